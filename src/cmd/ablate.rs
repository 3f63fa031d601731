//! `pali ablate ABLATION.toml [--only VARIANT] [--dry-run]`: run an ablation grid and write its
//! results table and plots (docs/ablations.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use pali_trainer::ablate::{finished, run_grid, AblationConfig, RunSpec};

use crate::backend::{dispatch, Job};
use crate::DeviceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Ablation file: a base run config, `[[variant]]`s (overrides) and seeds.
    pub config: PathBuf,
    /// Run (and report) only this variant.
    #[arg(long)]
    pub only: Option<String>,
    /// Print the resolved run configs and what would run; train nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(a: Args) -> Result<()> {
    let ab = AblationConfig::load(&a.config)
        .with_context(|| format!("loading {}", a.config.display()))?;
    let runs = ab.plan(a.only.as_deref())?;
    if a.dry_run {
        for r in &runs {
            println!(
                "# {} seed {} → {} ({})",
                r.variant,
                r.seed,
                r.dir.display(),
                if finished(&r.dir) {
                    "finished"
                } else {
                    "to run"
                }
            );
            println!("{}", toml::to_string(&r.config)?);
        }
        println!("{} runs", runs.len());
        return Ok(());
    }
    dispatch(
        a.device.device,
        GridJob {
            ab,
            runs,
            progress: !a.quiet,
        },
    )
}

struct GridJob {
    ab: AblationConfig,
    runs: Vec<RunSpec>,
    progress: bool,
}

impl Job for GridJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        run_grid::<B>(&self.ab, &self.runs, &device, self.progress)?;
        let md = self.ab.ablation.out_dir.join("results.md");
        println!("{}", std::fs::read_to_string(&md)?);
        println!("results in {}", self.ab.ablation.out_dir.display());
        Ok(())
    }
}
