//! Next-token losses with explicit masks (big_vision trainer `loss_fn`; HF `ForCausalLMLoss`).
//!
//! Burn's `CrossEntropyLoss` has no ignore-index and divides by the padded count (burn-notes
//! pitfall 4), so the loss is written out: log-softmax, gather, weight, normalise.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// How token losses become one number.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// big_vision: mean over each example's supervised tokens, then mean over the batch.
    #[default]
    PerExample,
    /// HF: mean over all supervised tokens of the batch.
    PerToken,
}

/// Per-token negative log-likelihood with optional label smoothing (`ls/(V−1)` on the other
/// classes, `1−ls` on the target, as big_vision).
///
/// # Shapes
/// - logits: [B, T, V] (position t predicts targets[t]), targets: [B, T] → [B, T]
pub fn token_nll<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    label_smoothing: f64,
) -> Tensor<B, 2> {
    let [b, t, v] = logits.dims();
    let logp = log_softmax(logits, 2); // [B, T, V]
    let picked = logp
        .clone()
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t]);
    if label_smoothing == 0.0 {
        return picked.neg();
    }
    let rest = logp.sum_dim(2).reshape([b, t]) - picked.clone();
    picked.mul_scalar(-(1.0 - label_smoothing))
        - rest.mul_scalar(label_smoothing / (v as f64 - 1.0))
}

/// Weighted reduction of a `[B, T]` token loss.
pub fn reduce<B: Backend>(
    tok: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    reduction: Reduction,
) -> Tensor<B, 1> {
    let weighted = tok * weights.clone();
    match reduction {
        Reduction::PerToken => weighted.sum() / weights.sum().clamp_min(1.0),
        Reduction::PerExample => {
            let [b, _] = weights.dims();
            let per_ex = weighted.sum_dim(1) / weights.sum_dim(1).clamp_min(1.0); // [B, 1]
            per_ex.reshape([b]).mean()
        }
    }
}

/// HF's loss: `labels` [B, S] with −100 = ignored, shifted inside (logits[t] predicts
/// labels[t+1]), token mean over the batch.
///
/// # Shapes
/// - logits: [B, S, V], labels: [B, S] → [1]
pub fn hf_causal_lm_loss<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    let logits = logits.slice([0..b, 0..s - 1, 0..v]);
    let targets = labels.slice([0..b, 1..s]);
    let weights = targets.clone().not_equal_elem(-100).float();
    let targets = targets.clamp_min(0);
    reduce(
        token_nll(logits, targets, 0.0),
        weights,
        Reduction::PerToken,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend as TB;
    use burn::tensor::TensorData;

    #[test]
    fn reductions_differ_as_documented() {
        let dev = Default::default();
        // Two examples, uniform logits over V=4 → nll = ln 4 per token.
        let logits = Tensor::<TB, 3>::zeros([2, 3, 4], &dev);
        let targets = Tensor::<TB, 2, Int>::zeros([2, 3], &dev);
        let tok = token_nll(logits, targets, 0.0);
        // example 0 weights token 0 with loss ln4, example 1 has 3 tokens; scale ex 1 by 2.
        let tok = tok
            * Tensor::<TB, 2>::from_data(
                TensorData::new(vec![1.0f32, 1., 1., 2., 2., 2.], [2, 3]),
                &dev,
            );
        let w = Tensor::<TB, 2>::from_data(
            TensorData::new(vec![1.0f32, 0., 0., 1., 1., 1.], [2, 3]),
            &dev,
        );
        let l4 = 4f32.ln();
        let per_tok = reduce(tok.clone(), w.clone(), Reduction::PerToken).into_scalar();
        let per_ex = reduce(tok, w, Reduction::PerExample).into_scalar();
        assert!((per_tok - (l4 + 6.0 * l4) / 4.0).abs() < 1e-6);
        assert!((per_ex - (l4 + 2.0 * l4) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn label_smoothing_matches_dense_formula() {
        let dev = Default::default();
        let vals = vec![0.3f32, -1.0, 2.0, 0.5, 1.0, 0.0, -0.5, 0.25];
        let logits = Tensor::<TB, 3>::from_data(TensorData::new(vals.clone(), [1, 2, 4]), &dev);
        let targets = Tensor::<TB, 2, Int>::from_data(TensorData::new(vec![2i64, 0], [1, 2]), &dev);
        let got = token_nll(logits, targets, 0.1)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for (row, t) in [(0usize, 2usize), (1, 0)] {
            let l = &vals[row * 4..row * 4 + 4];
            let lse = l.iter().map(|x| x.exp()).sum::<f32>().ln();
            let want: f32 = (0..4)
                .map(|j| {
                    let y = if j == t { 0.9 } else { 0.1 / 3.0 };
                    -y * (l[j] - lse)
                })
                .sum();
            assert!((got[row] - want).abs() < 1e-5, "{} vs {want}", got[row]);
        }
    }
}
