//! Training the VQ-VAE mask tokenizer: reconstruction (MSE to the ±1 mask) + codebook loss +
//! β·commitment loss, straight-through gradients, Adam; unused codebook rows are re-seeded from
//! encoder outputs (data-dependent initialisation, dead-code restarts) so all 128 `<seg>` codes
//! stay in use. Reports the mean
//! IoU of mask → 16 codes → mask on held-out masks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use pali_data::masks::{synthetic_mask, BinaryMask};
use pali_data::rng::Rng;
use pali_model::vqvae::{self, VqVae, VqVaeConfig, MASK_SIZE};
use serde_json::json;

use crate::error::{io, Error, Result};
use crate::events::{Event, Observer, StepLog};
use crate::rundir::{holds_run, Existing, RunDir};

/// Where training masks come from.
#[derive(Debug, Clone)]
pub enum MaskSource {
    /// The synthetic stream of `pali_data::masks::synthetic_mask`.
    Synthetic,
    /// Every PNG/JPEG mask file in a directory (each cropped to its own box).
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct VqTrainOptions {
    pub masks: MaskSource,
    pub out_dir: PathBuf,
    /// Move a run already in `out_dir` aside instead of refusing the directory (see
    /// [`crate::rundir`]).
    pub overwrite: bool,
    pub config: VqVaeConfig,
    /// Stop after this many steps…
    pub steps: u64,
    /// …or after this much wall time, whichever comes first.
    pub max_minutes: Option<f64>,
    pub batch_size: usize,
    pub lr: f64,
    /// Commitment weight β.
    pub beta: f64,
    pub seed: u64,
    /// Held-out masks for the IoU report.
    pub eval_masks: usize,
    pub log_every: u64,
}

/// What a run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VqSummary {
    pub steps: u64,
    pub seconds: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Mean IoU of mask → codes → mask on held-out masks (64×64 crops, decoder output > 0).
    pub heldout_miou: f64,
    pub heldout_masks: usize,
    /// Distinct codes used on the held-out masks.
    pub codes_used: usize,
    pub checkpoint: PathBuf,
}

/// Held-out synthetic masks use a seed no training run uses.
const HELDOUT_SEED: u64 = 0x0004_E1D0;

/// 64×64 crops in [0, 1] of masks `start..start + n` of a source.
fn crops(
    source: &MaskSource,
    files: &[PathBuf],
    seed: u64,
    start: u64,
    n: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n * MASK_SIZE * MASK_SIZE);
    for k in 0..n as u64 {
        let m = match source {
            MaskSource::Synthetic => synthetic_mask(seed, start + k),
            MaskSource::Dir(_) => {
                BinaryMask::load(&files[((start + k) % files.len() as u64) as usize])?
            }
        };
        let Some(b) = m.bbox() else {
            return Err(Error::Train(format!("mask {} is empty", start + k)));
        };
        out.extend(m.crop64(b)?);
    }
    Ok(out)
}

fn mask_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "bmp"
                )
            })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Config(format!(
            "{}: no PNG/JPEG/BMP mask files",
            dir.display()
        )));
    }
    Ok(files)
}

/// Mean IoU of the round trip on `masks` (64×64 crops in [0, 1]; inside = ≥ 0.5), and the
/// number of distinct codes used.
pub fn round_trip_iou<B: Backend>(
    model: &VqVae<B>,
    masks: &[f32],
    device: &B::Device,
) -> (f64, usize) {
    let n = masks.len() / (MASK_SIZE * MASK_SIZE);
    let mut sum = 0.0;
    let mut used = std::collections::BTreeSet::new();
    for start in (0..n).step_by(64) {
        let b = (n - start).min(64);
        let px = &masks[start * 4096..(start + b) * 4096];
        let x = Tensor::<B, 4>::from_data(TensorData::new(px.to_vec(), [b, 1, 64, 64]), device);
        let (codes, _) = model.quantize(model.encode(x));
        used.extend(codes.clone().into_data().iter::<i64>());
        let rec: Vec<f32> = model.decode(codes).into_data().iter::<f32>().collect();
        for i in 0..b {
            let (mut inter, mut union) = (0usize, 0usize);
            for p in 0..4096 {
                let (t, r) = (px[i * 4096 + p] >= 0.5, rec[i * 4096 + p] > 0.0);
                inter += usize::from(t && r);
                union += usize::from(t || r);
            }
            sum += if union == 0 {
                1.0
            } else {
                inter as f64 / union as f64
            };
        }
    }
    (sum / n.max(1) as f64, used.len())
}

