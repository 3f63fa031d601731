//! SigLIP ViT image encoder, as HF `modeling_siglip.py` (5.24, lines 124-185, 237-356, 566-611)
//! and big_vision `models/vit.py`: conv patch embedding, learned position embedding (no CLS),
//! pre-LN blocks (MHA with biases, GELU-tanh MLP), final LayerNorm. PaliGemma uses every patch
//! token (no head); the stage-0 two-tower model adds SigLIP's attention-pooling head
//! ([`MapHead`], HF `SiglipMultiheadAttentionPoolingHead`).
//!
//! Field names mirror the HF checkpoint keys (`embeddings.patch_embedding`, `encoder.layers.{i}
//! .self_attn.q_proj`, …) so that checkpoint IO needs no remap table.

use crate::activation::gelu_tanh;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Tensor;

use crate::config::{PosembInit, SiglipConfig};
use crate::precision::Compute;

#[derive(Module, Debug)]
pub struct SiglipEmbeddings<B: Backend> {
    pub patch_embedding: Conv2d<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct SiglipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
    pub compute: Compute,
}

#[derive(Module, Debug)]
pub struct SiglipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub compute: Compute,
}

#[derive(Module, Debug)]
pub struct SiglipLayer<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    pub self_attn: SiglipAttention<B>,
    pub layer_norm2: LayerNorm<B>,
    pub mlp: SiglipMlp<B>,
}

#[derive(Module, Debug)]
pub struct SiglipEncoder<B: Backend> {
    pub layers: Vec<SiglipLayer<B>>,
}

#[derive(Module, Debug)]
pub struct SiglipVision<B: Backend> {
    pub embeddings: SiglipEmbeddings<B>,
    pub encoder: SiglipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
    /// The attention-pooling head of a contrastive (stage-0) tower; `None` inside PaliGemma.
    pub head: Option<MapHead<B>>,
}

/// `torch.nn.MultiheadAttention` as HF's pooling head holds it: one packed `[3D, D]` input
/// projection (PyTorch layout, rows q | k | v) and an output projection.
#[derive(Module, Debug)]
pub struct PoolAttention<B: Backend> {
    pub in_proj_weight: Param<Tensor<B, 2>>,
    pub in_proj_bias: Param<Tensor<B, 1>>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
}

/// Multihead attention pooling (big_vision `MAPHead`): one learned probe attends to every
/// patch, then LayerNorm and a residual MLP.
#[derive(Module, Debug)]
pub struct MapHead<B: Backend> {
    /// [1, 1, D]
    pub probe: Param<Tensor<B, 3>>,
    pub attention: PoolAttention<B>,
    pub layernorm: LayerNorm<B>,
    pub mlp: SiglipMlp<B>,
}

impl SiglipConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> SiglipVision<B> {
        let d = self.hidden_size;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let layers = (0..self.num_layers)
            .map(|_| SiglipLayer {
                layer_norm1: ln(),
                self_attn: SiglipAttention {
                    q_proj: lin(d, d),
                    k_proj: lin(d, d),
                    v_proj: lin(d, d),
                    out_proj: lin(d, d),
                    num_heads: self.num_heads,
                    compute: Compute::F32,
                },
                layer_norm2: ln(),
                mlp: SiglipMlp {
                    fc1: lin(d, self.intermediate_size),
                    fc2: lin(self.intermediate_size, d),
                    compute: Compute::F32,
                },
            })
            .collect();
        let (n, g) = (self.num_patches(), self.grid());
        let pos = match self.posemb_init {
            // Normal with std 1/sqrt(D), as big_vision's `pos_embedding` init.
            PosembInit::Normal => EmbeddingConfig::new(n, d)
                .with_initializer(burn::nn::Initializer::Normal {
                    mean: 0.0,
                    std: (d as f64).powf(-0.5),
                })
                .init(device),
            PosembInit::Sincos2d => Embedding {
                weight: Param::from_tensor(
                    Tensor::<B, 1>::from_floats(posemb_sincos_2d(g, g, d).as_slice(), device)
                        .reshape([n, d]),
                ),
            },
        };
        SiglipVision {
            head: None,
            embeddings: SiglipEmbeddings {
                patch_embedding: Conv2dConfig::new([3, d], [self.patch_size; 2])
                    .with_stride([self.patch_size; 2])
                    .init(device),
                position_embedding: pos,
            },
            encoder: SiglipEncoder { layers },
            post_layernorm: ln(),
        }
    }
}

