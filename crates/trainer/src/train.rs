//! The training loop. Setup, then one loop per stage that reads top to bottom:
//! batch → forward → loss → backward → optimizer step → log / non-finite check → checkpoint,
//! and an evaluation at the end of each stage.
//!
//! Resume precedence (the order matters):
//! 1. with `resume`, the newest checkpoint under `out_dir/checkpoints` (model, Adam moments,
//!    data-stream state, step) — the run continues exactly where it stopped;
//! 2. else `model.init_hf` (an HF PaliGemma checkpoint);
//! 3. else a random initialisation from `run.seed` (projector zero-initialised).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use pali_data::batch::{Batch, BatchBuilder, Loader};
use pali_data::dataset::{Dataset, JsonlDataset, SynthDataset};
use pali_data::mixture::Mixture;
use pali_data::{PaliTokenizer, SequenceBuilder};
use pali_model::checkpoint::{load_into, TensorFile, Tower};
use pali_model::loss::{reduce, token_nll};
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
pub fn stage_sources(stage: &Stage, seed: u64, split: u64) -> Result<Vec<Arc<dyn Dataset>>> {
    stage
        .sources
        .iter()
        .map(|s| -> Result<Arc<dyn Dataset>> {
            Ok(match s.kind().map_err(Error::Config)? {
                SourceKind::Synth { task, size } => Arc::new(SynthDataset::new(
                    task,
                    seed,
                    split,
                    size,
                    stage.task_prefix,
                )),
                SourceKind::Jsonl { path } => {
                    Arc::new(JsonlDataset::open(&path, stage.on_error, false)?)
                }
            })
        })
        .collect()
}

