//! `pali vqvae train|encode|decode`: the segmentation mask tokenizer.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use pali_data::masks::BinaryMask;
use pali_eval::segmentation::parse_seg_tokens;
use pali_model::vqvae::{self, VqVaeConfig};
use pali_trainer::vqvae::{train_vqvae, MaskSource, VqTrainOptions};

use crate::backend::{dispatch, Job};
use crate::progress::Console;
use crate::DeviceArg;

#[derive(clap::Subcommand, Debug)]
pub enum VqvaeCommand {
    /// Train a VQ-VAE on masks (synthetic or a directory of PNG masks).
    Train(TrainArgs),
    /// A mask (PNG, any size; cropped to its own box unless --box) → `<loc×4><seg×16>`.
    Encode(CodecArgs),
    /// 16 `<segNNN>` tokens (with or without the 4 `<loc>`) → a mask PNG.
    Decode(DecodeArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Train on the synthetic mask stream.
    #[arg(long, conflicts_with = "masks")]
    pub synthetic: bool,
    /// Directory of mask images (white = inside).
    #[arg(long)]
    pub masks: Option<PathBuf>,
    #[arg(long, default_value = "runs/vqvae")]
    pub out: PathBuf,
    /// Move a run already in `--out` aside (to `OUT.old-N`; nothing is deleted) and start
    /// afresh. Without it, such a directory is refused.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, default_value_t = 3000)]
    pub steps: u64,
    /// Stop after this many minutes even if `--steps` is not reached.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.25)]
    pub beta: f64,
    /// Codebook width D (big_vision's checkpoint has its own; see docs/segmentation.md).
    #[arg(long, default_value_t = 64)]
    pub embed_dim: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 256)]
    pub eval_masks: usize,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(clap::Args, Debug)]
pub struct CodecArgs {
    /// VQ-VAE weights: `vqvae.safetensors` from `pali vqvae train`, or big_vision's `vae-oid.npz`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub mask: PathBuf,
    /// Box `y_min,x_min,y_max,x_max` in [0, 1] (default: the mask's own box).
    #[arg(long, value_delimiter = ',', num_args = 4)]
    pub r#box: Option<Vec<f32>>,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// `<seg…>`×16, optionally after `<loc…>`×4 (then the mask is placed in its box).
    #[arg(long)]
    pub tokens: String,
    /// Output size WIDTHxHEIGHT (default 64x64: the crop itself).
    #[arg(long, default_value = "64x64")]
    pub size: String,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(cmd: VqvaeCommand) -> Result<()> {
    match cmd {
        VqvaeCommand::Train(a) => {
            let spec = a.device.spec()?;
            dispatch(spec, TrainJob(a))
        }
        VqvaeCommand::Encode(a) => {
            let spec = a.device.spec()?;
            dispatch(spec, EncodeJob(a))
        }
        VqvaeCommand::Decode(a) => {
            let spec = a.device.spec()?;
            dispatch(spec, DecodeJob(a))
        }
    }
}

struct TrainJob(TrainArgs);

impl Job for TrainJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.0;
        let masks = match (&a.masks, a.synthetic) {
            (Some(d), _) => MaskSource::Dir(d.clone()),
            (None, true) => MaskSource::Synthetic,
            (None, false) => bail!("give --synthetic or --masks DIR"),
        };
        let opts = VqTrainOptions {
            masks,
            out_dir: a.out.clone(),
            overwrite: a.overwrite,
            config: VqVaeConfig::new().with_embed_dim(a.embed_dim),
            steps: a.steps,
            max_minutes: a.max_minutes,
            batch_size: a.batch_size,
            lr: a.lr,
            beta: a.beta,
            seed: a.seed,
            eval_masks: a.eval_masks,
            log_every: 10,
        };
        let s = train_vqvae::<B>(&opts, &device, &Console::new(!a.quiet))?;
        println!("{}", serde_json::to_string_pretty(&s)?);
        Ok(())
    }
}

struct EncodeJob(CodecArgs);

impl Job for EncodeJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.0;
        let (_, model) = vqvae::load::<B>(&a.checkpoint, &device)
            .with_context(|| format!("loading {}", a.checkpoint.display()))?;
        let m = BinaryMask::load(&a.mask)?;
        let bbox = match &a.r#box {
            Some(b) => [b[0], b[1], b[2], b[3]],
            None => m
                .bbox()
                .with_context(|| format!("{}: the mask is empty", a.mask.display()))?,
        };
        let crop = m.crop64(bbox)?;
        let x = Tensor::<B, 4>::from_data(TensorData::new(crop, [1, 1, 64, 64]), &device);
        let (codes, _) = model.quantize(model.encode(x));
        let codes: Vec<i64> = codes.into_data().iter::<i64>().collect();
        let loc: String = bbox
            .iter()
            .map(|c| format!("<loc{:04}>", (c * 1023.0).round().clamp(0.0, 1023.0) as u32))
            .collect();
        let seg: String = codes.iter().map(|c| format!("<seg{c:03}>")).collect();
        println!("{loc}{seg}");
        Ok(())
    }
}

struct DecodeJob(DecodeArgs);

impl Job for DecodeJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.0;
        let (_, model) = vqvae::load::<B>(&a.checkpoint, &device)
            .with_context(|| format!("loading {}", a.checkpoint.display()))?;
        let (w, h) = a
            .size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
            .filter(|(w, h)| *w > 0 && *h > 0)
            .with_context(|| format!("--size `{}`: expected WIDTHxHEIGHT", a.size))?;
        let (loc, codes) = parse_seg_tokens(&a.tokens, model.codebook_size())?;
        let t = Tensor::<B, 2, Int>::from_data(
            TensorData::new(codes.iter().map(|c| *c as i64).collect::<Vec<_>>(), [1, 16]),
            &device,
        );
        let m64: Vec<f32> = model.decode(t).into_data().iter::<f32>().collect();
        let mask = pali_eval::segmentation::place_mask(&m64, loc, w, h);
        mask.save_png(&a.out)?;
        eprintln!(
            "wrote {} ({}x{}, {} pixels inside)",
            a.out.display(),
            w,
            h,
            mask.area()
        );
        Ok(())
    }
}
