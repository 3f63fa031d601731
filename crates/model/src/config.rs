//! Model configuration: one `Config` per module, nested in [`PaliGemmaConfig`].
//!
//! Everything the model needs is here, so a model can be rebuilt from this config's own
//! serialisation or from an HF `config.json` ([`crate::hf`]). Nothing is specialised to a
//! particular checkpoint: head layouts, soft-caps, window sizes all come from these fields.
//!
//! Every field has a default (shapes: the released PaliGemma 3B, SigLIP So400m/14 at 224 px and
//! Gemma 2B), so configs are built with named `with_*` calls, never positional numbers;
//! [`crate::presets`] spells out every shape field.

use burn::config::Config;
use serde::{Deserialize, Serialize};

/// SigLIP ViT image encoder (HF `SiglipVisionModel`, big_vision `vit.py` with `pool_type='none'`).
#[derive(Config, Debug, PartialEq)]
pub struct SiglipConfig {
    /// Square input resolution in pixels.
    #[config(default = 224)]
    pub image_size: usize,
    /// Patch size (conv kernel = stride).
    #[config(default = 14)]
    pub patch_size: usize,
    /// Width of the encoder.
    #[config(default = 1152)]
    pub hidden_size: usize,
    /// MLP hidden width.
    #[config(default = 4304)]
    pub intermediate_size: usize,
    /// Number of encoder blocks.
    #[config(default = 27)]
    pub num_layers: usize,
    /// Attention heads (head_dim = hidden_size / num_heads).
    #[config(default = 16)]
    pub num_heads: usize,
    /// LayerNorm epsilon (Flax and HF SigLIP use 1e-6).
    #[config(default = 1e-6)]
    pub layer_norm_eps: f64,
    /// How a fresh encoder's (always learned) position embedding starts. An init choice only:
    /// checkpoints carry the table itself, so it is not part of the HF config.
    #[config(default = "PosembInit::Normal")]
    pub posemb_init: PosembInit,
}

/// Initial values of the learned position embedding.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PosembInit {
    /// Normal with std 1/sqrt(D): big_vision's `posemb = "learn"` (SigLIP, PaliGemma).
    Normal,
    /// big_vision's `posemb_sincos_2d` table (x then y, sin and cos, temperature 10⁴), still
    /// learned: every patch starts with its row and column legible.
    Sincos2d,
}

impl SiglipConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Image tokens per image: (image_size / patch_size)².
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// Which attention a decoder layer uses.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    FullAttention,
    SlidingAttention,
}

/// Gemma (1 or 2) decoder.
#[derive(Config, Debug, PartialEq)]
pub struct GemmaConfig {
    /// Rows of the (tied) embedding matrix.
    #[config(default = 257_216)]
    pub vocab_size: usize,
    /// Width D.
    #[config(default = 2048)]
    pub hidden_size: usize,
    /// GeGLU hidden width.
    #[config(default = 16384)]
    pub intermediate_size: usize,
    /// Decoder layers.
    #[config(default = 18)]
    pub num_layers: usize,
    /// Query heads H.
    #[config(default = 8)]
    pub num_heads: usize,
    /// Key/value heads (1 = MQA, < H = GQA, H = MHA).
    #[config(default = 1)]
    pub num_kv_heads: usize,
    /// Head dim Dh (may differ from D / H).
    #[config(default = 256)]
    pub head_dim: usize,
    /// RMSNorm epsilon.
    #[config(default = 1e-6)]
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Attention scale is `query_pre_attn_scalar^-0.5` when set (Gemma 2), else `head_dim^-0.5`.
    #[config(default = "None")]
    pub query_pre_attn_scalar: Option<f64>,
    /// `cap·tanh(s/cap)` on attention scores (Gemma 2: 50).
    #[config(default = "None")]
    pub attn_logit_softcapping: Option<f64>,
    /// `cap·tanh(l/cap)` on the final logits (Gemma 2: 30).
    #[config(default = "None")]
    pub final_logit_softcapping: Option<f64>,
    /// Sliding window length for `sliding_attention` layers.
    #[config(default = "None")]
    pub sliding_window: Option<usize>,
    /// Per-layer attention type; empty means all layers use full attention.
    #[config(default = "Vec::new()")]
    pub layer_types: Vec<LayerType>,
    /// Gemma 2 style extra norms (post-attention and pre/post feed-forward).
    #[config(default = false)]
    pub post_norms: bool,
    /// Residual dropout on attention and MLP outputs (the paper's "LLM dropout").
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl GemmaConfig {
    pub fn layer_type(&self, layer: usize) -> LayerType {
        self.layer_types
            .get(layer)
            .copied()
            .unwrap_or(LayerType::FullAttention)
    }
    /// Softmax scale of the attention scores.
    pub fn attn_scale(&self) -> f64 {
        self.query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .powf(-0.5)
    }
}

/// The connector between the image encoder and the decoder.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProjectorKind {
    /// One Linear (PaliGemma's choice; zero-initialised for new models).
    #[default]
    Linear,
    /// Linear → GELU(tanh) → Linear (the paper's connector ablation, §5.5).
    Mlp,
}

