//! Decoding: prefill the prompts once, then extend one token at a time with a KV cache (or,
//! for comparison, re-run the whole sequence each step). Samplers: greedy, beam search,
//! temperature, nucleus and best-of-n (big_vision `predict_fns.py`); an optional logit mask
//! forbids tokens (e.g. `<noise>` and EOS in PaliGemma 2 detection).
//!
//! Rows have prompts of their own lengths. The logits of every step come to the host, where the
//! samplers run: they are cheap next to the model, and sampling stays identical on every backend.
//! [`greedy_with_logits`] runs the same loop on HF-layout inputs for `pali generate`.

use std::str::FromStr;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use pali_data::rng::Rng;
use pali_model::cache::CacheState;
use pali_model::gemma::LayerCache;
use pali_model::mask::make_attn_mask;
use pali_model::paligemma::{bool_tensor, bool_values};
use pali_model::{ModelInput, PaliGemma};

use crate::error::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    Greedy,
    /// Beam search of this width; the result has the highest total log-probability found.
    Beam(usize),
    /// Sampling from softmax(logits / t).
    Temperature(f32),
    /// Sampling from the smallest set of tokens whose probability reaches `p` (after `t`).
    Nucleus {
        p: f32,
        t: f32,
    },
    /// `n` samples at temperature `t`; the one with the highest total log-probability wins.
    BestOfN {
        n: usize,
        t: f32,
    },
}

impl FromStr for Sampler {
    type Err = String;
    /// `greedy`, `beam:K`, `temperature:T`, `nucleus:P[:T]`, `best_of:N[:T]`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize, what: &str| -> std::result::Result<f32, String> {
            parts
                .get(i)
                .ok_or_else(|| format!("`{s}`: missing {what}"))?
                .parse::<f32>()
                .map_err(|_| format!("`{s}`: {what} is not a number"))
        };
        let t_or_1 = |i: usize| {
            if parts.len() > i {
                num(i, "temperature")
            } else {
                Ok(1.0)
            }
        };
        let sampler = match parts[0] {
            "greedy" if parts.len() == 1 => Sampler::Greedy,
            "beam" if parts.len() == 2 => Sampler::Beam(num(1, "beam size")? as usize),
            "temperature" if parts.len() == 2 => Sampler::Temperature(num(1, "temperature")?),
            "nucleus" if (2..=3).contains(&parts.len()) => Sampler::Nucleus {
                p: num(1, "p")?,
                t: t_or_1(2)?,
            },
            "best_of" if (2..=3).contains(&parts.len()) => Sampler::BestOfN {
                n: num(1, "n")? as usize,
                t: t_or_1(2)?,
            },
            _ => {
                return Err(format!(
                    "unknown decoding `{s}`: greedy, beam:K, temperature:T, nucleus:P[:T], \
                     best_of:N[:T]"
                ))
            }
        };
        match sampler {
            Sampler::Beam(0) | Sampler::BestOfN { n: 0, .. } => {
                Err(format!("`{s}`: the size must be at least 1"))
            }
            Sampler::Nucleus { p, .. } if !(p > 0.0 && p <= 1.0) => {
                Err(format!("`{s}`: p must be in (0, 1]"))
            }
            Sampler::Temperature(t) | Sampler::Nucleus { t, .. } | Sampler::BestOfN { t, .. }
                if !(t >= 0.0 && t.is_finite()) =>
            {
                Err(format!("`{s}`: the temperature must be ≥ 0"))
            }
            s => Ok(s),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DecodeOptions {
    pub sampler: Sampler,
    /// New tokens at most, EOS included.
    pub max_new: usize,
    pub eos: u32,
    /// Token ids that are never produced (logit set to −∞).
    pub forbid: Vec<u32>,
    /// Seed of the sampling samplers.
    pub seed: u64,
    /// Reuse keys/values of earlier positions (the normal case); `false` re-runs the whole
    /// sequence every step, for measurements and as a cross-check.
    pub use_cache: bool,
}

impl DecodeOptions {
    pub fn greedy(max_new: usize, eos: u32) -> Self {
        Self {
            sampler: Sampler::Greedy,
            max_new,
            eos,
            forbid: Vec::new(),
            seed: 0,
            use_cache: true,
        }
    }
}

/// Prompts of one batch: every row's token ids (image slots included) and `mask_ar`, without
/// padding; rows may differ in length.
pub struct Prompts<B: Backend> {
    /// [B, F, 3, H, W]
    pub pixel_values: Tensor<B, 5>,
    pub ids: Vec<Vec<i64>>,
    pub mask_ar: Vec<Vec<i64>>,
}

/// One decoded row.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Generated tokens, EOS excluded.
    pub tokens: Vec<u32>,
    /// Log-probability (temperature 1, after the logit mask) of each generated token, and of
    /// the EOS as the last entry when one was produced.
    pub logprobs: Vec<f32>,
    /// The row produced EOS within `max_new` tokens.
    pub finished: bool,
}

