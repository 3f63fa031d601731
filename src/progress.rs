//! The terminal side of training: the trainer's events as progress bars and lines on stderr.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use pali_trainer::events::{Event, Observer};

/// Prints the trainer's events; `bars = false` keeps the lines and drops the progress bars.
pub struct Console {
    bars: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Console {
    pub fn new(bars: bool) -> Self {
        Self {
            bars,
            bar: Mutex::new(None),
        }
    }

    /// A line on stderr that does not tear the progress bar.
    fn line(&self, text: &str) {
        match self.bar.lock().expect("bar").as_ref() {
            Some(b) if !b.is_hidden() => b.suspend(|| eprintln!("{text}")),
            _ => eprintln!("{text}"),
        }
    }
}

impl Observer for Console {
    fn on(&self, event: Event<'_>) {
        match event {
            Event::Info(text) => self.line(text),
            Event::Begin {
                name,
                steps,
                start,
                details,
            } => {
                for l in details {
                    self.line(l);
                }
                let bar = if self.bars {
                    ProgressBar::new(steps)
                } else {
                    ProgressBar::hidden()
                };
                bar.set_style(
                    ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                        .expect("template")
                        .progress_chars("=> "),
                );
                bar.set_prefix(name.to_string());
                bar.set_position(start);
                *self.bar.lock().expect("bar") = Some(bar);
            }
            Event::Step { done, log } => {
                if let Some(bar) = self.bar.lock().expect("bar").as_ref() {
                    if let Some(l) = log {
                        bar.set_message(match l.extra {
                            Some((name, v)) => format!("loss {:.4} {name} {v:.4}", l.loss),
                            None => format!(
                                "loss {:.4} lr {:.2e} {:.0} tok/s",
                                l.loss, l.lr, l.tokens_per_s
                            ),
                        });
                    }
                    bar.set_position(done);
                }
            }
            Event::End => {
                if let Some(bar) = self.bar.lock().expect("bar").take() {
                    bar.finish();
                }
            }
            Event::Eval {
                eval, end_of_stage, ..
            } => {
                if end_of_stage {
                    for (p, want, got) in &eval.shown {
                        self.line(&format!("  eval `{p}` → `{got}` (want `{want}`)"));
                    }
                }
                let ppl: serde_json::Map<String, serde_json::Value> = eval
                    .perplexity
                    .iter()
                    .map(|(k, v)| (k.clone(), (*v).into()))
                    .collect();
                self.line(&format!(
                    "  eval ({:?}) {} | exact match {:.1}% (most frequent answer: {:.1}%) | val \
                     perplexity {}",
                    eval.task,
                    eval.metrics,
                    eval.accuracy * 100.0,
                    eval.majority_baseline * 100.0,
                    serde_json::Value::Object(ppl)
                ));
            }
            Event::StageDone(s) => self.line(&format!(
                "stage `{}` done: loss {:.4} → {:.4} in {:.1} s{}",
                s.name,
                s.first_loss,
                s.last_loss,
                s.seconds,
                s.eval_accuracy
                    .map(|a| format!(", eval exact match {:.1}%", a * 100.0))
                    .unwrap_or_default()
            )),
        }
    }
}

/// The lines a finished stage adds below the run's table: stage 0's retrieval recall or
/// perplexity, and a VQA evaluation by question type beside its baselines (most frequent
/// answer; the blind control with grey images, when it ran).
pub fn stage_details(s: &pali_trainer::train::StageSummary) -> Vec<String> {
    let Some(m) = &s.eval_metrics else {
        return Vec::new();
    };
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or_else(|| "-".into(), |x| format!("{:.1}%", x * 100.0))
    };
    let mut out = Vec::new();
    if m.get("image_to_text_recall@1").is_some() {
        out.push(format!(
            "{}: recall@1 image→text {}, text→image {} among {} pairs (chance {})",
            s.name,
            pct(&m["image_to_text_recall@1"]),
            pct(&m["text_to_image_recall@1"]),
            m["candidates"],
            pct(&m["chance_recall@1"]),
        ));
    }
    if let Some(p) = m.get("perplexity").and_then(|p| p.as_f64()) {
        out.push(format!("{}: validation perplexity {p:.2}", s.name));
    }
    if let Some(types) = m.get("by_question_type").and_then(|t| t.as_object()) {
        let blind = m.get("blind");
        out.push(format!(
            "{}: {:<12} {:>8} {:>12} {:>14} {:>14}",
            s.name, "question", "examples", "exact match", "most frequent", "blind (grey)"
        ));
        for (k, v) in types {
            let b = blind.map_or(serde_json::Value::Null, |b| {
                b["by_question_type"][k]["exact_match"].clone()
            });
            out.push(format!(
                "{}: {:<12} {:>8} {:>12} {:>14} {:>14}",
                s.name,
                k,
                v["examples"],
                pct(&v["exact_match"]),
                pct(&v["majority_baseline"]),
                pct(&b),
            ));
        }
        if let Some(b) = blind {
            out.push(format!(
                "{}: all questions: exact match {}, blind (grey images) {}",
                s.name,
                pct(&serde_json::json!(s.eval_accuracy)),
                pct(&b["exact_match"])
            ));
        }
    }
    out
}
