//! What training reports while it runs. The library prints nothing: it sends these events to
//! the [`Observer`] the caller passes in (the CLI draws progress bars and prints lines; a test
//! or a notebook may collect them). Metrics also go to `metrics.jsonl` whatever the observer.

use pali_eval::Task;

/// One thing worth telling.
#[derive(Debug)]
pub enum Event<'a> {
    /// A line of information: where training starts from, a re-initialised part, a loaded
    /// tower, an ablation run starting or skipped.
    Info(&'a str),
    /// A loop of `steps` steps starts (a stage, or VQ-VAE training) at step `start`;
    /// `details` describes it (the stage's data mixture).
    Begin {
        name: &'a str,
        steps: u64,
        start: u64,
        details: &'a [String],
    },
    /// `done` steps of the current loop are done; on logging steps, what was logged.
    Step { done: u64, log: Option<&'a StepLog> },
    /// The current loop ended.
    End,
    /// An evaluation of stage `stage` at run step `step`; `end_of_stage` for the final one.
    Eval {
        stage: &'a str,
        step: u64,
        eval: &'a Eval,
        end_of_stage: bool,
    },
    /// A stage finished.
    StageDone(&'a StageSummary),
}

/// What a logging step reports (also written to `metrics.jsonl`).
#[derive(Debug, Clone, Default)]
pub struct StepLog {
    pub loss: f64,
    /// Learning rate of the first group.
    pub lr: f64,
    pub tokens_per_s: f64,
    /// Anything else worth showing (VQ-VAE: its reconstruction loss).
    pub extra: Option<(&'static str, f64)>,
}

/// Receives events; `Sync` so a data-parallel run may report from any thread.
pub trait Observer: Sync {
    fn on(&self, event: Event<'_>);
}

/// Ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn on(&self, _: Event<'_>) {}
}

/// Result of an evaluation.
#[derive(Debug)]
pub struct Eval {
    pub task: Task,
    /// Exact match of the decoded outputs.
    pub accuracy: f64,
    /// Share of the most frequent reference answer: what always giving that answer scores.
    pub majority_baseline: f64,
    /// The task metrics (`pali eval`'s JSON object).
    pub metrics: serde_json::Value,
    /// Validation perplexity on suffix tokens, per source (same masks as training).
    pub perplexity: Vec<(String, f64)>,
    /// A few (prompt, reference, prediction) triples.
    pub shown: Vec<(String, String, String)>,
}

/// What a finished stage reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageSummary {
    pub name: String,
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub seconds: f64,
    pub eval_accuracy: Option<f64>,
    /// What always answering the most frequent reference scores on the same examples.
    pub eval_baseline: Option<f64>,
    /// The task metrics of the end-of-stage evaluation.
    pub eval_metrics: Option<serde_json::Value>,
    /// Validation perplexity per source at the end of the stage.
    pub val_perplexity: Vec<(String, f64)>,
}
