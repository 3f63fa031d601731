//! `pali bench train-step`: time the training step `pali train` runs (batch to device, forward,
//! loss, backward, big_vision's optimizer chain) on a randomly initialised model and a
//! synthetic batch, and report what was measured as JSON.
//!
//! FLOPs per step are 6·params·tokens (forward + backward of every weight) plus attention
//! (12·layers·S²·H·Dh per example for the decoder, same for the encoder over its N tokens); MFU
//! divides by the device peak given with `--peak-tflops` (nothing is assumed about the device).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use pali_data::batch::Batch;
use pali_model::presets::{count_params, preset};
use pali_model::{hf, ImageEncoder, PaliGemmaConfig};
use pali_trainer::config::{Attention, LossOn, LossSection, Optim, RunConfig};
use pali_trainer::inputs::{batch_loss, step_inputs};
use pali_trainer::optim::{self, AdamState, Groups};
use pali_trainer::step::{train_step, StepSettings};

use crate::backend::{dispatch, Job};
use crate::DeviceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model preset (see `pali model list`).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// HF PaliGemma config.json (same shapes as a PyTorch run of that config).
    #[arg(long, conflicts_with = "run")]
    pub config: Option<PathBuf>,
    /// A run config (`pali train`'s TOML): time the first steps of its first stage exactly as
    /// `pali train` takes them (its model, data, optimizer settings, schedule and seeds);
    /// `--warmup` (at least 1) + `--steps` steps in all. `--batch`, `--text-len` and `--dtype`
    /// come from it.
    #[arg(long, conflicts_with = "preset")]
    pub run: Option<PathBuf>,
    /// With `--run`: override a config key, as `pali train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "run")]
    pub overrides: Vec<String>,
    /// With `--run`: write the weights after the last step (safetensors, as a checkpoint's
    /// `model.safetensors`).
    #[arg(long, requires = "run")]
    pub save_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Text tokens per example (after the image tokens).
    #[arg(long, default_value_t = 32)]
    pub text_len: usize,
    /// Timed steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Forward only (no backward, no optimizer).
    #[arg(long)]
    pub forward_only: bool,
    /// Device peak in TFLOP/s, to report MFU.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Matmul dtype: `f32`, or `bf16` (mixed precision: f32 weights, bf16 matmuls).
    #[arg(long, default_value = "f32")]
    pub dtype: pali_model::Compute,
    /// Recompute cheap activations in the backward pass instead of keeping them (Burn's
    /// balanced checkpointing), as `run.gradient_checkpointing`.
    #[arg(long)]
    pub grad_checkpointing: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.run {
        return run_config(&args, path);
    }
    let config = match (&args.preset, &args.config) {
        (Some(p), None) => preset(p)?,
        (None, Some(c)) => hf::parse_config(c)?,
        _ => bail!("give --preset NAME, --config HF_CONFIG.json or --run RUN.toml"),
    };
    let device = args.device.spec()?;
    let device_name = format!("{device:?}");
    let measured = dispatch(
        device,
        BenchJob {
            args: &args,
            config: &config,
        },
    )?;
    let stats = measured.times;
    let n = count_params(&config).total();
    let tokens = (args.batch * (config.num_image_tokens() + args.text_len)) as f64;
    let mut times = stats.clone();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let flops = step_flops(&config, args.batch, args.text_len, !args.forward_only);
    let json = serde_json::json!({
        "what": if args.forward_only { "forward" } else { "train step (forward+backward+optimizer chain)" },
        "model": args.preset.clone().unwrap_or_else(|| args.config.as_ref().unwrap().display().to_string()),
        "device": device_name,
        "dtype": args.dtype.to_string(),
        "grad_checkpointing": args.grad_checkpointing,
        "batch": args.batch,
        "seq_len": config.num_image_tokens() + args.text_len,
        "params": n,
        "steps": stats.len(),
        "step_seconds_median": median,
        "step_seconds_min": times[0],
        "tokens_per_second": tokens / median,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / median / 1e12,
        "mfu": args.peak_tflops.map(|p| flops / median / (p * 1e12)),
        "peak_rss_mib": peak_rss_mib(),
        "breakdown": measured.breakdown.map(|b| serde_json::json!({
            "inputs_s": b.inputs_s, "forward_s": b.forward_s, "backward_s": b.backward_s,
            "optimizer_s": b.optimizer_s, "host_sync_s": b.host_sync_s,
        })),
        "matmuls": measured.matmuls,
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// `--run`: the first steps of a run config's first stage, as `pali train` takes them.
fn run_config(args: &Args, path: &std::path::Path) -> Result<()> {
    if args.forward_only {
        bail!("--forward-only times a synthetic batch; it does not combine with --run");
    }
    let config = RunConfig::load(path, &args.overrides)
        .with_context(|| format!("loading {}", path.display()))?;
    let device = args.device.spec()?;
    let device_name = format!("{device:?}");
    let (times, tokens, waits) = dispatch(
        device,
        ReplayJob {
            args,
            config: &config,
        },
    )?;
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    let stage = config
        .stages
        .iter()
        .find(|s| s.kind.is_vlm())
        .context("the run config has no PaliGemma stage to time")?;
    let json = serde_json::json!({
        "what": "train step (forward+backward+optimizer chain) of a run config's first stage",
        "run": path.display().to_string(),
        "stage": stage.name,
        "device": device_name,
        "dtype": config.run.dtype.to_string(),
        "grad_checkpointing": config.run.gradient_checkpointing,
        "batch": stage.batch_size,
        "steps": times.len(),
        "step_seconds_median": median,
        "step_seconds_min": sorted[0],
        "tokens_per_second": tokens as f64 / times.len() as f64 / median,
        // Time the step waited for the loader (its batches are built on other threads).
        "data_wait_seconds_mean": waits.iter().sum::<f64>() / waits.len().max(1) as f64,
        "data_wait_seconds_max": waits.iter().copied().fold(0.0, f64::max),
        "peak_rss_mib": peak_rss_mib(),
        "weights": args.save_weights.as_ref().map(|p| p.display().to_string()),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

struct ReplayJob<'a> {
    args: &'a Args,
    config: &'a RunConfig,
}

impl Job for ReplayJob<'_> {
    /// Seconds of each timed step, the tokens of those steps, and the seconds each waited
    /// for its batch.
    type Output = (Vec<f64>, usize, Vec<f64>);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        // At least one untimed step: the clock starts before the run is planned and loaded.
        let warmup = self.args.warmup.max(1) as u64;
        let total = warmup + self.args.steps as u64;
        let (mut times, mut tokens, mut waits) = (Vec::new(), 0, Vec::new());
        let mut last = Instant::now();
        let model =
            pali_trainer::train::replay::<B>(self.config, &device, total, &mut |step, n, w| {
                if step >= warmup {
                    times.push(last.elapsed().as_secs_f64());
                    waits.push(w);
                    tokens += n;
                }
                last = Instant::now();
            })?;
        if let Some(p) = &self.args.save_weights {
            pali_model::checkpoint::save_safetensors(&model, p)?;
        }
        if times.is_empty() {
            bail!("--steps 0: nothing was timed");
        }
        Ok((times, tokens, waits))
    }
}

/// Model FLOPs of one step: 2·params·tokens forward (×3 with backward) plus attention scores.
pub fn step_flops(c: &PaliGemmaConfig, batch: usize, text_len: usize, backward: bool) -> f64 {
    let p = count_params(c);
    let n = c.num_image_tokens() as f64;
    let s = n + text_len as f64;
    let b = batch as f64;
    // Embedding lookups are not matmuls, but the tied LM head is: count the table once.
    let lm = (p.language) as f64;
    let vis = p.vision as f64 + p.projector as f64;
    let mut f = 2.0 * (lm * s + vis * n) * b;
    let t = &c.text;
    f += 4.0 * b * (t.num_layers as f64) * s * s * (t.num_heads * t.head_dim) as f64;
    if let ImageEncoder::Siglip(v) = &c.vision {
        f += 4.0 * b * (v.num_layers as f64) * n * n * v.hidden_size as f64;
    }
    if backward {
        f *= 3.0;
    }
    f
}

fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// A memory figure of `/proc/self/status` (`VmHWM:` peak, `VmRSS:` now), in MiB.
pub(crate) fn status_mib(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct BenchJob<'a> {
    args: &'a Args,
    config: &'a PaliGemmaConfig,
}

impl Job for BenchJob<'_> {
    type Output = Measured;
    fn run<B: Backend>(self, device: B::Device) -> Result<Measured> {
        use burn::backend::autodiff::checkpoint::strategy::{
            BalancedCheckpointing, NoCheckpointing,
        };
        if self.args.grad_checkpointing {
            steps::<Autodiff<B, BalancedCheckpointing>>(self.args, self.config, device)
        } else {
            steps::<Autodiff<B, NoCheckpointing>>(self.args, self.config, device)
        }
    }
}

/// Warm-up then timed steps of the training step `pali train` runs ([`train_step`]: the
/// optimizer chain with its default group, clipping 1.0, no weight decay); the step times in
/// seconds.
fn steps<AD: AutodiffBackend>(
    a: &Args,
    c: &PaliGemmaConfig,
    device: AD::Device,
) -> Result<Measured> {
    if !a.dtype.supported::<AD>(&device) {
        bail!("--dtype {}: device {device:?} does not support it", a.dtype);
    }
    let mut model = c.init::<AD>(&device);
    // A zero projector would leave its gradient path trivial; benchmark a trained-like one.
    model.multi_modal_projector = c.projector_config().with_zero_init(false).init(&device);
    let mut model = model.with_compute(a.dtype);
    let optim = Optim::new(1e-5);
    let loss = LossSection::default();
    let groups = Groups::from_parts(&[], &optim.weight_decay_params);
    let settings = StepSettings {
        optim: &optim,
        loss: &loss,
        groups: &groups,
        grad_accum: 1,
        peer: None,
    };
    let mut adam = AdamState::default();
    let batch = synthetic_batch(c, a.batch, a.text_len);
    let mut times = Vec::new();
    let mut before = None;
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            before = matmul_counters();
        }
        let mut b = batch.clone();
        let start = Instant::now();
        let inputs = step_inputs::<AD>(&mut b, c, Attention::PrefixLm, LossOn::Suffix, &device)?;
        if a.forward_only {
            let _ = batch_loss(&model, inputs, &loss)?.into_scalar();
        } else {
            let sched = vec![1.0; groups.groups.len()];
            let (m, _) = train_step(model, inputs, &mut adam, &settings, sched, None, false)?;
            model = m;
            // Reading one weight back waits for the step to finish on asynchronous devices.
            let _ = model.language_model.norm.weight.val().sum().into_scalar();
        }
        if step >= a.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let matmuls = match (before, matmul_counters()) {
        (Some(b), Some(e)) if e.0 > b.0 => {
            let n = a.steps as f64;
            let secs = (e.2 - b.2) as f64 * 1e-9 / n;
            let flop = (e.1 - b.1) as f64 / n;
            Some(serde_json::json!({
                "calls_per_step": (e.0 - b.0) as f64 / n,
                "gflop_per_step": flop / 1e9,
                "seconds_per_step": secs,
                "gflops_per_s": flop / secs / 1e9,
                "share_of_step": secs * n / times.iter().sum::<f64>(),
            }))
        }
        _ => None,
    };
    let breakdown = if a.forward_only {
        None
    } else {
        Some(phases(
            model,
            &batch,
            c,
            &settings,
            &mut adam,
            &device,
            a.steps.clamp(1, 3),
        )?)
    };
    Ok(Measured {
        times,
        breakdown,
        matmuls,
    })
}

