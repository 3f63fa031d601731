//! Ablation grids: a base run config, named variants (each a list of `--set` overrides) and
//! seeds. Every (variant, seed) trains under `out_dir/VARIANT/seed-S`; a finished run (its
//! `summary.json` exists) is skipped, an interrupted one resumes from its last checkpoint.
//! Results: `results.json`, `results.md` (mean ± std per variant and metric, best in bold, the
//! paper's finding beside it) and SVG plots (a bar chart per metric, loss curves per variant).

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
    #[serde(rename = "variant")]
    pub variants: Vec<Variant>,
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
    /// `val_perplexity/TASK`, `eval/KEY` (keys of the last evaluation, see docs/eval.md).
    pub metrics: Vec<String>,
    /// What the paper found (shown above the table).
    #[serde(default)]
    pub paper: String,
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
        for p in [&mut a.ablation.base, &mut a.ablation.out_dir] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let mut names = std::collections::HashSet::new();
        for v in &a.variants {
            if !names.insert(&v.name) || v.name.is_empty() || v.name.contains(['/', '\\']) {
                return Err(Error::Config(format!(
                    "{}: variant name `{}` is empty, repeated or contains a slash",
                    path.display(),
                    v.name
                )));
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

    /// Every run of the grid with its resolved config (overrides applied and checked).
    pub fn plan(&self, only: Option<&str>) -> Result<Vec<RunSpec>> {
        let mut out = Vec::new();
        for v in &self.variants {
            if only.is_some_and(|o| o != v.name) {
                continue;
            }
            for &seed in &self.ablation.seeds {
                let dir = self
                    .ablation
                    .out_dir
                    .join(&v.name)
                    .join(format!("seed-{seed}"));
                let mut sets = v.set.clone();
                sets.push(format!("run.seed={seed}"));
                sets.push(format!("run.out_dir=\"{}\"", dir.display()));
                let config = RunConfig::load(&self.ablation.base, &sets)
                    .map_err(|e| Error::Config(format!("variant `{}` seed {seed}: {e}", v.name)))?;
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

/// Whether a run finished (the trainer writes `summary.json` last).
pub fn finished(dir: &Path) -> bool {
    dir.join("summary.json").is_file()
}

/// Runs `runs` (skipping finished ones, resuming interrupted ones), then writes the results of
/// every finished run of the whole grid.
pub fn run_grid<B: Backend>(
    a: &AblationConfig,
    runs: &[RunSpec],
    device: &B::Device,
    progress: bool,
) -> Result<Vec<RunResult>> {
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
        let resume = !crate::ckpt::checkpoints(&r.dir).is_empty();
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
        let opts = TrainOptions {
            resume,
            progress,
            max_steps: None,
        };
        train::<B>(&r.config, device, &opts)?;
        done_now += 1;
    }
    let results = a
        .plan(None)?
        .iter()
        .filter(|r| finished(&r.dir))
        .map(collect)
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
}

/// Reads a finished run's `summary.json` and `metrics.jsonl`.
pub fn collect(r: &RunSpec) -> Result<RunResult> {
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
    // The last evaluation of the run: task metrics, exact match, perplexity per task.
    if let Some(s) = stages.iter().rev().find(|s| !s["eval_metrics"].is_null()) {
        if let Some(o) = s["eval_metrics"].as_object() {
            for (k, v) in o {
                if let Some(x) = v.as_f64() {
                    m.insert(format!("eval/{k}"), x);
                }
            }
        }
        if let Some(x) = s["eval_accuracy"].as_f64() {
            m.insert("exact_match".into(), x);
        }
        if let Some(p) = s["val_perplexity"].as_array() {
            for kv in p {
                if let (Some(k), Some(v)) = (kv[0].as_str(), kv[1].as_f64()) {
                    m.insert(format!("val_perplexity/{k}"), v);
                }
            }
        }
    }
    let mut curve = Vec::new();
    let mut tps = Vec::new();
    for line in read(r.dir.join("metrics.jsonl"))?.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(s), Some(l)) = (v["step"].as_f64(), v["loss"].as_f64()) {
            curve.push((s, l));
        }
        if let Some(t) = v["tokens_per_s"].as_f64() {
            tps.push(t);
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
        let file = format!("bar-{}.svg", m.replace('/', "_"));
        crate::plot::bars(m, &t, &dir.join(&file))?;
        plots.push(file);
    }
    crate::plot::loss_curves(&a.ablation.name, results, &dir.join("loss.svg"))?;
    md.push_str("\nPlots: `loss.svg`");
    for f in &plots {
        md.push_str(&format!(", `{f}`"));
    }
    md.push('\n');
    let p = dir.join("results.md");
    std::fs::write(&p, md).map_err(io(&p))?;
    Ok(())
}
