//! Perplexity on suffix tokens, with the masks and loss weights the training step uses
//! (the caller builds them exactly as for training).

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use pali_model::loss::token_nll;
use pali_model::{ForwardOptions, ModelInput, PaliGemma};

use crate::error::Result;

/// Summed negative log-likelihood and token count of each row.
///
/// # Shapes
/// - targets, weights: [B, T] (position t of the text predicts targets[t]; weight 1 on the
///   tokens that count, as the training loss) → B pairs
pub fn row_nll<B: Backend>(
    model: &PaliGemma<B>,
    input: ModelInput<B>,
    targets: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    n_img: usize,
) -> Result<Vec<(f64, f64)>> {
    let [b, _] = targets.dims();
    let out = model.forward(input, ForwardOptions::logits_from(n_img))?;
    let nll = token_nll(out.logits, targets, 0.0) * weights.clone(); // [B, T]
    let sums: Vec<f32> = nll.sum_dim(1).into_data().iter::<f32>().collect();
    let counts: Vec<f32> = weights.sum_dim(1).into_data().iter::<f32>().collect();
    Ok((0..b).map(|r| (sums[r] as f64, counts[r] as f64)).collect())
}

/// Per-task sums; perplexity = exp(Σ nll / Σ tokens).
#[derive(Debug, Clone, Default)]
pub struct Perplexity {
    sums: BTreeMap<String, (f64, f64)>,
}

impl Perplexity {
    pub fn add(&mut self, task: &str, nll: f64, tokens: f64) {
        let e = self.sums.entry(task.to_string()).or_default();
        e.0 += nll;
        e.1 += tokens;
    }

    /// (task, perplexity, tokens), tasks in name order.
    pub fn per_task(&self) -> Vec<(String, f64, f64)> {
        self.sums
            .iter()
            .map(|(k, (n, t))| (k.clone(), (n / t.max(1.0)).exp(), *t))
            .collect()
    }
}
