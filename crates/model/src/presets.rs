//! Named model presets. Each cites its source; resolutions are derived from the 224 preset.
//!
//! - SigLIP So400m/14: big_vision `vit.decode_variant` (width 1152, depth 27, mlp 4304, heads 16).
//! - Gemma 2B (PaliGemma 1): big_vision `gemma.get_config("gemma_2b")`; HF
//!   `google/paligemma-3b-pt-224` config (vocab 257216 = 257152 + `<image>`, padded to ×64).
//! - Gemma 2 2B/9B/27B (PaliGemma 2 3B/10B/28B): HF `convert_paligemma2_weights_to_hf.py`.

use crate::config::{GemmaConfig, ImageEncoder, LayerType, PaliGemmaConfig, SiglipConfig};
use crate::error::{Error, Result};

/// Preset names accepted by [`preset`].
pub const PRESETS: &[&str] = &[
    "paligemma-3b-224",
    "paligemma-3b-448",
    "paligemma-3b-896",
    "paligemma2-3b-224",
    "paligemma2-3b-448",
    "paligemma2-3b-896",
    "paligemma2-10b-224",
    "paligemma2-10b-448",
    "paligemma2-10b-896",
    "paligemma2-28b-224",
    "paligemma2-28b-448",
    "paligemma2-28b-896",
    "tiny-gemma1",
    "tiny-gemma2",
    "tiny",
];

/// SigLIP So400m/14 at `res` px: (res/14)² tokens (224 → 256, 448 → 1024, 896 → 4096).
pub fn so400m(res: usize) -> SiglipConfig {
    SiglipConfig::new()
        .with_image_size(res)
        .with_patch_size(14)
        .with_hidden_size(1152)
        .with_intermediate_size(4304)
        .with_num_layers(27)
        .with_num_heads(16)
}

/// Real checkpoints: 257152 tokens (256000 + 1024 loc + 128 seg), `<image>` = 257152, rows padded
/// to 257216.
const VOCAB_ROWS: usize = 257_216;
const IMAGE_TOKEN: usize = 257_152;

pub fn gemma_2b() -> GemmaConfig {
    GemmaConfig::new()
        .with_vocab_size(VOCAB_ROWS)
        .with_hidden_size(2048)
        .with_intermediate_size(16384)
        .with_num_layers(18)
        .with_num_heads(8)
        .with_num_kv_heads(1)
        .with_head_dim(256)
}

/// The real vocabulary and Gemma 2's soft-caps, 4096-token window on alternating layers and
/// extra norms, on the decoder shape `c`.
fn gemma2(c: GemmaConfig) -> GemmaConfig {
    let layers = c.num_layers;
    c.with_vocab_size(VOCAB_ROWS)
        .with_attn_logit_softcapping(Some(50.0))
        .with_final_logit_softcapping(Some(30.0))
        .with_sliding_window(Some(4096))
        .with_layer_types(alternating(layers))
        .with_post_norms(true)
}

/// Gemma 2 default: even layers slide, odd layers are global.
pub fn alternating(layers: usize) -> Vec<LayerType> {
    (0..layers)
        .map(|i| {
            if i % 2 == 0 {
                LayerType::SlidingAttention
            } else {
                LayerType::FullAttention
            }
        })
        .collect()
}

fn pali(vision: SiglipConfig, text: GemmaConfig) -> PaliGemmaConfig {
    PaliGemmaConfig::new()
        .with_vision(ImageEncoder::Siglip(vision))
        .with_text(text)
        .with_image_token_id(IMAGE_TOKEN)
        .with_output_vocab_size(Some(IMAGE_TOKEN))
}

/// A tiny model for tests and the CPU quickstart. `vocab` is the tokenizer's size.
pub fn tiny(vocab: usize, image_token_id: usize, image_size: usize) -> PaliGemmaConfig {
    let vision = SiglipConfig::new()
        .with_image_size(image_size)
        .with_patch_size(8)
        .with_hidden_size(48)
        .with_intermediate_size(96)
        .with_num_layers(2)
        .with_num_heads(4);
    let text = GemmaConfig::new()
        .with_vocab_size(vocab)
        .with_hidden_size(64)
        .with_intermediate_size(128)
        .with_num_layers(2)
        .with_num_heads(4)
        .with_num_kv_heads(1)
        .with_head_dim(16);
    PaliGemmaConfig::new()
        .with_vision(ImageEncoder::Siglip(vision))
        .with_text(text)
        .with_image_token_id(image_token_id)
        .with_output_vocab_size(crate::hf::default_output_vocab(image_token_id, vocab))
}

