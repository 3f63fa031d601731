//! The tensors of a training step: a host batch of the data stream → model inputs (image slots
//! first, then `text[:, :-1]`), next-token targets and loss weights; and the loss of such a batch
//! as training minimises it.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use pali_data::batch::Batch;
use pali_model::loss::{reduce, token_nll};
use pali_model::mask::make_attn_mask;
use pali_model::paligemma::bool_tensor;
use pali_model::paligemma::ForwardOptions;
use pali_model::{ModelInput, PaliGemma, PaliGemmaConfig};

use crate::config::{Attention, LossOn, LossSection};
use crate::error::Result;

/// Model inputs of a batch (image tokens first, then `text[:, :-1]`), next-token targets
/// (`text[:, 1:]`) and loss weights.
pub struct StepInputs<B: Backend> {
    pub input: ModelInput<B>,
    /// [B, T]: text position t predicts targets[t].
    pub targets: Tensor<B, 2, Int>,
    /// [B, T]: 1 on the tokens the loss counts.
    pub weights: Tensor<B, 2>,
    /// Image slots in front of the text.
    pub n_img: usize,
    pub tokens: usize,
}

impl<B: Backend> StepInputs<B> {
    /// The same inputs on `device` (for a data-parallel replica).
    pub fn to_device(self, device: &B::Device) -> Self {
        let i = self.input;
        StepInputs {
            input: ModelInput {
                pixel_values: i.pixel_values.to_device(device),
                input_ids: i.input_ids.to_device(device),
                positions: i.positions.to_device(device),
                masks: pali_model::gemma::AttentionMasks {
                    full: i.masks.full.to_device(device),
                    sliding: i.masks.sliding.map(|m| m.to_device(device)),
                },
            },
            targets: self.targets.to_device(device),
            weights: self.weights.to_device(device),
            n_img: self.n_img,
            tokens: self.tokens,
        }
    }

    /// The rows `r` of the batch (a micro-batch for gradient accumulation).
    pub fn rows(&self, r: std::ops::Range<usize>) -> Self {
        let i = &self.input;
        let [_, f, c, h, w] = i.pixel_values.dims();
        let [_, s] = i.input_ids.dims();
        let [_, t] = self.targets.dims();
        let n = r.len();
        StepInputs {
            input: ModelInput {
                pixel_values: i
                    .pixel_values
                    .clone()
                    .slice([r.clone(), 0..f, 0..c, 0..h, 0..w]),
                input_ids: i.input_ids.clone().slice([r.clone(), 0..s]),
                positions: i.positions.clone().slice([r.clone(), 0..s]),
                masks: pali_model::gemma::AttentionMasks {
                    full: i.masks.full.clone().slice([r.clone(), 0..s, 0..s]),
                    sliding: i
                        .masks
                        .sliding
                        .clone()
                        .map(|m| m.slice([r.clone(), 0..s, 0..s])),
                },
            },
            targets: self.targets.clone().slice([r.clone(), 0..t]),
            weights: self.weights.clone().slice([r, 0..t]),
            n_img: self.n_img,
            tokens: self.tokens / self.targets.dims()[0].max(1) * n,
        }
    }
}

