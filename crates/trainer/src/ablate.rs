//! Ablation grids: a base run config, named variants (each a list of `--set` overrides) and
//! seeds. Every (variant, seed) trains under `out_dir/VARIANT/seed-S`; a finished run (its
//! `summary.json` exists) is skipped, an interrupted one resumes from its last checkpoint.
//! Their results are written by the `report` module.
//!
//! `[[prepare]]` runs are trained once, before the grid, under `out_dir/_prepare/NAME`; an
//! override may name their output as `{prepare.NAME}`: the final checkpoint directory, or the
//! exported tower file with `export`, or the run directory of a run with only stage-0 stages
//! (its towers are `{prepare.NAME}/STAGE/final`). This is how a grid starts many transfers from
//! one pretraining (few-shot transfer), from a pretrained decoder without the new tokens
//! (new-token init), or every run from the same stage-0 towers (the image-side grids).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{io, Error, Result};
use crate::events::{Event, Observer};
use crate::train::{train, TrainOptions};

/// An ablation file.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AblationConfig {
    pub ablation: AblationSection,
    #[serde(rename = "prepare", default)]
    pub prepares: Vec<Prepare>,
    #[serde(rename = "variant")]
    pub variants: Vec<Variant>,
    /// Smoke test (`pali ablate --smoke`): one seed, 2 steps per stage, tiny evaluations.
    #[serde(skip)]
    pub smoke: bool,
}

