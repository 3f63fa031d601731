//! One batch's loss and gradients, split into micro-batches (gradient accumulation) and over
//! devices (data parallelism).
//!
//! The batch's rows are cut into `grad_accum × devices` equal micro-batches. Device d takes the
//! d-th run of `grad_accum` of them on its replica of the model, forked from the main model at
//! every step so that all replicas hold the same weights, in its own thread. Gradients are summed
//! on the main device (the first), where the one optimizer step runs. Each micro-batch loss is
//! scaled so that the sum is the whole batch's loss: the update is the one-device update up to
//! float summation order.
//!
//! Forking copies every parameter to every other device each step; that costs a parameter
//! transfer per device per step, small next to a large batch's compute.

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use pali_model::loss::Reduction;
use pali_model::PaliGemma;

use crate::config::LossSection;
use crate::error::{Error, Result};
use crate::inputs::{batch_loss, StepInputs};
use crate::optim::{self, Grads};

/// A batch's loss (on the device) and its gradients.
pub type LossAndGrads<B> = (Tensor<B, 1>, Grads<B>);

/// How one batch is split.
pub struct Split<'a, AD: Backend> {
    pub grad_accum: usize,
    /// The first is the main device, which holds the model and the optimizer.
    pub devices: &'a [AD::Device],
    /// Seeds each device's RNG (dropout masks) with `seed + d` before its forward pass.
    pub dropout_seed: Option<u64>,
}

/// The batch's loss (the value the optimizer minimises, left on the main device: reading it
/// would wait for the step) and its gradients on the main device.
pub fn batch_gradients<AD: AutodiffBackend>(
    model: &PaliGemma<AD>,
    inputs: StepInputs<AD>,
    loss: &LossSection,
    split: &Split<AD>,
) -> Result<LossAndGrads<AD::InnerBackend>> {
    let (k, n_dev) = (split.grad_accum.max(1), split.devices.len());
    let rows = inputs.targets.dims()[0];
    let total_w = inputs.weights.clone().sum();
    let parts = k * n_dev;
    let mut micro: Vec<StepInputs<AD>> = if parts == 1 {
        vec![inputs]
    } else {
        (0..parts)
            .map(|p| inputs.rows(p * rows / parts..(p + 1) * rows / parts))
            .collect()
    };
    let seed = |d: usize, dev: &AD::Device| {
        if let Some(s) = split.dropout_seed {
            AD::seed(dev, s.wrapping_add(d as u64));
        }
    };
    if n_dev == 1 {
        seed(0, &split.devices[0]);
        return device_gradients(model, micro, loss, rows, total_w);
    }
    let mine: Vec<_> = micro.drain(..k).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = split.devices[1..]
            .iter()
            .enumerate()
            .map(|(i, dev)| {
                let replica = model.clone().fork(dev);
                let part: Vec<_> = micro.drain(..k).map(|m| m.to_device(dev)).collect();
                let total_w = total_w.clone().to_device(dev);
                s.spawn(move || {
                    seed(i + 1, dev);
                    device_gradients(&replica, part, loss, rows, total_w)
                })
            })
            .collect();
        seed(0, &split.devices[0]);
        let (mut value, mut grads) = device_gradients(model, mine, loss, rows, total_w)?;
        let main = &split.devices[0];
        for w in workers {
            let (v, g) = w
                .join()
                .map_err(|_| Error::Train("a data-parallel worker panicked".into()))??;
            value = value + v.to_device(main);
            optim::add_gradients(
                &mut grads,
                g.into_iter().map(|(p, t)| (p, t.to_device(main))).collect(),
            );
        }
        Ok((value, grads))
    })
}

/// Loss and summed gradients of some micro-batches of a batch of `rows` rows whose loss
/// weights sum to `total_w`, on `model`'s device.
fn device_gradients<AD: AutodiffBackend>(
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
