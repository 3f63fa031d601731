//! PaliGemma: image encoder → projector → Gemma, glued as big_vision `paligemma.py` and HF
//! `modeling_paligemma.py` (5.24).
//!
//! The sequence is `[image tokens][BOS] prefix ["\n"] suffix [EOS] [PAD]`. Image tokens are the
//! slots of `input_ids` that hold `image_token_id`; their rows are replaced, in order, by the
//! projected image features, which are **not** scaled (only text embeddings get ×√D).

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use crate::config::{ImageEncoder, PaliGemmaConfig};
use crate::error::{Error, Result};
use crate::gemma::{AttentionMasks, Gemma, LayerCache};
use crate::precision::Compute;
use crate::projector::Projector;
use crate::siglip::{patchify, SiglipVision};

#[derive(Module, Debug)]
pub struct PaliGemma<B: Backend> {
    /// `None` for the "no image encoder" ablation (raw patches go to the projector).
    pub vision_tower: Option<SiglipVision<B>>,
    pub multi_modal_projector: Projector<B>,
    pub language_model: Gemma<B>,
    pub image_token_id: usize,
    pub patch_size: usize,
    pub output_vocab: usize,
}

/// One forward pass's inputs.
#[derive(Clone, Debug)]
pub struct ModelInput<B: Backend> {
    /// [B, F, 3, H, W] in [-1, 1]; F images (frames) per example.
    pub pixel_values: Tensor<B, 5>,
    /// [B, S] token ids, `image_token_id` in the F·N image slots.
    pub input_ids: Tensor<B, 2, Int>,
    /// [B, S] RoPE positions.
    pub positions: Tensor<B, 2, Int>,
    /// Attention masks (see [`crate::mask`]).
    pub masks: AttentionMasks<B>,
}

/// Intermediate activations, recorded on request (parity tests, `pali forward --hidden-states`).
#[derive(Debug, Default)]
pub struct Trace<B: Backend> {
    /// HF `vision_hidden_states`: [B·F, N, Dv] each, 0 = embeddings, last = before post-LN.
    pub vision_hidden: Vec<Tensor<B, 3>>,
    /// HF `lm_hidden_states` without the final-norm overwrite: 0 = merged embeddings,
    /// i = output of layer i−1, last = last layer's raw output.
    pub lm_hidden: Vec<Tensor<B, 3>>,
    /// Output of the final norm: [B, S, D].
    pub lm_last_hidden: Option<Tensor<B, 3>>,
    /// Vision encoder output after `post_layernorm`: [B·F, N, Dv].
    pub vision_last_hidden: Option<Tensor<B, 3>>,
}

/// What [`PaliGemma::forward`] computes besides the hidden states. The default: logits of every
/// position over the predictable vocabulary, no trace.
pub struct ForwardOptions<'a, B: Backend> {
    /// Logits only for positions `logits_from..S` (training needs the text positions only).
    pub logits_from: usize,
    /// Logits over every embedding row, padding rows included (HF's `lm_head` output), instead
    /// of the predictable vocabulary.
    pub all_vocab_rows: bool,
    /// Records intermediate activations here.
    pub trace: Option<&'a mut Trace<B>>,
    /// Check that each row has as many image tokens as the images give features (a host read
    /// of the ids). Off only for inputs whose layout is built to match (training steps), so a
    /// step needs no device-to-host transfer.
    pub check_image_tokens: bool,
}

impl<B: Backend> Default for ForwardOptions<'_, B> {
    fn default() -> Self {
        Self {
            logits_from: 0,
            all_vocab_rows: false,
            trace: None,
            check_image_tokens: true,
        }
    }
}

impl<'a, B: Backend> ForwardOptions<'a, B> {
    /// Logits of positions `n..S` over the predictable vocabulary (e.g. `n` = image tokens).
    pub fn logits_from(n: usize) -> Self {
        Self {
            logits_from: n,
            ..Self::default()
        }
    }

    /// Logits of every position over every embedding row, as HF returns them.
    pub fn all_vocab_rows() -> Self {
        Self {
            all_vocab_rows: true,
            ..Self::default()
        }
    }