/// Shrinks a run to a smoke test: every stage 2 steps, evaluations of 2 examples at the end.
fn shrink(c: &mut RunConfig) {
    for s in &mut c.stages {
        s.steps = 2;
        s.checkpoint_every = 2;
        s.log_every = 1;
        s.eval.every = 0;
        s.eval.examples = s.eval.examples.min(2);
        for g in &mut s.groups {
            g.warmup_steps = g.warmup_steps.min(1);
            g.cooldown_steps = 0;
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AblationSection {
    pub name: String,
    /// The base run config (relative to this file).
    pub base: PathBuf,
    /// Where the grid goes (relative to this file).
    pub out_dir: PathBuf,
    #[serde(default = "one_seed")]
    pub seeds: Vec<u64>,
    /// Metrics of the table: `final_loss`, `wall_seconds`, `tokens_per_s`, `exact_match`,
    /// `val_perplexity/TASK`, `eval/KEY` (keys of the last evaluation, see docs/eval.md), and
    /// `CURVE@start` for a tracked curve's first value, and `STAGE:KEY` for a stage's own final
    /// evaluation (e.g. `pretrain:val_perplexity/caption`).
    pub metrics: Vec<String>,
    /// What the paper found (shown above the table).
    #[serde(default)]
    pub paper: String,
    /// Overrides applied to every variant (before the variant's own).
    #[serde(default)]
    pub set: Vec<String>,
    /// Evaluation metrics plotted over training steps (`val_perplexity/TASK`, `eval/KEY`),
    /// from every evaluation in metrics.jsonl (set `eval.every` in the base).
    #[serde(default)]
    pub curves: Vec<String>,
}

/// A run trained once before the grid; its output is `{prepare.NAME}` in overrides.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Prepare {
    pub name: String,
    /// Its run config (relative to the ablation file; default: the ablation's base).
    #[serde(default)]
    pub base: Option<PathBuf>,
    #[serde(default)]
    pub set: Vec<String>,
    /// Export one tower of the final checkpoint; `{prepare.NAME}` is then that file.
    #[serde(default)]
    pub export: Option<Export>,
}

/// `pali model export` of a preparatory run's final checkpoint.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// `gemma` (the decoder) or `siglip` (the image encoder).
    pub tower: String,
    /// Keep only the first N embedding rows (a decoder without `<loc>`/`<seg>` rows).
    #[serde(default)]
    pub vocab: Option<usize>,
}

/// A preparatory run, resolved.
#[derive(Debug, Clone)]
pub struct PrepareSpec {
    pub name: String,
    pub dir: PathBuf,
    pub config: RunConfig,
    /// What `{prepare.NAME}` stands for.
    pub target: PathBuf,
    pub export: Option<Export>,
}

impl PrepareSpec {
    pub fn done(&self) -> bool {
        finished(&self.dir) && self.target.exists()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// Overrides, as `pali train --set`.
    #[serde(default)]
    pub set: Vec<String>,
    /// The paper's number or finding for this variant (free text, shown in the table).
    #[serde(default)]
    pub paper: String,
}

fn one_seed() -> Vec<u64> {
    vec![0]
}

/// One (variant, seed) of the grid.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub variant: String,
    pub seed: u64,
    pub dir: PathBuf,
    pub config: RunConfig,
}

impl AblationConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let mut a: AblationConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        // Absolute paths: run directories are passed to the base config as overrides, which
        // it would otherwise resolve against its own directory.
        let abs = std::path::absolute(path).map_err(io(path))?;
        let base = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        for p in [&mut a.ablation.base, &mut a.ablation.out_dir]
            .into_iter()
            .chain(a.prepares.iter_mut().filter_map(|p| p.base.as_mut()))
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        // Names become directory names and `{prepare.NAME}` keys: unique, no slash or brace.
        let unique = |kind: &str, names: Vec<&String>| -> Result<()> {
            let mut seen = std::collections::HashSet::new();
            match names
                .into_iter()
                .find(|n| !seen.insert(*n) || n.is_empty() || n.contains(['/', '\\', '}']))
            {
                Some(n) => Err(Error::Config(format!(
                    "{}: {kind} name `{n}` is empty, repeated or has a slash or brace",
                    path.display()
                ))),
                None => Ok(()),
            }
        };
        unique("prepare", a.prepares.iter().map(|p| &p.name).collect())?;
        unique("variant", a.variants.iter().map(|v| &v.name).collect())?;
        for p in &a.prepares {
            if let Some(e) = &p.export {
                pali_model::checkpoint::tower_by_name(&e.tower).map_err(|m| {
                    Error::Config(format!(
                        "{}: prepare `{}`: export: {m}",
                        path.display(),
                        p.name
                    ))
                })?;
            }
        }
        if a.variants.is_empty() || a.ablation.seeds.is_empty() {
            return Err(Error::Config(format!(
                "{}: no [[variant]] or no seeds",
                path.display()
            )));
        }
        Ok(a)
    }

    /// The preparatory runs, resolved (their overrides checked).
    pub fn prepare_plan(&self) -> Result<Vec<PrepareSpec>> {
        self.prepares
            .iter()
            .map(|p| {
                let dir = self.ablation.out_dir.join("_prepare").join(&p.name);
                let mut sets = p.set.clone();
                sets.push(format!("run.out_dir=\"{}\"", dir.display()));
                let base = p.base.as_ref().unwrap_or(&self.ablation.base);
                let mut config = RunConfig::load(base, &sets)
                    .map_err(|e| Error::Config(format!("prepare `{}`: {e}", p.name)))?;
                if self.smoke {
                    shrink(&mut config);
                }
                let vlm = config.stages.iter().any(|s| s.kind.is_vlm());
                let target = match &p.export {
                    Some(_) if !vlm => {
                        return Err(Error::Config(format!(
                            "prepare `{}`: `export` needs a PaliGemma stage; a stage-0 run's \
                             towers are `{{prepare.{}}}/STAGE/final`",
                            p.name, p.name
                        )))
                    }
                    Some(e) => dir.join(format!("{}.safetensors", e.tower)),
                    // Stage 0 only: the run directory, whose `STAGE/final/` hold the towers.
                    None if !vlm => dir.clone(),
                    None => {
                        // Stage-0 steps are not part of the PaliGemma step count.
                        let steps: u64 = config.run.start_step
                            + config
                                .stages
                                .iter()
                                .filter(|s| s.kind.is_vlm())
                                .map(|s| s.steps)
                                .sum::<u64>();
                        dir.join("checkpoints").join(format!("step-{steps:08}"))
                    }
                };
                Ok(PrepareSpec {
                    name: p.name.clone(),
                    dir,
                    config,
                    target,
                    export: p.export.clone(),
                })
            })
            .collect()
    }

    /// Every run of the grid with its resolved config (overrides applied; checked as well
    /// once the preparatory runs exist).
    pub fn plan(&self, only: Option<&str>) -> Result<Vec<RunSpec>> {
        let prepares = self.prepare_plan()?;
        let ready = prepares.iter().all(|p| p.done());
        let mut out = Vec::new();
        for v in &self.variants {
            if only.is_some_and(|o| o != v.name) {
                continue;
            }
            let seeds = if self.smoke {
                &self.ablation.seeds[..1]
            } else {
                &self.ablation.seeds[..]
            };
            for &seed in seeds {
                let dir = self
                    .ablation
                    .out_dir
                    .join(&v.name)
                    .join(format!("seed-{seed}"));
                let mut sets = Vec::new();
                for s in self.ablation.set.iter().chain(&v.set) {
                    sets.push(
                        substitute(s, &prepares)
                            .map_err(|m| Error::Config(format!("variant `{}`: {m}", v.name)))?,
                    );
                }
                sets.push(format!("run.seed={seed}"));
                sets.push(format!("run.out_dir=\"{}\"", dir.display()));
                let mut config = if ready {
                    RunConfig::load(&self.ablation.base, &sets)
                } else {
                    RunConfig::parse(&self.ablation.base, &sets)
                }
                .map_err(|e| Error::Config(format!("variant `{}` seed {seed}: {e}", v.name)))?;
                if self.smoke {
                    shrink(&mut config);
                }
                out.push(RunSpec {
                    variant: v.name.clone(),
                    seed,
                    dir,
                    config,
                });
            }
        }
        if out.is_empty() {
            return Err(Error::Config(format!(
                "no variant named `{}`",
                only.unwrap_or_default()
            )));
        }
        Ok(out)
    }
}

