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
