//! The training loop. Setup, then one loop per stage that reads top to bottom:
//! batch → forward → loss → backward → optimizer step → log / non-finite check → checkpoint,
//! and evaluations (task metrics + validation perplexity) every `eval_every` steps and at the end
//! of each stage.
//!
//! Resume precedence (the order matters):
//! 1. with `resume`, the newest checkpoint under `out_dir/checkpoints` (model, Adam moments,
//!    data-stream state, step) — the run continues exactly where it stopped;
//! 2. else `model.init_hf` (an HF PaliGemma checkpoint);
//! 3. else a random initialisation from `run.seed` (projector zero-initialised), with the towers
//!    named by `model.init_siglip` / `model.init_gemma` loaded from unimodal checkpoints.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use pali_data::batch::{Batch, BatchBuilder, Loader};
use pali_data::dataset::{Dataset, Example, JsonlDataset, SynthDataset, SynthTask};
use pali_data::masks::MaskEncoder;
use pali_data::mixture::{FewShot, Mixture};
use pali_data::{PaliTokenizer, SequenceBuilder};
use pali_eval::perplexity::{row_nll, Perplexity};
use pali_eval::run::{predict, references_from_suffix, PredictOptions};
use pali_eval::segmentation::VqVaeEncoder;
use pali_eval::{score, DecodeOptions, Prediction, Sampler, Task};
use pali_model::checkpoint::{load_into, TensorFile, Tower};
use pali_model::mask::make_attn_mask;
use pali_model::paligemma::bool_tensor;
use pali_model::{ImageEncoder, ModelInput, PaliGemma, PaliGemmaConfig, ProjectorKind};
use serde_json::json;

use crate::ckpt::{self, RunState};
use crate::config::{
    Attention, EncoderChoice, LossOn, ProjectorChoice, RunConfig, SourceKind, Stage,
};
use crate::error::{io, Error, Result};
use crate::optim::{self, AdamState, Groups, StepConfig};
use crate::parallel;
use crate::posemb;

/// What a finished stage reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageSummary {
    pub name: String,
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub seconds: f64,
    pub eval_accuracy: Option<f64>,
    /// What always answering the most frequent reference scores on the same examples.
    pub eval_baseline: Option<f64>,
    /// The task metrics of the end-of-stage evaluation.
    pub eval_metrics: Option<serde_json::Value>,
    /// Validation perplexity per source at the end of the stage.
    pub val_perplexity: Vec<(String, f64)>,
}

/// A stage evaluates when it asks for examples and has validation data: a synthetic first
/// source (its validation split) or `eval_jsonl`.
fn evaluates(stage: &Stage) -> bool {
    let first_is_synth = matches!(stage.sources[0].kind(), Ok(SourceKind::Synth { .. }));
    stage.eval_examples > 0 && (stage.eval_jsonl.is_some() || first_is_synth)
}

/// Options that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: bool,
    pub progress: bool,
    /// Stop after this many optimizer steps of the whole run (tests, debugging).
    pub max_steps: Option<u64>,
}

/// The model config of `config` at `resolution`.
pub fn model_config(
    config: &RunConfig,
    tok: &PaliTokenizer,
    resolution: usize,
) -> Result<PaliGemmaConfig> {
    let name = config.model.preset.as_deref().unwrap_or("init_hf");
    let mut c = match (&config.model.init_hf, name) {
        (Some(dir), _) => {
            pali_model::hf::parse_config(&dir.join("config.json"))?.with_position_offset(0)
        }
        (None, "tiny") => {
            pali_model::presets::tiny(tok.vocab_size(), tok.image as usize, resolution)
        }
        (None, name) => pali_model::presets::preset(name)?,
    };
    if let ImageEncoder::Siglip(v) = &mut c.vision {
        v.image_size = resolution;
    }
    if tok.vocab_size() > c.text.vocab_size {
        return Err(Error::Config(format!(
            "tokenizer {} has {} tokens but model `{}` has {} embedding rows",
            tok.path.display(),
            tok.vocab_size(),
            name,
            c.text.vocab_size
        )));
    }
    if tok.image as usize != c.image_token_id {
        if let Some(dir) = &config.model.init_hf {
            return Err(Error::Config(format!(
                "tokenizer {} has `<image>` = {} but {} expects {}",
                tok.path.display(),
                tok.image,
                dir.join("config.json").display(),
                c.image_token_id
            )));
        }
        // A preset with another tokenizer (e.g. a full-size model on the synthetic data): the
        // tokenizer's `<image>` id is used, and rows past its vocabulary are never predicted.
        c.image_token_id = tok.image as usize;
        c.output_vocab_size = Some(c.predictable_vocab().min(tok.vocab_size()));
    }
    if config.model.encoder == EncoderChoice::None {
        c.vision = ImageEncoder::RawPatches {
            image_size: resolution,
            patch_size: c.vision.patch_size(),
        };
    }
    if config.model.projector == ProjectorChoice::Mlp {
        c.projector = ProjectorKind::Mlp;
    }
    Ok(c)
}