impl Decoded {
    pub fn total_logprob(&self) -> f64 {
        self.logprobs.iter().map(|x| *x as f64).sum()
    }
}

/// Prompts as one ready model input: right-padded rows with their own RoPE positions and
/// attention masks (HF's layout, as `pali generate` reads it). Decoded with the KV cache.
pub struct PaddedPrompts<B: Backend> {
    pub input: ModelInput<B>,
    /// [B, S] real tokens; each row's come first.
    pub input_mask: Tensor<B, 2, Bool>,
}

/// The logits of every decoding step: `[step][row]` → one value per predictable token.
pub type StepLogits = Vec<Vec<Vec<f32>>>;

/// What a session keeps between steps.
enum Memory<B: Backend> {
    /// Per-layer keys/values, what each slot holds, and each row's next RoPE position.
    Cache {
        layers: Vec<LayerCache<B>>,
        state: CacheState,
        next_pos: Vec<i64>,
    },
    /// Every row's sequence so far, re-run whole each step.
    Rerun {
        pixels: Tensor<B, 5>,
        rows: Vec<Vec<i64>>,
        mask_ar: Vec<Vec<i64>>,
    },
}

/// The model side of decoding: holds the cache (or the full sequences) of every row.
struct Session<'m, B: Backend> {
    model: &'m PaliGemma<B>,
    window: Option<usize>,
    device: B::Device,
    memory: Memory<B>,
}

/// Right-pads `rows` into one model input (positions from 0, big_vision masks); also returns
/// its input mask.
fn pad_rows<B: Backend>(
    pixels: Tensor<B, 5>,
    rows: &[Vec<i64>],
    mask_ar: &[Vec<i64>],
    window: Option<usize>,
    d: &B::Device,
) -> (ModelInput<B>, Vec<bool>) {
    let b = rows.len();
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let (mut ids, mut ar, mut valid) = (vec![0i64; b * s], vec![1i64; b * s], vec![false; b * s]);
    for (r, (row, m)) in rows.iter().zip(mask_ar).enumerate() {
        ids[r * s..r * s + row.len()].copy_from_slice(row);
        ar[r * s..r * s + row.len()].copy_from_slice(m);
        valid[r * s..r * s + row.len()]
            .iter_mut()
            .for_each(|v| *v = true);
    }
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, s]), d);
    let input_mask = bool_tensor::<B, 2>(valid.clone(), [b, s], d);
    let masks = make_attn_mask(int(ar), input_mask, window);
    let positions = Tensor::<B, 1, Int>::arange(0..s as i64, d)
        .reshape([1, s])
        .expand([b, s]);
    let input = ModelInput {
        pixel_values: pixels,
        input_ids: int(ids),
        positions,
        masks,
    };
    (input, valid)
}

/// A filled KV cache and, per row, the logits of its next token.
type Prefilled<B> = (Vec<LayerCache<B>>, Vec<Vec<f32>>);

/// Runs `input` whole; returns the filled cache and the logits after each row's last real token
/// (row `r` has `lengths[r]` of them, first).
fn run_prompt<B: Backend>(
    model: &PaliGemma<B>,
    input: ModelInput<B>,
    lengths: &[usize],
) -> Result<Prefilled<B>> {
    let device = input.input_ids.device();
    let b = lengths.len();
    let mut cache = Vec::new();
    let h = model.prefill(input, &mut cache)?; // [B, S, D]
    let dim = h.dims()[2];
    let last: Vec<i64> = lengths.iter().map(|l| *l as i64 - 1).collect();
    let last = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [b]), &device);
    let h_last = h.gather(1, last.reshape([b, 1, 1]).expand([b, 1, dim])); // [B, 1, D]
    Ok((cache, host_rows(model.logits(h_last))))
}

