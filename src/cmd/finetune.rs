//! `pali finetune`: transfer a checkpoint to a JSONL dataset. Writes the equivalent stage-3 run
//! config next to its outputs (`finetune.toml`, re-runnable with `pali train`) and runs it.
//! Defaults follow big_vision's transfer configs / the paper (§3.2.4, forkme.py): Adam
//! (b2 0.999), lr 1e-5, cosine with 5 % warm-up, global clip 1.0, no weight decay.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pali_data::dataset::{Dataset, JsonlDataset, OnError};
use pali_trainer::config::{RunConfig, SourceType};
use pali_trainer::train::TrainOptions;

use super::train::TrainJob;
use crate::backend::dispatch_many;
use crate::DeviceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF-style checkpoint directory (`config.json` + safetensors): an HF PaliGemma
    /// checkpoint or a `pali train` checkpoint (`OUT/checkpoints/step-…`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Training data: big_vision JSONL (`{"image", "prefix", "suffix"}`).
    #[arg(long)]
    pub train: PathBuf,
    /// Validation JSONL, decoded and scored at the end (up to 256 examples).
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Metric of that evaluation: caption, vqa (default), vqav2, docvqa, chartqa, detect or
    /// refcoco (`eval_task` of the stage).
    #[arg(long)]
    pub task: Option<String>,
    /// Override a key of the written config, e.g. `--set stage.transfer.grad_clip=0.5` or
    /// `--set run.dtype="bf16"` (docs/config.md).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[arg(long, default_value_t = 10)]
    pub epochs: u64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Image resolution (default: the checkpoint's).
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub text_len: usize,
    /// Tokenizer (default: `tokenizer.json` in the checkpoint directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "runs/finetune")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip unreadable examples instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Matmul dtype, `f32` or `bf16` (mixed precision; see `run.dtype` in docs/config.md).
    #[arg(long, default_value = "f32")]
    pub dtype: pali_model::Compute,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(a: Args) -> Result<()> {
    let abs = |p: &PathBuf| std::path::absolute(p).with_context(|| format!("{}", p.display()));
    let ckpt = abs(&a.checkpoint)?;
    let model = pali_model::hf::parse_config(&ckpt.join("config.json"))?;
    let tokenizer = match &a.tokenizer {
        Some(t) => abs(t)?,
        None => ckpt.join("tokenizer.json"),
    };
    if !tokenizer.is_file() {
        bail!(
            "no tokenizer: {} does not exist; pass --tokenizer",
            tokenizer.display()
        );
    }
    let on_error = if a.skip_bad {
        OnError::Skip
    } else {
        OnError::Fail
    };
    let train_path = abs(&a.train)?;
    let n = JsonlDataset::open(&train_path, on_error, false)?.len() as u64;
    let steps = (a.epochs * n).div_ceil(a.batch_size as u64).max(1);
    let out = abs(&a.out)?;
    std::fs::create_dir_all(&out)?;
    let eval = match &a.val {
        Some(v) => {
            let v = abs(v)?;
            let n = JsonlDataset::open(&v, on_error, false)?.len();
            Some((v, n.min(256)))
        }
        None => None,
    };
    // Build the config as TOML so it is checked exactly like a hand-written one.
    let table = |pairs: Vec<(&str, toml::Value)>| -> toml::Value {
        toml::Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    let mut doc = toml::Table::new();
    doc.insert(
        "run".into(),
        table(vec![
            ("name", "finetune".into()),
            ("out_dir", out.display().to_string().into()),
            ("seed", (a.seed as i64).into()),
            ("dtype", a.dtype.to_string().into()),
        ]),
    );
    doc.insert(
        "model".into(),
        table(vec![("init_hf", ckpt.display().to_string().into())]),
    );
    doc.insert(
        "tokenizer".into(),
        table(vec![("path", tokenizer.display().to_string().into())]),
    );
    let mut stage = toml::Table::new();
    stage.insert("name".into(), "transfer".into());
    stage.insert("checkpoint_every".into(), 1000.into());
    stage.insert("log_every".into(), 10.into());
    stage.insert(
        "resolution".into(),
        (a.resolution.unwrap_or(model.vision.image_size()) as i64).into(),
    );
    stage.insert("text_len".into(), (a.text_len as i64).into());
    stage.insert("steps".into(), (steps as i64).into());
    stage.insert("batch_size".into(), (a.batch_size as i64).into());
    stage.insert("lr".into(), a.lr.into());
    stage.insert(
        "on_error".into(),
        (if a.skip_bad { "skip" } else { "fail" }).into(),
    );
    if let Some((v, k)) = &eval {
        stage.insert("eval_jsonl".into(), v.display().to_string().into());
        stage.insert("eval_examples".into(), (*k as i64).into());
    }
    if let Some(t) = &a.task {
        stage.insert("eval_task".into(), t.clone().into());
    }
    let mut source = toml::Table::new();
    source.insert("kind".into(), toml::Value::try_from(SourceType::Jsonl)?);
    source.insert("path".into(), train_path.display().to_string().into());
    stage.insert("source".into(), toml::Value::Array(vec![source.into()]));
    doc.insert("stage".into(), toml::Value::Array(vec![stage.into()]));
    let path = out.join("finetune.toml");
    let sets: String = a
        .overrides
        .iter()
        .map(|o| format!(" --set '{o}'"))
        .collect();
    let header = format!(
        "# Written by `pali finetune`: {n} examples × {} epochs / batch {} = {steps} steps.\n# Re-run with `pali train {}{sets}`.\n",
        a.epochs,
        a.batch_size,
        path.display()
    );
    std::fs::write(&path, header + &toml::to_string_pretty(&doc)?)?;
    eprintln!("wrote {}", path.display());
    let config = RunConfig::load(&path, &a.overrides)?;
    dispatch_many(
        &a.device.for_run(&config, &path)?,
        TrainJob {
            config,
            opts: TrainOptions {
                resume: a.resume,
                progress: !a.quiet,
                max_steps: None,
            },
        },
    )
}
