//! Gemma 1 and Gemma 2 decoders, as HF `modeling_gemma.py` / `modeling_gemma2.py` (5.24) and
//! big_vision `models/ppp/gemma.py`.
//!
//! - RMSNorm is `x·rsqrt(mean(x²)+eps)·(1+w)`, not Burn's `x·w` (burn-notes pitfall 5).
//! - RoPE is rotate-half (first and second halves of the head), not Burn's interleaved pairs.
//! - Gemma 2 adds `query_pre_attn_scalar`, attention/final soft-caps, post-norms and
//!   sliding-window layers; all are config fields, so Gemma 1 is the same code with them off.
//!
//! Field names mirror the HF checkpoint (`layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, …).

use crate::activation::gelu_tanh;
use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig,
};
use burn::tensor::backend::Backend;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::config::{GemmaConfig, LayerType};
use crate::precision::Compute;

/// Gemma's RMSNorm with a zero-initialised scale used as `(1 + w)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(d: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::zeros([d], device)),
            eps,
        }
    }
    /// # Shapes
    /// - x: [..., D] → [..., D]
    pub fn forward<const N: usize>(&self, x: Tensor<B, N>) -> Tensor<B, N> {
        let rms = x
            .clone()
            .powi_scalar(2)
            .mean_dim(N - 1)
            .add_scalar(self.eps)
            .sqrt();
        let scale = self.weight.val().add_scalar(1.0).unsqueeze::<N>();
        (x / rms) * scale
    }
}

/// Rotary tables for one forward pass: `cos` and `sin` of `position · inv_freq`, duplicated
/// over the two halves of the head (`cat(freqs, freqs)` as HF), one pair for the query heads
/// and one for the key heads.
#[derive(Clone, Debug)]
pub struct Rope<B: Backend> {
    pub q: RopeTables<B>,
    pub k: RopeTables<B>,
}

/// `cos` and `sin` materialised at the shape of the heads they rotate, [B, S, H, Dh], with the
/// sign of `rotate_half` folded into `sin` (its first half negated): every product is then
/// between two contiguous tensors of one shape, which CPU backends run as a SIMD loop instead
/// of a strided broadcast. The values are the same products as HF's
/// `q·cos + rotate_half(q)·sin`, bit for bit.
#[derive(Clone, Debug)]
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub signed_sin: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    /// # Shapes
    /// - positions: [B, S] → tables [B, S, heads, Dh] and [B, S, kv_heads, Dh]
    pub fn new(
        positions: Tensor<B, 2, Int>,
        head_dim: usize,
        theta: f64,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let device = positions.device();
        let [b, s] = positions.dims();
        let half = head_dim / 2;
        // inv_freq = 1 / θ^(2i/Dh), rounded to f32 as HF computes it.
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let inv =
            Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), &device).reshape([1, 1, half]);
        let freqs = positions.float().reshape([b, s, 1]) * inv; // [B, S, Dh/2]
        let (cos, sin) = (freqs.clone().cos(), freqs.sin());
        let cos = Tensor::cat(vec![cos.clone(), cos], 2).unsqueeze_dim::<4>(2); // [B, S, 1, Dh]
        let sin = Tensor::cat(vec![sin.clone().neg(), sin], 2).unsqueeze_dim::<4>(2);
        let tables = |h: usize| RopeTables {
            cos: cos.clone().repeat_dim(2, h),
            signed_sin: sin.clone().repeat_dim(2, h),
        };
        let q = tables(heads);
        let k = if kv_heads == heads {
            q.clone()
        } else {
            tables(kv_heads)
        };
        Self { q, k }
    }
}

impl<B: Backend> RopeTables<B> {
    /// `x·cos + rotate_half(x)·sin`, where `rotate_half(x) = cat(−x2, x1)`.
    ///
    /// # Shapes
    /// - x: [B, S, H, Dh] → [B, S, H, Dh]
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
        let swapped = Tensor::cat(vec![x2, x1], 3);
        x * self.cos.clone() + swapped * self.signed_sin.clone()
    }
}

/// Attention masks for one forward pass, as data: `true` = query may attend key.
#[derive(Clone, Debug)]
pub struct AttentionMasks<B: Backend> {
    /// Used by full-attention layers: [B, Sq, Sk].
    pub full: Tensor<B, 3, Bool>,
    /// Used by sliding-window layers: [B, Sq, Sk]; `None` when no layer slides.
    pub sliding: Option<Tensor<B, 3, Bool>>,
}