/// big_vision `posemb_sincos_2d(h, w, width)`, row-major patches: for patch (y, x) the row
/// is `[sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)]` with ω_i = 10000^(-i / (width/4 - 1)).
/// `width` must be a multiple of 4 (configs are checked before this; big_vision asserts it).
pub fn posemb_sincos_2d(h: usize, w: usize, width: usize) -> Vec<f32> {
    assert!(
        width.is_multiple_of(4),
        "posemb_sincos_2d: width {width} is not a multiple of 4"
    );
    let q = width / 4;
    let omega: Vec<f64> = (0..q)
        .map(|i| 10000f64.powf(-(i as f64) / (q.max(2) - 1) as f64))
        .collect();
    let mut out = vec![0f32; h * w * width];
    for (n, row) in out.chunks_mut(width).enumerate() {
        let (y, x) = ((n / w) as f64, (n % w) as f64);
        for (i, om) in omega.iter().enumerate() {
            row[i] = (x * om).sin() as f32;
            row[q + i] = (x * om).cos() as f32;
            row[2 * q + i] = (y * om).sin() as f32;
            row[3 * q + i] = (y * om).cos() as f32;
        }
    }
    out
}

impl SiglipConfig {
    /// The encoder with an attention-pooling head (a contrastive tower).
    pub fn init_with_head<B: Backend>(&self, device: &B::Device) -> SiglipVision<B> {
        let d = self.hidden_size;
        // HF's init: Xavier-uniform probe and packed projection (PyTorch's fans of a [1, 1, D]
        // tensor are D and D), zero projection bias.
        let xavier = burn::nn::Initializer::XavierUniform { gain: 1.0 };
        let mut v = self.init(device);
        v.head = Some(MapHead {
            probe: xavier.init_with([1, 1, d], Some(d), Some(d), device),
            attention: PoolAttention {
                in_proj_weight: xavier.init_with([3 * d, d], Some(d), Some(3 * d), device),
                in_proj_bias: Param::from_tensor(Tensor::zeros([3 * d], device)),
                out_proj: LinearConfig::new(d, d).init(device),
                num_heads: self.num_heads,
            },
            layernorm: LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device),
            mlp: SiglipMlp {
                fc1: LinearConfig::new(d, self.intermediate_size).init(device),
                fc2: LinearConfig::new(self.intermediate_size, d).init(device),
                compute: Compute::F32,
            },
        });
        v
    }
}

impl<B: Backend> MapHead<B> {
    /// # Shapes
    /// - x: [B, N, D] (the encoder output after `post_layernorm`) → [B, D]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, n, d] = x.dims();
        let a = &self.attention;
        let h = a.num_heads;
        let w = a.in_proj_weight.val(); // [3D, D]
        let bias = a.in_proj_bias.val(); // [3D]
        let proj = |t: Tensor<B, 3>, i: usize| {
            let wi = w.clone().slice([i * d..(i + 1) * d, 0..d]).transpose(); // [D, D]
            let bi = bias.clone().slice(i * d..(i + 1) * d).reshape([1, 1, d]);
            t.matmul(wi.unsqueeze()) + bi
        };
        let probe = self.probe.val().expand([b, 1, d]);
        let heads = |t: Tensor<B, 3>, len: usize| t.reshape([b, len, h, d / h]).swap_dims(1, 2);
        let q = heads(proj(probe, 0), 1); // [B, H, 1, Dh]
        let k = heads(proj(x.clone(), 1), n);
        let v = heads(proj(x, 2), n);
        let opts = AttentionModuleOptions {
            scale: Some(((d / h) as f64).powf(-0.5)),
            softcap: None,
            is_causal: false,
        };
        let o = Compute::F32.attention(q, k, v, None, opts); // [B, H, 1, Dh]
        let o = a.out_proj.forward(o.swap_dims(1, 2).reshape([b, 1, d]));
        let c = self.mlp.compute;
        let hid = c.linear(&self.mlp.fc1, self.layernorm.forward(o.clone()));
        let o = o + c.linear(&self.mlp.fc2, gelu_tanh(hid));
        o.reshape([b, d])
    }
}

impl<B: Backend> SiglipAttention<B> {
    /// # Shapes
    /// - x: [B, N, D] → [B, N, D]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let heads = |t: Tensor<B, 3>| t.reshape([b, n, h, d / h]).swap_dims(1, 2); // [B, H, N, Dh]
        let c = self.compute;
        let q = heads(c.linear(&self.q_proj, x.clone()));
        let k = heads(c.linear(&self.k_proj, x.clone()));
        let v = heads(c.linear(&self.v_proj, x));
        let opts = AttentionModuleOptions {
            scale: Some(((d / h) as f64).powf(-0.5)),
            softcap: None,
            is_causal: false,
        };
        let o = c.attention(q, k, v, None, opts); // [B, H, N, Dh]
        c.linear(&self.out_proj, o.swap_dims(1, 2).reshape([b, n, d]))
    }
}

