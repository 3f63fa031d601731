//! HF `config.json` ⇄ [`PaliGemmaConfig`].
//!
//! Missing fields take the defaults of the HF config classes (transformers 5.24:
//! `SiglipVisionConfig`, `GemmaConfig`, `Gemma2Config`), as `from_pretrained` would — real hub
//! configs omit many of them. Unsupported values (another activation, a pooling head) are errors
//! naming the field.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::{
    GemmaConfig, ImageEncoder, LayerType, PaliGemmaConfig, ProjectorKind, SiglipConfig,
};
use crate::error::{io_err, Error, Result};

struct Obj<'a> {
    path: &'a Path,
    prefix: &'static str,
    map: &'a Map<String, Value>,
}

impl Obj<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            field: format!("{}{field}", self.prefix),
            msg: msg.into(),
        }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str, default: Option<usize>) -> Result<usize> {
        match self.get(k) {
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, found {v}"))),
            None => default.ok_or_else(|| self.err(k, "missing")),
        }
    }
    fn f64(&self, k: &str, default: f64) -> Result<f64> {
        match self.get(k) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(k, format!("expected a number, found {v}"))),
            None => Ok(default),
        }
    }
    fn opt_f64(&self, k: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.map.get(k) {
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| (x != 0.0).then_some(x))
                .ok_or_else(|| self.err(k, format!("expected a number or null, found {v}"))),
            None => Ok(default),
        }
    }
    fn str(&self, k: &str) -> Option<&str> {
        self.get(k).and_then(|v| v.as_str())
    }
}

fn check_act(o: &Obj, keys: &[&str]) -> Result<()> {
    for k in keys {
        if let Some(a) = o.str(k) {
            // HF coerces Gemma's "gelu" to the tanh form (configuration_gemma.py:88-94).
            if !matches!(
                a,
                "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" | "gelu_fast" | "gelu"
            ) {
                return Err(o.err(k, format!("unsupported activation `{a}` (only tanh-GELU)")));
            }
        }
    }
    Ok(())
}

/// Parses an HF PaliGemma `config.json`.
pub fn parse_config(path: &Path) -> Result<PaliGemmaConfig> {
    let v = read_json(path)?;
    let empty = Map::new();
    let top = Obj {
        path,
        prefix: "",
        map: v.as_object().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            field: "<root>".into(),
            msg: "not a JSON object".into(),
        })?,
    };
    if let Some(mt) = top.str("model_type") {
        if mt != "paligemma" {
            return Err(top.err("model_type", format!("expected `paligemma`, found `{mt}`")));
        }
    }
    let vis = Obj {
        path,
        prefix: "vision_config.",
        map: top
            .get("vision_config")
            .and_then(|x| x.as_object())
            .unwrap_or(&empty),
    };
    let txt = Obj {
        path,
        prefix: "text_config.",
        map: top
            .get("text_config")
            .and_then(|x| x.as_object())
            .unwrap_or(&empty),
    };
    let vision = parse_vision(&vis)?;
    let text = parse_text(&txt)?;
    let projection_dim = top.usize("projection_dim", Some(text.hidden_size))?;
    if projection_dim != text.hidden_size {
        return Err(top.err(
            "projection_dim",
            format!(
                "{projection_dim} differs from text_config.hidden_size {}",
                text.hidden_size
            ),
        ));
    }
    let image_token_id = match top.get("image_token_index") {
        Some(_) => top.usize("image_token_index", None)?,
        None => top.usize("image_token_id", Some(256000))?,
    };
    Ok(PaliGemmaConfig::new()
        .with_vision(ImageEncoder::Siglip(vision))
        .with_text(text)
        .with_image_token_id(image_token_id)
        .with_output_vocab_size(default_output_vocab(
            image_token_id,
            txt.usize("vocab_size", Some(257152))?,
        ))
        .with_position_offset(1))
}

