//! Stage 0, the paper's unimodal pretraining, run before the PaliGemma stages of the same config:
//!
//! - `kind = "siglip"`: SigLIP's two towers ([`TwoTower`]) on (image, suffix) pairs with the
//!   sigmoid loss; the image tower (with its pooling head) is what stage 1 starts from.
//! - `kind = "lm"`: the Gemma decoder alone on text (each example's suffix), next-token loss
//!   under a causal mask, vocabulary without the `<loc>`/`<seg>` rows.
//!
//! Each stage lives in `out_dir/NAME/`: `checkpoints/` (resumable, like the PaliGemma
//! stages'), `metrics.jsonl` with its TensorBoard file, `curves-NAME.svg`, and, when it ends,
//! `final/` — an HF checkpoint (`SiglipModel` or `GemmaForCausalLM` layout, `config.json`,
//! `tokenizer.json`, `summary.json`) renamed into place at once, so its presence means the
//! stage is done. Stage-0 steps have their own count: the PaliGemma steps start at
//! `run.start_step` as before.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use pali_data::batch::{Batch, Loader};
use pali_model::checkpoint::{load_into, save_safetensors, TensorFile, Tower};
use pali_model::gemma::Gemma;
use pali_model::loss::{reduce, token_nll};
use pali_model::mask::make_attn_mask;
use pali_model::paligemma::bool_tensor;
use pali_model::two_tower::{sigmoid_loss, TwoTower};
use serde_json::json;

use crate::ckpt::{self, RunState};
use crate::config::LossSection;
use crate::error::{io, Error, Result};
use crate::events::{Event, StageSummary, StepLog};
use crate::metrics::Metrics;
use crate::optim::{self, AdamState, StepConfig};
use crate::rundir::Existing;
use crate::stage::{TowerModel, TowerPlan};
use crate::train::TrainOptions;

/// A Gemma decoder as a causal language model, named as HF's `GemmaForCausalLM` (`model.*`,
/// the head tied to the embedding): the layout `model.init_gemma` reads.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: Gemma<B>,
    /// Gemma 2's local attention window (for the masks).
    pub sliding_window: Option<usize>,
}

/// Retrieval candidates of the SigLIP evaluation (the paper's recall@1 over 256 pairs).
const CANDIDATES: usize = 256;

/// What a stage-0 model minimises on a batch.
pub trait Objective<B: Backend>: Module<B> {
    fn loss(&self, batch: &Batch, loss: &LossSection, device: &B::Device) -> Tensor<B, 1>;
}

/// `text[:, a..a+len]` of a batch as ids.
fn ids<B: Backend>(b: &Batch, from: usize, len: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let (n, t1) = (b.batch_size, b.seq_len);
    let v: Vec<i64> = (0..n)
        .flat_map(|r| b.text[r * t1 + from..r * t1 + from + len].iter().copied())
        .collect();
    Tensor::from_data(TensorData::new(v, [n, len]), device)
}

impl<B: Backend> Objective<B> for TwoTower<B> {
    fn loss(&self, b: &Batch, _: &LossSection, device: &B::Device) -> Tensor<B, 1> {
        let out = self.forward(pixels(b, device), text_ids(b, device));
        sigmoid_loss(out.logits_per_image)
    }
}

/// A batch's images: [B, 3, R, R].
fn pixels<B: Backend>(b: &Batch, device: &B::Device) -> Tensor<B, 4> {
    let r = b.resolution;
    Tensor::from_data(
        TensorData::new(b.pixel_values.clone(), [b.batch_size, 3, r, r]),
        device,
    )
}

/// The text tower's input: the text without BOS (`tok(text) [EOS] [PAD] …`, as SigLIP's
/// tokenizer pads), `text_len` tokens.
fn text_ids<B: Backend>(b: &Batch, device: &B::Device) -> Tensor<B, 2, Int> {
    ids(b, 1, b.seq_len - 1, device)
}