impl<B: Backend> SiglipLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let c = self.mlp.compute;
        let h = c.linear(&self.mlp.fc1, self.layer_norm2.forward(x.clone()));
        x + c.linear(&self.mlp.fc2, gelu_tanh(h))
    }
}

impl<B: Backend> SiglipVision<B> {
    /// Patch + position embeddings.
    ///
    /// # Shapes
    /// - pixels: [B, 3, H, W] in [-1, 1] → [B, N, D], N = (H/p)·(W/p), patches row-major.
    pub fn embed(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = self.embeddings.patch_embedding.forward(pixels); // [B, D, H/p, W/p]
        let [b, d, gh, gw] = x.dims();
        let x = x.reshape([b, d, gh * gw]).swap_dims(1, 2); // [B, N, D]
        let n_pos = self.embeddings.position_embedding.weight.dims()[0];
        assert_eq!(
            n_pos,
            gh * gw,
            "image gives {gh}x{gw} patches but the position embedding has {n_pos} rows: \
             resample it for this resolution"
        );
        let pos = self
            .embeddings
            .position_embedding
            .weight
            .val()
            .unsqueeze::<3>(); // [1, N, D]
        x + pos
    }

    /// Full encoder. When `hidden` is given, records the embedding output and every layer's
    /// output (pre final LayerNorm), as HF `output_hidden_states`.
    ///
    /// # Shapes
    /// - pixels: [B, 3, H, W] → [B, N, D] (after `post_layernorm`)
    pub fn forward(
        &self,
        pixels: Tensor<B, 4>,
        mut hidden: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed(pixels);
        for layer in &self.encoder.layers {
            if let Some(h) = hidden.as_deref_mut() {
                h.push(x.clone());
            }
            x = layer.forward(x);
        }
        if let Some(h) = &mut hidden {
            h.push(x.clone());
        }
        self.post_layernorm.forward(x)
    }

    /// The pooled image embedding of a tower with a head (HF `pooler_output`).
    ///
    /// # Shapes
    /// - pixels: [B, 3, H, W] → [B, D]
    pub fn pooled(&self, pixels: Tensor<B, 4>) -> Tensor<B, 2> {
        let head = self
            .head
            .as_ref()
            .expect("pooled() needs a tower built with init_with_head");
        head.forward(self.forward(pixels, None))
    }
}

/// Cut images into flattened patches, row-major, channel-last inside a patch — the input of the
/// "no image encoder" ablation.
///
/// # Shapes
/// - pixels: [B, 3, H, W] → [B, N, p·p·3]
pub fn patchify<B: Backend>(pixels: Tensor<B, 4>, p: usize) -> Tensor<B, 3> {
    let [b, c, h, w] = pixels.dims();
    let (gh, gw) = (h / p, w / p);
    pixels
        .reshape([b, c, gh, p, gw, p])
        .permute([0, 2, 4, 3, 5, 1]) // [B, gh, gw, p, p, C]
        .reshape([b, gh * gw, p * p * c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend as B;

    #[test]
    fn sincos_table_is_big_vision_s() {
        // h = w = 2, width 8: ω = [1, 1e-4]; row 3 is patch (y 1, x 1), row 1 is (y 0, x 1).
        let t = posemb_sincos_2d(2, 2, 8);
        let (s, c) = (1f32.sin(), 1f32.cos());
        let (s4, c4) = (1e-4f32.sin(), 1e-4f32.cos());
        assert_eq!(&t[8..16], &[s, s4, c, c4, 0.0, 0.0, 1.0, 1.0]);
        assert_eq!(&t[24..32], &[s, s4, c, c4, s, s4, c, c4]);
    }

    #[test]
    fn sincos_init_fills_the_learned_table() {
        let device = Default::default();
        let cfg = SiglipConfig::new()
            .with_image_size(16)
            .with_patch_size(8)
            .with_hidden_size(8)
            .with_intermediate_size(8)
            .with_num_layers(1)
            .with_num_heads(2);
        let pos = |c: &SiglipConfig| -> Vec<f32> {
            let v = c.init::<B>(&device);
            v.embeddings
                .position_embedding
                .weight
                .val()
                .into_data()
                .to_vec()
                .unwrap()
        };
        let sincos = pos(&cfg.clone().with_posemb_init(PosembInit::Sincos2d));
        assert_eq!(sincos, posemb_sincos_2d(2, 2, 8));
        assert_ne!(pos(&cfg), sincos);
    }
}