/// Real checkpoints put `<image>` right after the 257152 tokens and pad the embedding to a
/// multiple of 64; those tail rows must never be predicted. A placeholder inside the vocabulary
/// proper (as in small test tokenizers) leaves the whole vocabulary predictable.
pub fn default_output_vocab(image_token_id: usize, vocab_size: usize) -> Option<usize> {
    (image_token_id < vocab_size && vocab_size - image_token_id <= 64).then_some(image_token_id)
}

fn parse_vision(o: &Obj) -> Result<SiglipConfig> {
    check_act(o, &["hidden_act"])?;
    if o.get("vision_use_head").and_then(|v| v.as_bool()) == Some(true) {
        return Err(o.err(
            "vision_use_head",
            "PaliGemma uses no pooling head; expected false",
        ));
    }
    // Defaults: PaliGemmaConfig's default vision config (So400m/14 @224) with the real 4304 MLP.
    Ok(SiglipConfig::new()
        .with_image_size(o.usize("image_size", Some(224))?)
        .with_patch_size(o.usize("patch_size", Some(14))?)
        .with_hidden_size(o.usize("hidden_size", Some(1152))?)
        .with_intermediate_size(o.usize("intermediate_size", Some(4304))?)
        .with_num_layers(o.usize("num_hidden_layers", Some(27))?)
        .with_num_heads(o.usize("num_attention_heads", Some(16))?)
        .with_layer_norm_eps(o.f64("layer_norm_eps", 1e-6)?))
}

fn parse_text(o: &Obj) -> Result<GemmaConfig> {
    if o.get("hidden_act").is_some() && o.get("hidden_activation").is_some() {
        // candle bails here too: the two names would disagree silently otherwise.
        if o.str("hidden_act") != o.str("hidden_activation") {
            return Err(o.err(
                "hidden_activation",
                "both hidden_act and hidden_activation are set and differ",
            ));
        }
    }
    check_act(o, &["hidden_act", "hidden_activation"])?;
    let gemma2 = match o.str("model_type").unwrap_or("gemma") {
        "gemma" => false,
        "gemma2" => true,
        other => {
            return Err(o.err(
                "model_type",
                format!("expected `gemma` or `gemma2`, found `{other}`"),
            ))
        }
    };
    let (d, f, l, h, kv) = if gemma2 {
        (2304, 9216, 26, 8, 4)
    } else {
        (2048, 16384, 18, 8, 1)
    };
    let hidden = o.usize("hidden_size", Some(d))?;
    let heads = o.usize("num_attention_heads", Some(h))?;
    let layers = o.usize("num_hidden_layers", Some(l))?;
    let theta = match o.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
        Some(t) => t
            .as_f64()
            .ok_or_else(|| o.err("rope_parameters.rope_theta", "expected a number"))?,
        None => o.f64("rope_theta", 10000.0)?,
    };
    if let Some(rt) = o
        .get("rope_parameters")
        .and_then(|p| p.get("rope_type"))
        .and_then(|v| v.as_str())
    {
        if rt != "default" {
            return Err(o.err(
                "rope_parameters.rope_type",
                format!("unsupported `{rt}` (only `default`)"),
            ));
        }
    }
    let mut c = GemmaConfig::new()
        .with_vocab_size(o.usize("vocab_size", Some(257216))?)
        .with_hidden_size(hidden)
        .with_intermediate_size(o.usize("intermediate_size", Some(f))?)
        .with_num_layers(layers)
        .with_num_heads(heads)
        .with_num_kv_heads(o.usize("num_key_value_heads", Some(kv))?)
        .with_head_dim(o.usize("head_dim", Some(256))?)
        .with_rms_norm_eps(o.f64("rms_norm_eps", 1e-6)?)
        .with_rope_theta(theta);
    if heads % c.num_kv_heads != 0 {
        return Err(o.err(
            "num_key_value_heads",
            format!(
                "{} does not divide num_attention_heads {heads}",
                c.num_kv_heads
            ),
        ));
    }
    if gemma2 {
        let window = o.usize("sliding_window", Some(4096))?;
        let types = match o.get("layer_types") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("full_attention") => Ok(LayerType::FullAttention),
                    Some("sliding_attention") => Ok(LayerType::SlidingAttention),
                    _ => Err(o.err("layer_types", format!("entry {i}: unknown layer type {t}"))),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => {
                return Err(o.err("layer_types", format!("expected a list, found {other}")))
            }
            // Gemma2Config default: even layers slide, odd layers are global.
            None => (0..layers)
                .map(|i| {
                    if i % 2 == 0 {
                        LayerType::SlidingAttention
                    } else {
                        LayerType::FullAttention
                    }
                })
                .collect(),
        };
        if types.len() != layers {
            return Err(o.err(
                "layer_types",
                format!("{} entries for {layers} layers", types.len()),
            ));
        }
        c = c
            .with_query_pre_attn_scalar(Some(o.f64("query_pre_attn_scalar", 256.0)?))
            .with_attn_logit_softcapping(o.opt_f64("attn_logit_softcapping", Some(50.0))?)
            .with_final_logit_softcapping(o.opt_f64("final_logit_softcapping", Some(30.0))?)
            .with_sliding_window(Some(window))
            .with_layer_types(types)
            .with_post_norms(true);
    }
    Ok(c)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Ids of `<bos>`, `<eos>` and `<pad>` in an HF `tokenizer.json` (its `added_tokens`); Gemma's