/// Calls, floating-point operations and nanoseconds of the CPU backend's matmuls so far
/// (counted by the patched burn-flex; other backends count nothing).
fn matmul_counters() -> Option<(u64, u64, u64)> {
    #[cfg(feature = "flex")]
    return Some(burn_flex::ops::matmul::stats::get());
    #[cfg(not(feature = "flex"))]
    None
}

/// What the timed steps measured, and where a step's time goes.
struct Measured {
    times: Vec<f64>,
    breakdown: Option<Breakdown>,
    /// The timed steps' matrix products, per step: calls, work, time, rate, share of the step.
    matmuls: Option<serde_json::Value>,
}

/// Median seconds of each phase of a step, measured in up to 3 extra steps that wait for the
/// device after each phase (so they add up to a little more than an unsynchronised step).
struct Breakdown {
    /// Host batch → device tensors (masks, ids, pixels): what the data side costs a step.
    inputs_s: f64,
    forward_s: f64,
    /// Backward pass and gradient collection.
    backward_s: f64,
    /// The optimizer chain (clip, Adam, weight decay, schedule, non-finite guard).
    optimizer_s: f64,
    /// One device-to-host read of a scalar once the device is idle: what a logging step adds
    /// (`pali train` reads nothing back on other steps).
    host_sync_s: f64,
}