impl<B: Backend> CausalLm<B> {
    /// Next-token NLL of every position ([B, T]) and its weights (1 on the text and EOS).
    fn token_losses(&self, b: &Batch, smoothing: f64, device: &B::Device) -> [Tensor<B, 2>; 2] {
        let (n, t) = (b.batch_size, b.seq_len - 1);
        let x = self.model.embed(ids(b, 0, t, device));
        // Every token its own block: causal. Padding has mask_ar = 1 too, so no real token
        // sees it (big_vision's layout).
        let ar = Tensor::<B, 2, Int>::ones([n, t], device);
        let input = bool_tensor::<B, 2>(vec![true; n * t], [n, t], device);
        let masks = make_attn_mask(ar, input, self.sliding_window);
        let positions = Tensor::<B, 1, Int>::arange(0..t as i64, device)
            .reshape([1, t])
            .expand([n, t]);
        let h = self.model.forward_embeds(x, positions, &masks, None, None);
        let vocab = self.model.embed_tokens.weight.dims()[0];
        let logits = self.model.logits(h, vocab);
        let w: Vec<f32> = (0..n)
            .flat_map(|r| b.mask_loss[r * (t + 1) + 1..(r + 1) * (t + 1)].iter())
            .map(|&x| x as f32)
            .collect();
        [
            token_nll(logits, ids(b, 1, t, device), smoothing),
            Tensor::from_data(TensorData::new(w, [n, t]), device),
        ]
    }
}

impl<B: Backend> Objective<B> for CausalLm<B> {
    fn loss(&self, b: &Batch, loss: &LossSection, device: &B::Device) -> Tensor<B, 1> {
        let [tok, w] = self.token_losses(b, loss.label_smoothing, device);
        reduce(tok, w, loss.reduction)
    }
}

/// Runs the stage-0 stages of a plan in order; a stage whose `final/` exists is done and is
/// skipped (its summary is read back). `opts.max_steps` counts their steps (done before a
/// resume too); returns the summaries of the stages done.
pub(crate) fn run<B: Backend>(
    towers: &[TowerPlan],
    device: &B::Device,
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    let mut summaries = Vec::new();
    let mut before = 0;
    for tp in towers {
        let limit = opts.max_steps.map(|m| m.saturating_sub(before));
        before += tp.stage.steps;
        let summary = tp.output().join("summary.json");
        if summary.is_file() {
            let text = std::fs::read_to_string(&summary).map_err(io(&summary))?;
            let s: StageSummary = serde_json::from_str(&text)
                .map_err(|e| Error::Train(format!("{}: {e}", summary.display())))?;
            let line = format!(
                "stage `{}`: done earlier, its tower is {}",
                tp.stage.name,
                tp.output().display()
            );
            opts.observer.on(Event::Info(&line));
            summaries.push(s);
            continue;
        }
        let s = match &tp.model {
            TowerModel::Siglip(c) => {
                let init = |d: &B::Device| c.init::<Autodiff<B>>(d);
                run_stage::<Autodiff<B>, _>(tp, init, device, opts, limit)?
            }
            TowerModel::Lm(c) => {
                let init = |d: &B::Device| CausalLm {
                    model: c.init::<Autodiff<B>>(d),
                    sliding_window: c.sliding_window,
                };
                run_stage::<Autodiff<B>, _>(tp, init, device, opts, limit)?
            }
        };
        match s {
            Some(s) => summaries.push(s),
            // Stopped by `max_steps`: the run stops here.
            None => return Ok(summaries),
        }
    }
    Ok(summaries)
}

