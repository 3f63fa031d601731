//! One rank's share of a batch: its loss and gradients over micro-batches (gradient
//! accumulation), summed over the data-parallel ranks ([`crate::dist`]).
//!
//! The batch's rows are cut into `ranks × grad_accum` equal micro-batches; rank r holds the
//! r-th run of `grad_accum` of them (its loader reads only those rows). Each micro-batch loss is
//! scaled so that the sum over all of them is the whole batch's loss; the ranks all-reduce their
//! summed gradients and loss, and every rank then takes the same optimizer step on its own
//! replica. The update is the one-device update up to float summation order.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use pali_model::loss::Reduction;
use pali_model::PaliGemma;

use crate::config::LossSection;
use crate::dist::Peer;
use crate::error::Result;
use crate::inputs::{batch_loss, StepInputs};
use crate::optim::{self, Grads};

/// A batch's loss (on the device) and its gradients.
pub type LossAndGrads<B> = (Tensor<B, 1>, Grads<B>);

/// How one batch is split.
pub struct Split<'a, B: Backend> {
    pub grad_accum: usize,
    /// The other ranks, in a data-parallel run.
    pub peer: Option<&'a Peer<B>>,
    /// Seeds the RNG (dropout masks) with `seed` mixed with the rank before the forward pass.
    pub dropout_seed: Option<u64>,
}

/// The whole batch's loss (the value the optimizer minimises, left on the device: reading it
/// would wait for the step) and its gradients, from this rank's rows `inputs`.
pub fn batch_gradients<AD: AutodiffBackend>(
    model: &PaliGemma<AD>,
    inputs: StepInputs<AD>,
    loss: &LossSection,
    split: &Split<AD::InnerBackend>,
) -> Result<LossAndGrads<AD::InnerBackend>> {
    let k = split.grad_accum.max(1);
    let (rank, ranks) = split.peer.map_or((0, 1), |p| (p.rank, p.world));
    let rows = inputs.targets.dims()[0];
    let device = inputs.targets.device();
    let total_rows = rows * ranks;
    // The loss weights of the whole batch (per-token reduction only): one small all-reduce.
    let total_w = match (loss.reduction, split.peer) {
        (Reduction::PerToken, Some(p)) if ranks > 1 => {
            Tensor::from_inner(p.sum(inputs.weights.clone().sum().inner())?)
        }
        _ => inputs.weights.clone().sum(),
    };
    let micro: Vec<StepInputs<AD>> = if k == 1 {
        vec![inputs]
    } else {
        (0..k)
            .map(|p| inputs.rows(p * rows / k..(p + 1) * rows / k))
            .collect()
    };
    if let Some(s) = split.dropout_seed {
        // Rank 0 keeps the one-device seed; the others' do not collide with another step's.
        AD::seed(
            &device,
            s ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
    }
    let (value, grads) = local_gradients(model, micro, loss, total_rows, total_w)?;
    let Some(peer) = split.peer.filter(|p| p.world > 1) else {
        return Ok((value, grads));
    };
    // The loss travels in the last gradient bucket: no collective of its own.
    const LOSS: &str = "\u{0}loss";
    let mut grads = grads;
    grads.push((LOSS.into(), value));
    let mut summed = peer.all_reduce_grads(grads)?;
    let (_, value) = summed.pop().expect("the loss entry");
    Ok((value, summed))
}

/// Loss and summed gradients of some micro-batches of a batch of `rows` rows whose loss
/// weights sum to `total_w`, on `model`'s device.
fn local_gradients<AD: AutodiffBackend>(
    model: &PaliGemma<AD>,
    micro: Vec<StepInputs<AD>>,
    loss: &LossSection,
    rows: usize,
    total_w: Tensor<AD, 1>,
) -> Result<LossAndGrads<AD::InnerBackend>> {
    let (mut value, mut grads) = (None::<Tensor<AD::InnerBackend, 1>>, None);
    for sub in micro {
        let n = sub.targets.dims()[0];
        let w = sub.weights.clone();
        let mut l = batch_loss(model, sub, loss)?;
        if n < rows {
            l = match loss.reduction {
                Reduction::PerExample => l.mul_scalar(n as f64 / rows as f64),
                Reduction::PerToken => l * (w.sum() / total_w.clone().clamp_min(1.0)),
            };
        }
        let v = l.clone().inner();
        value = Some(match value {
            Some(acc) => acc + v,
            None => v,
        });
        let g = optim::gradients(model, &l.backward());
        match &mut grads {
            None => grads = Some(g),
            Some(acc) => optim::add_gradients(acc, g),
        }
    }
    let none = "at least one micro-batch";
    Ok((value.expect(none), grads.expect(none)))
}