impl<'m, B: Backend> Session<'m, B> {
    /// Runs the prompts; returns the session and the logits of every row's next token.
    fn start(
        model: &'m PaliGemma<B>,
        p: Prompts<B>,
        window: Option<usize>,
        use_cache: bool,
    ) -> Result<(Self, Vec<Vec<f32>>)> {
        if p.ids.is_empty() || p.ids.iter().any(|r| r.is_empty()) {
            return Err(Error::Other(
                "decode: every prompt needs at least one token".into(),
            ));
        }
        let device = p.pixel_values.device();
        if use_cache {
            let (input, valid) = pad_rows(p.pixel_values, &p.ids, &p.mask_ar, window, &device);
            let s = input.input_ids.dims()[1];
            let positions = p.ids.iter().flat_map(|_| 0..s as i64).collect();
            return Self::prefill(model, window, input, valid, positions);
        }
        let s = Session {
            model,
            window,
            device,
            memory: Memory::Rerun {
                pixels: p.pixel_values,
                rows: p.ids,
                mask_ar: p.mask_ar,
            },
        };
        let logits = s.rerun()?;
        Ok((s, logits))
    }

    /// As [`Self::start`] with the cache, for prompts that are already a model input.
    fn start_padded(
        model: &'m PaliGemma<B>,
        p: PaddedPrompts<B>,
        window: Option<usize>,
    ) -> Result<(Self, Vec<Vec<f32>>)> {
        let [b, s] = p.input.input_ids.dims();
        if b == 0 || s == 0 {
            return Err(Error::Other(
                "decode: every prompt needs at least one token".into(),
            ));
        }
        let valid = bool_values(p.input_mask);
        for (r, row) in valid.chunks(s).enumerate() {
            let n = row.iter().take_while(|v| **v).count();
            if n == 0 || row[n..].iter().any(|v| *v) {
                return Err(Error::Other(format!(
                    "decode: row {r} of the input mask must be real tokens, then padding, with \
                     at least one real token"
                )));
            }
        }
        let positions = p
            .input
            .positions
            .clone()
            .into_data()
            .iter::<i64>()
            .collect();
        Self::prefill(model, window, p.input, valid, positions)
    }

    /// Prefills the cache with `input` ([B, S], right-padded; `valid` and `positions` are its
    /// input mask and RoPE positions, row-major).
    fn prefill(
        model: &'m PaliGemma<B>,
        window: Option<usize>,
        input: ModelInput<B>,
        valid: Vec<bool>,
        positions: Vec<i64>,
    ) -> Result<(Self, Vec<Vec<f32>>)> {
        let device = input.input_ids.device();
        let s = input.input_ids.dims()[1];
        let state = CacheState {
            valid: valid.chunks(s).map(|c| c.to_vec()).collect(),
            positions: positions.chunks(s).map(|c| c.to_vec()).collect(),
        };
        let lengths: Vec<usize> = state
            .valid
            .iter()
            .map(|v| v.iter().filter(|x| **x).count())
            .collect();
        let next_pos = lengths
            .iter()
            .zip(&state.positions)
            .map(|(l, p)| p[l - 1] + 1)
            .collect();
        let (layers, logits) = run_prompt(model, input, &lengths)?;
        let memory = Memory::Cache {
            layers,
            state,
            next_pos,
        };
        let session = Session {
            model,
            window,
            device,
            memory,
        };
        Ok((session, logits))
    }

    /// Without a cache: runs every row's whole sequence (right-padded).
    fn rerun(&self) -> Result<Vec<Vec<f32>>> {
        let Memory::Rerun {
            pixels,
            rows,
            mask_ar,
        } = &self.memory
        else {
            unreachable!("rerun with a cache");
        };
        let (input, _) = pad_rows(pixels.clone(), rows, mask_ar, self.window, &self.device);
        let lengths: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        Ok(run_prompt(self.model, input, &lengths)?.1)
    }