/// The datasets of a stage's sources (`split` 0 = train, 1 = validation).
pub fn stage_sources(
    stage: &Stage,
    seed: u64,
    split: u64,
    encoders: &MaskEncoders,
) -> Result<Vec<Arc<dyn Dataset>>> {
    stage
        .sources
        .iter()
        .map(|s| -> Result<Arc<dyn Dataset>> {
            let d: Arc<dyn Dataset> = match s.kind().map_err(Error::Config)? {
                SourceKind::Synth { task, size } => {
                    let mut d = SynthDataset::new(task, seed, split, size, stage.task_prefix);
                    if let Some(e) = s.vqvae.as_ref().and_then(|p| encoders.get(p)) {
                        d = d.with_mask_encoder(e.clone());
                    }
                    if let Some(n) = s.noise_boxes {
                        d = d.with_noise_boxes(n);
                    }
                    Arc::new(d)
                }
                SourceKind::Jsonl { path } => {
                    Arc::new(JsonlDataset::open(&path, stage.on_error, false)?)
                }
            };
            // Few-shot subsets apply to the training split; validation stays whole.
            Ok(match s.few_shot {
                Some(k) if split == 0 => Arc::new(FewShot::new(d, k, seed)?),
                _ => d,
            })
        })
        .collect()
}

/// VQ-VAE mask encoders of the `segment` sources, by checkpoint path.
pub type MaskEncoders = HashMap<PathBuf, Arc<dyn MaskEncoder>>;

/// Loads the VQ-VAE of every source that names one (on `device`).
pub fn mask_encoders<B: Backend>(config: &RunConfig, device: &B::Device) -> Result<MaskEncoders> {
    let mut out = MaskEncoders::new();
    for p in config
        .stages
        .iter()
        .flat_map(|s| s.sources.iter().filter_map(|x| x.vqvae.clone()))
    {
        if let std::collections::hash_map::Entry::Vacant(slot) = out.entry(p) {
            let enc = VqVaeEncoder::<B>::load(slot.key(), device)?;
            slot.insert(Arc::new(enc) as Arc<dyn MaskEncoder>);
        }
    }
    Ok(out)
}

/// Resamples the position embedding when the stage's resolution differs from the model's.
pub(crate) fn set_resolution<B: Backend>(
    model: PaliGemma<B>,
    from: usize,
    to: usize,
) -> PaliGemma<B> {
    let mut model = model;
    if from == to {
        return model;
    }
    let p = model.patch_size;
    if let Some(v) = model.vision_tower.as_mut() {
        let w = v.embeddings.position_embedding.weight.val();
        let [n, d] = w.dims();
        let device = w.device();
        let vals: Vec<f32> = w.into_data().convert::<f32>().to_vec().expect("f32");
        let (g_old, g_new) = (from / p, to / p);
        assert_eq!(
            n,
            g_old * g_old,
            "position embedding rows {n} vs grid {g_old}²"
        );
        let out = posemb::resample(&vals, g_old, g_new, d);
        let t = Tensor::<B, 2>::from_data(TensorData::new(out, [g_new * g_new, d]), &device);
        v.embeddings.position_embedding.weight = Param::from_tensor(t);
    }
    model
}

/// Model inputs of a batch (image tokens first, then `text[:, :-1]`), next-token targets
/// (`text[:, 1:]`) and loss weights.
pub struct StepInputs<B: Backend> {
    pub input: ModelInput<B>,
    /// [B, T]: text position t predicts targets[t].
    pub targets: Tensor<B, 2, Int>,
    /// [B, T]: 1 on the tokens the loss counts.
    pub weights: Tensor<B, 2>,
    /// Image slots in front of the text.
    pub n_img: usize,
    pub tokens: usize,
}

impl<B: Backend> StepInputs<B> {
    /// The same inputs on `device` (for a data-parallel replica).
    pub fn to_device(self, device: &B::Device) -> Self {
        let i = self.input;
        StepInputs {
            input: ModelInput {
                pixel_values: i.pixel_values.to_device(device),
                input_ids: i.input_ids.to_device(device),
                positions: i.positions.to_device(device),
                masks: pali_model::gemma::AttentionMasks {
                    full: i.masks.full.to_device(device),
                    sliding: i.masks.sliding.map(|m| m.to_device(device)),
                },
            },
            targets: self.targets.to_device(device),
            weights: self.weights.to_device(device),
            n_img: self.n_img,
            tokens: self.tokens,
        }
    }

