//! Loss and learning-rate curves of a stage, drawn from metrics.jsonl into an SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Reads `metrics.jsonl` and writes `out` with the stage's loss and per-group lr over steps.
pub fn stage_curves(metrics: &Path, stage: &str, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .map_err(|e| Error::Train(format!("{}: {e}", metrics.display())))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["stage"] == stage && v.get("loss").is_some())
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let loss: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r["loss"].as_f64()?)))
        .collect();
    let groups: Vec<String> = rows[0]["lr"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(out, (900, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(330);
        let (x0, x1) = (
            loss.first().unwrap().0,
            loss.last().unwrap().0.max(loss.first().unwrap().0 + 1.0),
        );
        let ymax = loss.iter().map(|p| p.1).fold(0.0, f64::max) * 1.05;
        let mut c = ChartBuilder::on(&top)
            .caption(format!("{stage}: training loss"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, 0.0..ymax.max(1e-6))?;
        c.configure_mesh().x_desc("step").y_desc("loss").draw()?;
        c.draw_series(LineSeries::new(loss.iter().copied(), &BLUE))?;
        let lrmax = rows
            .iter()
            .flat_map(|r| groups.iter().filter_map(move |g| r["lr"][g].as_f64()))
            .fold(0.0, f64::max)
            * 1.05;
        let mut c = ChartBuilder::on(&bottom)
            .caption("learning rate per group", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0.0..lrmax.max(1e-12))?;
        c.configure_mesh().x_desc("step").y_desc("lr").draw()?;
        for (i, g) in groups.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r["lr"][g].as_f64()?)))
                .collect();
            c.draw_series(LineSeries::new(pts, color))?
                .label(g.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Train(format!("plotting {}: {e}", out.display())))
}

/// One bar per variant (mean over seeds) with ±std error bars.
pub fn bars(metric: &str, t: &crate::ablate::Table, out: &Path) -> Result<()> {
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
pub fn loss_curves(name: &str, runs: &[crate::ablate::RunResult], out: &Path) -> Result<()> {
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
pub fn metric_curves(
    name: &str,
    metric: &str,
    runs: &[crate::ablate::RunResult],
    out: &Path,
) -> Result<()> {
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