    /// Makes row `i` of the new batch a copy of old row `idx[i]`.
    fn reorder(&mut self, idx: &[usize]) {
        let t = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                idx.iter().map(|i| *i as i64).collect::<Vec<_>>(),
                [idx.len()],
            ),
            &self.device,
        );
        fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
            idx.iter().map(|i| v[*i].clone()).collect()
        }
        match &mut self.memory {
            Memory::Cache {
                layers,
                state,
                next_pos,
            } => {
                for (k, v) in layers.iter_mut().flatten() {
                    *k = k.clone().select(0, t.clone());
                    *v = v.clone().select(0, t.clone());
                }
                state.valid = pick(&state.valid, idx);
                state.positions = pick(&state.positions, idx);
                *next_pos = pick(next_pos, idx);
            }
            Memory::Rerun {
                pixels,
                rows,
                mask_ar,
            } => {
                *rows = pick(rows, idx);
                *mask_ar = pick(mask_ar, idx);
                *pixels = pixels.clone().select(0, t);
            }
        }
    }

    /// Appends one token per row; returns the logits of the token after it.
    fn step(&mut self, ids: &[i64]) -> Result<Vec<Vec<f32>>> {
        let (layers, state, next_pos) = match &mut self.memory {
            Memory::Cache {
                layers,
                state,
                next_pos,
            } => (layers, state, next_pos),
            Memory::Rerun { rows, mask_ar, .. } => {
                for (r, id) in ids.iter().enumerate() {
                    rows[r].push(*id);
                    mask_ar[r].push(1);
                }
                return self.rerun();
            }
        };
        let b = ids.len();
        let d = &self.device;
        let masks = state.step_masks::<B>(next_pos, self.window, d);
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [b, 1]), d);
        let p = Tensor::<B, 2, Int>::from_data(TensorData::new(next_pos.clone(), [b, 1]), d);
        let h = self.model.decode_step(t, p, &masks, layers);
        state.push(next_pos);
        next_pos.iter_mut().for_each(|p| *p += 1);
        Ok(host_rows(self.model.logits(h)))
    }
}

/// [B, 1, V] → one host vector per row.
fn host_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [b, _, v] = logits.dims();
    let flat: Vec<f32> = logits.into_data().iter::<f32>().collect();
    (0..b).map(|r| flat[r * v..(r + 1) * v].to_vec()).collect()
}

/// Log-softmax with forbidden tokens at −∞.
fn log_softmax(logits: &[f32], forbid: &[u32]) -> Vec<f32> {
    let mut x = logits.to_vec();
    for f in forbid {
        if let Some(v) = x.get_mut(*f as usize) {
            *v = f32::NEG_INFINITY;
        }
    }
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
    x.iter_mut().for_each(|v| *v -= lse);
    x
}

/// First index of the maximum.
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// Draws a token from `logp` (temperature `t`; nucleus `p` < 1 keeps the most likely tokens up
/// to that mass). `t = 0` is greedy.
fn sample(logp: &[f32], t: f32, p: f32, rng: &mut Rng) -> usize {
    if t == 0.0 {
        return argmax(logp);
    }
    let scaled: Vec<f32> = logp.iter().map(|l| l / t).collect();
    let m = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = scaled
        .iter()
        .enumerate()
        .map(|(i, v)| (i, (v - m).exp()))
        .filter(|(_, q)| *q > 0.0)
        .collect();
    let z: f32 = probs.iter().map(|(_, q)| q).sum();
    probs.iter_mut().for_each(|(_, q)| *q /= z);
    if p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|(_, q)| {
                mass += q;
                mass >= p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let z: f32 = probs.iter().map(|(_, q)| q).sum();
        probs.iter_mut().for_each(|(_, q)| *q /= z);
    }
    let u = rng.f32();
    let mut acc = 0.0;
    for (i, q) in &probs {
        acc += q;
        if u < acc {
            return *i;
        }
    }
    probs.last().map_or(0, |(i, _)| *i)
}

/// Decodes every prompt row with `opts.sampler`.
pub fn decode<B: Backend>(
    model: &PaliGemma<B>,
    prompts: Prompts<B>,
    sliding_window: Option<usize>,
    opts: &DecodeOptions,
) -> Result<Vec<Decoded>> {
    if opts.max_new == 0 {
        return Ok(vec![
            Decoded {
                tokens: vec![],
                logprobs: vec![],
                finished: false
            };
            prompts.ids.len()
        ]);
    }
    let (s, first) = Session::start(model, prompts, sliding_window, opts.use_cache)?;
    match opts.sampler {
        Sampler::Beam(k) => beam(s, first, opts, k),
        Sampler::Greedy => sampled(s, first, opts, 1, 0.0, 1.0, None),
        Sampler::Temperature(t) => sampled(s, first, opts, 1, t, 1.0, None),
        Sampler::Nucleus { p, t } => sampled(s, first, opts, 1, t, p, None),
        Sampler::BestOfN { n, t } => sampled(s, first, opts, n, t, 1.0, None),
    }
}