/// (2, 1, 0) for any it lacks.
pub fn special_ids(tokenizer_json: &Value) -> [u64; 3] {
    let find = |name: &str, default: u64| {
        tokenizer_json["added_tokens"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["content"] == name))
            .and_then(|t| t["id"].as_u64())
            .unwrap_or(default)
    };
    [find("<bos>", 2), find("<eos>", 1), find("<pad>", 0)]
}

/// The files HF writes beside `config.json` so that `AutoProcessor.from_pretrained` and
/// `generate` work on a checkpoint: transformers 5's `processor_config.json` (the SigLIP image
/// processor nested in it), 4.x's `preprocessor_config.json` and `special_tokens_map.json`,
/// `tokenizer_config.json` and `generation_config.json`, as transformers 5.24 writes them for a
/// PaliGemma (the fixtures' files, field by field). `ids` are `[bos, eos, pad]`.
pub fn processor_files(
    c: &PaliGemmaConfig,
    ids: [u64; 3],
) -> std::result::Result<Vec<(&'static str, Value)>, String> {
    let ImageEncoder::Siglip(v) = &c.vision else {
        return Err("a model without an image encoder has no HF processor".into());
    };
    let image = json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": v.num_patches(),
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"height": v.image_size, "width": v.image_size},
    });
    let mut preprocessor = image.clone();
    preprocessor["processor_class"] = json!("PaliGemmaProcessor");
    let [bos, eos, pad] = ids;
    Ok(vec![
        (
            "processor_config.json",
            json!({"image_processor": image, "processor_class": "PaliGemmaProcessor"}),
        ),
        ("preprocessor_config.json", preprocessor),
        (
            "tokenizer_config.json",
            json!({
                "backend": "tokenizers",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "extra_special_tokens": ["<image>"],
                "mask_token": null,
                "model_max_length": 1e30,
                "pad_token": "<pad>",
                "padding_side": "right",
                "processor_class": "PaliGemmaProcessor",
                "tokenizer_class": "GemmaTokenizer",
                "unk_token": "<unk>",
            }),
        ),
        (
            "special_tokens_map.json",
            json!({
                "additional_special_tokens": ["<image>"],
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }),
        ),
        (
            "generation_config.json",
            json!({
                "_from_model_config": true,
                "bos_token_id": bos,
                "eos_token_id": eos,
                "output_attentions": false,
                "output_hidden_states": false,
                "pad_token_id": pad,
                "use_cache": true,
            }),
        ),
    ])
}

