//! One training step, as `pali train` runs it and `pali bench train-step` times it: the batch's
//! loss and gradients over micro-batches and devices ([`parallel`]), then big_vision's optimizer
//! chain ([`optim::step`]).

use burn::tensor::backend::AutodiffBackend;
use pali_model::PaliGemma;

use crate::config::{LossSection, Optim};
use crate::error::{Error, Result};
use crate::inputs::StepInputs;
use crate::optim::{self, AdamState, Groups, StepConfig, StepStats};
use crate::parallel::{self, Split};

/// What a step needs besides the model, the batch and the optimizer state: a stage's settings.
pub struct StepSettings<'a, D> {
    pub optim: &'a Optim,
    pub loss: &'a LossSection,
    pub groups: &'a Groups,
    pub grad_accum: usize,
    /// The first holds the model and the optimizer state.
    pub devices: &'a [D],
}

/// What a step did.
pub struct StepResult<B: burn::tensor::backend::Backend> {
    /// The batch's loss, the value the optimizer minimises.
    pub loss: f64,
    /// Tokens of the batch (image slots included).
    pub tokens: usize,
    /// Norms of the update (device scalars; parameter and update norms only when asked for).
    pub stats: StepStats<B>,
}

/// One optimizer step on `inputs`. `sched` is each group's schedule value at this step;
/// `dropout_seed` seeds the dropout masks; `norms` also computes parameter and update norms.
/// A non-finite loss is an error and leaves `adam` untouched (the model is dropped).
#[allow(clippy::too_many_arguments)]
pub fn train_step<AD: AutodiffBackend>(
    model: PaliGemma<AD>,
    inputs: StepInputs<AD>,
    adam: &mut AdamState<AD::InnerBackend>,
    s: &StepSettings<AD::Device>,
    sched: Vec<f64>,
    dropout_seed: Option<u64>,
    norms: bool,
) -> Result<(PaliGemma<AD>, StepResult<AD::InnerBackend>)> {
    let tokens = inputs.tokens;
    let split = Split {
        grad_accum: s.grad_accum,
        devices: s.devices,
        dropout_seed,
    };
    let (loss, grads) = parallel::batch_gradients(&model, inputs, s.loss, &split)?;
    if !loss.is_finite() {
        return Err(Error::Train(format!("loss became {loss}")));
    }
    let cfg = StepConfig {
        optim: s.optim,
        groups: s.groups,
        sched,
        norms,
    };
    let (model, stats) = optim::step(model, grads, adam, &cfg);
    Ok((
        model,
        StepResult {
            loss,
            tokens,
            stats,
        },
    ))
}