/// Greedy decoding of prompts that are already a model input (as `pali generate` reads them),
/// with the loop of [`decode`] and the KV cache; `eos: None` never stops early. Also returns the
/// logits of every step, rows that already ended included.
pub fn greedy_with_logits<B: Backend>(
    model: &PaliGemma<B>,
    prompts: PaddedPrompts<B>,
    sliding_window: Option<usize>,
    max_new: usize,
    eos: Option<u32>,
) -> Result<(Vec<Decoded>, StepLogits)> {
    // No token id reaches u32::MAX.
    let opts = DecodeOptions::greedy(max_new, eos.unwrap_or(u32::MAX));
    let (s, first) = Session::start_padded(model, prompts, sliding_window)?;
    let mut steps = Vec::with_capacity(max_new);
    let rows = sampled(s, first, &opts, 1, 0.0, 1.0, Some(&mut steps))?;
    Ok((rows, steps))
}

/// Greedy and sampling decoders: `n` samples per row, the best total log-probability kept.
/// `steps`, when given, receives the logits of every step (of all `b·n` rows).
fn sampled<B: Backend>(
    mut s: Session<'_, B>,
    first: Vec<Vec<f32>>,
    opts: &DecodeOptions,
    n: usize,
    t: f32,
    p: f32,
    mut steps: Option<&mut StepLogits>,
) -> Result<Vec<Decoded>> {
    let b = first.len();
    let mut logits = first;
    if n > 1 {
        let idx: Vec<usize> = (0..b * n).map(|i| i / n).collect();
        s.reorder(&idx);
        logits = idx.iter().map(|i| logits[*i].clone()).collect();
    }
    let rows = b * n;
    let mut rngs: Vec<Rng> = (0..rows)
        .map(|r| Rng::derive(opts.seed, &[r as u64]))
        .collect();
    let mut out = vec![
        Decoded {
            tokens: vec![],
            logprobs: vec![],
            finished: false
        };
        rows
    ];
    for step in 0..opts.max_new {
        let mut next = vec![opts.eos as i64; rows];
        for r in 0..rows {
            if out[r].finished {
                continue;
            }
            let lp = log_softmax(&logits[r], &opts.forbid);
            let tok = sample(&lp, t, p, &mut rngs[r]);
            out[r].logprobs.push(lp[tok]);
            if tok as u32 == opts.eos {
                out[r].finished = true;
            } else {
                out[r].tokens.push(tok as u32);
            }
            next[r] = tok as i64;
        }
        if let Some(steps) = steps.as_deref_mut() {
            steps.push(std::mem::take(&mut logits));
        }
        if step + 1 == opts.max_new || out.iter().all(|d| d.finished) {
            break;
        }
        logits = s.step(&next)?;
    }
    // Best of each row's n samples (first one on ties).
    Ok(out
        .chunks(n)
        .map(|c| {
            let mut best = 0;
            for (i, d) in c.iter().enumerate() {
                if d.total_logprob() > c[best].total_logprob() {
                    best = i;
                }
            }
            c[best].clone()
        })
        .collect())
}

#[derive(Clone)]
struct Hyp {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    score: f64,
}