/// HF `config.json` for a model pali trained, loadable by `PaliGemmaForConditionalGeneration`.
/// Models outside HF's architecture (MLP connector, no image encoder) are refused.
pub fn to_hf_config(c: &PaliGemmaConfig) -> std::result::Result<Value, String> {
    let ImageEncoder::Siglip(v) = &c.vision else {
        return Err("a model without an image encoder has no HF equivalent".into());
    };
    if c.projector != ProjectorKind::Linear {
        return Err("the MLP connector has no HF equivalent (HF PaliGemma uses one Linear)".into());
    }
    let mut text = gemma_json(&c.text);
    text.as_object_mut()
        .unwrap()
        .insert("num_image_tokens".into(), json!(v.num_patches()));
    let t = &c.text;
    let mut vision = siglip_vision_json(v, false);
    let m = vision.as_object_mut().expect("object");
    m.insert("projection_dim".into(), json!(t.hidden_size));
    m.insert("num_image_tokens".into(), json!(v.num_patches()));
    Ok(json!({
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "image_token_index": c.image_token_id,
        "projection_dim": t.hidden_size,
        "hidden_size": t.hidden_size,
        "vocab_size": t.vocab_size,
        "tie_word_embeddings": true,
        "text_config": text,
        "vision_config": vision,
    }))
}

/// The image encoder's HF config (`SiglipVisionConfig` fields); `head`: SigLIP's pooling head
/// (`vision_use_head`), which PaliGemma's encoder has not.
pub fn siglip_vision_json(v: &SiglipConfig, head: bool) -> Value {
    json!({
        "model_type": "siglip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_channels": 3,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": head,
    })
}

/// The decoder's HF config (`GemmaConfig` / `Gemma2Config` fields, transformers 5.24).
pub fn gemma_json(t: &GemmaConfig) -> Value {
    let gemma2 = t.post_norms;
    let mut text = json!({
        "model_type": if gemma2 { "gemma2" } else { "gemma" },
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": true,
    });
    if gemma2 {
        let m = text.as_object_mut().unwrap();
        // transformers 5 validates `Gemma2Config.query_pre_attn_scalar` as an int (every
        // released value is one: 256, 144): 20.0 would be refused.
        let scalar = match t.query_pre_attn_scalar {
            Some(q) if q.fract() == 0.0 && q.abs() < 1e15 => json!(q as i64),
            q => json!(q),
        };
        m.insert("query_pre_attn_scalar".into(), scalar);
        m.insert(
            "attn_logit_softcapping".into(),
            json!(t.attn_logit_softcapping),
        );
        m.insert(
            "final_logit_softcapping".into(),
            json!(t.final_logit_softcapping),
        );
        m.insert("sliding_window".into(), json!(t.sliding_window));
        let types: Vec<&str> = (0..t.num_layers)
            .map(|i| match t.layer_type(i) {
                LayerType::FullAttention => "full_attention",
                LayerType::SlidingAttention => "sliding_attention",
            })
            .collect();
        m.insert("layer_types".into(), json!(types));
    }
    text
}

/// A standalone decoder's `config.json` (`GemmaForCausalLM` / `Gemma2ForCausalLM`): what a
/// stage-0 language model is saved with. `ids` are `[bos, eos, pad]` ([`special_ids`]).
pub fn causal_lm_config(t: &GemmaConfig, [bos, eos, pad]: [u64; 3]) -> Value {
    let mut v = gemma_json(t);
    let arch = if t.post_norms {
        "Gemma2ForCausalLM"
    } else {
        "GemmaForCausalLM"
    };
    let m = v.as_object_mut().unwrap();
    m.insert("architectures".into(), json!([arch]));
    m.insert("pad_token_id".into(), json!(pad));
    m.insert("eos_token_id".into(), json!(eos));
    m.insert("bos_token_id".into(), json!(bos));
    v
}
