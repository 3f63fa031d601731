//! `pali eval` (decode a dataset and score it), `pali score` (score prediction files offline),
//! `pali predict` (one image, optionally drawn). Formats: docs/eval.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use pali_data::batch::BatchBuilder;
use pali_data::dataset::{Dataset, Example, ImageSource, JsonlDataset, OnError};
use pali_data::image::ResizeMethod;
use pali_data::{PaliTokenizer, SequenceBuilder};
use pali_eval::perplexity::Perplexity;
use pali_eval::run::{predict, references_from_suffix, PredictOptions};
use pali_eval::score::{pair, read_references, score, Prediction};
use pali_eval::segmentation::{MaskDecoder, VqVaeDecoder};
use pali_eval::{DecodeOptions, Sampler, Task};
use pali_model::{PaliGemma, PaliGemmaConfig};
use pali_trainer::config::{Attention, LossOn};
use pali_trainer::evaluate::batch_nll;
use serde_json::{json, Value};

use crate::backend::{dispatch, Job};
use crate::DeviceArg;

/// Decoding flags shared by `eval` and `predict`.
#[derive(clap::Args, Debug, Clone)]
pub struct DecodeArgs {
    /// greedy, beam:K, temperature:T, nucleus:P[:T], best_of:N[:T].
    #[arg(long, default_value = "greedy")]
    pub decode: Sampler,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Tokens never to produce, comma-separated (e.g. `<noise>,<eos>` for PaliGemma 2
    /// detection).
    #[arg(long, value_delimiter = ',')]
    pub forbid: Vec<String>,
    /// Re-run the whole sequence every step instead of using the KV cache (for measurements).
    #[arg(long)]
    pub no_cache: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompt length limit in tokens.
    #[arg(long, default_value_t = 128)]
    pub text_len: usize,
    #[arg(long, value_enum, default_value = "bicubic")]
    pub resize: Resize,
    /// Resize images to this resolution first (as a stage's `downscale`).
    #[arg(long)]
    pub downscale: Option<usize>,
    /// Tiles per side, each its own frame (as a stage's `window`).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Tokenizer (default: `tokenizer.json` in the checkpoint directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Matmul dtype, `f32` or `bf16` (weights stay f32; see `run.dtype` in docs/config.md).
    #[arg(long, default_value = "f32")]
    pub dtype: pali_model::Compute,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Resize {
    Bicubic,
    Bilinear,
    BilinearNoAntialias,
}

impl DecodeArgs {
    fn transforms(&self) -> Result<pali_data::transform::Transforms> {
        if self.window == 0 || self.downscale == Some(0) {
            anyhow::bail!("--window and --downscale must be > 0");
        }
        Ok(pali_data::transform::Transforms {
            downscale: self.downscale,
            window: self.window,
            ..Default::default()
        })
    }
}

impl From<Resize> for ResizeMethod {
    fn from(r: Resize) -> Self {
        match r {
            Resize::Bicubic => ResizeMethod::Bicubic,
            Resize::Bilinear => ResizeMethod::Bilinear,
            Resize::BilinearNoAntialias => ResizeMethod::BilinearNoAntialias,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory (`config.json` + safetensors), from HF or `pali train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Data: big_vision JSONL (`{"image", "prefix", "suffix"}`, optional `"id"`).
    #[arg(long)]
    pub data: PathBuf,
    /// caption, vqa, vqav2, docvqa, chartqa, detect, refcoco or perplexity.
    #[arg(long)]
    pub task: Task,
    /// References in `pali score`'s format, paired by `id` (default: each line's suffix).
    #[arg(long)]
    pub references: Option<PathBuf>,
    /// Write the predictions here (JSONL, `pali score`'s format).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// VQ-VAE weights to decode RefCOCO `<seg>` tokens into masks (else the box is the mask).
    #[arg(long)]
    pub vqvae: Option<PathBuf>,
    #[command(flatten)]
    pub decoding: DecodeArgs,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    #[arg(long)]
    pub task: Task,
    /// `{"id", "prediction"[, "scores"]}` per line.
    #[arg(long)]
    pub predictions: PathBuf,
    /// Per task, see docs/eval.md.
    #[arg(long)]
    pub references: PathBuf,
    /// VQ-VAE weights to decode RefCOCO `<seg>` tokens into masks (`pali vqvae train` output or
    /// big_vision's `vae-oid.npz`); without it the predicted box is the mask.
    #[arg(long)]
    pub vqvae: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    /// The prefix, e.g. `caption en`, `detect cat ; dog`, `answer en what is this?`.
    #[arg(long)]
    pub prompt: String,
    /// Draw the detected boxes (if any) onto the image and save it as PNG here.
    #[arg(long)]
    pub draw: Option<PathBuf>,
    /// VQ-VAE weights: with `--draw`, segmentation outputs (`<loc×4><seg×16>`) are drawn as
    /// masks too.
    #[arg(long)]
    pub vqvae: Option<PathBuf>,
    #[command(flatten)]
    pub decoding: DecodeArgs,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run_score(a: ScoreArgs) -> Result<()> {
    let decoder = match &a.vqvae {
        Some(p) => Some(mask_decoder::<crate::backend::Cpu>(p, &Default::default())?),
        None => None,
    };
    let m = pali_eval::score_files(
        a.task,
        &a.predictions,
        &a.references,
        decoder.as_ref().map(|d| d as &dyn MaskDecoder),
    )?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    dispatch(a.device.spec()?, EvalJob(a))
}

pub fn run_predict(a: PredictArgs) -> Result<()> {
    dispatch(a.device.spec()?, PredictJob(a))
}

/// A VQ-VAE checkpoint as the RefCOCO mask decoder.
fn mask_decoder<B: Backend>(path: &Path, device: &B::Device) -> Result<VqVaeDecoder<B>> {
    VqVaeDecoder::load(path, device)
        .with_context(|| format!("loading the VQ-VAE {}", path.display()))
}

/// Model (computing in `d.dtype`), config and tokenizer of a checkpoint directory.
fn load<B: Backend>(
    dir: &Path,
    d: &DecodeArgs,
    device: &B::Device,
) -> Result<(PaliGemma<B>, PaliGemmaConfig, PaliTokenizer)> {
    if !d.dtype.supported::<B>(device) {
        bail!("--dtype {}: device {device:?} does not support it", d.dtype);
    }
    let (cfg, model) = pali_model::load_hf::<B>(dir, device)
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let model = model.with_compute(d.dtype);
    let tok_path = d
        .tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    if !tok_path.is_file() {
        bail!(
            "no tokenizer: {} does not exist; pass --tokenizer",
            tok_path.display()
        );
    }
    let tok = PaliTokenizer::from_file(&tok_path)?;
    Ok((model, cfg, tok))
}

fn decode_options(d: &DecodeArgs, tok: &PaliTokenizer) -> Result<DecodeOptions> {
    let mut forbid = Vec::new();
    for t in &d.forbid {
        let id = match t.as_str() {
            "<eos>" => tok.eos,
            s => tok.token_id(s).with_context(|| {
                format!("--forbid: `{s}` is not a single token of the tokenizer")
            })?,
        };
        forbid.push(id);
    }
    Ok(DecodeOptions {
        sampler: d.decode,
        max_new: d.max_new_tokens,
        eos: tok.eos,
        forbid,
        seed: d.seed,
        use_cache: !d.no_cache,
    })
}

fn image_resolution(cfg: &PaliGemmaConfig) -> usize {
    cfg.vision.image_size()
}

struct EvalJob(EvalArgs);

impl Job for EvalJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.0;
        let (model, cfg, tok) = load::<B>(&a.checkpoint, &a.decoding, &device)?;
        let data = JsonlDataset::open(&a.data, OnError::Fail, false)?;
        let n = a.limit.unwrap_or(usize::MAX).min(data.len());
        let examples: Vec<Example> = (0..n).map(|i| data.get(i)).collect::<Result<_, _>>()?;
        let res = image_resolution(&cfg);
        let bar = |len: usize, what: &str| {
            let b = if a.quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(len as u64)
            };
            b.set_style(
                ProgressStyle::with_template(&format!(
                    "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
                ))
                .expect("template"),
            );
            b
        };
        if a.task == Task::Perplexity {
            let m = perplexity(
                &model,
                &cfg,
                tok,
                &examples,
                &a,
                res,
                &device,
                bar(n, "perplexity"),
            )?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            return Ok(());
        }
        let opts = PredictOptions {
            decode: decode_options(&a.decoding, &tok)?,
            text_len: a.decoding.text_len,
            resolution: res,
            resize: a.decoding.resize.into(),
            batch_size: a.batch_size,
            transforms: a.decoding.transforms()?,
        };
        let pb = bar(n, "decoding");
        let (preds, thr) = predict(&model, &cfg, &tok, &examples, &opts, &device, |k| {
            pb.set_position(k as u64)
        })?;
        pb.finish_and_clear();
        let predictions: Vec<(usize, Prediction)> = preds
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    i + 1,
                    Prediction {
                        id: p.id.clone(),
                        prediction: p.prediction.clone(),
                        scores: Some(p.object_scores.clone()).filter(|_| a.task == Task::Detect),
                    },
                )
            })
            .collect();
        let decoder = match &a.vqvae {
            Some(p) => Some(mask_decoder::<B>(p, &device)?),
            None => None,
        };
        let decoder = decoder.as_ref().map(|d| d as &dyn MaskDecoder);
        let mut metrics = match &a.references {
            Some(path) => {
                let refs = read_references(path, a.task)?;
                let out = a
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("(predictions)"));
                score(a.task, &pair(&predictions, &out, &refs, path)?, decoder)?
            }
            None => {
                let refs = references_from_suffix(a.task, &examples);
                let pairs: Vec<_> = predictions
                    .iter()
                    .map(|(_, p)| p)
                    .zip(refs.iter())
                    .collect();
                score(a.task, &pairs, decoder)?
            }
        };
        if let Value::Object(m) = &mut metrics {
            m.entry("invalid").or_insert(json!(0));
            m.insert("decode_tokens_per_s".into(), json!(thr.tokens_per_second()));
            m.insert("decode".into(), json!(format!("{:?}", opts.decode.sampler)));
            m.insert("kv_cache".into(), json!(opts.decode.use_cache));
            m.insert("dtype".into(), json!(a.decoding.dtype.to_string()));
        }
        if let Some(out) = &a.out {
            let mut f = std::fs::File::create(out).with_context(|| format!("{}", out.display()))?;
            for ((_, p), full) in predictions.iter().zip(&preds) {
                let mut line =
                    json!({"id": p.id, "prediction": p.prediction, "prefix": full.prefix});
                if let Some(s) = &p.scores {
                    line["scores"] = json!(s);
                }
                writeln!(f, "{line}")?;
            }
            eprintln!(
                "wrote {} predictions to {}",
                predictions.len(),
                out.display()
            );
        }
        println!("{}", serde_json::to_string_pretty(&metrics)?);
        Ok(())
    }
}

/// Perplexity on the suffix tokens, prefix-LM masks and suffix loss weights as in training.
#[allow(clippy::too_many_arguments)]
fn perplexity<B: Backend>(
    model: &PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    tok: PaliTokenizer,
    examples: &[Example],
    a: &EvalArgs,
    res: usize,
    device: &B::Device,
    pb: ProgressBar,
) -> Result<Value> {
    let frames = examples.first().map_or(1, |e| e.images.len());
    let builder = BatchBuilder {
        tokenizer: Arc::new(tok),
        seq: SequenceBuilder::new(a.decoding.text_len),
        resolution: res,
        resize: a.decoding.resize.into(),
        frames,
        transforms: a.decoding.transforms()?,
    };
    let mut ppl = Perplexity::default();
    let mut truncated = 0;
    for chunk in examples.chunks(a.batch_size.max(1)) {
        let rows = chunk
            .iter()
            .map(|e| Ok((0, e.clone(), builder.encode(e, None)?)))
            .collect::<Result<Vec<_>, pali_data::Error>>()?;
        let (nll, cut) = batch_nll(
            model,
            cfg,
            &builder,
            rows,
            Attention::PrefixLm,
            LossOn::Suffix,
            device,
        )?;
        truncated += cut;
        for (n, t) in nll {
            ppl.add("data", n, t);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let (_, p, tokens) = ppl.per_task().remove(0);
    Ok(
        json!({"perplexity": p, "tokens": tokens, "n": examples.len(), "invalid": 0,
              "truncated": truncated, "dtype": a.decoding.dtype.to_string()}),
    )
}

struct PredictJob(PredictArgs);

impl Job for PredictJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.0;
        let (model, cfg, tok) = load::<B>(&a.checkpoint, &a.decoding, &device)?;
        // Fail early, with the path, on a missing or undecodable image.
        let original = image::open(&a.image)
            .with_context(|| format!("reading image {}", a.image.display()))?
            .to_rgb8();
        let ex = Example {
            id: a.image.display().to_string(),
            images: vec![ImageSource::File(a.image.clone())],
            prefix: a.prompt.clone(),
            suffix: String::new(),
        };
        let opts = PredictOptions {
            decode: decode_options(&a.decoding, &tok)?,
            text_len: a.decoding.text_len,
            resolution: image_resolution(&cfg),
            resize: a.decoding.resize.into(),
            batch_size: 1,
            transforms: a.decoding.transforms()?,
        };
        let (preds, thr) = predict(&model, &cfg, &tok, &[ex], &opts, &device, |_| {})?;
        let p = &preds[0];
        println!("{}", p.prediction);
        eprintln!(
            "{} tokens, {:.1} tokens/s, total log-prob {:.3}",
            thr.new_tokens,
            thr.tokens_per_second(),
            p.decoded.total_logprob()
        );
        if let Some(out) = &a.draw {
            let (dets, _) = pali_eval::detection::parse_detections(&p.prediction);
            let mut img = original;
            let (w, h) = (img.width() as f64, img.height() as f64);
            for (k, d) in dets.iter().enumerate() {
                let [x0, y0, x1, y1] = d.to_pixels(w, h);
                let colour = PALETTE[k % PALETTE.len()];
                draw_box(&mut img, [x0, y0, x1, y1], colour);
                draw_text(&mut img, x0 as i64 + 2, y0 as i64 + 2, &d.label, colour);
                eprintln!(
                    "  {} [{:.0}, {:.0}, {:.0}, {:.0}] score {:.3}",
                    d.label,
                    x0,
                    y0,
                    x1,
                    y1,
                    p.object_scores.get(k).copied().unwrap_or(1.0)
                );
            }
            let mut masks = 0;
            if let Some(vae) = &a.vqvae {
                let dec = mask_decoder::<B>(vae, &device)?;
                for (k, part) in p.prediction.split(';').enumerate() {
                    let Some(seg) = pali_eval::segmentation::parse_segmentation(part) else {
                        continue;
                    };
                    let Some(codes) = seg.seg else { continue };
                    let m64 = dec.decode(&codes);
                    let (iw, ih) = (img.width() as usize, img.height() as usize);
                    let m = pali_eval::segmentation::place_mask(&m64, Some(seg.loc), iw, ih);
                    let c = PALETTE[k % PALETTE.len()];
                    for (i, inside) in m.data.iter().enumerate() {
                        if *inside {
                            let px = img.get_pixel_mut((i % iw) as u32, (i / iw) as u32);
                            for (v, cc) in px.0.iter_mut().zip(c) {
                                *v = ((*v as u16 + cc as u16) / 2) as u8;
                            }
                        }
                    }
                    masks += 1;
                }
            }
            img.save(out)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "drew {} boxes and {masks} masks onto {}",
                dets.len(),
                out.display()
            );
        }
        Ok(())
    }
}

const PALETTE: [[u8; 3]; 6] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [255, 225, 25],
];

fn put(img: &mut image::RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, image::Rgb(c));
    }
}

/// A 2-pixel outline.
fn draw_box(img: &mut image::RgbImage, b: [f64; 4], c: [u8; 3]) {
    let [x0, y0, x1, y1] = b.map(|v| v.round() as i64);
    for t in 0..2 {
        for x in x0..=x1 {
            put(img, x, y0 + t, c);
            put(img, x, y1 - t, c);
        }
        for y in y0..=y1 {
            put(img, x0 + t, y, c);
            put(img, x1 - t, y, c);
        }
    }
}

/// The label in the synthetic world's 5×7 font, scaled ×2 (upper-cased; other characters blank).
fn draw_text(img: &mut image::RgbImage, x: i64, y: i64, text: &str, c: [u8; 3]) {
    use pali_data::font::{ink, GLYPH_H, GLYPH_W};
    for (i, ch) in text.to_uppercase().chars().enumerate() {
        for gy in 0..GLYPH_H {
            for gx in 0..GLYPH_W {
                if ink(ch, gx, gy) {
                    let (px, py) = (
                        x + ((i * (GLYPH_W + 1) + gx) * 2) as i64,
                        y + (gy * 2) as i64,
                    );
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(img, px + dx, py + dy, c);
                    }
                }
            }
        }
    }
}