/// Resolves a preset name.
pub fn preset(name: &str) -> Result<PaliGemmaConfig> {
    let res = |s: &str| s.rsplit('-').next().and_then(|r| r.parse::<usize>().ok());
    let c = match name {
        // The shapes of the HF fixtures (tests/fixtures): vocab 1560, `<image>` = 400.
        "tiny-gemma1" => PaliGemmaConfig::new()
            .with_vision(ImageEncoder::Siglip(
                SiglipConfig::new()
                    .with_image_size(56)
                    .with_patch_size(14)
                    .with_hidden_size(32)
                    .with_intermediate_size(64)
                    .with_num_layers(2)
                    .with_num_heads(4),
            ))
            .with_text(
                GemmaConfig::new()
                    .with_vocab_size(1560)
                    .with_hidden_size(48)
                    .with_intermediate_size(96)
                    .with_num_layers(2)
                    .with_num_heads(4)
                    .with_num_kv_heads(1)
                    .with_head_dim(16),
            )
            .with_image_token_id(400),
        "tiny-gemma2" => PaliGemmaConfig::new()
            .with_vision(ImageEncoder::Siglip(
                SiglipConfig::new()
                    .with_image_size(32)
                    .with_patch_size(8)
                    .with_hidden_size(48)
                    .with_intermediate_size(96)
                    .with_num_layers(3)
                    .with_num_heads(4),
            ))
            .with_text(
                GemmaConfig::new()
                    .with_vocab_size(1560)
                    .with_hidden_size(64)
                    .with_intermediate_size(128)
                    .with_num_layers(3)
                    .with_num_heads(4)
                    .with_num_kv_heads(2)
                    .with_head_dim(24)
                    .with_query_pre_attn_scalar(Some(20.0))
                    .with_attn_logit_softcapping(Some(2.0))
                    .with_final_logit_softcapping(Some(8.0))
                    .with_sliding_window(Some(8))
                    .with_layer_types(alternating(3))
                    .with_post_norms(true),
            )
            .with_image_token_id(400),
        "tiny" => tiny(1560, 400, 32),
        n if n.starts_with("paligemma-3b-") => pali(so400m(res(n).unwrap_or(0)), gemma_2b()),
        n if n.starts_with("paligemma2-3b-") => pali(
            so400m(res(n).unwrap_or(0)),
            gemma2(
                GemmaConfig::new()
                    .with_hidden_size(2304)
                    .with_intermediate_size(9216)
                    .with_num_layers(26)
                    .with_num_heads(8)
                    .with_num_kv_heads(4)
                    .with_head_dim(256)
                    .with_query_pre_attn_scalar(Some(256.0)),
            ),
        ),
        n if n.starts_with("paligemma2-10b-") => pali(
            so400m(res(n).unwrap_or(0)),
            gemma2(
                GemmaConfig::new()
                    .with_hidden_size(3584)
                    .with_intermediate_size(14336)
                    .with_num_layers(42)
                    .with_num_heads(16)
                    .with_num_kv_heads(8)
                    .with_head_dim(256)
                    .with_query_pre_attn_scalar(Some(256.0)),
            ),
        ),
        // 27B: query_pre_attn_scalar = 4608 / 32 = 144 (big_vision "rsqrt_emb_per_head").
        n if n.starts_with("paligemma2-28b-") => pali(
            so400m(res(n).unwrap_or(0)),
            gemma2(
                GemmaConfig::new()
                    .with_hidden_size(4608)
                    .with_intermediate_size(36864)
                    .with_num_layers(46)
                    .with_num_heads(32)
                    .with_num_kv_heads(16)
                    .with_head_dim(128)
                    .with_query_pre_attn_scalar(Some(144.0)),
            ),
        ),
        _ => return Err(unknown(name)),
    };
    if !PRESETS.contains(&name) {
        return Err(unknown(name));
    }
    Ok(c)
}

fn unknown(name: &str) -> Error {
    Error::UnknownPreset(name.to_string(), PRESETS.join(", "))
}

/// Parameter count from the config alone (no allocation), split by tower.
pub fn count_params(c: &PaliGemmaConfig) -> ParamCount {
    let vision = match &c.vision {
        ImageEncoder::Siglip(v) => {
            let d = v.hidden_size;
            let block = 2 * 2 * d
                + 4 * (d * d + d)
                + (d * v.intermediate_size + v.intermediate_size)
                + (v.intermediate_size * d + d);
            (3 * v.patch_size * v.patch_size * d + d)
                + v.num_patches() * d
                + v.num_layers * block
                + 2 * d
        }
        ImageEncoder::RawPatches { .. } => 0,
    };
    let pc = c.projector_config();
    let projector = pc.input_dim * pc.output_dim
        + pc.output_dim
        + match pc.kind {
            crate::config::ProjectorKind::Linear => 0,
            crate::config::ProjectorKind::Mlp => pc.input_dim * pc.input_dim + pc.input_dim,
        };
    let t = &c.text;
    let d = t.hidden_size;
    let attn = d * t.num_heads * t.head_dim * 2 + d * t.num_kv_heads * t.head_dim * 2;
    let norms = if t.post_norms { 4 } else { 2 } * d;
    let block = attn + 3 * d * t.intermediate_size + norms;
    let language = t.vocab_size * d + t.num_layers * block + d;
    ParamCount {
        vision,
        projector,
        language,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ParamCount {
    pub vision: usize,
    pub projector: usize,
    pub language: usize,
}

impl ParamCount {
    pub fn total(&self) -> usize {
        self.vision + self.projector + self.language
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paligemma_3b_has_2_92b_params() {
        let n = count_params(&preset("paligemma-3b-224").unwrap()).total();
        // HF google/paligemma-3b-pt-224: 2,923,466,480 parameters.
        assert_eq!(n, 2_923_466_480);
    }

    #[test]
    fn resolutions_change_only_the_position_embedding() {
        let a = count_params(&preset("paligemma-3b-224").unwrap()).total();
        let b = count_params(&preset("paligemma-3b-448").unwrap()).total();
        assert_eq!(b - a, (1024 - 256) * 1152);
        assert_eq!(preset("paligemma-3b-896").unwrap().num_image_tokens(), 4096);
    }

    #[test]
    fn unknown_preset_lists_known_ones() {
        let e = preset("paligemma-3b-300").unwrap_err().to_string();
        assert!(
            e.contains("paligemma-3b-300") && e.contains("paligemma2-28b-896"),
            "{e}"
        );
    }
}
