//! Ablation grids: a base run config, named variants (each a list of `--set` overrides) and
//! seeds. Every (variant, seed) trains under `out_dir/VARIANT/seed-S`; a finished run (its
//! `summary.json` exists) is skipped, an interrupted one resumes from its last checkpoint.
//! Results: `results.json`, `results.md` (mean ± std per variant and metric, best in bold, the
//! paper's finding beside it) and SVG plots (a bar chart per metric, loss curves per variant,
//! and curves of tracked evaluation metrics over training).
//!
//! `[[prepare]]` runs are trained once, before the grid, under `out_dir/_prepare/NAME`; an
//! override may name their output as `{prepare.NAME}`: the final checkpoint directory, or the
//! exported tower file with `export`. This is how a grid starts many transfers from one
//! pretraining (few-shot transfer) or from a pretrained decoder without the new tokens
//! (new-token init).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::RunConfig;
use crate::error::{io, Error, Result};
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
        s.eval_every = 0;
        s.eval_examples = s.eval_examples.min(2);
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
    /// from every evaluation in metrics.jsonl (set `eval_every` in the base).
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
                let target = match &p.export {
                    Some(e) => dir.join(format!("{}.safetensors", e.tower)),
                    None => {
                        let steps: u64 = config.run.start_step
                            + config.stages.iter().map(|s| s.steps).sum::<u64>();
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
    let p = dir.join("config.resolved.toml");
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(());
    };
    let mut stored: RunConfig =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
    // A run may resume on another device.
    stored.run.device = config.run.device.clone();
    if &stored == config {
        return Ok(());
    }
    let (a, b) = (
        toml::to_string_pretty(&stored).expect("toml"),
        toml::to_string_pretty(config).expect("toml"),
    );
    let diff = a
        .lines()
        .zip(b.lines())
        .find(|(x, y)| x != y)
        .map(|(x, y)| format!("`{x}` there, `{y}` now"))
        .unwrap_or_else(|| "a different number of keys".into());
    Err(Error::Config(format!(
        "{} holds a run made with another config ({diff}); delete that directory to redo it",
        dir.display()
    )))
}

/// Whether a run directory holds a checkpoint to resume from.
fn resumable(dir: &Path) -> bool {
    !crate::ckpt::checkpoints(dir).is_empty()
}

/// Trains one run of the grid to its end.
fn train_run<B: Backend>(
    config: &RunConfig,
    resume: bool,
    devices: &[B::Device],
    progress: bool,
) -> Result<()> {
    let opts = TrainOptions {
        resume,
        progress,
        max_steps: None,
    };
    train::<B>(config, devices, &opts).map(|_| ())
}

/// Trains the preparatory runs that are not done yet (resuming interrupted ones) and exports
/// their towers.
pub fn run_prepares<B: Backend>(
    a: &AblationConfig,
    devices: &[B::Device],
    progress: bool,
) -> Result<()> {
    for p in a.prepare_plan()? {
        check_same_config(&p.dir, &p.config)?;
        if p.done() {
            eprintln!("prepare `{}`: done, skipped", p.name);
            continue;
        }
        if !finished(&p.dir) {
            let resume = resumable(&p.dir);
            eprintln!(
                "prepare `{}`{}",
                p.name,
                if resume { " (resuming)" } else { "" }
            );
            train_run::<B>(&p.config, resume, devices, progress)?;
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
            pali_model::checkpoint::export_tower(&last, tower, e.vocab, &p.target)?;
            eprintln!("prepare `{}`: exported {}", p.name, p.target.display());
        }
    }
    Ok(())
}