    /// Without the image-token check (inputs built with one image slot per feature).
    pub fn unchecked(self) -> Self {
        Self {
            check_image_tokens: false,
            ..self
        }
    }

    /// Records intermediate activations into `trace`, when given.
    pub fn with_trace(self, trace: Option<&'a mut Trace<B>>) -> Self {
        Self { trace, ..self }
    }
}

#[derive(Debug)]
pub struct ModelOutput<B: Backend> {
    /// [B, S − logits_from, V'] with V' the predictable vocabulary (or all rows on request).
    pub logits: Tensor<B, 3>,
    /// [B, F·N, D] projector output.
    pub image_features: Tensor<B, 3>,
}

impl PaliGemmaConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> PaliGemma<B> {
        let vision_tower = match &self.vision {
            ImageEncoder::Siglip(c) => Some(c.init(device)),
            ImageEncoder::RawPatches { .. } => None,
        };
        PaliGemma {
            vision_tower,
            multi_modal_projector: self.projector_config().init(device),
            language_model: self.text.init(device),
            image_token_id: self.image_token_id,
            patch_size: self.vision.patch_size(),
            output_vocab: self.predictable_vocab(),
        }
    }
}

impl<B: Backend> PaliGemma<B> {
    /// Sets the dtype every matmul computes in (see [`crate::precision`]); parameters stay f32.
    pub fn with_compute(mut self, c: Compute) -> Self {
        if let Some(v) = &mut self.vision_tower {
            for l in &mut v.encoder.layers {
                l.self_attn.compute = c;
                l.mlp.compute = c;
            }
        }
        self.multi_modal_projector.compute = c;
        let lm = &mut self.language_model;
        lm.compute = c;
        for l in &mut lm.layers {
            l.self_attn.compute = c;
            l.mlp.compute = c;
        }
        self
    }

    /// Encodes and projects every image; frames are folded into the batch and their tokens
    /// concatenated per example (big_vision `embed_image`).
    ///
    /// # Shapes
    /// - pixels: [B, F, 3, H, W] → [B, F·N, D]
    pub fn encode_images(
        &self,
        pixels: Tensor<B, 5>,
        trace: Option<&mut Trace<B>>,
    ) -> Tensor<B, 3> {
        let [b, f, c, h, w] = pixels.dims();
        let flat = pixels.reshape([b * f, c, h, w]);
        let feats = match &self.vision_tower {
            Some(v) => {
                let mut trace = trace;
                let f = v.forward(flat, trace.as_deref_mut().map(|t| &mut t.vision_hidden));
                if let Some(t) = trace {
                    t.vision_last_hidden = Some(f.clone());
                }
                f
            }
            None => patchify(flat, self.patch_size),
        }; // [B·F, N, Dv]
        let z = self.multi_modal_projector.forward(feats); // [B·F, N, D]
        let [_, n, d] = z.dims();
        z.reshape([b, f * n, d])
    }

    /// Text embeddings (×√D) with the image slots replaced by `image_features`, in order.
    ///
    /// # Shapes
    /// - ids: [B, S], image_features: [B, M, D] → [B, S, D]
    pub fn embed(
        &self,
        ids: Tensor<B, 2, Int>,
        image_features: Tensor<B, 3>,
    ) -> Result<Tensor<B, 3>> {
        let m = image_features.dims()[1];
        let is_img = ids.clone().equal_elem(self.image_token_id as i64); // [B, S]
        let counts = is_img.int().sum_dim(1).into_data(); // host sync: a cheap check
        let counts = counts.iter::<i64>().collect::<Vec<_>>();
        if let Some((row, &n)) = counts.iter().enumerate().find(|(_, &n)| n as usize != m) {
            return Err(Error::Input(format!(
                "image features and image tokens do not match: row {row} of input_ids has {n} \
                 image tokens (id {}), the images give {m} features (frames × (size/patch)²)",
                self.image_token_id
            )));
        }
        Ok(self.embed_unchecked(ids, image_features))
    }