/// Trains a VQ-VAE; writes `vqvae.safetensors`, `config.json`, `metrics.jsonl` and
/// `summary.json` under `out_dir`.
pub fn train_vqvae<B: Backend>(
    opts: &VqTrainOptions,
    device: &B::Device,
    obs: &dyn Observer,
) -> Result<VqSummary> {
    type AD<B> = Autodiff<B>;
    if !opts.overwrite && holds_run(&opts.out_dir) {
        return Err(Error::Config(format!(
            "{} already holds a run; pass --overwrite to move it aside (nothing is deleted)",
            opts.out_dir.display()
        )));
    }
    let existing = if opts.overwrite {
        Existing::Overwrite
    } else {
        Existing::Refuse
    };
    let run_dir = RunDir::open(&opts.out_dir, existing)?;
    if let Some(aside) = &run_dir.moved_aside {
        obs.on(Event::Info(&format!(
            "moved the earlier run to {}",
            aside.display()
        )));
    }
    let files = match &opts.masks {
        MaskSource::Dir(d) => mask_files(d)?,
        MaskSource::Synthetic => Vec::new(),
    };
    // Held-out masks: another seed of the synthetic stream, or the last tenth of the files
    // (a single file is both).
    let (heldout, train_files) = match &opts.masks {
        MaskSource::Synthetic => (
            crops(&opts.masks, &files, HELDOUT_SEED, 0, opts.eval_masks)?,
            files,
        ),
        MaskSource::Dir(_) => {
            let held_n = (files.len() / 10).max(1);
            let split = files.len().saturating_sub(held_n).max(1).min(files.len());
            let held = if files.len() == 1 {
                files.clone()
            } else {
                files[split..].to_vec()
            };
            let train = files[..split].to_vec();
            (crops(&opts.masks, &held, 0, 0, held.len())?, train)
        }
    };
    <AD<B> as Backend>::seed(device, opts.seed);
    let mut model: VqVae<AD<B>> = opts.config.init(device);
    let mut optim = AdamConfig::new().init::<AD<B>, VqVae<AD<B>>>();
    let metrics = opts.out_dir.join("metrics.jsonl");
    let _ = std::fs::remove_file(&metrics);
    obs.on(Event::Begin {
        name: "vqvae",
        steps: opts.steps,
        start: 0,
        details: &[],
    });
    let started = Instant::now();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let k = opts.config.codebook_size;
    let mut usage = vec![0u64; k];
    let mut rng = Rng::derive(opts.seed, &[0xC0DE]);
    let bs = opts.batch_size;
    let mut step = 0u64;
    while step < opts.steps {
        if opts
            .max_minutes
            .is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0)
        {
            break;
        }
        let px = crops(&opts.masks, &train_files, opts.seed, step * bs as u64, bs)?;
        let x = Tensor::<AD<B>, 4>::from_data(TensorData::new(px.clone(), [bs, 1, 64, 64]), device);
        let target = (x.clone() - 0.5) * 2.0;
        let out = model.forward(x);
        let recon = (out.recon - target).powf_scalar(2.0).mean();
        let codebook = (out.quantized.clone() - out.z.clone().detach())
            .powf_scalar(2.0)
            .mean();
        let commit = (out.z.clone() - out.quantized.detach())
            .powf_scalar(2.0)
            .mean();
        let loss = recon.clone() + codebook + commit * opts.beta;
        let lv = loss.clone().into_scalar().elem::<f64>();
        if !lv.is_finite() {
            return Err(Error::Train(format!("vqvae step {step}: loss became {lv}")));
        }
        let codes: Vec<i64> = out.codes.clone().into_data().iter::<i64>().collect();
        for c in &codes {
            usage[*c as usize] += 1;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(opts.lr, model, grads);
        step += 1;
        if first.is_nan() {
            first = lv;
        }
        last = lv;
        // Data-dependent initialisation (every row from an encoder output of the first batch),
        // then dead-code restarts: rows no cell picked in the last 20 steps take the value of a
        // random encoder output of this batch (plus a little noise). Without them the encoder
        // outputs drift away from a codebook that only a few cells ever reach.
        if step == 1 || step.is_multiple_of(20) {
            let dead: Vec<usize> = (0..k).filter(|i| step == 1 || usage[*i] == 0).collect();
            if !dead.is_empty() {
                let d = model.embed_dim();
                let z: Vec<f32> = out
                    .z
                    .clone()
                    .detach()
                    .permute([0, 2, 3, 1])
                    .into_data()
                    .iter::<f32>()
                    .collect();
                let cells = z.len() / d;
                let mut book: Vec<f32> = model.codebook.val().into_data().iter::<f32>().collect();
                for &i in &dead {
                    let c = rng.below(cells);
                    for j in 0..d {
                        book[i * d + j] = z[c * d + j] + rng.range(-0.01, 0.01);
                    }
                }
                let t = Tensor::<AD<B>, 2>::from_data(TensorData::new(book, [k, d]), device);
                model.codebook = model.codebook.map(|_| t.require_grad());
            }
            usage.iter_mut().for_each(|u| *u = 0);
        }
        let mut logged = None;
        if step.is_multiple_of(opts.log_every) || step == opts.steps {
            let r = recon.into_scalar().elem::<f64>();
            let line = json!({"step": step, "loss": lv, "recon": r, "seconds": started.elapsed().as_secs_f64()});
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics)
                .map_err(io(&metrics))?;
            use std::io::Write;
            writeln!(f, "{line}").map_err(io(&metrics))?;
            logged = Some(StepLog {
                loss: lv,
                lr: opts.lr,
                tokens_per_s: f64::NAN,
                extra: Some(("recon", r)),
            });
        }
        obs.on(Event::Step {
            done: step,
            log: logged.as_ref(),
        });
    }
    obs.on(Event::End);
    let valid = model.valid();
    let (miou, used) = round_trip_iou(&valid, &heldout, device);
    let ckpt = opts.out_dir.join("vqvae.safetensors");
    vqvae::save(&valid, &ckpt)?;
    let cfg_path = opts.out_dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&opts.config).expect("json"),
    )
    .map_err(io(&cfg_path))?;
    let summary = VqSummary {
        steps: step,
        seconds: started.elapsed().as_secs_f64(),
        first_loss: first,
        last_loss: last,
        heldout_miou: miou,
        heldout_masks: heldout.len() / 4096,
        codes_used: used,
        checkpoint: ckpt,
    };
    let sp = opts.out_dir.join("summary.json");
    std::fs::write(&sp, serde_json::to_string_pretty(&summary).expect("json")).map_err(io(&sp))?;
    Ok(summary)
}