/// Runs the grid (or variant `only`): first the preparatory runs, then every (variant, seed),
/// skipping finished ones and resuming interrupted ones; then writes the results of every
/// finished run of the whole grid.
pub fn run_grid<B: Backend>(
    a: &AblationConfig,
    only: Option<&str>,
    devices: &[B::Device],
    progress: bool,
) -> Result<Vec<RunResult>> {
    run_prepares::<B>(a, devices, progress)?;
    let runs = a.plan(only)?;
    for r in &runs {
        check_same_config(&r.dir, &r.config)?;
    }
    let started = Instant::now();
    let todo = runs.iter().filter(|r| !finished(&r.dir)).count();
    let mut done_now = 0usize;
    for (i, r) in runs.iter().enumerate() {
        if finished(&r.dir) {
            eprintln!(
                "[{}/{}] {} seed {}: finished, skipped",
                i + 1,
                runs.len(),
                r.variant,
                r.seed
            );
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
        eprintln!(
            "[{}/{}] {} seed {}{}{eta}",
            i + 1,
            runs.len(),
            r.variant,
            r.seed,
            if resume { " (resuming)" } else { "" }
        );
        train_run::<B>(&r.config, resume, devices, progress)?;
        done_now += 1;
    }
    let results = a
        .plan(None)?
        .iter()
        .filter(|r| finished(&r.dir))
        .map(|r| collect(r, &a.ablation.curves))
        .collect::<Result<Vec<_>>>()?;
    write_results(a, &results)?;
    Ok(results)
}

/// What one finished run measured.
#[derive(Serialize, Debug, Clone)]
pub struct RunResult {
    pub variant: String,
    pub seed: u64,
    pub metrics: BTreeMap<String, f64>,
    /// (global step, loss) of every logged step.
    pub loss_curve: Vec<(f64, f64)>,
    /// (global step, value) of every evaluation, per tracked metric (`curves`).
    pub curves: BTreeMap<String, Vec<(f64, f64)>>,
}

/// Reads a finished run's `summary.json` and `metrics.jsonl`; `curves` are the evaluation
/// metrics to follow over training.
pub fn collect(r: &RunSpec, curves: &[String]) -> Result<RunResult> {
    let read = |p: PathBuf| -> Result<String> { std::fs::read_to_string(&p).map_err(io(&p)) };
    let summary: Value = serde_json::from_str(&read(r.dir.join("summary.json"))?)
        .map_err(|e| Error::Train(format!("{}: {e}", r.dir.display())))?;
    let stages = summary.as_array().cloned().unwrap_or_default();
    let mut m = BTreeMap::new();
    if let Some(last) = stages.last() {
        if let Some(l) = last["last_loss"].as_f64() {
            m.insert("final_loss".into(), l);
        }
    }
    m.insert(
        "wall_seconds".into(),
        stages.iter().filter_map(|s| s["seconds"].as_f64()).sum(),
    );
    // A stage summary's evaluation as `{prefix}eval/KEY` and `{prefix}val_perplexity/TASK`.
    let evaluation = |s: &Value, prefix: &str, m: &mut BTreeMap<String, f64>| {
        for (k, v) in s["eval_metrics"].as_object().into_iter().flatten() {
            if let Some(x) = v.as_f64() {
                m.insert(format!("{prefix}eval/{k}"), x);
            }
        }
        for kv in s["val_perplexity"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (kv[0].as_str(), kv[1].as_f64()) {
                m.insert(format!("{prefix}val_perplexity/{k}"), v);
            }
        }
    };
    // Each stage's final evaluation as `STAGE:KEY` (stage-1 perplexity per task, …).
    for s in &stages {
        evaluation(
            s,
            &format!("{}:", s["name"].as_str().unwrap_or("?")),
            &mut m,
        );
    }
    // The last evaluation of the run: task metrics, exact match, perplexity per task.
    if let Some(s) = stages.iter().rev().find(|s| !s["eval_metrics"].is_null()) {
        evaluation(s, "", &mut m);
        if let Some(x) = s["eval_accuracy"].as_f64() {
            m.insert("exact_match".into(), x);
        }
    }
    let mut curve = Vec::new();
    let mut tracked: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut tps = Vec::new();
    for line in read(r.dir.join("metrics.jsonl"))?.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        for c in curves {
            // `val_perplexity/vqa` → v["val_perplexity"]["vqa"], `eval/cider` → v["eval"]["cider"].
            let x = c
                .split_once('/')
                .and_then(|(a, b)| v.get(a).and_then(|o| o.get(b)))
                .and_then(|x| x.as_f64());
            if let (Some(s), Some(x)) = (v["step"].as_f64(), x) {
                tracked.entry(c.clone()).or_default().push((s, x));
            }
        }
        if let (Some(s), Some(l)) = (v["step"].as_f64(), v["loss"].as_f64()) {
            curve.push((s, l));
        }
        if let Some(t) = v["tokens_per_s"].as_f64() {
            tps.push(t);
        }
    }
    // Where each tracked curve starts (e.g. the step-0 perplexity of new-token init).
    for (c, pts) in &tracked {
        if let Some(&(_, x)) = pts.first() {
            m.insert(format!("{c}@start"), x);
        }
    }
    if !tps.is_empty() {
        m.insert(
            "tokens_per_s".into(),
            tps.iter().sum::<f64>() / tps.len() as f64,
        );
    }
    Ok(RunResult {
        variant: r.variant.clone(),
        seed: r.seed,
        metrics: m,
        loss_curve: curve,
        curves: tracked,
    })
}

/// Lower is better for losses, perplexities and times; higher for the rest.
fn lower_is_better(metric: &str) -> bool {
    metric.contains("loss") || metric.contains("perplexity") || metric.contains("seconds")
}