/// [`AttentionMasks`] as each layer takes them: negated (`true` = blocked) and repeated over the
/// query heads, [B, H, Sq, Sk], once per forward pass instead of once per layer. A mask that is
/// only broadcast over the heads is copied to contiguous memory by CPU backends at every
/// masking, forward and backward.
#[derive(Clone, Debug)]
pub struct BlockedMasks<B: Backend> {
    pub full: Tensor<B, 4, Bool>,
    pub sliding: Option<Tensor<B, 4, Bool>>,
}

impl<B: Backend> BlockedMasks<B> {
    pub fn new(masks: &AttentionMasks<B>, heads: usize) -> Self {
        let blocked = |m: &Tensor<B, 3, Bool>| {
            m.clone()
                .bool_not()
                .unsqueeze_dim::<4>(1)
                .repeat_dim(1, heads)
        };
        Self {
            full: blocked(&masks.full),
            sliding: masks.sliding.as_ref().map(blocked),
        }
    }
}

/// Cached keys and values of one layer: [B, Hkv, S, Dh] each.
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

#[derive(Module, Debug)]
pub struct GemmaAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
    pub compute: Compute,
}

impl<B: Backend> GemmaAttention<B> {
    /// # Shapes
    /// - x: [B, Sq, D]; allowed: [B, Sq, Sk] with Sk = cached + Sq → [B, Sq, D]
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        blocked: Tensor<B, 4, Bool>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, hkv, dh) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let c = self.compute;
        // RoPE on the projections' own layout, [B, Sq, H, Dh], then heads first.
        let q = rope
            .q
            .apply(c.linear(&self.q_proj, x.clone()).reshape([b, s, h, dh]))
            .swap_dims(1, 2); // [B, H, Sq, Dh]
        let mut k = rope
            .k
            .apply(c.linear(&self.k_proj, x.clone()).reshape([b, s, hkv, dh]))
            .swap_dims(1, 2); // [B, Hkv, Sq, Dh]
        let mut v = c
            .linear(&self.v_proj, x)
            .reshape([b, s, hkv, dh])
            .swap_dims(1, 2); // [B, Hkv, Sq, Dh]
        if let Some(cache) = cache {
            if let Some((k0, v0)) = cache.take() {
                k = Tensor::cat(vec![k0, k], 2);
                v = Tensor::cat(vec![v0, v], 2);
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let sk = k.dims()[2];
        let [mb, mh, mq, mk] = blocked.dims();
        assert!(
            mb == b && mh == h && mq == s && mk == sk,
            "attention mask has shape {:?} but q is [{b}, {h}, {s}, {dh}] and k is [{b}, {hkv}, {sk}, {dh}]",
            blocked.dims()
        );
        let opts = AttentionModuleOptions {
            scale: Some(self.scale),
            softcap: self.softcap,
            is_causal: false,
        };
        // GQA/MQA: kv head j serves query heads j·rep … (j+1)·rep−1 (HF `repeat_kv`).
        let o = c.attention(q, k, v, Some(blocked), opts); // [B, H, Sq, Dh]
        c.linear(&self.o_proj, o.swap_dims(1, 2).reshape([b, s, h * dh]))
    }
}

#[derive(Module, Debug)]
pub struct GemmaMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    pub compute: Compute,
}

impl<B: Backend> GemmaMlp<B> {
    /// GeGLU: `down(gelu_tanh(gate(x)) · up(x))`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let c = self.compute;
        let g = gelu_tanh(c.linear(&self.gate_proj, x.clone()));
        c.linear(&self.down_proj, g * c.linear(&self.up_proj, x))
    }
}

#[derive(Module, Debug)]
pub struct GemmaLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: GemmaAttention<B>,
    /// Gemma 1: the pre-MLP norm. Gemma 2: the norm after attention.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Gemma 2 only.
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Gemma 2 only.
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    pub mlp: GemmaMlp<B>,
    pub dropout: Dropout,
    pub sliding: bool,
}

impl<B: Backend> GemmaLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        masks: &BlockedMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let blocked = match (&masks.sliding, self.sliding) {
            (Some(m), true) => m.clone(),
            _ => masks.full.clone(),
        };
        let a = self.self_attn.forward(
            self.input_layernorm.forward(x.clone()),
            rope,
            blocked,
            cache,
        );
        match (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            (Some(pre), Some(post)) => {
                let h = x + self
                    .dropout
                    .forward(self.post_attention_layernorm.forward(a));
                let m = self.mlp.forward(pre.forward(h.clone()));
                h + self.dropout.forward(post.forward(m))
            }
            _ => {
                let h = x + self.dropout.forward(a);
                let m = self
                    .mlp
                    .forward(self.post_attention_layernorm.forward(h.clone()));
                h + self.dropout.forward(m)
            }
        }
    }
}