/// Beam search of width `k`, no length penalty: returns, per row, the hypothesis with the highest
/// total log-probability among those that ended with EOS (or, when none did within `max_new`,
/// among the unfinished ones).
fn beam<B: Backend>(
    mut s: Session<'_, B>,
    first: Vec<Vec<f32>>,
    opts: &DecodeOptions,
    k: usize,
) -> Result<Vec<Decoded>> {
    let b = first.len();
    let idx: Vec<usize> = (0..b * k).map(|i| i / k).collect();
    s.reorder(&idx);
    let mut logits: Vec<Vec<f32>> = idx.iter().map(|i| first[*i].clone()).collect();
    let dead = Hyp {
        tokens: vec![],
        logprobs: vec![],
        score: f64::NEG_INFINITY,
    };
    // Only the first copy of each row is live at the start.
    let mut alive: Vec<Vec<Hyp>> = (0..b)
        .map(|_| {
            let mut v = vec![dead.clone(); k];
            v[0].score = 0.0;
            v
        })
        .collect();
    let mut finished: Vec<Vec<Hyp>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for step in 0..opts.max_new {
        let mut parents = Vec::with_capacity(b * k);
        let mut next = Vec::with_capacity(b * k);
        for r in 0..b {
            if done[r] {
                parents.extend((0..k).map(|j| r * k + j));
                next.extend(std::iter::repeat_n(opts.eos as i64, k));
                continue;
            }
            // The 2k best continuations of each live hypothesis, then the 2k best overall.
            let mut cands: Vec<(f64, usize, usize, f32)> = Vec::new();
            for (j, h) in alive[r].iter().enumerate() {
                if h.score == f64::NEG_INFINITY {
                    continue;
                }
                let lp = log_softmax(&logits[r * k + j], &opts.forbid);
                let mut order: Vec<usize> = (0..lp.len()).collect();
                let take = (2 * k).min(order.len());
                order.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]).then(a.cmp(b)));
                for &tok in &order[..take] {
                    if lp[tok] > f32::NEG_INFINITY {
                        cands.push((h.score + lp[tok] as f64, j, tok, lp[tok]));
                    }
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            let mut new_alive = Vec::with_capacity(k);
            for (rank, (score, j, tok, lp)) in cands.into_iter().enumerate() {
                let mut h = alive[r][j].clone();
                h.logprobs.push(lp);
                h.score = score;
                if tok as u32 == opts.eos {
                    if rank < k {
                        finished[r].push(h);
                    }
                } else if new_alive.len() < k {
                    h.tokens.push(tok as u32);
                    parents.push(r * k + j);
                    next.push(tok as i64);
                    new_alive.push(h);
                }
                if new_alive.len() == k {
                    break;
                }
            }
            while new_alive.len() < k {
                parents.push(r * k);
                next.push(opts.eos as i64);
                new_alive.push(dead.clone());
            }
            alive[r] = new_alive;
            // Scores only fall as hypotheses grow: once a finished one beats every live one,
            // nothing better can come.
            let best_done = finished[r]
                .iter()
                .map(|h| h.score)
                .fold(f64::NEG_INFINITY, f64::max);
            let best_alive = alive[r]
                .iter()
                .map(|h| h.score)
                .fold(f64::NEG_INFINITY, f64::max);
            done[r] = best_done >= best_alive;
        }
        if step + 1 == opts.max_new || done.iter().all(|d| *d) {
            break;
        }
        s.reorder(&parents);
        logits = s.step(&next)?;
    }
    Ok((0..b)
        .map(|r| {
            let pick = |hs: &[Hyp]| {
                hs.iter()
                    .filter(|h| h.score > f64::NEG_INFINITY)
                    .fold(None::<&Hyp>, |best, h| match best {
                        Some(b) if b.score >= h.score => Some(b),
                        _ => Some(h),
                    })
                    .cloned()
            };
            match pick(&finished[r]) {
                Some(h) => Decoded {
                    tokens: h.tokens,
                    logprobs: h.logprobs,
                    finished: true,
                },
                None => {
                    let h = pick(&alive[r]).unwrap_or(dead.clone());
                    Decoded {
                        tokens: h.tokens,
                        logprobs: h.logprobs,
                        finished: false,
                    }
                }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_syntax() {
        assert_eq!("greedy".parse::<Sampler>(), Ok(Sampler::Greedy));
        assert_eq!("beam:4".parse::<Sampler>(), Ok(Sampler::Beam(4)));
        assert_eq!(
            "nucleus:0.9".parse::<Sampler>(),
            Ok(Sampler::Nucleus { p: 0.9, t: 1.0 })
        );
        assert_eq!(
            "best_of:3:0.7".parse::<Sampler>(),
            Ok(Sampler::BestOfN { n: 3, t: 0.7 })
        );
        for bad in [
            "beam",
            "beam:0",
            "nucleus:1.5",
            "temperature:-1",
            "top_k:3",
            "beam:x",
        ] {
            assert!(bad.parse::<Sampler>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nucleus_keeps_the_head() {
        // p = 0.5 over probabilities (0.6, 0.3, 0.1): only token 0 can be drawn.
        let lp: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            assert_eq!(sample(&lp, 1.0, 0.5, &mut rng), 0);
        }
        // p = 0.85: tokens 0 and 1, never 2; both show up.
        let mut seen = [0; 3];
        for _ in 0..400 {
            seen[sample(&lp, 1.0, 0.85, &mut rng)] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 150 && seen[1] > 60, "{seen:?}");
        // Temperature 0 is argmax; forbidden tokens never come out.
        assert_eq!(sample(&lp, 0.0, 1.0, &mut rng), 0);
        let masked = log_softmax(&[5.0, 1.0, 0.0], &[0]);
        assert_eq!(masked[0], f32::NEG_INFINITY);
        assert!((masked[1].exp() + masked[2].exp() - 1.0).abs() < 1e-6);
    }
}