/// Resamples the position embedding when the stage's resolution differs from the model's.
fn set_resolution<B: Backend>(model: PaliGemma<B>, from: usize, to: usize) -> PaliGemma<B> {
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

/// Model inputs of a batch: image tokens first, then `text[:, :-1]`; targets `text[:, 1:]`.
struct StepInputs<B: Backend> {
    input: ModelInput<B>,
    targets: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    n_img: usize,
    tokens: usize,
}

fn step_inputs<B: Backend>(
    b: &mut Batch,
    cfg: &PaliGemmaConfig,
    stage: &Stage,
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
        let img_ar = i64::from(stage.attention == Attention::CausalAll);
        ar.extend(std::iter::repeat_n(img_ar, n_img));
        match stage.attention {
            Attention::PrefixLm => ar.extend(&mar[..t]),
            // Every text token its own block: causal over the prefix too.
            Attention::CausalText | Attention::CausalAll => ar.extend(std::iter::repeat_n(1, t)),
        }
        tg.extend(&text[1..]);
        let weights = match stage.loss.on {
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

/// Result of the end-of-stage evaluation.
pub struct Eval {
    /// Exact match of greedy decoding.
    pub accuracy: f64,
    /// Share of the most frequent reference answer: what always giving that answer scores.
    pub majority_baseline: f64,
    /// A few (prompt, reference, prediction) triples.
    pub shown: Vec<(String, String, String)>,
}

/// Greedy-decodes `n` validation examples of the stage's first source; exact-match accuracy.
fn evaluate<B: Backend>(
    model: &PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    stage: &Stage,
    tok: &Arc<PaliTokenizer>,
    seed: u64,
    n: usize,
    device: &B::Device,
) -> Result<Eval> {
    let val: Arc<dyn Dataset> = match &stage.eval_jsonl {
        Some(p) => Arc::new(JsonlDataset::open(p, stage.on_error, false)?),
        None => stage_sources(stage, seed, 1)?.remove(0),
    };
    let n = n.min(val.len());
    let seq = SequenceBuilder::new(stage.text_len);
    let n_img = cfg.num_image_tokens();
    let mut correct = 0;
    let mut shown = Vec::new();
    let mut answers_seen: std::collections::HashMap<String, usize> =
        std::collections::HashMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let b = chunk.len();
        let s = n_img + stage.text_len;
        let (mut ids, mut ar, mut im, mut px, mut answers) =
            (vec![], vec![], vec![], vec![], vec![]);
        for &i in chunk {
            let ex = val.get(i)?;
            let p = seq.prompt(tok, &ex.prefix)?;
            ids.extend(std::iter::repeat_n(cfg.image_token_id as i64, n_img));
            ids.extend(p.ids.iter().map(|x| *x as i64));
            ar.extend(std::iter::repeat_n(0i64, n_img));
            ar.extend(p.mask_ar.iter().map(|x| *x as i64));
            im.extend(std::iter::repeat_n(true, n_img));
            im.extend(p.mask_input.iter().map(|x| *x == 1));
            px.extend(ex.images[0].pixels(stage.resolution, stage.resize)?);
            answers.push((ex.prefix.clone(), ex.suffix.clone()));
        }
        let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, s]), device);
        let input_mask = bool_tensor::<B, 2>(im, [b, s], device);
        let masks = make_attn_mask(int(ar), input_mask.clone(), cfg.text.sliding_window);
        let positions = Tensor::<B, 1, Int>::arange(0..s as i64, device)
            .reshape([1, s])
            .expand([b, s]);
        let r = stage.resolution;
        let input = ModelInput {
            pixel_values: Tensor::from_data(TensorData::new(px, [b, 1, 3, r, r]), device),
            input_ids: int(ids),
            positions,
            masks,
        };
        let (out, _) = pali_model::generate::greedy(
            model,
            input,
            input_mask,
            cfg.text.sliding_window,
            stage.text_len,
            Some(tok.eos as i64),
        )?;
        for (row, (prefix, want)) in out.iter().zip(answers) {
            let ids: Vec<u32> = row
                .iter()
                .take_while(|t| **t != tok.eos as i64)
                .map(|t| *t as u32)
                .collect();
            let got = tok.decode(&ids)?;
            correct += usize::from(got.trim() == want.trim());
            *answers_seen.entry(want.trim().to_string()).or_default() += 1;
            if shown.len() < 5 {
                shown.push((prefix, want, got));
            }
        }
    }
    let majority = answers_seen.values().copied().max().unwrap_or(0);
    Ok(Eval {
        accuracy: correct as f64 / n.max(1) as f64,
        majority_baseline: majority as f64 / n.max(1) as f64,
        shown,
    })
}