    /// [`Self::embed`] without the check that every row has one image token per feature (no
    /// device-to-host transfer); for inputs built that way.
    pub fn embed_unchecked(
        &self,
        ids: Tensor<B, 2, Int>,
        image_features: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let [_, m, d] = image_features.dims();
        let is_img = ids.clone().equal_elem(self.image_token_id as i64); // [B, S]
                                                                         // Ids of image slots are replaced by 0 before the lookup (their rows are overwritten).
        let text = self.language_model.embed(ids.mask_fill(is_img.clone(), 0)); // [B, S, D]
        if m == 0 {
            return text;
        }
        // Gather from cat([text, image]): slot t takes text row t, or image row S + rank.
        let is_img = is_img.int();
        let rank = is_img.clone().cumsum(1) - 1;
        let pos = Tensor::<B, 1, Int>::arange(0..s as i64, &text.device())
            .reshape([1, s])
            .expand([b, s]);
        let idx = pos.clone() + is_img * (rank + (s as i64) - pos); // [B, S]
        let all = Tensor::cat(vec![text, image_features], 1); // [B, S + M, D]
        all.gather(1, idx.reshape([b, s, 1]).expand([b, s, d]))
    }

    /// Full forward pass; `opts` chooses which logits to compute and whether to record a trace.
    pub fn forward(
        &self,
        input: ModelInput<B>,
        opts: ForwardOptions<'_, B>,
    ) -> Result<ModelOutput<B>> {
        let ForwardOptions {
            logits_from,
            all_vocab_rows,
            mut trace,
            check_image_tokens,
        } = opts;
        let image_features = self.encode_images(input.pixel_values, trace.as_deref_mut());
        let x = if check_image_tokens {
            self.embed(input.input_ids, image_features.clone())?
        } else {
            self.embed_unchecked(input.input_ids, image_features.clone())
        };
        let h = self.language_model.forward_embeds(
            x,
            input.positions,
            &input.masks,
            None,
            trace.as_deref_mut().map(|t| &mut t.lm_hidden),
        );
        if let Some(t) = trace {
            t.lm_last_hidden = Some(h.clone());
        }
        let [b, s, d] = h.dims();
        let h = if logits_from > 0 {
            h.slice([0..b, logits_from..s, 0..d])
        } else {
            h
        };
        let vocab = if all_vocab_rows {
            self.language_model.embed_tokens.weight.dims()[0]
        } else {
            self.output_vocab
        };
        Ok(ModelOutput {
            logits: self.language_model.logits(h, vocab),
            image_features,
        })
    }

    /// Prefill for decoding: like [`Self::forward`] but fills `cache` and returns the hidden
    /// states after the final norm ([B, S, D]).
    pub fn prefill(
        &self,
        input: ModelInput<B>,
        cache: &mut Vec<LayerCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let image_features = self.encode_images(input.pixel_values, None);
        let x = self.embed(input.input_ids, image_features)?;
        Ok(self
            .language_model
            .forward_embeds(x, input.positions, &input.masks, Some(cache), None))
    }

    /// One decoding step for text tokens (no image slots).
    ///
    /// # Shapes
    /// - ids, positions: [B, 1]; masks [B, 1, Sk] → hidden [B, 1, D]
    pub fn decode_step(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        masks: &AttentionMasks<B>,
        cache: &mut Vec<LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let x = self.language_model.embed(ids);
        self.language_model
            .forward_embeds(x, positions, masks, Some(cache), None)
    }

    /// Logits over the predictable vocabulary.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.language_model.logits(h, self.output_vocab)
    }
}

/// A bool tensor from host values. Goes through an int tensor: GPU backends store bools as
/// u32/u8 and refuse native-bool data.
pub fn bool_tensor<B: Backend, const D: usize>(
    values: Vec<bool>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Bool> {
    let ints: Vec<i64> = values.into_iter().map(i64::from).collect();
    Tensor::<B, D, Int>::from_data(burn::tensor::TensorData::new(ints, shape), device).equal_elem(1)
}

/// Host values of a bool tensor, whatever the backend's bool storage.
pub fn bool_values<B: Backend, const D: usize>(t: Tensor<B, D, Bool>) -> Vec<bool> {
    t.int().into_data().iter::<i64>().map(|x| x != 0).collect()
}
