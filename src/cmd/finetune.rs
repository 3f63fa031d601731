//! `pali finetune`: transfer a checkpoint to a JSONL dataset. It starts from
//! `configs/transfer/forkme.toml` (big_vision's `forkme.py` defaults, built into the binary),
//! applies its flags and `--set`s as overrides, writes the result next to its outputs
//! (`finetune.toml`, re-runnable with `pali train`) and runs it: the command and the file
//! cannot disagree.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pali_data::dataset::{Dataset, JsonlDataset, OnError};
use pali_trainer::config::{apply_override, RunConfig};
use pali_trainer::rundir::{Existing, RunDir};

use super::train::TrainJob;
use crate::backend::dispatch_many;
use crate::progress::Console;
use crate::DeviceArg;

/// The transfer template; its defaults are `pali finetune`'s.
const FORKME: &str = include_str!("../../configs/transfer/forkme.toml");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF-style checkpoint directory (`config.json` + safetensors): an HF PaliGemma
    /// checkpoint or a `pali train` checkpoint (`OUT/checkpoints/step-…`); or a big_vision
    /// `.npz` (then give `--tokenizer`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Training data: big_vision JSONL (`{"image", "prefix", "suffix"}`) or a shard directory
    /// (`pali data pack`).
    #[arg(long)]
    pub train: PathBuf,
    /// Validation JSONL, decoded and scored at the end (up to forkme.toml's `eval.examples`, 512).
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
    /// Passes over the training data [default: forkme.toml's, 15].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// [default: forkme.toml's, 32]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// [default: forkme.toml's, 1e-5]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Image resolution (default: the checkpoint's).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// [default: forkme.toml's, 128]
    #[arg(long)]
    pub text_len: Option<usize>,
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
    /// Continue the fine-tuning run in `--out` from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Move a run already in `--out` aside (to `OUT.old-N`; nothing is deleted) and start
    /// afresh. Without this or `--resume`, such a directory is refused.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
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
    // A big_vision `.npz` (the official release format) is read as it is, its shapes inferred.
    let npz = ckpt.extension().is_some_and(|e| e == "npz");
    let model = if npz {
        pali_model::big_vision::infer_config(&ckpt)?.1
    } else {
        pali_model::hf::parse_config(&ckpt.join("config.json"))?
    };
    let tokenizer = match &a.tokenizer {
        Some(t) => abs(t)?,
        None if npz => bail!(
            "{}: a big_vision checkpoint has no tokenizer; pass --tokenizer (PaliGemma's \
             tokenizer.json)",
            ckpt.display()
        ),
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
    let kind = if pali_data::shards::is_shard_dir(&train_path) {
        "shards"
    } else {
        "jsonl"
    };
    let n = if kind == "shards" {
        pali_data::shards::ShardDataset::open(&train_path)?.len()
    } else {
        JsonlDataset::open(&train_path, on_error, false)?.len()
    };
    let out = abs(&a.out)?;
    std::fs::create_dir_all(&out)?;

    // The template, then the flags as overrides (checked exactly like a hand-written config).
    let mut doc: toml::Value = toml::from_str(FORKME).context("configs/transfer/forkme.toml")?;
    if npz {
        // The template starts from an HF checkpoint; this run starts from the `.npz` instead.
        if let Some(m) = doc.get_mut("model").and_then(|m| m.as_table_mut()) {
            m.remove("init_hf");
        }
    }
    let quote = |p: &std::path::Path| toml::Value::String(p.display().to_string()).to_string();
    let mut sets = vec![
        "run.name=\"finetune\"".to_string(),
        format!("run.out_dir={}", quote(&out)),
        format!("run.seed={}", a.seed),
        format!("run.dtype=\"{}\"", a.dtype),
        format!(
            "model.{}={}",
            if npz { "init_big_vision" } else { "init_hf" },
            quote(&ckpt)
        ),
        format!("tokenizer.path={}", quote(&tokenizer)),
        format!(
            "stage.1.resolution={}",
            a.resolution.unwrap_or(model.vision.image_size())
        ),
        format!(
            "stage.1.source=[{{ kind = \"{kind}\", path = {} }}]",
            quote(&train_path)
        ),
        format!(
            "stage.1.on_error=\"{}\"",
            if a.skip_bad { "skip" } else { "fail" }
        ),
    ];
    if let Some(e) = a.epochs {
        sets.push(format!("stage.1.epochs={e:?}"));
    }
    if let Some(b) = a.batch_size {
        sets.push(format!("stage.1.batch_size={b}"));
    }
    if let Some(lr) = a.lr {
        sets.push(format!("stage.1.optim.lr={lr:e}"));
    }
    if let Some(t) = a.text_len {
        sets.push(format!("stage.1.text_len={t}"));
    }
    if let Some(t) = &a.task {
        sets.push(format!("stage.1.eval.task=\"{t}\""));
    }
    match &a.val {
        Some(v) => sets.push(format!("stage.1.eval.jsonl={}", quote(&abs(v)?))),
        None => {
            // No validation data: no evaluation.
            sets.push("stage.1.eval.examples=0".into());
            if let Some(e) = doc["stage"][0]
                .get_mut("eval")
                .and_then(|e| e.as_table_mut())
            {
                e.remove("jsonl");
            }
        }
    }
    for s in &sets {
        apply_override(&mut doc, s)?;
    }
    // The device is the command line's (`--device`, default cpu), not the template's.
    if let Some(run) = doc.get_mut("run").and_then(|r| r.as_table_mut()) {
        run.remove("device");
    }
    // Before finetune.toml is written, which belongs to the run in `out`: refuse the directory
    // or move its run aside as `pali train` would (the lock is taken again by the training).
    let existing = super::train::existing(a.resume, a.overwrite);
    if let Some(aside) = RunDir::open(&out, existing)?.moved_aside {
        eprintln!("moved the earlier run to {}", aside.display());
    }
    let path = out.join("finetune.toml");
    std::fs::write(&path, toml::to_string_pretty(&doc)?)?;
    let config = RunConfig::load(&path, &a.overrides)?;
    let st = &config.stages[0];
    let user_sets: String = a
        .overrides
        .iter()
        .map(|o| format!(" --set '{o}'"))
        .collect();
    let length = match st.epochs {
        Some(e) => format!("{n} examples × {e} epochs / batch {} = ", st.batch_size),
        None => String::new(),
    };
    let header = format!(
        "# Written by `pali finetune` from configs/transfer/forkme.toml: {length}{} steps.\n\
         # Re-run with `pali train {}{user_sets}`.\n",
        st.steps,
        path.display()
    );
    std::fs::write(&path, header + &toml::to_string_pretty(&doc)?)?;
    eprintln!("wrote {}", path.display());
    dispatch_many(
        &a.device.for_run(&config, &path)?,
        TrainJob {
            config,
            // Moved aside above already.
            existing: if a.resume {
                Existing::Resume
            } else {
                Existing::Refuse
            },
            max_steps: None,
            topology: pali_trainer::dist::Topology::single(),
            console: Console::new(!a.quiet),
        },
    )
}
