//! Bookkeeping of a KV cache during decoding (the decoders live in the eval crate).
//!
//! Rows may have prompts of different lengths (right padding): padding slots stay in the cache
//! but are masked out of every later step, and each row's RoPE positions continue from its own
//! last real token.

use burn::tensor::backend::Backend;

use crate::gemma::AttentionMasks;
use crate::paligemma::bool_tensor;

/// What the cache holds, per row and slot.
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

    /// Records the step's tokens (one per row, at `pos`) as real.
    pub fn push(&mut self, pos: &[i64]) {
        for ((valid, positions), p) in self.valid.iter_mut().zip(&mut self.positions).zip(pos) {
            valid.push(true);
            positions.push(*p);
        }
    }
}