/// The image encoder.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageEncoder {
    Siglip(SiglipConfig),
    /// No encoder: the projector sees raw flattened patches (Fuyu-style ablation, §5.6).
    RawPatches {
        image_size: usize,
        patch_size: usize,
    },
}

impl ImageEncoder {
    pub fn image_size(&self) -> usize {
        match self {
            ImageEncoder::Siglip(c) => c.image_size,
            ImageEncoder::RawPatches { image_size, .. } => *image_size,
        }
    }
    pub fn patch_size(&self) -> usize {
        match self {
            ImageEncoder::Siglip(c) => c.patch_size,
            ImageEncoder::RawPatches { patch_size, .. } => *patch_size,
        }
    }
    /// Tokens per image.
    pub fn num_patches(&self) -> usize {
        let g = self.image_size() / self.patch_size();
        g * g
    }
    /// Width of the features the projector receives.
    pub fn output_dim(&self) -> usize {
        match self {
            ImageEncoder::Siglip(c) => c.hidden_size,
            ImageEncoder::RawPatches { patch_size, .. } => 3 * patch_size * patch_size,
        }
    }
}

/// Projector configuration.
#[derive(Config, Debug, PartialEq)]
pub struct ProjectorConfig {
    /// Input width (image encoder output).
    pub input_dim: usize,
    /// Output width (decoder width D).
    pub output_dim: usize,
    /// Linear or MLP.
    #[config(default = "ProjectorKind::Linear")]
    pub kind: ProjectorKind,
    /// Zero-initialise the last layer, as big_vision's `head_zeroinit=True`.
    #[config(default = true)]
    pub zero_init: bool,
}

/// The whole model: image encoder → projector → Gemma decoder.
#[derive(Config, Debug, PartialEq)]
pub struct PaliGemmaConfig {
    /// Image encoder.
    #[config(default = "ImageEncoder::Siglip(SiglipConfig::new())")]
    pub vision: ImageEncoder,
    /// Connector kind (its widths follow from `vision` and `text`).
    #[config(default = "ProjectorKind::Linear")]
    pub projector: ProjectorKind,
    /// Decoder.
    #[config(default = "GemmaConfig::new()")]
    pub text: GemmaConfig,
    /// Id of the `<image>` placeholder token.
    #[config(default = 257_152)]
    pub image_token_id: usize,
    /// How many leading vocabulary rows the LM head may predict. Real checkpoints pad the
    /// embedding to 257216 rows for 257152 tokens (plus `<image>`); rows at or beyond this
    /// limit never enter a softmax or an argmax. `None` = all rows.
    #[config(default = "None")]
    pub output_vocab_size: Option<usize>,
    /// RoPE position of the first token: 0 as big_vision, 1 as HF transformers.
    #[config(default = 0)]
    pub position_offset: usize,
}

impl PaliGemmaConfig {
    pub fn projector_config(&self) -> ProjectorConfig {
        ProjectorConfig::new(self.vision.output_dim(), self.text.hidden_size)
            .with_kind(self.projector)
    }
    /// Vocabulary rows that may be predicted.
    pub fn predictable_vocab(&self) -> usize {
        self.output_vocab_size
            .unwrap_or(self.text.vocab_size)
            .min(self.text.vocab_size)
    }
    /// Image tokens per image.
    pub fn num_image_tokens(&self) -> usize {
        self.vision.num_patches()
    }
}