    /// The rows `r` of the batch (a micro-batch for gradient accumulation).
    pub fn rows(&self, r: std::ops::Range<usize>) -> Self {
        let i = &self.input;
        let [_, f, c, h, w] = i.pixel_values.dims();
        let [_, s] = i.input_ids.dims();
        let [_, t] = self.targets.dims();
        let n = r.len();
        StepInputs {
            input: ModelInput {
                pixel_values: i
                    .pixel_values
                    .clone()
                    .slice([r.clone(), 0..f, 0..c, 0..h, 0..w]),
                input_ids: i.input_ids.clone().slice([r.clone(), 0..s]),
                positions: i.positions.clone().slice([r.clone(), 0..s]),
                masks: pali_model::gemma::AttentionMasks {
                    full: i.masks.full.clone().slice([r.clone(), 0..s, 0..s]),
                    sliding: i
                        .masks
                        .sliding
                        .clone()
                        .map(|m| m.slice([r.clone(), 0..s, 0..s])),
                },
            },
            targets: self.targets.clone().slice([r.clone(), 0..t]),
            weights: self.weights.clone().slice([r, 0..t]),
            n_img: self.n_img,
            tokens: self.tokens / self.targets.dims()[0].max(1) * n,
        }
    }
}

/// Turns a host batch into the tensors of a training step (also what validation perplexity
/// uses, so both see the same masks).
pub fn step_inputs<B: Backend>(
    b: &mut Batch,
    cfg: &PaliGemmaConfig,
    attention: Attention,
    loss_on: LossOn,
    device: &B::Device,
) -> StepInputs<B> {
    let (bs, t1, f, r) = (b.batch_size, b.seq_len, b.frames, b.resolution);
    let t = t1 - 1;
    let n_img = f * cfg.num_image_tokens();
    let s = n_img + t;
    let mut ids = Vec::with_capacity(bs * s);
    let mut ar = Vec::with_capacity(bs * s);
    let mut tg = Vec::with_capacity(bs * t);
    let mut w = Vec::with_capacity(bs * t);
    for row in 0..bs {
        let text = &b.text[row * t1..(row + 1) * t1];
        let mar = &b.mask_ar[row * t1..(row + 1) * t1];
        let mloss = &b.mask_loss[row * t1..(row + 1) * t1];
        let minp = &b.mask_input[row * t1..(row + 1) * t1];
        ids.extend(std::iter::repeat_n(cfg.image_token_id as i64, n_img));
        ids.extend(&text[..t]);
        let img_ar = i64::from(attention == Attention::CausalAll);
        ar.extend(std::iter::repeat_n(img_ar, n_img));
        match attention {
            Attention::PrefixLm => ar.extend(&mar[..t]),
            // Every text token its own block: causal over the prefix too.
            Attention::CausalText | Attention::CausalAll => ar.extend(std::iter::repeat_n(1, t)),
        }
        tg.extend(&text[1..]);
        let weights = match loss_on {
            LossOn::Suffix => &mloss[1..],
            LossOn::PrefixAndSuffix => &minp[1..],
        };
        w.extend(weights.iter().map(|x| *x as f32));
    }
    let int = |v: Vec<i64>, shape: [usize; 2]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device)
    };
    let mask_ar = int(ar, [bs, s]);
    // big_vision trains with input_mask all true: padding has mask_ar = 1, so real tokens never see it.
    let input_mask = bool_tensor::<B, 2>(vec![true; bs * s], [bs, s], device);
    let masks = make_attn_mask(mask_ar, input_mask, cfg.text.sliding_window);
    let positions = Tensor::<B, 1, Int>::arange(0..s as i64, device)
        .reshape([1, s])
        .expand([bs, s]);
    let pixel_values = Tensor::<B, 5>::from_data(
        TensorData::new(std::mem::take(&mut b.pixel_values), [bs, f, 3, r, r]),
        device,
    );
    StepInputs {
        input: ModelInput {
            pixel_values,
            input_ids: int(ids, [bs, s]),
            positions,
            masks,
        },
        targets: int(tg, [bs, t]),
        weights: Tensor::from_data(TensorData::new(w, [bs, t]), device),
        n_img,
        tokens: bs * s,
    }
}

fn append_jsonl(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{v}").map_err(io(path))
}

/// Result of an evaluation.
pub struct Eval {
    /// Exact match of the decoded outputs.
    pub accuracy: f64,
    /// Share of the most frequent reference answer: what always giving that answer scores.
    pub majority_baseline: f64,
    /// The task metrics (`pali eval`'s JSON object).
    pub metrics: serde_json::Value,
    /// Validation perplexity on suffix tokens, per source (same masks as training).
    pub perplexity: Vec<(String, f64)>,
    /// A few (prompt, reference, prediction) triples.
    pub shown: Vec<(String, String, String)>,
}

