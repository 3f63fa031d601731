//! Greedy decoding with a KV cache: prefill the prompt once, then extend one token at a time.
//!
//! Rows may have prompts of different lengths (right padding): each row keeps its own count of
//! real tokens, which gives the RoPE position of its next token; padding slots stay in the cache
//! but are masked out of every later step. Richer samplers live in the eval crate.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::error::Result;
use crate::gemma::{AttentionMasks, LayerCache};
use crate::paligemma::{bool_tensor, bool_values, ModelInput, PaliGemma};

/// Bookkeeping of what the cache holds, per row and slot.
#[derive(Clone, Debug)]
pub struct CacheState {
    /// Slot holds a real token (not padding).
    pub valid: Vec<Vec<bool>>,
    /// RoPE position of the token in each slot.
    pub positions: Vec<Vec<i64>>,
}

impl CacheState {
    /// Masks for a step that appends one token per row at `new_pos`.
    pub fn step_masks<B: Backend>(
        &self,
        new_pos: &[i64],
        sliding_window: Option<usize>,
        device: &B::Device,
    ) -> AttentionMasks<B> {
        let b = self.valid.len();
        let sk = self.valid[0].len() + 1;
        let build = |window: Option<usize>| {
            let mut v = Vec::with_capacity(b * sk);
            for ((valid, pos), new) in self.valid.iter().zip(&self.positions).zip(new_pos) {
                for (ok, p) in valid.iter().zip(pos) {
                    let near = window.is_none_or(|w| new - p < w as i64);
                    v.push(*ok && near);
                }
                v.push(true);
            }
            bool_tensor::<B, 3>(v, [b, 1, sk], device)
        };
        AttentionMasks {
            full: build(None),
            sliding: sliding_window.map(|w| build(Some(w))),
        }
    }

    fn push(&mut self, pos: &[i64]) {
        for ((valid, positions), p) in self.valid.iter_mut().zip(&mut self.positions).zip(pos) {
            valid.push(true);
            positions.push(*p);
        }
    }
}

/// Tokens per row, and the logits of every step.
pub type Generated<B> = (Vec<Vec<i64>>, Vec<Tensor<B, 2>>);

/// Greedy decoding. `input_mask` [B, S] marks the prompt's real tokens; rows must be
/// right-padded. Returns `max_new` tokens per row (after `eos`, a row repeats `eos`) and the raw
/// logits of every step ([B, V'] each) for inspection.
pub fn greedy<B: Backend>(
    model: &PaliGemma<B>,
    prompt: ModelInput<B>,
    input_mask: Tensor<B, 2, Bool>,
    sliding_window: Option<usize>,
    max_new: usize,
    eos: Option<i64>,
) -> Result<Generated<B>> {
    let device = prompt.input_ids.device();
    let [b, s] = prompt.input_ids.dims();
    let valid: Vec<bool> = bool_values(input_mask);
    let pos: Vec<i64> = prompt.positions.clone().into_data().iter::<i64>().collect();
    let mut state = CacheState {
        valid: valid.chunks(s).map(|c| c.to_vec()).collect(),
        positions: pos.chunks(s).map(|c| c.to_vec()).collect(),
    };
    let lengths: Vec<usize> = state
        .valid
        .iter()
        .map(|v| v.iter().filter(|x| **x).count())
        .collect();

    let mut cache: Vec<LayerCache<B>> = Vec::new();
    let h = model.prefill(prompt, &mut cache)?; // [B, S, D]
    let d = h.dims()[2];
    // The last real token of each row predicts the first new token.
    let last = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            lengths.iter().map(|l| *l as i64 - 1).collect::<Vec<_>>(),
            [b],
        ),
        &device,
    );
    let h_last = h.gather(1, last.reshape([b, 1, 1]).expand([b, 1, d])); // [B, 1, D]
    let mut logits = model.logits(h_last); // [B, 1, V']
    let mut next_pos: Vec<i64> = (0..b)
        .map(|r| state.positions[r][lengths[r] - 1] + 1)
        .collect();

    let mut out = vec![Vec::with_capacity(max_new); b];
    let mut step_logits = Vec::with_capacity(max_new);
    let mut done = vec![false; b];
    for step in 0..max_new {
        let v = logits.dims()[2];
        let lg = logits.reshape([b, v]);
        let tok: Vec<i64> = lg.clone().argmax(1).into_data().iter::<i64>().collect();
        step_logits.push(lg);
        for r in 0..b {
            let t = if done[r] {
                eos.unwrap_or(tok[r])
            } else {
                tok[r]
            };
            out[r].push(t);
            done[r] |= Some(t) == eos;
        }
        if step + 1 == max_new || done.iter().all(|d| *d) {
            break;
        }
        let ids: Vec<i64> = out.iter().map(|o| *o.last().unwrap()).collect();
        let masks = state.step_masks::<B>(&next_pos, sliding_window, &device);
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, 1]), &device);
        let p = Tensor::<B, 2, Int>::from_data(TensorData::new(next_pos.clone(), [b, 1]), &device);
        let h = model.decode_step(ids, p, &masks, &mut cache);
        logits = model.logits(h);
        state.push(&next_pos);
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok((out, step_logits))
}
