//! `pali train RUN.toml [--set KEY=VALUE …] [--resume]`: the staged curriculum.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use pali_trainer::config::RunConfig;
use pali_trainer::dist::Topology;
use pali_trainer::rundir::Existing;
use pali_trainer::train::{train_on, TrainOptions};

use crate::backend::{dispatch_many, Job};
use crate::cmd::launch::DistArgs;
use crate::progress::Console;
use crate::DeviceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run config (TOML, see docs/config.md).
    pub config: PathBuf,
    /// Override a config key, e.g. `--set stage.1.lr=3e-5` or `--set run.seed=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from the newest checkpoint in the run's output directory.
    #[arg(long)]
    pub resume: bool,
    /// Move a run already in the output directory aside (to `DIR.old-N`; nothing is deleted)
    /// and start afresh. Without this or `--resume`, such a directory is refused.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Stop after this many optimizer steps in total.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// No progress bars (logs still go to metrics.jsonl).
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArg,
    #[command(flatten)]
    pub dist: DistArgs,
}

pub fn run(args: Args) -> Result<()> {
    let config = RunConfig::load(&args.config, &args.overrides)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let (topology, devices) = args
        .dist
        .topology(args.device.for_run(&config, &args.config)?)?;
    // Only the process holding rank 0 shows progress.
    let quiet = args.quiet || topology.node_rank > 0;
    dispatch_many(
        &devices,
        TrainJob {
            config,
            existing: existing(args.resume, args.overwrite),
            max_steps: args.max_steps,
            console: Console::new(!quiet),
            topology,
        },
    )
    .with_context(|| format!("training {}", args.config.display()))
}

/// What `--resume` / `--overwrite` (clap keeps them apart) ask of a directory holding a run.
pub fn existing(resume: bool, overwrite: bool) -> Existing {
    match (resume, overwrite) {
        (true, _) => Existing::Resume,
        (false, true) => Existing::Overwrite,
        (false, false) => Existing::Refuse,
    }
}

/// Trains `config` and prints the per-stage summary table (shared with `pali finetune`).
pub struct TrainJob {
    pub config: RunConfig,
    pub existing: Existing,
    pub max_steps: Option<u64>,
    pub console: Console,
    /// Where this process sits in a multi-process run.
    pub topology: Topology,
}

impl Job for TrainJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        self.run_on::<B>(vec![device])
    }

    fn run_on<B: Backend>(self, devices: Vec<B::Device>) -> Result<()> {
        let opts = TrainOptions {
            existing: self.existing,
            max_steps: self.max_steps,
            observer: &self.console,
        };
        let summaries = train_on::<B>(&self.config, &devices, &self.topology, &opts)?;
        if self.topology.node_rank > 0 {
            return Ok(());
        }
        println!(
            "{:<12} {:>6} {:>10} {:>10} {:>9} {:>8} {:>9}",
            "stage", "steps", "loss[0]", "loss[-1]", "seconds", "eval", "majority"
        );
        let pct = |x: Option<f64>| {
            x.map(|a| format!("{:.1}%", a * 100.0))
                .unwrap_or_else(|| "-".into())
        };
        for s in &summaries {
            println!(
                "{:<12} {:>6} {:>10.4} {:>10.4} {:>9.1} {:>8} {:>9}",
                s.name,
                s.steps,
                s.first_loss,
                s.last_loss,
                s.seconds,
                pct(s.eval_accuracy),
                pct(s.eval_baseline)
            );
        }
        for s in &summaries {
            for line in crate::progress::stage_details(s) {
                println!("{line}");
            }
        }
        println!("outputs in {}", self.config.run.out_dir.display());
        Ok(())
    }
}
