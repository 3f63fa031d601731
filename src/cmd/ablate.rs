//! `pali ablate ABLATION.toml [--only VARIANT] [--dry-run]`: run an ablation grid and write its
//! results table and plots (docs/ablations.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use pali_trainer::ablate::{check_same_config, finished, run_grid, AblationConfig};

use crate::backend::{dispatch_many, Job};
use crate::progress::Console;
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
    /// Another base run config (e.g. `configs/ablations/base-paper.toml` for GPUs): the grid
    /// then goes to `OUT_DIR-BASENAME`.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Smoke test: every variant with one seed and 2 steps per stage, under DIR (not the
    /// grid's out_dir); checks that the whole grid runs.
    #[arg(long, value_name = "DIR")]
    pub smoke: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(a: Args) -> Result<()> {
    let mut ab = AblationConfig::load(&a.config)
        .with_context(|| format!("loading {}", a.config.display()))?;
    if let Some(base) = &a.base {
        let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("base");
        let out = &ab.ablation.out_dir;
        ab.ablation.out_dir = out.with_file_name(format!(
            "{}-{stem}",
            out.file_name().and_then(|s| s.to_str()).unwrap_or("grid")
        ));
        ab.ablation.base = std::path::absolute(base)?;
    }
    if let Some(dir) = &a.smoke {
        ab.smoke = true;
        ab.ablation.out_dir = std::path::absolute(dir)?;
    }
    let runs = ab
        .plan(a.only.as_deref())
        .with_context(|| format!("planning {}", a.config.display()))?;
    if a.dry_run {
        for p in ab.prepare_plan()? {
            println!(
                "# prepare `{}` → {} ({})",
                p.name,
                p.target.display(),
                if p.done() { "done" } else { "to run" }
            );
            println!("{}", toml::to_string(&p.config)?);
        }
        for r in &runs {
            println!(
                "# {} seed {} → {} ({})",
                r.variant,
                r.seed,
                r.dir.display(),
                match (
                    finished(&r.dir),
                    check_same_config(&r.dir, &r.config).is_ok()
                ) {
                    (_, false) => "made with another config: delete it to redo",
                    (true, true) => "finished",
                    (false, true) => "to run",
                }
            );
            println!("{}", toml::to_string(&r.config)?);
        }
        println!("{} runs", runs.len());
        return Ok(());
    }
    // The base config's `run.device` unless `--device` says otherwise.
    let devices = match runs.first() {
        Some(r) => a.device.for_run(&r.config, &ab.ablation.base)?,
        None => crate::backend::Devices(vec![a.device.spec()?]),
    };
    dispatch_many(
        &devices,
        GridJob {
            ab,
            only: a.only,
            console: Console::new(!a.quiet),
        },
    )
}

struct GridJob {
    ab: AblationConfig,
    only: Option<String>,
    console: Console,
}

impl Job for GridJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        self.run_on::<B>(vec![device])
    }

    fn run_on<B: Backend>(self, devices: Vec<B::Device>) -> Result<()> {
        run_grid::<B>(&self.ab, self.only.as_deref(), &devices, &self.console)?;
        pali_trainer::report::write(&self.ab)?;
        let md = self.ab.ablation.out_dir.join("results.md");
        println!("{}", std::fs::read_to_string(&md)?);
        println!("results in {}", self.ab.ablation.out_dir.display());
        Ok(())
    }
}