/// The VQ-VAE as the data crate's mask encoder (the `segment` task's targets).
pub struct VqVaeEncoder<B: Backend> {
    pub model: pali_model::vqvae::VqVae<B>,
    pub device: B::Device,
}

impl<B: Backend> VqVaeEncoder<B> {
    /// The VQ-VAE checkpoint at `path` (`.npz` or safetensors).
    pub fn load(path: &std::path::Path, device: &B::Device) -> pali_model::Result<Self> {
        Ok(Self {
            model: pali_model::vqvae::load(path, device)?.1,
            device: device.clone(),
        })
    }
}

impl<B: Backend> pali_data::masks::MaskEncoder for VqVaeEncoder<B> {
    fn encode(&self, crop64: &[f32]) -> pali_data::Result<[u32; 16]> {
        if crop64.len() != 64 * 64 {
            return Err(pali_data::Error::Invalid(format!(
                "mask crop has {} values, expected 64x64 = 4096",
                crop64.len()
            )));
        }
        let x = burn::tensor::Tensor::<B, 4>::from_data(
            burn::tensor::TensorData::new(crop64.to_vec(), [1, 1, 64, 64]),
            &self.device,
        );
        let (codes, _) = self.model.quantize(self.model.encode(x));
        let v: Vec<i64> = codes.into_data().iter::<i64>().collect();
        let mut out = [0u32; 16];
        for (o, c) in out.iter_mut().zip(v) {
            *o = c as u32;
        }
        Ok(out)
    }
}