/// The metric family a stage is scored with: `eval_task`, else from its first source.
pub fn eval_task(stage: &Stage) -> Task {
    if let Some(t) = stage.eval_task.as_deref().and_then(|t| t.parse().ok()) {
        return t;
    }
    match stage.sources[0].kind() {
        Ok(SourceKind::Synth { task, .. }) => match task {
            SynthTask::Caption | SynthTask::GroundedCaption => Task::Caption,
            SynthTask::Vqa | SynthTask::Count => Task::Vqa,
            SynthTask::Detect => Task::Detect,
            SynthTask::Ocr => Task::Docvqa,
            SynthTask::Segment => Task::Refcoco,
        },
        _ => Task::Vqa,
    }
}

/// Decodes `n` validation examples and scores them with the stage's task (the evaluators of
/// `pali eval`), and measures validation perplexity of every source.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: Backend>(
    model: &PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    stage: &Stage,
    tok: &Arc<PaliTokenizer>,
    seed: u64,
    n: usize,
    encoders: &MaskEncoders,
    device: &B::Device,
) -> Result<Eval> {
    // Validation data, opened once: the synthetic sources' validation split, and `eval_jsonl`
    // (the decoded set when given, and the validation set of JSONL sources).
    let split1 = stage_sources(stage, seed, 1, encoders)?;
    let eval_set: Option<Arc<dyn Dataset>> = match &stage.eval_jsonl {
        Some(p) => Some(Arc::new(JsonlDataset::open(p, stage.on_error, false)?)),
        None => None,
    };
    let val = eval_set.clone().unwrap_or_else(|| split1[0].clone());
    let n = n.min(val.len());
    let examples: Vec<Example> = (0..n)
        .map(|i| val.get(i))
        .collect::<std::result::Result<_, _>>()?;
    let task = eval_task(stage);
    let sampler: Sampler = stage.eval_decode.parse().map_err(Error::Config)?;
    let opts = PredictOptions {
        decode: DecodeOptions {
            sampler,
            max_new: stage.text_len,
            eos: tok.eos,
            // PaliGemma 2 decodes detections without its noise class.
            forbid: tok
                .noise
                .filter(|_| stage.sources.iter().any(|x| x.noise_boxes.is_some()))
                .into_iter()
                .collect(),
            seed,
            use_cache: true,
        },
        text_len: stage.text_len,
        resolution: stage.resolution,
        resize: stage.resize,
        batch_size: 16,
        transforms: transforms(stage, 0),
    };
    let (preds, _) = predict(model, cfg, tok, &examples, &opts, device, |_| {})?;
    let refs = references_from_suffix(task, &examples);
    let scored: Vec<Prediction> = preds
        .iter()
        .map(|p| Prediction {
            id: p.id.clone(),
            prediction: p.prediction.clone(),
            scores: (task == Task::Detect).then(|| p.object_scores.clone()),
        })
        .collect();
    let pairs: Vec<_> = scored.iter().zip(refs.iter()).collect();
    let metrics = score(task, &pairs, None)?;
    let mut correct = 0;
    let mut answers_seen: std::collections::HashMap<&str, usize> = Default::default();
    for p in &preds {
        correct += usize::from(p.prediction.trim() == p.suffix.trim());
        *answers_seen.entry(p.suffix.trim()).or_default() += 1;
    }
    let shown = preds
        .iter()
        .take(5)
        .map(|p| (p.prefix.clone(), p.suffix.clone(), p.prediction.clone()))
        .collect();
    let majority = answers_seen.values().copied().max().unwrap_or(0);

    // Perplexity per source on its validation examples, masks and loss weights as in training.
    let mut ppl = Perplexity::default();
    let builder = BatchBuilder {
        tokenizer: tok.clone(),
        seq: SequenceBuilder::new(stage.text_len),
        resolution: stage.resolution,
        resize: stage.resize,
        frames: 1,
        transforms: transforms(stage, 0),
    };
    for (k, src) in stage.sources.iter().enumerate() {
        let set = match (src.kind(), &eval_set) {
            (Ok(SourceKind::Synth { .. }), _) => split1[k].clone(),
            (_, Some(e)) => e.clone(),
            // A JSONL source without `eval_jsonl`: its training data is no validation set.
            (_, None) => continue,
        };
        let name = match src.kind() {
            Ok(SourceKind::Synth { task, .. }) => task.name().to_string(),
            _ => set.name().to_string(),
        };
        let m = n.min(set.len());
        for chunk in (0..m).collect::<Vec<_>>().chunks(16) {
            let rows = chunk
                .iter()
                .map(|i| {
                    let ex = set.get(*i)?;
                    let enc = builder.encode(&ex, None)?;
                    Ok((k, ex, enc))
                })
                .collect::<std::result::Result<Vec<_>, pali_data::Error>>()?;
            let (nll, _) = batch_nll(
                model,
                cfg,
                &builder,
                rows,
                stage.attention,
                stage.loss.on,
                device,
            )?;
            for (n, t) in nll {
                ppl.add(&name, n, t);
            }
        }
    }
    Ok(Eval {
        accuracy: correct as f64 / n.max(1) as f64,
        majority_baseline: majority as f64 / n.max(1) as f64,
        metrics,
        perplexity: ppl.per_task().into_iter().map(|(k, p, _)| (k, p)).collect(),
        shown,
    })
}