/// One stage-0 stage. Returns its summary, or `None` when it reached step `limit` first
/// (after a checkpoint there).
fn run_stage<AD, M>(
    tp: &TowerPlan,
    init: impl Fn(&AD::Device) -> M,
    device: &AD::Device,
    opts: &TrainOptions,
    limit: Option<u64>,
) -> Result<Option<StageSummary>>
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD> + Objective<AD> + Clone,
    M::InnerModule: TowerEval<AD::InnerBackend>,
{
    let stage = tp.stage;
    let dir = tp.dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let obs = opts.observer;
    let resumed = if opts.existing == Existing::Resume {
        ckpt::newest_intact(&dir, &mut |e| {
            let line = format!("skipping a damaged checkpoint: {e}");
            obs.on(Event::Info(&line));
        })?
    } else {
        None
    };
    // Seeded by the run and the stage's position: the towers do not depend on what came before.
    AD::seed(
        device,
        tp.config.run.seed.wrapping_add(2000 + tp.index as u64),
    );
    let (model, mut adam, start) = match &resumed {
        Some((ck, st)) => {
            let file = TensorFile::open(ck)?;
            let m = load_into(init(device), &file, Tower::Exact)?;
            let a = ckpt::load_adam::<AD::InnerBackend>(ck, st.adam_t.clone(), device)?;
            let line = format!(
                "resuming stage `{}` from {} (step {})",
                stage.name,
                ck.display(),
                st.stage_step
            );
            obs.on(Event::Info(&line));
            (m, a, st.stage_step)
        }
        None => (init(device), AdamState::default(), 0),
    };
    crate::init::materialize(&model);
    let mut model = optim::apply_freeze(model, &tp.groups)?;
    let kept = resumed.as_ref().map_or(Some(0), |(_, st)| st.metrics_bytes);
    let metrics = Metrics::open(&dir, kept, start)?;
    let mut mixture = tp.mixture()?;
    if let Some(ms) = resumed.as_ref().and_then(|(_, st)| st.mixture.clone()) {
        mixture.restore(ms)?;
    }
    let details = mixture.describe();
    obs.on(Event::Begin {
        name: &stage.name,
        steps: stage.steps,
        start,
        details: &details,
    });
    let mut loader = Loader::spawn(
        mixture,
        tp.batch_builder(),
        stage.batch_size,
        stage.on_error,
        2,
    );
    let started = Instant::now();
    let mut window = (Instant::now(), 0usize);
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut mixture_after = None;
    let save = |model: &M, adam: &AdamState<AD::InnerBackend>, done, mixture| {
        let state = RunState {
            global_step: done,
            stage: tp.index,
            stage_step: done,
            resolution: stage.resolution,
            mixture,
            adam_t: adam.t.clone(),
            metrics_bytes: Some(metrics.len()?),
            stages_done: Vec::new(),
            files: Default::default(),
        };
        ckpt::save(
            &dir,
            &model.valid(),
            adam,
            &state,
            tp.config.run.keep_checkpoints,
            None,
        )
        .map(|_| ())
    };
    for step in start..stage.steps {
        if limit.is_some_and(|m| step >= m) {
            if step > start {
                save(&model, &adam, step, mixture_after)?;
            }
            return Ok(None);
        }
        let batch = loader.recv()?;
        let done = step + 1;
        let checkpoint = done % stage.checkpoint_every == 0 && done < stage.steps;
        let log = done % stage.log_every == 0 || done == stage.steps || step == start || checkpoint;
        let loss = model.loss(&batch, &stage.loss, device);
        let grads = loss.backward();
        let g = optim::gradients(&model, &grads);
        let sched: Vec<f64> = (0..tp.groups.groups.len())
            .map(|i| tp.groups.at(i, 0, stage.steps, step))
            .collect();
        let cfg = StepConfig {
            optim: &stage.optim,
            groups: &tp.groups,
            sched: sched.clone(),
            norms: log,
        };
        let loss = loss.inner();
        let (m, stats) = optim::step(model, g, &mut adam, &cfg, loss.clone());
        model = m;
        window.1 += batch.batch_size * (batch.seq_len - 1);
        mixture_after = batch.state_after.clone();
        let logged = if log {
            // The one device-to-host read of a logging step.
            let vals: Vec<f32> = Tensor::cat(
                vec![
                    loss,
                    stats.grad_norm.clone(),
                    stats.applied.clone().float(),
                    stats.param_norm.clone(),
                ],
                0,
            )
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
            let [loss_v, grad_norm, applied, param_norm] = [0, 1, 2, 3].map(|i| vals[i] as f64);
            if applied < 0.5 {
                return Err(Error::Train(format!(
                    "stage `{}` step {done}: the loss or a gradient is not finite (NaN or \
                     infinite); the update was skipped and the last good checkpoint is kept",
                    stage.name
                )));
            }
            if first_loss.is_nan() {
                first_loss = loss_v;
            }
            last_loss = loss_v;
            let tps = window.1 as f64 / window.0.elapsed().as_secs_f64();
            window = (Instant::now(), 0);
            let lrs = tp.groups.lrs(stage.optim.lr, &sched);
            metrics.append(&json!({
                "step": done, "stage": stage.name, "stage_step": done, "loss": loss_v,
                "lr": lrs, "grad_norm": grad_norm, "param_norm": param_norm, "tokens_per_s": tps,
            }))?;
            Some(StepLog {
                loss: loss_v,
                lr: stage.optim.lr * sched[0],
                tokens_per_s: tps,
                extra: None,
            })
        } else {
            None
        };
        obs.on(Event::Step {
            done,
            log: logged.as_ref(),
        });
        if checkpoint {
            save(&model, &adam, done, mixture_after.clone())?;
        }
    }
    obs.on(Event::End);
    let svg = dir.join(format!("curves-{}.svg", stage.name));
    crate::plot::stage_curves(&metrics.path, &stage.name, &svg)?;
    let eval = if stage.eval.examples > 0 {
        let inner = model.valid();
        let e = inner.evaluate(tp, device)?;
        let mut line = json!({"step": stage.steps, "stage": stage.name});
        line["eval"] = e.clone();
        metrics.append(&line)?;
        let text = e
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        obs.on(Event::Info(&format!("stage `{}`: {text}", stage.name)));
        Some(e)
    } else {
        None
    };
    let summary = StageSummary {
        name: stage.name.clone(),
        steps: stage.steps,
        first_loss,
        last_loss,
        seconds: started.elapsed().as_secs_f64(),
        eval_accuracy: None,
        eval_baseline: None,
        val_perplexity: eval
            .as_ref()
            .and_then(|e| e.get("perplexity"))
            .and_then(|p| p.as_f64())
            .map(|p| vec![(stage.name.clone(), p)])
            .unwrap_or_default(),
        eval_metrics: eval,
    };
    // `final/` first: once it exists the stage is done, and a resume skips it (a resume from
    // an end-of-stage checkpoint would log its evaluation twice and have no losses to report).
    write_output(tp, &model.valid(), &summary)?;
    save(&model, &adam, stage.steps, None)?;
    obs.on(Event::StageDone(&summary));
    Ok(Some(summary))
}