/// Mean and (sample) standard deviation; `None` without values.
fn mean_std(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    Some((m, s))
}

/// Per variant and metric: (mean, std, n).
pub type Table = BTreeMap<String, BTreeMap<String, (f64, f64, usize)>>;

pub fn table(a: &AblationConfig, results: &[RunResult]) -> Table {
    let mut t = Table::new();
    for v in &a.variants {
        let rows: Vec<&RunResult> = results.iter().filter(|r| r.variant == v.name).collect();
        if rows.is_empty() {
            continue;
        }
        let mut per = BTreeMap::new();
        for metric in &a.ablation.metrics {
            let vals: Vec<f64> = rows
                .iter()
                .filter_map(|r| r.metrics.get(metric).copied())
                .collect();
            if let Some((m, s)) = mean_std(&vals) {
                per.insert(metric.clone(), (m, s, vals.len()));
            }
        }
        t.insert(v.name.clone(), per);
    }
    t
}

/// The markdown table: variant × metric, mean ± std, best in bold, the paper column last.
pub fn markdown(a: &AblationConfig, t: &Table) -> String {
    let mut s = format!("## Ablation `{}`\n\n", a.ablation.name);
    if !a.ablation.paper.is_empty() {
        s.push_str(&format!("Paper: {}\n\n", a.ablation.paper));
    }
    let seeds = a.ablation.seeds.len();
    s.push_str(&format!(
        "Mean ± std over {seeds} seed{} ({}).\n\n",
        if seeds == 1 { "" } else { "s" },
        a.ablation
            .seeds
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s.push_str("| variant |");
    for m in &a.ablation.metrics {
        s.push_str(&format!(" {m} |"));
    }
    s.push_str(" paper |\n|---|");
    for _ in &a.ablation.metrics {
        s.push_str("---|");
    }
    s.push_str("---|\n");
    let best: BTreeMap<&String, f64> = a
        .ablation
        .metrics
        .iter()
        .filter_map(|m| {
            let vals = t.values().filter_map(|p| p.get(m).map(|x| x.0));
            let b = if lower_is_better(m) {
                vals.fold(f64::INFINITY, f64::min)
            } else {
                vals.fold(f64::NEG_INFINITY, f64::max)
            };
            b.is_finite().then_some((m, b))
        })
        .collect();
    for v in &a.variants {
        let Some(per) = t.get(&v.name) else { continue };
        s.push_str(&format!("| {} |", v.name));
        for m in &a.ablation.metrics {
            match per.get(m) {
                Some((mean, std, _)) => {
                    let cell = format!("{} ± {}", fmt(*mean), fmt(*std));
                    if t.len() > 1 && best.get(m) == Some(mean) {
                        s.push_str(&format!(" **{cell}** |"));
                    } else {
                        s.push_str(&format!(" {cell} |"));
                    }
                }
                None => s.push_str(" – |"),
            }
        }
        s.push_str(&format!(" {} |\n", v.paper));
    }
    s
}

fn fmt(x: f64) -> String {
    if x != 0.0 && (x.abs() >= 1e4 || x.abs() < 1e-3) {
        format!("{x:.3e}")
    } else if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

/// A metric name as part of a file name (`pretrain:val_perplexity/ocr` →
/// `pretrain_val_perplexity_ocr`), safe on every file system.
fn file_safe(metric: &str) -> String {
    metric
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_results(a: &AblationConfig, results: &[RunResult]) -> Result<()> {
    let dir = &a.ablation.out_dir;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let t = table(a, results);
    let json = serde_json::json!({"ablation": a.ablation.name, "runs": results, "table": t});
    let p = dir.join("results.json");
    std::fs::write(&p, serde_json::to_string_pretty(&json).expect("json")).map_err(io(&p))?;
    let mut md = markdown(a, &t);
    let mut plots = Vec::new();
    for m in &a.ablation.metrics {
        let file = format!("bar-{}.svg", file_safe(m));
        crate::plot::bars(m, &t, &dir.join(&file))?;
        plots.push(file);
    }
    crate::plot::loss_curves(&a.ablation.name, results, &dir.join("loss.svg"))?;
    for c in &a.ablation.curves {
        let file = format!("curve-{}.svg", file_safe(c));
        crate::plot::metric_curves(&a.ablation.name, c, results, &dir.join(&file))?;
        plots.push(file);
    }
    md.push_str("\nPlots: `loss.svg`");
    for f in &plots {
        md.push_str(&format!(", `{f}`"));
    }
    md.push('\n');
    let p = dir.join("results.md");
    std::fs::write(&p, md).map_err(io(&p))?;
    Ok(())
}