/// Summed suffix NLL and token count of each row of encoded examples, with the masks and loss
/// weights of a training step; also the number of rows whose text was cut.
pub fn batch_nll<B: Backend>(
    model: &PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    builder: &BatchBuilder,
    rows: Vec<(usize, Example, pali_data::batch::Encoded)>,
    attention: Attention,
    loss_on: LossOn,
    device: &B::Device,
) -> Result<(Vec<(f64, f64)>, usize)> {
    let mut batch = builder.build(rows, Vec::new())?;
    let inputs = step_inputs::<B>(&mut batch, cfg, attention, loss_on, device);
    let nll = row_nll(
        model,
        inputs.input,
        inputs.targets,
        inputs.weights,
        inputs.n_img,
    )?;
    Ok((nll, batch.truncated))
}

/// The image transforms of `stage`; `seed` seeds its augmentations.
pub fn transforms(stage: &Stage, seed: u64) -> pali_data::transform::Transforms {
    pali_data::transform::Transforms {
        downscale: stage.downscale,
        window: stage.window,
        augment: stage.augment,
        seed,
    }
}

/// Runs an evaluation, prints it and appends it to metrics.jsonl.
#[allow(clippy::too_many_arguments)]
fn evaluate_and_log<B: Backend>(
    model: &PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    stage: &Stage,
    tok: &Arc<PaliTokenizer>,
    seed: u64,
    global_step: u64,
    metrics_path: &Path,
    encoders: &MaskEncoders,
    device: &B::Device,
    verbose: bool,
) -> Result<Eval> {
    let ev = evaluate(
        model,
        cfg,
        stage,
        tok,
        seed,
        stage.eval_examples,
        encoders,
        device,
    )?;
    if verbose {
        for (p, want, got) in &ev.shown {
            eprintln!("  eval `{p}` → `{got}` (want `{want}`)");
        }
    }
    let ppl: serde_json::Map<String, serde_json::Value> = ev
        .perplexity
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    eprintln!(
        "  eval ({:?}) {} | exact match {:.1}% (most frequent answer: {:.1}%) | val perplexity {}",
        eval_task(stage),
        ev.metrics,
        ev.accuracy * 100.0,
        ev.majority_baseline * 100.0,
        serde_json::Value::Object(ppl.clone())
    );
    append_jsonl(
        metrics_path,
        &json!({"step": global_step, "stage": stage.name, "eval": ev.metrics,
                "eval_exact_match": ev.accuracy, "eval_majority_baseline": ev.majority_baseline,
                "eval_examples": stage.eval_examples, "val_perplexity": ppl}),
    )?;
    Ok(ev)
}

/// Runs every stage of `config` on backend `B` (gradients through `Autodiff<B>`, with Burn's
/// balanced checkpointing when `run.gradient_checkpointing`), data-parallel over `devices`
/// (the first holds the model and the optimizer; see [`parallel`]).
pub fn train<B: Backend>(
    config: &RunConfig,
    devices: &[B::Device],
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    if config.run.gradient_checkpointing {
        train_with::<B, BalancedCheckpointing>(config, devices, opts)
    } else {
        train_with::<B, NoCheckpointing>(config, devices, opts)
    }
}