#[allow(clippy::too_many_arguments)]
fn phases<AD: AutodiffBackend>(
    mut model: pali_model::PaliGemma<AD>,
    batch: &Batch,
    c: &PaliGemmaConfig,
    settings: &StepSettings<AD::InnerBackend>,
    adam: &mut AdamState<AD::InnerBackend>,
    device: &AD::Device,
    n: usize,
) -> Result<Breakdown> {
    use burn::tensor::ElementConversion;
    let wait = |t: Tensor<AD::InnerBackend, 1>| t.into_scalar().elem::<f64>();
    let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..n {
        let mut b = batch.clone();
        let t0 = Instant::now();
        let inputs = step_inputs::<AD>(&mut b, c, Attention::PrefixLm, LossOn::Suffix, device)?;
        wait(inputs.weights.clone().inner().sum());
        let t1 = Instant::now();
        let loss = batch_loss(&model, inputs, settings.loss)?;
        wait(loss.clone().inner());
        let t2 = Instant::now();
        let grads = optim::gradients(&model, &loss.clone().backward());
        wait(grads[0].1.clone().sum());
        let t3 = Instant::now();
        let cfg = optim::StepConfig {
            optim: settings.optim,
            groups: settings.groups,
            sched: vec![1.0; settings.groups.groups.len()],
            norms: false,
        };
        let (m, stats) = optim::step(model, grads, adam, &cfg, loss.inner());
        model = m;
        wait(model.language_model.norm.weight.val().inner().sum());
        let t4 = Instant::now();
        wait(stats.grad_norm);
        let t5 = Instant::now();
        for (v, d) in t
            .iter_mut()
            .zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4])
        {
            v.push(d.as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok(Breakdown {
        inputs_s: med(&mut t[0]),
        forward_s: med(&mut t[1]),
        backward_s: med(&mut t[2]),
        optimizer_s: med(&mut t[3]),
        host_sync_s: med(&mut t[4]),
    })
}

/// A batch as the data stream makes it: `text_len + 1` text tokens per row (inputs are all but
/// the last, targets all but the first), the first half prefix, the rest suffix with loss;
/// pixels in [-1, 1].
fn synthetic_batch(c: &PaliGemmaConfig, b: usize, text_len: usize) -> Batch {
    let (t1, res) = (text_len + 1, c.vision.image_size());
    let vocab = c.predictable_vocab() as i64;
    let prefix = text_len / 2;
    let mut text = Vec::with_capacity(b * t1);
    for r in 0..b {
        for i in 0..t1 {
            // Any text token but the image placeholder.
            let t = ((i * 31 + r * 7) as i64) % vocab;
            text.push(if t == c.image_token_id as i64 {
                (t + 1) % vocab
            } else {
                t
            });
        }
    }
    let per_row =
        |f: &dyn Fn(usize) -> i64| -> Vec<i64> { (0..b).flat_map(|_| (0..t1).map(f)).collect() };
    let n_px = b * 3 * res * res;
    Batch {
        batch_size: b,
        frames: 1,
        resolution: res,
        pixel_values: (0..n_px)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect(),
        seq_len: t1,
        text,
        mask_ar: per_row(&|i| i64::from(i > prefix)),
        mask_loss: per_row(&|i| i64::from(i > prefix)),
        mask_input: per_row(&|_| 1),
        sources: vec![0; b],
        ids: (0..b).map(|r| r.to_string()).collect(),
        truncated: 0,
        eos_cut: Vec::new(),
        skipped: Vec::new(),
        state_after: None,
    }
}

/// `pali bench data`: image decode + resize throughput from JPEG files, one core and all cores,
/// and batch throughput of a run config's first stage.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    /// JPEG files to write and decode.
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Side of the JPEGs written (synthetic scenes).
    #[arg(long, default_value_t = 480)]
    pub source_size: usize,
    /// Target resolution.
    #[arg(long, default_value_t = 224)]
    pub resolution: usize,
    /// Per-pixel noise (± levels) added to the scenes before JPEG encoding, to decode like
    /// photographs (0: flat synthetic scenes).
    #[arg(long, default_value_t = 0)]
    pub noise: u8,
    /// A run config whose first stage's batches are timed too.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub batches: usize,
}

