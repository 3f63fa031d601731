//! `pali`: train PaliGemma-style vision-language models. This file only parses and dispatches.

mod backend;
mod cmd;
mod devices;
mod progress;
mod st;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use backend::{DeviceSpec, Devices};

#[derive(Parser)]
#[command(
    name = "pali",
    version,
    about = "Train PaliGemma-style vision-language models on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What this machine offers: compiled-in backends, CUDA driver, devices, NVRTC, NCCL and
    /// wgpu adapters (run it first on a new machine; paste it into bug reports).
    Doctor,
    /// Inspect model presets and configs.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Train: the staged curriculum of a run config (stage 1 → 2 → 3, or any subset).
    Train(cmd::train::Args),
    /// Start N processes of a multi-process run on this host: `pali launch --nproc 2 -- train
    /// run.toml` (see docs/distributed.md).
    Launch(cmd::launch::LaunchArgs),
    /// Run a multi-process run's orchestrator on its own (then start every process with
    /// `--external-master`); process 0 starts one itself otherwise.
    Orchestrator {
        #[arg(long, default_value_t = 29500)]
        port: u16,
    },
    /// Run an ablation grid (variants × seeds) and write its results table and plots.
    Ablate(cmd::ablate::Args),
    /// Transfer a checkpoint to a JSONL dataset (writes the equivalent run config and runs it).
    Finetune(cmd::finetune::Args),
    /// Datasets: synthetic export, validation, batch inspection.
    Data {
        #[command(subcommand)]
        command: cmd::data::DataCommand,
    },
    /// The segmentation mask tokenizer (VQ-VAE): train, encode a mask, decode tokens.
    Vqvae {
        #[command(subcommand)]
        command: cmd::vqvae::VqvaeCommand,
    },
    /// Tokenizers: train one for the synthetic corpus.
    Tokenizer {
        #[command(subcommand)]
        command: cmd::tokenizer::TokenizerCommand,
    },
    /// Run one forward pass of an HF checkpoint on HF-named inputs (port verification).
    Forward(cmd::forward::Args),
    /// Greedy decoding with a KV cache from a prompt in HF-named inputs.
    Generate(cmd::generate::Args),
    /// Decode a JSONL dataset with a checkpoint and score the predictions (JSON on stdout).
    Eval(cmd::eval::EvalArgs),
    /// Score a predictions file against a references file, offline (JSON on stdout).
    Score(cmd::eval::ScoreArgs),
    /// One image and prompt through a checkpoint; `--draw` saves the detected boxes as PNG.
    Predict(cmd::eval::PredictArgs),
    /// Benchmarks (JSON on stdout).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Forward + backward + optimizer step of a random model on a synthetic batch.
    TrainStep(cmd::bench::Args),
    /// Data loading throughput: JPEG decode + resize per core, batches/s of a config.
    Data(cmd::bench::DataArgs),
    /// Decoding throughput (new tokens/s) of a random model, with and without the KV cache.
    Decode(cmd::bench::DecodeArgs),
    /// A shard reader's memory: pack N small rows, draw batches, report RSS as it reads.
    Shards(cmd::bench::ShardsArgs),
    /// All-reduce time and bandwidth over the ranks of a multi-process run:
    /// `pali launch --nproc 2 -- bench allreduce --size-mb 64`.
    Allreduce(cmd::bench::AllReduceArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Print a preset's (or an HF config.json's) shapes and parameter counts.
    Info {
        /// Preset name (see `pali model list`) or a path to an HF config.json / checkpoint dir.
        preset: String,
    },
    /// List the presets.
    List,
    /// Write one tower of a checkpoint as a unimodal HF checkpoint: the decoder as a Gemma
    /// (`model.init_gemma`) or the image encoder as a SigLIP (`model.init_siglip`).
    Export {
        /// A checkpoint directory (`OUT/checkpoints/step-…`) or safetensors file.
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// `gemma` (the decoder) or `siglip` (the image encoder).
        #[arg(long)]
        tower: String,
        /// Keep only the first N embedding rows (e.g. drop the `<loc>`/`<seg>` rows).
        #[arg(long)]
        vocab: Option<usize>,
        /// `f32` or `bf16` (half the bytes; round to nearest even).
        #[arg(long, default_value = "f32")]
        save_dtype: String,
        /// Output safetensors file.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Write a randomly initialised model as an HF checkpoint directory (benchmarks, memory
    /// measurements, a start for `model.init_hf`).
    Init {
        /// Preset name or an HF config.json.
        model: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Convert a big_vision PaliGemma checkpoint (`.npz`, the official release format) into an
    /// HF checkpoint directory (`model.init_hf`, `pali eval`, transformers).
    Convert {
        /// The `.npz` file (f32, f16 or bf16 arrays).
        #[arg(long)]
        from: std::path::PathBuf,
        /// The model: a preset or an HF config.json (default: the preset whose shapes match).
        #[arg(long)]
        config: Option<String>,
        /// The PaliGemma tokenizer.json, copied beside the weights with the processor files.
        #[arg(long)]
        tokenizer: Option<std::path::PathBuf>,
        /// Output directory (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    devices::quiet_panics();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model { command } => match command {
            ModelCommand::Info { preset } => cmd::model::info(&preset),
            ModelCommand::List => cmd::model::list(),
            ModelCommand::Export {
                checkpoint,
                tower,
                vocab,
                save_dtype,
                out,
            } => cmd::model::export(&checkpoint, &tower, vocab, &save_dtype, &out),
            ModelCommand::Init { model, seed, out } => cmd::model::init(&model, seed, &out),
            ModelCommand::Convert {
                from,
                config,
                tokenizer,
                out,
            } => cmd::model::convert(&from, config.as_deref(), tokenizer.as_deref(), &out),
        },
        Command::Doctor => {
            for line in devices::report() {
                println!("{line}");
            }
            Ok(())
        }
        Command::Train(args) => cmd::train::run(args),
        Command::Launch(args) => cmd::launch::launch(args),
        Command::Orchestrator { port } => {
            pali_trainer::dist::serve_orchestrator(port).map_err(Into::into)
        }
        Command::Finetune(args) => cmd::finetune::run(args),
        Command::Ablate(args) => cmd::ablate::run(args),
        Command::Data { command } => cmd::data::run(command),
        Command::Tokenizer { command } => cmd::tokenizer::run(command),
        Command::Vqvae { command } => cmd::vqvae::run(command),
        Command::Forward(args) => cmd::forward::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Eval(args) => cmd::eval::run_eval(args),
        Command::Score(args) => cmd::eval::run_score(args),
        Command::Predict(args) => cmd::eval::run_predict(args),
        Command::Bench {
            command: BenchCommand::TrainStep(args),
        } => cmd::bench::run(args),
        Command::Bench {
            command: BenchCommand::Allreduce(args),
        } => cmd::bench::run_allreduce(args),
        Command::Bench {
            command: BenchCommand::Data(args),
        } => cmd::bench::run_data(args),
        Command::Bench {
            command: BenchCommand::Decode(args),
        } => cmd::bench::run_decode(args),
        Command::Bench {
            command: BenchCommand::Shards(args),
        } => cmd::bench::run_shards(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Shared argument: where to compute.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArg {
    /// cpu, wgpu[:N] or cuda[:N]; training also takes a list, `cuda:0,cuda:1`, for data
    /// parallelism [default: cpu, or for runs the config's `run.device`].
    #[arg(long)]
    pub device: Option<Devices>,
}

impl DeviceArg {
    /// The one device given, else cpu.
    pub fn spec(&self) -> anyhow::Result<DeviceSpec> {
        match &self.device {
            None => Ok(DeviceSpec::Cpu),
            Some(Devices(d)) if d.len() == 1 => Ok(d[0]),
            Some(_) => anyhow::bail!("--device: this command runs on one device"),
        }
    }

    /// The devices given, else the `run.device` of the run config read from `path`, else cpu.
    pub fn for_run(
        &self,
        config: &pali_trainer::config::RunConfig,
        path: &std::path::Path,
    ) -> anyhow::Result<Devices> {
        match (&self.device, &config.run.device) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(s)) => s
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: run.device = \"{s}\": {e}", path.display())),
            (None, None) => Ok(Devices(vec![DeviceSpec::Cpu])),
        }
    }
}