/// Runs every stage of `config` on backend `B` (gradients through `Autodiff<B>`).
pub fn train<B: Backend>(
    config: &RunConfig,
    device: &B::Device,
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    type AD<B> = Autodiff<B>;
    let out_dir = &config.run.out_dir;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let resolved = out_dir.join("config.resolved.toml");
    std::fs::write(&resolved, toml::to_string_pretty(config).expect("toml"))
        .map_err(io(&resolved))?;
    let metrics_path = out_dir.join("metrics.jsonl");
    let tok = Arc::new(PaliTokenizer::from_file(&config.tokenizer.path)?);

    // Check every stage's groups against the model's parameters before any work.
    let probe = model_config(config, &tok, config.stages[0].resolution)?.init::<B>(device);
    let paths = optim::param_paths::<B, _>(&probe);
    for (i, s) in config.stages.iter().enumerate() {
        Groups::new(s)?
            .assign(&paths)
            .map_err(|e| Error::Config(format!("stage {} (`{}`): {e}", i + 1, s.name)))?;
        stage_sources(s, config.run.seed, 0)?;
    }
    drop(probe);

    // ---- Initialisation (see the module doc for the precedence) ----
    let latest = if opts.resume {
        ckpt::checkpoints(out_dir).pop()
    } else {
        None
    };
    B::seed(device, config.run.seed);
    let (mut model, mut adam, mut state): (PaliGemma<AD<B>>, AdamState<B>, Option<RunState>) =
        match &latest {
            Some(dir) => {
                let st = ckpt::load_state(dir)?;
                let cfg = model_config(config, &tok, st.resolution)?;
                let m = load_into(
                    cfg.init::<AD<B>>(device),
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
                        let (hf, m) = pali_model::load_hf::<AD<B>>(p, device)?;
                        set_resolution(m, hf.vision.image_size(), res0)
                    }
                    None => model_config(config, &tok, res0)?.init::<AD<B>>(device),
                };
                (m, AdamState::default(), None)
            }
        };
    let mut resolution = state
        .as_ref()
        .map(|s| s.resolution)
        .unwrap_or(config.stages[0].resolution);
    let mut global_step = state.as_ref().map(|s| s.global_step).unwrap_or(0);
    let first_stage = state.as_ref().map(|s| s.stage).unwrap_or(0);
    let mut summaries = Vec::new();

    for (si, stage) in config.stages.iter().enumerate().skip(first_stage) {
        // ---- Stage setup: resolution, groups, data ----
        let resumed = state.as_ref().filter(|s| s.stage == si).cloned();
        let start_step = resumed.as_ref().map(|s| s.stage_step).unwrap_or(0);
        if start_step >= stage.steps {
            continue;
        }
        if resolution != stage.resolution {
            model = set_resolution(model, resolution, stage.resolution);
            resolution = stage.resolution;
        }
        let cfg = model_config(config, &tok, resolution)?;
        let groups = Groups::new(stage)?;
        model = optim::apply_freeze(model, &groups)?;
        // At a stage start (fresh or resumed at the boundary) the optimizer state may be reset.
        if start_step == 0 && si > 0 && !stage.carry_optimizer {
            adam = AdamState::default();
        }
        let srcs = stage_sources(stage, config.run.seed, 0)?;
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
            if opts.max_steps.is_some_and(|m| global_step >= m) {
                return Ok(summaries);
            }
            let mut batch = loader.recv()?;
            let inputs = step_inputs::<AD<B>>(&mut batch, &cfg, stage, device);
            truncated += batch.truncated;
            eos_cut += batch.eos_cut.len();
            skipped += batch.skipped.len();
            let out = model.forward(inputs.input, inputs.n_img, false, None)?;
            let tok_loss = token_nll(out.logits, inputs.targets, stage.loss.label_smoothing);
            let loss = reduce(tok_loss, inputs.weights, stage.loss.reduction);
            let loss_value = loss.clone().into_scalar().elem::<f64>();
            if !loss_value.is_finite() {
                return Err(Error::Train(format!("stage `{}` step {step}: loss became {loss_value}; the last good checkpoint is kept", stage.name)));
            }
            let grads = loss.backward();
            let done = step + 1;
            let log = done % stage.log_every == 0 || done == stage.steps || step == start_step;
            let sched: Vec<f64> = (0..groups.groups.len())
                .map(|g| groups.schedule(g, stage.steps).at(step))
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
            let (m, stats) = optim::step(model, &grads, &mut adam, &scfg);
            model = m;
            global_step += 1;
            tokens_since += inputs.tokens;
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
        let first_is_synth = matches!(stage.sources[0].kind(), Ok(SourceKind::Synth { .. }));
        let eval = if stage.eval_examples > 0 && (stage.eval_jsonl.is_some() || first_is_synth) {
            let ev = evaluate(
                &model.valid(),
                &cfg,
                stage,
                &tok,
                config.run.seed,
                stage.eval_examples,
                device,
            )?;
            for (p, want, got) in &ev.shown {
                eprintln!("  eval `{p}` → `{got}` (want `{want}`)");
            }
            eprintln!(
                "  eval exact match {:.1}% (always giving the most frequent answer: {:.1}%)",
                ev.accuracy * 100.0,
                ev.majority_baseline * 100.0
            );
            append_jsonl(
                &metrics_path,
                &json!({"step": global_step, "stage": stage.name, "eval_exact_match": ev.accuracy,
                        "eval_majority_baseline": ev.majority_baseline, "eval_examples": stage.eval_examples}),
            )?;
            Some(ev)
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