#[derive(Module, Debug)]
pub struct Gemma<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<GemmaLayer<B>>,
    pub norm: RmsNorm<B>,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub final_logit_softcapping: Option<f64>,
    /// Dtype of the LM-head matmul.
    pub compute: Compute,
}

impl GemmaConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Gemma<B> {
        let d = self.hidden_size;
        let norm = || RmsNorm::new(d, self.rms_norm_eps, device);
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let (h, hkv, dh) = (self.num_heads, self.num_kv_heads, self.head_dim);
        assert!(
            h % hkv == 0,
            "num_heads {h} is not a multiple of num_kv_heads {hkv}"
        );
        let layers = (0..self.num_layers)
            .map(|i| GemmaLayer {
                input_layernorm: norm(),
                self_attn: GemmaAttention {
                    q_proj: lin(d, h * dh),
                    k_proj: lin(d, hkv * dh),
                    v_proj: lin(d, hkv * dh),
                    o_proj: lin(h * dh, d),
                    num_heads: h,
                    num_kv_heads: hkv,
                    head_dim: dh,
                    scale: self.attn_scale(),
                    softcap: self.attn_logit_softcapping,
                    compute: Compute::F32,
                },
                post_attention_layernorm: norm(),
                pre_feedforward_layernorm: self.post_norms.then(norm),
                post_feedforward_layernorm: self.post_norms.then(norm),
                mlp: GemmaMlp {
                    gate_proj: lin(d, self.intermediate_size),
                    up_proj: lin(d, self.intermediate_size),
                    down_proj: lin(self.intermediate_size, d),
                    compute: Compute::F32,
                },
                dropout: DropoutConfig::new(self.dropout).init(),
                sliding: self.layer_type(i) == LayerType::SlidingAttention
                    && self.sliding_window.is_some(),
            })
            .collect();
        // big_vision embedder init: variance_scaling(1, fan_in, normal) → std 1/sqrt(D).
        let embed_tokens = EmbeddingConfig::new(self.vocab_size, d)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: (d as f64).powf(-0.5),
            })
            .init(device);
        Gemma {
            embed_tokens,
            layers,
            norm: norm(),
            head_dim: dh,
            rope_theta: self.rope_theta,
            final_logit_softcapping: self.final_logit_softcapping,
            compute: Compute::F32,
        }
    }
}

impl<B: Backend> Gemma<B> {
    pub fn hidden_size(&self) -> usize {
        self.embed_tokens.weight.dims()[1]
    }

    /// Scaled token embeddings: `E[ids] · f32(sqrt(D))` (HF rounds the scale to the weight dtype).
    ///
    /// # Shapes
    /// - ids: [B, T] → [B, T, D]
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let scale = (self.hidden_size() as f64).sqrt() as f32;
        self.embed_tokens.forward(ids).mul_scalar(scale)
    }

    /// Runs the decoder layers on already-merged embeddings. When `hidden` is given, records the
    /// input and each layer's output (the last one before the final norm).
    ///
    /// # Shapes
    /// - x: [B, S, D], positions: [B, S] → [B, S, D] after the final norm
    pub fn forward_embeds(
        &self,
        x: Tensor<B, 3>,
        positions: Tensor<B, 2, Int>,
        masks: &AttentionMasks<B>,
        mut cache: Option<&mut Vec<LayerCache<B>>>,
        mut hidden: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        let heads = self.layers.first().map_or((1, 1), |l| {
            (l.self_attn.num_heads, l.self_attn.num_kv_heads)
        });
        let rope = Rope::new(positions, self.head_dim, self.rope_theta, heads.0, heads.1);
        let masks = BlockedMasks::new(masks, heads.0);
        let mut x = x;
        if let Some(c) = cache.as_deref_mut() {
            c.resize_with(self.layers.len(), || None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(h) = hidden.as_deref_mut() {
                h.push(x.clone());
            }
            let c = cache.as_deref_mut().map(|c| &mut c[i]);
            x = layer.forward(x, &rope, &masks, c);
        }
        if let Some(h) = &mut hidden {
            h.push(x.clone());
        }
        self.norm.forward(x)
    }

    /// Tied LM head over the first `vocab` rows, with the final soft-cap.
    ///
    /// # Shapes
    /// - h: [B, S, D] → [B, S, vocab]
    pub fn logits(&self, h: Tensor<B, 3>, vocab: usize) -> Tensor<B, 3> {
        let [b, s, d] = h.dims();
        let w = self.embed_tokens.weight.val(); // [V, D]
        let w = if vocab < w.dims()[0] {
            w.slice([0..vocab, 0..d])
        } else {
            w
        };
        let logits = self
            .compute
            .matmul(h.reshape([b * s, d]), w.transpose())
            .reshape([b, s, vocab]);
        match self.final_logit_softcapping {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }
}