/// Replaces `{prepare.NAME}` by what that preparatory run provides.
fn substitute(s: &str, prepares: &[PrepareSpec]) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("{prepare.") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "{prepare.".len()..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{s}`: unclosed `{{prepare.`"))?;
        let name = &after[..end];
        let p = prepares
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("`{s}`: no [[prepare]] named `{name}`"))?;
        out.push_str(&p.target.display().to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a run finished (the trainer writes `summary.json` last).
pub fn finished(dir: &Path) -> bool {
    dir.join("summary.json").is_file()
}

/// A run directory that already holds a run must hold this config: results of an edited
/// variant are not reused, nor is an interrupted run resumed under other settings.
pub fn check_same_config(dir: &Path, config: &RunConfig) -> Result<()> {
    let Some(mut stored) = crate::rundir::stored_config(dir)? else {
        return Ok(());
    };
    // A run may resume on another device.
    stored.run.device = config.run.device.clone();
    if &stored == config {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{} holds a run made with another config ({}); delete that directory to redo it",
        dir.display(),
        crate::rundir::first_difference(&stored, config)
    )))
}

/// Whether a run directory holds a checkpoint to resume from.
fn resumable(dir: &Path) -> bool {
    !crate::ckpt::checkpoints(dir).is_empty()
}

/// Trains one run of the grid to its end. Its directory holds this config's run or nothing
/// ([`check_same_config`] ran first), so it is always resumed.
fn train_run<B: Backend>(
    config: &RunConfig,
    devices: &[B::Device],
    observer: &dyn Observer,
) -> Result<()> {
    let opts = TrainOptions {
        existing: crate::rundir::Existing::Resume,
        max_steps: None,
        observer,
    };
    train::<B>(config, devices, &opts).map(|_| ())
}

/// Trains the preparatory runs that are not done yet (resuming interrupted ones) and exports
/// their towers.
pub fn run_prepares<B: Backend>(
    a: &AblationConfig,
    devices: &[B::Device],
    obs: &dyn Observer,
) -> Result<()> {
    for p in a.prepare_plan()? {
        check_same_config(&p.dir, &p.config)?;
        if p.done() {
            obs.on(Event::Info(&format!("prepare `{}`: done, skipped", p.name)));
            continue;
        }
        if !finished(&p.dir) {
            let resume = resumable(&p.dir);
            let resuming = if resume { " (resuming)" } else { "" };
            obs.on(Event::Info(&format!("prepare `{}`{resuming}", p.name)));
            train_run::<B>(&p.config, devices, obs)?;
        }
        if let Some(e) = &p.export {
            let last = crate::ckpt::checkpoints(&p.dir).pop().ok_or_else(|| {
                Error::Train(format!(
                    "prepare `{}`: no checkpoint in {}",
                    p.name,
                    p.dir.display()
                ))
            })?;
            let tower = pali_model::checkpoint::tower_by_name(&e.tower)?;
            pali_model::checkpoint::export_tower(
                &last,
                tower,
                e.vocab,
                pali_model::checkpoint::SaveDtype::F32,
                &p.target,
            )?;
            let line = format!("prepare `{}`: exported {}", p.name, p.target.display());
            obs.on(Event::Info(&line));
        }
    }
    Ok(())
}

/// Runs the grid (or variant `only`): first the preparatory runs, then every (variant, seed),
/// skipping finished ones and resuming interrupted ones. `report::write` then writes
/// the results of every finished run of the whole grid.
pub fn run_grid<B: Backend>(
    a: &AblationConfig,
    only: Option<&str>,
    devices: &[B::Device],
    obs: &dyn Observer,
) -> Result<()> {
    run_prepares::<B>(a, devices, obs)?;
    let runs = a.plan(only)?;
    for r in &runs {
        check_same_config(&r.dir, &r.config)?;
    }
    let started = Instant::now();
    let todo = runs.iter().filter(|r| !finished(&r.dir)).count();
    let mut done_now = 0usize;
    for (i, r) in runs.iter().enumerate() {
        if finished(&r.dir) {
            let line = format!(
                "[{}/{}] {} seed {}: finished, skipped",
                i + 1,
                runs.len(),
                r.variant,
                r.seed
            );
            obs.on(Event::Info(&line));
            continue;
        }
        let resume = resumable(&r.dir);
        let eta = if done_now > 0 {
            let per = started.elapsed().as_secs_f64() / done_now as f64;
            format!(
                ", grid ETA {:.1} min",
                per * (todo - done_now) as f64 / 60.0
            )
        } else {
            String::new()
        };
        let line = format!(
            "[{}/{}] {} seed {}{}{eta}",
            i + 1,
            runs.len(),
            r.variant,
            r.seed,
            if resume { " (resuming)" } else { "" }
        );
        obs.on(Event::Info(&line));
        train_run::<B>(&r.config, devices, obs)?;
        done_now += 1;
    }
    Ok(())
}
