//! One training step, as `pali train` runs it and `pali bench train-step` times it: the batch's
//! loss and gradients over micro-batches and devices ([`parallel`]), then big_vision's optimizer
//! chain ([`optim::step`]).

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use pali_model::PaliGemma;

use crate::config::{LossSection, Optim};
use crate::dist::Peer;
use crate::error::Result;
use crate::inputs::StepInputs;
use crate::optim::{self, AdamState, Groups, StepConfig, StepStats};
use crate::parallel::{self, Split};

/// What a step needs besides the model, the batch and the optimizer state: a stage's settings.
pub struct StepSettings<'a, B: Backend> {
    pub optim: &'a Optim,
    pub loss: &'a LossSection,
    pub groups: &'a Groups,
    pub grad_accum: usize,
    /// The other ranks of a data-parallel run (gradients are summed over them).
    pub peer: Option<&'a Peer<B>>,
}

/// What a step did, on the device: nothing in a step waits for the device, so a GPU runs
/// ahead; read these only on logging steps.
pub struct StepResult<B: Backend> {
    /// The batch's loss, the value the optimizer minimises.
    pub loss: Tensor<B, 1>,
    /// Tokens of the batch (image slots included).
    pub tokens: usize,
    /// Norms of the update (parameter and update norms only when asked for), and whether it
    /// was applied (a non-finite loss or gradient skips it).
    pub stats: StepStats<B>,
}

/// One optimizer step on `inputs`. `sched` is each group's schedule value at this step;
/// `dropout_seed` seeds the dropout masks (plus the rank); `norms` also computes parameter and update norms.
/// A non-finite loss or gradient leaves the weights as they were (see [`optim::step`]).
#[allow(clippy::too_many_arguments)]
pub fn train_step<AD: AutodiffBackend>(
    model: PaliGemma<AD>,
    inputs: StepInputs<AD>,
    adam: &mut AdamState<AD::InnerBackend>,
    s: &StepSettings<AD::InnerBackend>,
    sched: Vec<f64>,
    dropout_seed: Option<u64>,
    norms: bool,
) -> Result<(PaliGemma<AD>, StepResult<AD::InnerBackend>)> {
    let tokens = inputs.tokens;
    let split = Split {
        grad_accum: s.grad_accum,
        peer: s.peer,
        dropout_seed,
    };
    let (loss, grads) = parallel::batch_gradients(&model, inputs, s.loss, &split)?;
    let cfg = StepConfig {
        optim: s.optim,
        groups: s.groups,
        sched,
        norms,
    };
    let (model, stats) = optim::step(model, grads, adam, &cfg, loss.clone());
    Ok((
        model,
        StepResult {
            loss,
            tokens,
            stats,
        },
    ))
}