/// Writes `final/`: the tower as an HF checkpoint, then renames it into place.
fn write_output<B: Backend, M: TowerEval<B>>(
    tp: &TowerPlan,
    model: &M,
    summary: &StageSummary,
) -> Result<()> {
    let out = tp.output();
    let tmp = tp.dir().join(".final.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    save_safetensors(model, &tmp.join("model.safetensors"))?;
    let tok_path = &tp.config.tokenizer.path;
    let tok_json: serde_json::Value = std::fs::read_to_string(tok_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let ids = pali_model::hf::special_ids(&tok_json);
    let config = match &tp.model {
        TowerModel::Siglip(c) => c.to_hf(ids[2], ids[0], ids[1]),
        TowerModel::Lm(c) => pali_model::hf::causal_lm_config(c, ids),
    };
    let files = [
        (
            "config.json",
            serde_json::to_string_pretty(&config).expect("json"),
        ),
        (
            "summary.json",
            serde_json::to_string_pretty(summary).expect("json"),
        ),
    ];
    for (name, text) in files {
        let p = tmp.join(name);
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    let tp_json = tmp.join("tokenizer.json");
    std::fs::copy(tok_path, &tp_json).map_err(io(&tp_json))?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&tmp, &out).map_err(io(&out))?;
    std::fs::File::open(tp.dir())
        .and_then(|f| f.sync_all())
        .map_err(io(&tp.dir()))
}

/// A stage-0 model's end-of-stage evaluation, as a JSON object of named numbers.
pub trait TowerEval<B: Backend>: Module<B> {
    fn evaluate(&self, tp: &TowerPlan, device: &B::Device) -> Result<serde_json::Value>;
}

/// Up to `n` validation examples, encoded without augmentation, in batches of `size`.
fn validation_batches(tp: &TowerPlan, n: usize, size: usize) -> Result<Vec<(Batch, Vec<String>)>> {
    let Some(ds) = tp.validation() else {
        return Err(Error::Config(format!(
            "stage `{}`: eval.examples > 0 but there is no validation data (a synthetic first \
             source, or eval.jsonl)",
            tp.stage.name
        )));
    };
    let builder = tp.batch_builder();
    let n = n.min(ds.len());
    let mut out = Vec::new();
    for start in (0..n).step_by(size.max(1)) {
        let mut rows = Vec::new();
        let mut texts = Vec::new();
        for i in start..(start + size).min(n) {
            let ex = ds.get(i)?;
            let enc = builder.encode(&ex, None)?;
            texts.push(ex.suffix.clone());
            rows.push((0, ex, enc));
        }
        out.push((builder.build(rows, Vec::new())?, texts));
    }
    Ok(out)
}

impl<B: Backend> TowerEval<B> for TwoTower<B> {
    /// Image→text and text→image recall@1 among up to 256 validation pairs. A retrieved
    /// candidate counts as a hit when its text equals the true one (synthetic captions repeat:
    /// two images with the same caption are equally right).
    fn evaluate(&self, tp: &TowerPlan, device: &B::Device) -> Result<serde_json::Value> {
        let n = tp.stage.eval.examples.min(CANDIDATES);
        let (mut im, mut tx, mut texts) = (Vec::new(), Vec::new(), Vec::new());
        for (b, t) in validation_batches(tp, n, tp.stage.batch_size)? {
            let out = self.forward(pixels(&b, device), text_ids(&b, device));
            im.push(out.image_embeds);
            tx.push(out.text_embeds);
            texts.extend(t);
        }
        let n = texts.len();
        let sim = Tensor::cat(im, 0).matmul(Tensor::cat(tx, 0).transpose()); // [n, n]
        let s: Vec<f32> = sim.into_data().convert::<f32>().to_vec().expect("f32");
        let best = |i: usize, by_row: bool| {
            (0..n)
                .max_by(|&a, &b| {
                    let at = |j: usize| if by_row { s[i * n + j] } else { s[j * n + i] };
                    at(a).total_cmp(&at(b))
                })
                .expect("n > 0")
        };
        let hits = |by_row: bool| {
            (0..n)
                .filter(|&i| texts[best(i, by_row)] == texts[i])
                .count() as f64
                / n as f64
        };
        // Chance: the share of candidates whose text equals the query's, on average.
        let chance = (0..n)
            .map(|i| texts.iter().filter(|t| **t == texts[i]).count() as f64 / n as f64)
            .sum::<f64>()
            / n as f64;
        Ok(json!({
            "image_to_text_recall@1": hits(true),
            "text_to_image_recall@1": hits(false),
            "chance_recall@1": chance,
            "candidates": n,
        }))
    }
}

impl<B: Backend> TowerEval<B> for CausalLm<B> {
    /// Validation perplexity: exp of the mean NLL per token (text and EOS) over up to
    /// `eval.examples` validation texts.
    fn evaluate(&self, tp: &TowerPlan, device: &B::Device) -> Result<serde_json::Value> {
        let (mut nll, mut count) = (0f64, 0f64);
        for (b, _) in validation_batches(tp, tp.stage.eval.examples, tp.stage.batch_size)? {
            let [tok, w] = self.token_losses(&b, 0.0, device);
            let v: Vec<f32> = Tensor::cat(vec![(tok * w.clone()).sum(), w.sum()], 0)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            nll += v[0] as f64;
            count += v[1] as f64;
        }
        Ok(json!({"perplexity": (nll / count.max(1.0)).exp(), "tokens": count}))
    }
}