/// Turns a host batch into the tensors of a training step (also what validation perplexity
/// uses, so both see the same masks). Every row gets exactly one image slot per image feature,
/// checked here on the host so the forward pass need not read the ids back.
pub fn step_inputs<B: Backend>(
    b: &mut Batch,
    cfg: &PaliGemmaConfig,
    attention: Attention,
    loss_on: LossOn,
    device: &B::Device,
) -> Result<StepInputs<B>> {
    let (bs, t1, f, r) = (b.batch_size, b.seq_len, b.frames, b.resolution);
    let t = t1 - 1;
    let n_img = f * cfg.num_image_tokens();
    let s = n_img + t;
    let mut ids = Vec::with_capacity(bs * s);
    let mut ar = Vec::with_capacity(bs * s);
    let mut tg = Vec::with_capacity(bs * t);
    let mut w = Vec::with_capacity(bs * t);
    for row in 0..bs {
        let text = &b.text[row * t1..(row + 1) * t1];
        let mar = &b.mask_ar[row * t1..(row + 1) * t1];
        let mloss = &b.mask_loss[row * t1..(row + 1) * t1];
        let minp = &b.mask_input[row * t1..(row + 1) * t1];
        if text[..t].contains(&(cfg.image_token_id as i64)) {
            return Err(pali_data::Error::Invalid(format!(
                "example `{}`: its text holds the `<image>` token (id {}), which only image \
                 slots may use",
                b.ids.get(row).map_or("?", String::as_str),
                cfg.image_token_id
            ))
            .into());
        }
        ids.extend(std::iter::repeat_n(cfg.image_token_id as i64, n_img));
        ids.extend(&text[..t]);
        let img_ar = i64::from(attention == Attention::CausalAll);
        ar.extend(std::iter::repeat_n(img_ar, n_img));
        match attention {
            Attention::PrefixLm => ar.extend(&mar[..t]),
            // Every text token its own block: causal over the prefix too.
            Attention::CausalText | Attention::CausalAll => ar.extend(std::iter::repeat_n(1, t)),
        }
        tg.extend(&text[1..]);
        let weights = match loss_on {
            LossOn::Suffix => &mloss[1..],
            LossOn::PrefixAndSuffix => &minp[1..],
        };
        w.extend(weights.iter().map(|x| *x as f32));
    }
    let int = |v: Vec<i64>, shape: [usize; 2]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device)
    };
    let mask_ar = int(ar, [bs, s]);
    // big_vision trains with input_mask all true: padding has mask_ar = 1, so real tokens never see it.
    let input_mask = bool_tensor::<B, 2>(vec![true; bs * s], [bs, s], device);
    let masks = make_attn_mask(mask_ar, input_mask, cfg.text.sliding_window);
    let positions = Tensor::<B, 1, Int>::arange(0..s as i64, device)
        .reshape([1, s])
        .expand([bs, s]);
    let pixel_values = Tensor::<B, 5>::from_data(
        TensorData::new(std::mem::take(&mut b.pixel_values), [bs, f, 3, r, r]),
        device,
    );
    Ok(StepInputs {
        input: ModelInput {
            pixel_values,
            input_ids: int(ids, [bs, s]),
            positions,
            masks,
        },
        targets: int(tg, [bs, t]),
        weights: Tensor::from_data(TensorData::new(w, [bs, t]), device),
        n_img,
        tokens: bs * s,
    })
}

/// The loss of `inputs` under `loss` (a scalar on the model's device).
pub fn batch_loss<B: Backend>(
    model: &PaliGemma<B>,
    inputs: StepInputs<B>,
    loss: &LossSection,
) -> Result<Tensor<B, 1>> {
    // `step_inputs` placed the image slots: no need to check them on the device.
    let opts = ForwardOptions::logits_from(inputs.n_img).unchecked();
    let out = model.forward(inputs.input, opts)?;
    let tok_loss = token_nll(out.logits, inputs.targets, loss.label_smoothing);
    Ok(reduce(tok_loss, inputs.weights, loss.reduction))
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    /// Whether some position that carries loss may attend to the token it must predict.
    fn sees_its_target(attention: Attention, loss_on: LossOn) -> bool {
        // [BOS] p p "\n" s s [EOS] [PAD], big_vision's masks.
        let text = vec![2, 10, 11, 12, 20, 21, 1, 0];
        let mut b = Batch {
            batch_size: 1,
            frames: 1,
            resolution: 16,
            pixel_values: vec![0.0; 3 * 16 * 16],
            seq_len: text.len(),
            text,
            mask_ar: vec![0, 0, 0, 0, 1, 1, 1, 1],
            mask_loss: vec![0, 0, 0, 0, 1, 1, 1, 0],
            mask_input: vec![1, 1, 1, 1, 1, 1, 1, 0],
            sources: vec![0],
            ids: vec!["x".into()],
            truncated: 0,
            eos_cut: Vec::new(),
            skipped: Vec::new(),
            state_after: None,
        };
        let cfg = pali_model::presets::tiny(300, 299, 16);
        let d = Default::default();
        let s = step_inputs::<Flex>(&mut b, &cfg, attention, loss_on, &d).unwrap();
        let full: Vec<bool> = s.input.masks.full.into_data().to_vec().unwrap();
        let w: Vec<f32> = s.weights.into_data().to_vec().unwrap();
        let n = s.input.input_ids.dims()[1];
        let (n_img, t) = (s.n_img, w.len());
        assert!(
            w.iter().filter(|x| **x > 0.0).count() >= 3,
            "loss on some tokens"
        );
        // Text position i (input position n_img + i) predicts the token at input n_img + i + 1.
        (0..t - 1).any(|i| w[i] > 0.0 && full[(n_img + i) * n + n_img + i + 1])
    }

    /// No position that carries loss sees its own target, for every combination the config
    /// allows; the one it refuses (loss on the prefix under the prefix-LM mask) would.
    #[test]
    fn no_loss_target_is_visible_to_its_position() {
        for attention in [
            Attention::PrefixLm,
            Attention::CausalText,
            Attention::CausalAll,
        ] {
            for loss_on in [LossOn::Suffix, LossOn::PrefixAndSuffix] {
                let refused =
                    attention == Attention::PrefixLm && loss_on == LossOn::PrefixAndSuffix;
                assert_eq!(
                    sees_its_target(attention, loss_on),
                    refused,
                    "{attention:?}, {loss_on:?}"
                );
            }
        }
    }
}
