//! The results of an ablation grid: what each finished run measured (`summary.json`,
//! `metrics.jsonl`), a table of mean ± std per variant and metric (`results.json`,
//! `results.md`, the paper's finding beside it) and SVG plots (a bar chart per metric, loss
//! curves per variant, curves of tracked evaluation metrics over training).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::ablate::{finished, AblationConfig, RunSpec};
use crate::error::{io, Error, Result};

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
    // Nested metrics join their keys with `/`: `eval/blind/exact_match`,
    // `eval/by_question_type/what color/exact_match`.
    fn flatten(key: String, v: &Value, m: &mut BTreeMap<String, f64>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    flatten(format!("{key}/{k}"), x, m);
                }
            }
            _ => {
                if let Some(x) = v.as_f64() {
                    m.insert(key, x);
                }
            }
        }
    }
    let evaluation = |s: &Value, prefix: &str, m: &mut BTreeMap<String, f64>| {
        for (k, v) in s["eval_metrics"].as_object().into_iter().flatten() {
            flatten(format!("{prefix}eval/{k}"), v, m);
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

/// Reads every finished run of the grid and writes `results.json`, `results.md` and the plots
/// into the grid's directory.
pub fn write(a: &AblationConfig) -> Result<Vec<RunResult>> {
    let results = a
        .plan(None)?
        .iter()
        .filter(|r| finished(&r.dir))
        .map(|r| collect(r, &a.ablation.curves))
        .collect::<Result<Vec<_>>>()?;
    write_results(a, &results)?;
    Ok(results)
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
        bars(m, &t, &dir.join(&file))?;
        plots.push(file);
    }
    loss_curves(&a.ablation.name, results, &dir.join("loss.svg"))?;
    for c in &a.ablation.curves {
        let file = format!("curve-{}.svg", file_safe(c));
        metric_curves(&a.ablation.name, c, results, &dir.join(&file))?;
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

/// One bar per variant (mean over seeds) with ±std error bars.
pub fn bars(metric: &str, t: &Table, out: &Path) -> Result<()> {
    let rows: Vec<(&String, f64, f64)> = t
        .iter()
        .filter_map(|(v, per)| per.get(metric).map(|(m, s, _)| (v, *m, *s)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(out, (120 + 110 * rows.len() as u32, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let hi = rows.iter().map(|r| r.1 + r.2).fold(0.0, f64::max);
        let lo = rows.iter().map(|r| r.1 - r.2).fold(0.0, f64::min);
        let pad = (hi - lo).abs().max(1e-9) * 0.1;
        let n = rows.len();
        let mut c = ChartBuilder::on(&root)
            .caption(metric, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n as f64, (lo - pad).min(0.0)..hi + pad)?;
        // Bar i spans [i + 0.15, i + 0.85]; its name sits at i + 0.5.
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * n + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                let centred = (x - x.floor() - 0.5).abs() < 1e-6;
                if centred {
                    rows.get(i).map(|r| r.0.clone()).unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()?;
        for (i, (_, m, s)) in rows.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let x = i as f64;
            c.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *m)],
                color.filled(),
            )))?;
            c.draw_series(std::iter::once(PathElement::new(
                vec![(x + 0.5, m - s), (x + 0.5, m + s)],
                BLACK.stroke_width(2),
            )))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Train(format!("plotting {}: {e}", out.display())))
}

/// Runs' (step, value) curves: one line per run, one colour and legend entry per variant.
type Series<'a> = Vec<(&'a String, &'a [(f64, f64)])>;

/// Draws `series` into a chart whose y axis is `Y` (linear or log), with point markers if
/// `markers`, and the legend.
fn draw_runs<'a, Y>(
    c: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    series: &Series,
    markers: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    Y: Ranged<ValueType = f64>,
{
    let mut variants: Vec<&String> = series.iter().map(|(v, _)| *v).collect();
    variants.dedup();
    for (i, v) in variants.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        for (k, (_, pts)) in series.iter().filter(|(w, _)| w == v).enumerate() {
            if markers {
                c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            let s = c.draw_series(LineSeries::new(pts.iter().copied(), color))?;
            if k == 0 {
                s.label(v.to_string())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Training loss over global steps, one line per run, coloured by variant.
pub fn loss_curves(name: &str, runs: &[RunResult], out: &Path) -> Result<()> {
    let series: Series = runs
        .iter()
        .map(|r| (&r.variant, r.loss_curve.as_slice()))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let pts = series.iter().flat_map(|(_, c)| c.iter());
    let (xmax, ymax) = pts.fold((1.0f64, 0.0f64), |a, p| (a.0.max(p.0), a.1.max(p.1)));
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(out, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(format!("{name}: training loss"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax * 1.05 + 1e-9)?;
        c.configure_mesh().x_desc("step").y_desc("loss").draw()?;
        draw_runs(&mut c, &series, false)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Train(format!("plotting {}: {e}", out.display())))
}

/// A tracked evaluation metric over global steps (log scale), one line per run, coloured by
/// variant.
pub fn metric_curves(name: &str, metric: &str, runs: &[RunResult], out: &Path) -> Result<()> {
    let series: Series = runs
        .iter()
        .filter_map(|r| r.curves.get(metric).map(|c| (&r.variant, c.as_slice())))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let pts = series.iter().flat_map(|(_, c)| c.iter());
    let (xmax, ymin, ymax) = pts.fold((1.0f64, f64::INFINITY, 0.0f64), |a, p| {
        (a.0.max(p.0), a.1.min(p.1), a.2.max(p.1))
    });
    let ymin = (ymin * 0.9).max(1e-6);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(out, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(format!("{name}: {metric}"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax, (ymin..ymax * 1.1 + 1e-9).log_scale())?;
        c.configure_mesh()
            .x_desc("step")
            .y_desc(format!("{metric} (log)"))
            .draw()?;
        draw_runs(&mut c, &series, true)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Train(format!("plotting {}: {e}", out.display())))
}