pub fn run_data(a: DataArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be > 0");
    }
    use pali_data::image::ResizeMethod;
    use rayon::prelude::*;
    let dir = std::env::temp_dir().join(format!("pali-bench-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let files: Vec<PathBuf> = (0..a.n)
        .map(|i| -> Result<PathBuf> {
            let rgb = pali_data::synth::Scene::generate(0, 0, i as u64).render(a.source_size);
            let p = dir.join(format!("{i}.jpg"));
            let s = a.source_size as u32;
            let mut px = rgb.to_u8();
            if a.noise > 0 {
                // Photographs have texture everywhere: a flat scene's JPEG decodes several
                // times faster than a photo's.
                let mut r = pali_data::rng::Rng::new(i as u64);
                for v in &mut px {
                    let d = r.below(2 * a.noise as usize + 1) as i32 - a.noise as i32;
                    *v = (*v as i32 + d).clamp(0, 255) as u8;
                }
            }
            let img = image::RgbImage::from_raw(s, s, px).expect("size");
            img.save_with_format(&p, image::ImageFormat::Jpeg)?;
            Ok(p)
        })
        .collect::<Result<_>>()?;
    let jpeg_bytes: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let jpeg_kb = jpeg_bytes as f64 / files.len().max(1) as f64 / 1e3;
    // The loader's path from a file: read, decode to bytes, resize, normalise.
    let work = |p: &PathBuf| -> usize {
        pali_data::dataset::ImageSource::File(p.clone())
            .pixels(a.resolution, ResizeMethod::Bicubic)
            .expect("decodable")
            .len()
    };
    let t = Instant::now();
    let one: usize = files.iter().map(work).sum();
    let single = a.n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in &files {
        pali_data::image::load8(p).expect("decodable");
    }
    let decode_only = a.n as f64 / t.elapsed().as_secs_f64();
    let first = pali_data::image::load8(&files[0])?;
    let t = Instant::now();
    for _ in 0..a.n {
        pali_data::image::preprocess8(&first, a.resolution, ResizeMethod::Bicubic);
    }
    let resize_only = a.n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let all: usize = files.par_iter().map(work).sum();
    let parallel = a.n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(one, all);
    // The same images packed into shards, read back as the loader reads a shard source.
    let jsonl = dir.join("images.jsonl");
    let lines: String = files
        .iter()
        .map(|p| {
            serde_json::json!({"image": p.file_name().unwrap().to_string_lossy(), "prefix": "caption en", "suffix": "x"})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&jsonl, lines)?;
    let shard_dir = dir.join("shards");
    pali_data::shards::pack_jsonl(
        &[jsonl],
        &shard_dir,
        &pali_data::shards::PackOptions::default(),
        &|_| {},
    )?;
    let shards = pali_data::shards::ShardDataset::open(&shard_dir)?;
    let from_shard = |i: usize| -> usize {
        use pali_data::dataset::Dataset;
        shards.get(i).expect("a row").images[0]
            .pixels(a.resolution, ResizeMethod::Bicubic)
            .expect("decodable")
            .len()
    };
    let t = Instant::now();
    let one_shard: usize = (0..a.n).map(from_shard).sum();
    let shard_single = a.n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let all_shard: usize = (0..a.n).into_par_iter().map(from_shard).sum();
    let shard_parallel = a.n as f64 / t.elapsed().as_secs_f64();
    assert_eq!((one_shard, all_shard), (one, all));
    // The augmented path: Inception crop + JPEG re-encode + random resize method.
    let aug = pali_data::transform::Transforms {
        augment: pali_data::transform::Augment {
            crop_min_area: Some(0.9),
            jpeg_quality: Some([70, 100]),
            random_resize: true,
        },
        ..Default::default()
    };
    let t = Instant::now();
    files.par_iter().enumerate().for_each(|(i, p)| {
        let im = pali_data::dataset::ImageSource::File(p.clone());
        aug.pixels(&im, a.resolution, ResizeMethod::Bicubic, Some(i as u64))
            .expect("decodable");
    });
    let augmented = a.n as f64 / t.elapsed().as_secs_f64();
    // Near-duplicate search: decode + pHash.
    let t = Instant::now();
    pali_data::dedup::hash_files(&files)?;
    let phash = a.n as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    let mut json = serde_json::json!({
        "what": "decode JPEG + bicubic resize + normalise",
        "source": format!("{0}x{0} JPEG, noise ±{1}", a.source_size, a.noise),
        "jpeg_kb_mean": jpeg_kb,
        "resolution": a.resolution,
        "images": a.n,
        "images_per_s_one_core": single,
        "images_per_s_all_cores": parallel,
        "decode_only_images_per_s_one_core": decode_only,
        "resize_only_images_per_s_one_core": resize_only,
        "shard_images_per_s_one_core": shard_single,
        "shard_images_per_s_all_cores": shard_parallel,
        "augmented_images_per_s_all_cores": augmented,
        "phash_images_per_s_all_cores": phash,
        "cores": rayon::current_num_threads(),
    });
    if let Some(cfg) = &a.config {
        let c = pali_trainer::config::RunConfig::load(cfg, &[])?;
        // The first stage's stream, as the trainer draws it.
        let plan =
            pali_trainer::stage::RunPlan::new::<crate::backend::Cpu>(&c, &Default::default())?;
        let sp = plan
            .stages
            .first()
            .context("the run config has no PaliGemma stage")?;
        let st = sp.stage;
        let mut mix = sp.mixture()?;
        let builder = sp.batch_builder();
        let t = Instant::now();
        for _ in 0..a.batches {
            pali_data::batch::next_batch(&mut mix, &builder, st.batch_size, st.on_error)?;
        }
        let bps = a.batches as f64 / t.elapsed().as_secs_f64();
        json["config"] = cfg.display().to_string().into();
        json["batches_per_s"] = bps.into();
        json["batch_size"] = st.batch_size.into();
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// `pali bench shards`: a shard reader's memory against the dataset's size.
#[derive(clap::Args, Debug)]
pub struct ShardsArgs {
    /// Rows to pack (one small synthetic PNG each).
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// Rows drawn through the loader afterwards.
    #[arg(long, default_value_t = 200_000)]
    pub draws: usize,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Side of the images (and the resolution they are read at).
    #[arg(long, default_value_t = 16)]
    pub image_side: usize,
    #[arg(long, default_value = "data/tokenizer/tokenizer.json")]
    pub tokenizer: PathBuf,
}

pub fn run_shards(a: ShardsArgs) -> Result<()> {
    use pali_data::shards::{Row, ShardDataset, ShardWriter};
    use std::sync::Arc;
    if a.rows == 0 || a.batch == 0 || a.image_side == 0 {
        bail!("--rows, --batch and --image-side must be > 0");
    }
    let tokenizer = Arc::new(pali_data::PaliTokenizer::from_file(&a.tokenizer)?);
    let side = a.image_side;
    let pngs: Vec<Vec<u8>> = (0..64u64)
        .map(|i| {
            let rgb = pali_data::synth::Scene::generate(0, 0, i).render(side);
            let mut out = std::io::Cursor::new(Vec::new());
            image::RgbImage::from_raw(side as u32, side as u32, rgb.to_u8())
                .expect("size")
                .write_to(&mut out, image::ImageFormat::Png)
                .expect("PNG in memory");
            out.into_inner()
        })
        .collect();
    let tmp = tempfile::Builder::new()
        .prefix("pali-bench-shards-")
        .tempdir()?;
    let out = tmp.path().join("shards");
    let bar = indicatif::ProgressBar::new(a.rows as u64);
    let t = Instant::now();
    let mut w = ShardWriter::create(&out, 64 << 20)?;
    for i in 0..a.rows {
        w.push(&Row {
            id: format!("row-{i}"),
            task: "caption".into(),
            prefix: "caption en".into(),
            suffix: format!("shape number {i}"),
            images: vec![pngs[i % pngs.len()].clone().into()],
        })?;
        if i % 4096 == 0 {
            bar.set_position(i as u64);
        }
    }
    let index = w.finish(Vec::new())?;
    bar.finish_and_clear();
    let pack_rows_per_s = a.rows as f64 / t.elapsed().as_secs_f64();
    let rss_before_open = status_mib("VmRSS:");
    let ds: Arc<dyn pali_data::dataset::Dataset> = Arc::new(ShardDataset::open(&out)?);
    let mut mix = pali_data::mixture::Mixture::new(vec![ds], &[1.0], 0)?;
    let builder = pali_data::batch::BatchBuilder {
        tokenizer,
        seq: pali_data::SequenceBuilder::new(32),
        resolution: side,
        resize: pali_data::image::ResizeMethod::Bicubic,
        frames: 1,
        transforms: Default::default(),
    };
    let batches = a.draws.div_ceil(a.batch);
    let mut rss = Vec::new();
    let t = Instant::now();
    for k in 0..batches {
        pali_data::batch::next_batch(
            &mut mix,
            &builder,
            a.batch,
            pali_data::dataset::OnError::Fail,
        )?;
        if k % (batches / 10).max(1) == 0 || k + 1 == batches {
            rss.push(serde_json::json!({
                "drawn": (k + 1) * a.batch,
                "rss_mib": status_mib("VmRSS:"),
            }));
        }
    }
    let read_rows_per_s = (batches * a.batch) as f64 / t.elapsed().as_secs_f64();
    // Random rows of the first shard, undecoded: burn-dataset's SqliteDataset against pali's
    // reader (which exists because SqliteDataset panics on a bad row).
    let reader = ShardDataset::open(&out)?;
    let rows = index.shards[0].rows;
    let picks: Vec<u64> = {
        let mut r = pali_data::rng::Rng::new(7);
        (0..20_000)
            .map(|_| 1 + r.below(rows as usize) as u64)
            .collect()
    };
    let t = Instant::now();
    for &row in &picks {
        reader.read(0, row)?;
    }
    let pali_rows_per_s = picks.len() as f64 / t.elapsed().as_secs_f64();
    let burn = burn_dataset::SqliteDataset::<Row>::from_db_file(
        reader.shard_path(0),
        pali_data::shards::SPLIT,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    for &row in &picks {
        use burn_dataset::Dataset as _;
        burn.get(row as usize - 1).context("a row")?;
    }
    let burn_rows_per_s = picks.len() as f64 / t.elapsed().as_secs_f64();
    let bytes: u64 = index.shards.iter().map(|s| s.bytes).sum();
    let json = serde_json::json!({
        "what": "pack N rows into shards, then draw batches from them (shuffled, decoded)",
        "rows": a.rows,
        "shards": index.shards.len(),
        "dataset_mb": bytes as f64 / 1e6,
        "pack_rows_per_s": pack_rows_per_s,
        "read_rows_per_s": read_rows_per_s,
        "random_row_reads_per_s_one_core": {
            "pali_shard_reader": pali_rows_per_s,
            "burn_dataset_sqlite_dataset": burn_rows_per_s,
        },
        "rss_mib_before_open": rss_before_open,
        "rss_while_reading": rss,
        "cores": rayon::current_num_threads(),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    /// Model preset (see `pali model list`); randomly initialised.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Prompt text tokens per row (after the image tokens).
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// New tokens per row (EOS is never produced: every row decodes this many).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// greedy, beam:K, temperature:T, nucleus:P[:T], best_of:N[:T].
    #[arg(long, default_value = "greedy")]
    pub decode: pali_eval::Sampler,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// `pali bench decode`: decoding throughput with and without the KV cache.
pub fn run_decode(a: DecodeArgs) -> Result<()> {
    let config = preset(&a.preset)?;
    let device_name = format!("{:?}", a.device.spec()?);
    let (cached, uncached) = dispatch(
        a.device.spec()?,
        DecodeJob {
            a: &a,
            config: &config,
        },
    )?;
    let tokens = (a.batch * a.new_tokens) as f64;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        v[v.len() / 2]
    };
    let (c, u) = (median(cached), median(uncached));
    let json = serde_json::json!({
        "what": "decode (prefill + new tokens)",
        "model": a.preset,
        "device": device_name,
        "decode": format!("{:?}", a.decode),
        "batch": a.batch,
        "prompt_tokens": config.num_image_tokens() + a.prompt_len,
        "new_tokens": a.new_tokens,
        "kv_cache": {"seconds_median": c, "new_tokens_per_second": tokens / c},
        "no_cache": {"seconds_median": u, "new_tokens_per_second": tokens / u},
        "speedup": u / c,
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

struct DecodeJob<'a> {
    a: &'a DecodeArgs,
    config: &'a PaliGemmaConfig,
}

impl Job for DecodeJob<'_> {
    type Output = (Vec<f64>, Vec<f64>);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let (a, c) = (self.a, self.config);
        B::seed(&device, 0);
        let model = c.init::<B>(&device);
        let r = c.vision.image_size();
        let n_img = c.num_image_tokens();
        let vocab = c.predictable_vocab() as i64;
        let prompt = |_: ()| {
            let ids: Vec<Vec<i64>> = (0..a.batch)
                .map(|b| {
                    let mut row = vec![c.image_token_id as i64; n_img];
                    row.extend(
                        (0..a.prompt_len).map(|i| 2 + ((b * 31 + i * 7) as i64) % (vocab - 2)),
                    );
                    row
                })
                .collect();
            pali_eval::Prompts {
                pixel_values: Tensor::<B, 5>::random(
                    [a.batch, 1, 3, r, r],
                    Distribution::Uniform(-1.0, 1.0),
                    &device,
                ),
                mask_ar: ids.iter().map(|r| vec![0; r.len()]).collect(),
                ids,
            }
        };
        let mut opts = pali_eval::DecodeOptions::greedy(a.new_tokens, u32::MAX);
        opts.sampler = a.decode;
        let mut time = |cache: bool| -> Result<Vec<f64>> {
            opts.use_cache = cache;
            // One untimed run (allocations, autotune), then the timed ones.
            pali_eval::decode(&model, prompt(()), c.text.sliding_window, &opts)?;
            (0..a.repeats.max(1))
                .map(|_| {
                    let t0 = Instant::now();
                    let out = pali_eval::decode(&model, prompt(()), c.text.sliding_window, &opts)?;
                    let _ = B::sync(&device);
                    debug_assert!(out.iter().all(|d| d.tokens.len() == a.new_tokens));
                    Ok(t0.elapsed().as_secs_f64())
                })
                .collect()
        };
        Ok((time(true)?, time(false)?))
    }
}

#[derive(clap::Args, Debug)]
pub struct AllReduceArgs {
    /// Size of the all-reduced f32 tensor, in MB (10^6 bytes).
    #[arg(long, default_value_t = 64.0)]
    pub size_mb: f64,
    /// Timed all-reduces (after 2 untimed).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[command(flatten)]
    pub device: DeviceArg,
    #[command(flatten)]
    pub dist: crate::cmd::launch::DistArgs,
}

/// `pali bench allreduce`: all-reduce time and bandwidth over this run's ranks (start it with
/// `pali launch --nproc 2 -- bench allreduce`); rank 0 prints JSON.
pub fn run_allreduce(a: AllReduceArgs) -> Result<()> {
    let devices = a
        .device
        .device
        .clone()
        .unwrap_or(crate::backend::Devices(vec![
            crate::backend::DeviceSpec::Cpu,
        ]));
    let (topo, devices) = a.dist.topology(devices)?;
    if devices.0.len() != 1 {
        bail!("bench allreduce: one device per process (start more processes with pali launch)");
    }
    let out = dispatch(devices.0[0], AllReduceJob { a: &a, topo: &topo })?;
    if let Some(v) = out {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

struct AllReduceJob<'a> {
    a: &'a AllReduceArgs,
    topo: &'a pali_trainer::dist::Topology,
}

impl Job for AllReduceJob<'_> {
    type Output = Option<serde_json::Value>;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        use burn::tensor::ElementConversion;
        use pali_trainer::dist::{start_node, Peer};
        let (a, topo) = (self.a, self.topo);
        start_node(topo)?;
        let peer = Peer::<B>::join(topo, 0, 1, device.clone())?;
        let n = ((a.size_mb * 1e6 / 4.0) as usize).max(1);
        let t = Tensor::<B, 1>::ones([n], &device);
        let mut times = Vec::new();
        for i in 0..a.iters + 2 {
            let start = Instant::now();
            let s = peer.sum(t.clone())?;
            // The first element waits for the result.
            let first = s.slice(0..1).into_scalar().elem::<f64>();
            if first != peer.world as f64 {
                bail!("all-reduce of ones gave {first}, not {}", peer.world);
            }
            if i >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        if peer.rank != 0 {
            return Ok(None);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = (n * 4) as f64;
        let w = peer.world as f64;
        Ok(Some(serde_json::json!({
            "ranks": peer.world,
            "bytes": bytes,
            "iters": a.iters,
            "median_s": median,
            "min_s": times[0],
            // NCCL's conventions: algorithm bandwidth = size / time; bus bandwidth scales it by
            // 2 (n − 1) / n, what each link carries in a ring.
            "algbw_gb_per_s": bytes / median / 1e9,
            "busbw_gb_per_s": bytes / median / 1e9 * 2.0 * (w - 1.0) / w,
        })))
    }
}
