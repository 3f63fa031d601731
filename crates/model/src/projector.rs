//! The multimodal projector (big_vision `img/head`, HF `multi_modal_projector.linear`).
//!
//! `linear` is always the layer that writes into the decoder width, so a checkpoint of the
//! linear connector and the MLP connector share its name; the MLP adds `hidden` in front.

use crate::activation::gelu_tanh;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::{ProjectorConfig, ProjectorKind};
use crate::precision::Compute;

#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    /// MLP connector only: input → input width, followed by GELU(tanh).
    pub hidden: Option<Linear<B>>,
    /// Into the decoder width.
    pub linear: Linear<B>,
    pub compute: Compute,
}

impl ProjectorConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Projector<B> {
        let mut linear = LinearConfig::new(self.input_dim, self.output_dim).init(device);
        if self.zero_init {
            // big_vision `head_zeroinit=True`: a new projector starts by passing nothing, so the
            // decoder is undisturbed at step 0.
            linear.weight = Param::from_tensor(linear.weight.val().zeros_like());
            linear.bias = linear
                .bias
                .map(|b| Param::from_tensor(b.val().zeros_like()));
        }
        let hidden = match self.kind {
            ProjectorKind::Linear => None,
            ProjectorKind::Mlp => {
                Some(LinearConfig::new(self.input_dim, self.input_dim).init(device))
            }
        };
        Projector {
            hidden,
            linear,
            compute: Compute::F32,
        }
    }
}

impl<B: Backend> Projector<B> {
    /// # Shapes
    /// - x: [B, N, Din] → [B, N, D]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = match &self.hidden {
            Some(h) => gelu_tanh(self.compute.linear(h, x)),
            None => x,
        };
        self.compute.linear(&self.linear, x)
    }
}