fn train_with<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>(
    config: &RunConfig,
    devices: &[B::Device],
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    let device = devices.first().expect("at least one device");
    for s in &config.stages {
        let parts = s.grad_accum * devices.len();
        if !s.batch_size.is_multiple_of(parts) {
            return Err(Error::Config(format!(
                "stage `{}`: batch_size {} does not split into grad_accum {} × {} devices",
                s.name,
                s.batch_size,
                s.grad_accum,
                devices.len()
            )));
        }
    }
    let dtype = config.run.dtype;
    if !dtype.supported::<B>(device) {
        return Err(Error::Config(format!(
            "run.dtype = \"{dtype}\": device {device:?} does not support {dtype}; use \"f32\""
        )));
    }
    let out_dir = &config.run.out_dir;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let resolved = out_dir.join("config.resolved.toml");
    std::fs::write(&resolved, toml::to_string_pretty(config).expect("toml"))
        .map_err(io(&resolved))?;
    let metrics_path = out_dir.join("metrics.jsonl");
    let tok = Arc::new(PaliTokenizer::from_file(&config.tokenizer.path)?);
    if tok.noise.is_none() {
        if let Some(st) = config
            .stages
            .iter()
            .find(|st| st.sources.iter().any(|x| x.noise_boxes.is_some()))
        {
            return Err(Error::Config(format!(
                "stage `{}`: noise_boxes needs a `<noise>` token, which {} lacks (add it with \
                 `pali tokenizer add --tokens \"<noise>\"`)",
                st.name,
                config.tokenizer.path.display()
            )));
        }
    }

    let encoders = mask_encoders::<B>(config, device)?;
    // Check every stage's groups against the model's parameters before any work.
    let probe = model_config(config, &tok, config.stages[0].resolution)?.init::<B>(device);
    let paths = optim::param_paths::<B, _>(&probe);
    for (i, s) in config.stages.iter().enumerate() {
        Groups::new(s)?
            .assign(&paths)
            .map_err(|e| Error::Config(format!("stage {} (`{}`): {e}", i + 1, s.name)))?;
        stage_sources(s, config.run.seed, 0, &encoders)?;
    }
    drop(probe);

    // ---- Initialisation (see the module doc for the precedence) ----
    let latest = if opts.resume {
        ckpt::checkpoints(out_dir).pop()
    } else {
        None
    };
    B::seed(device, config.run.seed);
    let (mut model, mut adam, mut state): (
        PaliGemma<Autodiff<B, C>>,
        AdamState<B>,
        Option<RunState>,
    ) = match &latest {
        Some(dir) => {
            let st = ckpt::load_state(dir)?;
            let cfg = model_config(config, &tok, st.resolution)?;
            let m = load_into(
                cfg.init::<Autodiff<B, C>>(device),
                &TensorFile::open(&dir.join("model.safetensors"))?,
                Tower::All,
            )?;
            let a = ckpt::load_adam::<B>(dir, st.adam_t.clone(), device)?;
            eprintln!(
                "resuming from {} (stage {}, step {})",
                dir.display(),
                st.stage + 1,
                st.stage_step
            );
            (m, a, Some(st))
        }
        None => {
            let res0 = config.stages[0].resolution;
            let m = match &config.model.init_hf {
                Some(p) => {
                    let (hf, m) = pali_model::load_hf::<Autodiff<B, C>>(p, device)?;
                    set_resolution(m, hf.vision.image_size(), res0)
                }
                None => {
                    let c0 = model_config(config, &tok, res0)?;
                    crate::init::unimodal(
                        c0.init::<Autodiff<B, C>>(device),
                        &c0,
                        &config.model,
                        device,
                    )?
                }
            };
            (m, AdamState::default(), None)
        }
    };
    crate::init::materialize(&model);
    let mut resolution = state
        .as_ref()
        .map(|s| s.resolution)
        .unwrap_or(config.stages[0].resolution);
    let mut global_step = state
        .as_ref()
        .map(|s| s.global_step)
        .unwrap_or(config.run.start_step);
    let first_stage = state.as_ref().map(|s| s.stage).unwrap_or(0);
    let mut summaries = Vec::new();

    for (si, stage) in config.stages.iter().enumerate().skip(first_stage) {
        // ---- Stage setup: resolution, groups, data ----
        let resumed = state.as_ref().filter(|s| s.stage == si).cloned();
        let start_step = resumed.as_ref().map(|s| s.stage_step).unwrap_or(0);
        // Steps of the run before this stage (schedules with `continues` count from there).
        let stage_start = global_step - start_step;
        if start_step >= stage.steps {
            continue;
        }
        if resolution != stage.resolution {
            model = set_resolution(model, resolution, stage.resolution);
            resolution = stage.resolution;
        }
        let cfg = model_config(config, &tok, resolution)?;
        let groups = Groups::new(stage)?;
        // This stage's evaluation (task metrics + validation perplexity) of the current model.
        let evaluate_now = |m: &PaliGemma<Autodiff<B, C>>, step: u64, verbose: bool| {
            let seed = config.run.seed;
            evaluate_and_log(
                &m.valid(),
                &cfg,
                stage,
                &tok,
                seed,
                step,
                &metrics_path,
                &encoders,
                device,
                verbose,
            )
        };
        if start_step == 0 && !stage.reset.is_empty() {
            // Seeded by the stage, so a run resumed at this boundary resets to the same weights.
            B::seed(device, config.run.seed.wrapping_add(1000 + si as u64));
            let fresh = cfg.init::<Autodiff<B, C>>(device);
            for part in &stage.reset {
                match part.as_str() {
                    "vision_tower" => model.vision_tower = fresh.vision_tower.clone(),
                    "multi_modal_projector" => {
                        model.multi_modal_projector = fresh.multi_modal_projector.clone()
                    }
                    _ => model.language_model = fresh.language_model.clone(),
                }
                adam.forget(&format!("{part}."));
            }
            eprintln!(
                "stage `{}`: re-initialised {}",
                stage.name,
                stage.reset.join(", ")
            );
        }
        model = optim::apply_freeze(model, &groups)?.with_compute(dtype);
        for layer in model.language_model.layers.iter_mut() {
            layer.dropout = burn::nn::DropoutConfig::new(stage.llm_dropout).init();
        }
        // At a stage start (fresh or resumed at the boundary) the optimizer state may be reset.
        if start_step == 0 && si > 0 && !stage.carry_optimizer {
            adam = AdamState::default();
        }
        let srcs = stage_sources(stage, config.run.seed, 0, &encoders)?;
        let weights: Vec<f64> = stage.sources.iter().map(|s| s.weight).collect();
        let mut mixture = Mixture::new(srcs, &weights, config.run.seed.wrapping_add(si as u64))?;
        if let Some(ms) = resumed.as_ref().and_then(|st| st.mixture.clone()) {
            mixture.state = ms;
        }
        eprintln!(
            "stage {} `{}`: {} px, text_len {}, {} steps × batch {}",
            si + 1,
            stage.name,
            stage.resolution,
            stage.text_len,
            stage.steps,
            stage.batch_size
        );
        for line in mixture.describe() {
            eprintln!("  {line}");
        }
        let mut seq = SequenceBuilder::new(stage.text_len);
        seq.truncation = stage.truncation;
        let builder = BatchBuilder {
            tokenizer: tok.clone(),
            seq,
            resolution,
            resize: stage.resize,
            frames: 1,
            transforms: transforms(stage, config.run.seed.wrapping_add(si as u64)),
        };
        let mut loader = Loader::spawn(mixture, builder, stage.batch_size, stage.on_error, 2);
        let bar = if opts.progress {
            ProgressBar::new(stage.steps)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.name.clone());
        bar.set_position(start_step);
        let started = Instant::now();
        let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
        let (mut tokens_since, mut since) = (0usize, Instant::now());
        // Data problems since the last log line (truncated rows, rows that lost EOS, skipped).
        let (mut truncated, mut eos_cut, mut skipped) = (0usize, 0usize, 0usize);

        // ---- The loop ----
        for step in start_step..stage.steps {
            // Mid-stage evaluations every `eval_every` steps, the first before step 0: where a
            // curve starts matters to some ablations (new-token init: the step-0 perplexity).
            if stage.eval_every > 0 && step % stage.eval_every == 0 && evaluates(stage) {
                bar.suspend(|| evaluate_now(&model, global_step, false))?;
            }
            if opts.max_steps.is_some_and(|m| global_step >= m) {
                return Ok(summaries);
            }
            let mut batch = loader.recv()?;
            let inputs = step_inputs::<Autodiff<B, C>>(
                &mut batch,
                &cfg,
                stage.attention,
                stage.loss.on,
                device,
            );
            truncated += batch.truncated;
            eos_cut += batch.eos_cut.len();
            skipped += batch.skipped.len();
            let split = parallel::Split {
                grad_accum: stage.grad_accum,
                devices,
                // Dropout masks from (seed, step): a resumed run draws the same ones.
                dropout_seed: (stage.llm_dropout > 0.0).then(|| {
                    config
                        .run
                        .seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add(global_step)
                }),
            };
            let tokens = inputs.tokens;
            let (loss_value, grads) =
                parallel::batch_gradients(&model, inputs, &stage.loss, &split)?;
            if !loss_value.is_finite() {
                return Err(Error::Train(format!("stage `{}` step {step}: loss became {loss_value}; the last good checkpoint is kept", stage.name)));
            }
            let done = step + 1;
            let log = done % stage.log_every == 0 || done == stage.steps || step == start_step;
            let sched: Vec<f64> = (0..groups.groups.len())
                .map(|g| groups.at(g, stage_start, stage.steps, step))
                .collect();
            let scfg = StepConfig {
                lr: stage.lr,
                b1: stage.b1,
                b2: stage.b2,
                eps: stage.eps,
                weight_decay: stage.weight_decay,
                grad_clip: stage.grad_clip,
                groups: &groups,
                sched: sched.clone(),
                norms: log,
            };
            let (m, stats) = optim::step(model, grads, &mut adam, &scfg);
            model = m;
            global_step += 1;
            tokens_since += tokens;
            if first_loss.is_nan() {
                first_loss = loss_value;
            }
            last_loss = loss_value;
            if log {
                let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f64>();
                let (gn, pn, un) = (
                    scalar(stats.grad_norm),
                    scalar(stats.param_norm),
                    scalar(stats.update_norm),
                );
                if !gn.is_finite() || !un.is_finite() {
                    return Err(Error::Train(format!("stage `{}` step {step}: gradient norm {gn}, update norm {un}; the last good checkpoint is kept", stage.name)));
                }
                let tps = tokens_since as f64 / since.elapsed().as_secs_f64();
                (tokens_since, since) = (0, Instant::now());
                let lrs: serde_json::Map<String, serde_json::Value> = groups
                    .groups
                    .iter()
                    .zip(&sched)
                    .map(|((_, g), s)| {
                        (
                            g.params.clone(),
                            json!(stage.lr * g.mult * s * f64::from(u8::from(!g.frozen))),
                        )
                    })
                    .collect();
                let seen: Vec<u64> = batch
                    .state_after
                    .as_ref()
                    .map(|s| s.sources.iter().map(|x| x.seen).collect())
                    .unwrap_or_default();
                append_jsonl(
                    &metrics_path,
                    &json!({
                        "step": global_step, "stage": stage.name, "stage_step": done, "loss": loss_value,
                        "lr": lrs, "grad_norm": gn, "param_norm": pn, "update_norm": un,
                        "tokens_per_s": tps, "seen": seen, "truncated": truncated, "eos_cut": eos_cut,
                        "skipped": skipped,
                    }),
                )?;
                (truncated, eos_cut, skipped) = (0, 0, 0);
                bar.set_message(format!(
                    "loss {loss_value:.4} lr {:.2e} {tps:.0} tok/s",
                    stage.lr * sched[0]
                ));
            }
            bar.set_position(done);
            if done % stage.checkpoint_every == 0 || done == stage.steps {
                let st = RunState {
                    global_step,
                    stage: if done == stage.steps { si + 1 } else { si },
                    stage_step: if done == stage.steps { 0 } else { done },
                    resolution,
                    mixture: (done < stage.steps)
                        .then(|| batch.state_after.clone().expect("loader sets the state")),
                    adam_t: adam.t.clone(),
                };
                let extras = ckpt::HfExtras {
                    config: &cfg,
                    tokenizer: &config.tokenizer.path,
                };
                ckpt::save(
                    out_dir,
                    &model.valid(),
                    &adam,
                    &st,
                    config.run.keep_checkpoints,
                    Some(extras),
                )?;
            }
        }
        bar.finish();
        let svg = out_dir.join(format!("curves-{}.svg", stage.name));
        crate::plot::stage_curves(&metrics_path, &stage.name, &svg)?;
        let eval = if evaluates(stage) {
            Some(evaluate_now(&model, global_step, true)?)
        } else {
            None
        };
        let s = StageSummary {
            name: stage.name.clone(),
            steps: stage.steps,
            first_loss,
            last_loss,
            seconds: started.elapsed().as_secs_f64(),
            eval_accuracy: eval.as_ref().map(|e| e.accuracy),
            eval_baseline: eval.as_ref().map(|e| e.majority_baseline),
            eval_metrics: eval.as_ref().map(|e| e.metrics.clone()),
            val_perplexity: eval.map(|e| e.perplexity).unwrap_or_default(),
        };
        eprintln!(
            "stage `{}` done: loss {:.4} → {:.4} in {:.1} s{}",
            s.name,
            s.first_loss,
            s.last_loss,
            s.seconds,
            s.eval_accuracy
                .map(|a| format!(", eval exact match {:.1}%", a * 100.0))
                .unwrap_or_default()
        );
        summaries.push(s);
        state = None;
    }
    let sp = out_dir.join("summary.json");
    std::fs::write(&sp, serde_json::to_string_pretty(&summaries).expect("json"))
        .map_err(io(&sp))?;
    Ok(summaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_shot_limits_the_training_split_only() {
        let d = tempfile::tempdir().unwrap();
        let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer/tokenizer.json");
        let p = d.path().join("run.toml");
        std::fs::write(
            &p,
            format!(
                "[run]\nname = \"f\"\nout_dir = \"out\"\n[model]\npreset = \"tiny\"\n[tokenizer]\npath = \"{}\"\n\
                 [[stage]]\nname = \"s\"\nresolution = 32\ntext_len = 16\nsteps = 1\n\
                 batch_size = 1\nlr = 1e-3\n\
                 source = [{{ kind = \"synth\", task = \"vqa\", size = 100, few_shot = 7 }}]\n",
                tok.display()
            ),
        )
        .unwrap();
        let c = RunConfig::load(&p, &[]).unwrap();
        let train = stage_sources(&c.stages[0], 3, 0, &MaskEncoders::new()).unwrap();
        let val = stage_sources(&c.stages[0], 3, 1, &MaskEncoders::new()).unwrap();
        assert_eq!((train[0].len(), val[0].len()), (7, 100));
        assert!(
            train[0].name().contains("7-shot, seed 3"),
            "{}",
            train[0].name()
        );
        let again = stage_sources(&c.stages[0], 3, 0, &MaskEncoders::new()).unwrap();
        assert_eq!(
            train[0].get(0).unwrap().suffix,
            again[0].get(0).unwrap().suffix
        );
    }
}
