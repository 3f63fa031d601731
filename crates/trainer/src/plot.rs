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
