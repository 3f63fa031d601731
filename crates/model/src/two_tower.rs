//! SigLIP's two-tower model, the image side of stage 0 (Zhai et al. 2023; HF `SiglipModel`,
//! transformers 5.24 `modeling_siglip.py` lines 189-222, 470-545, 621-830; big_vision
//! `trainers/proj/image_text/siglip.py`).
//!
//! - image tower: the SigLIP ViT with its attention-pooling head ([`crate::siglip::MapHead`]);
//! - text tower: token + learned position embeddings, the same pre-LN blocks without any mask,
//!   a final LayerNorm, the **last** position pooled (it may be padding, as SigLIP was
//!   trained: texts are padded to a fixed length) and a linear head to the image width;
//! - both embeddings L2-normalised; `logits = t·iᵀ · exp(logit_scale) + logit_bias`;
//! - the sigmoid loss: every one of the n² pairs is a binary problem (label +1 on the
//!   diagonal, −1 elsewhere), `−Σ log σ(label · logit)` over the pairs, divided by n.
//!
//! Field names mirror HF's keys (`vision_model.*`, `text_model.*`, `logit_scale`,
//! `logit_bias`), so [`crate::checkpoint`] writes a checkpoint HF's `from_pretrained` reads.

use std::path::Path;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde_json::{json, Value};

use crate::config::SiglipConfig;
use crate::error::{io_err, Error};
use crate::siglip::{SiglipEncoder, SiglipVision};

/// The text tower (HF `SiglipTextConfig`; defaults are HF's).
#[derive(Config, Debug, PartialEq)]
pub struct SiglipTextConfig {
    pub vocab_size: usize,
    #[config(default = 768)]
    pub hidden_size: usize,
    #[config(default = 3072)]
    pub intermediate_size: usize,
    #[config(default = 12)]
    pub num_layers: usize,
    #[config(default = 12)]
    pub num_heads: usize,
    /// Text length (every text is padded to it).
    #[config(default = 64)]
    pub max_position_embeddings: usize,
    /// Width of the pooled text embedding: the image tower's width.
    pub projection_size: usize,
    #[config(default = 1e-6)]
    pub layer_norm_eps: f64,
}

/// Both towers.
#[derive(Config, Debug, PartialEq)]
pub struct TwoTowerConfig {
    pub vision: SiglipConfig,
    pub text: SiglipTextConfig,
}

#[derive(Module, Debug)]
pub struct SiglipTextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct SiglipText<B: Backend> {
    pub embeddings: SiglipTextEmbeddings<B>,
    pub encoder: SiglipEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
    pub head: Linear<B>,
}

#[derive(Module, Debug)]
pub struct TwoTower<B: Backend> {
    pub vision_model: SiglipVision<B>,
    pub text_model: SiglipText<B>,
    /// log of the temperature t; [1]
    pub logit_scale: Param<Tensor<B, 1>>,
    /// [1]
    pub logit_bias: Param<Tensor<B, 1>>,
}

/// What the two towers compute for a batch of n (image, text) pairs.
pub struct TwoTowerOutput<B: Backend> {
    /// [n, D], unit norm
    pub image_embeds: Tensor<B, 2>,
    /// [n, D], unit norm
    pub text_embeds: Tensor<B, 2>,
    /// [n_images, n_texts]: HF `logits_per_image`
    pub logits_per_image: Tensor<B, 2>,
}

impl TwoTowerConfig {
    /// Random towers; `logit_scale` = log 10 and `logit_bias` = −10, the paper's init (the
    /// bias keeps the many negatives from dominating the first steps).
    pub fn init<B: Backend>(&self, device: &B::Device) -> TwoTower<B> {
        let t = &self.text;
        // The text blocks are the image blocks' code with the text widths.
        let blocks = SiglipConfig::new()
            .with_hidden_size(t.hidden_size)
            .with_intermediate_size(t.intermediate_size)
            .with_num_layers(t.num_layers)
            .with_num_heads(t.num_heads)
            .with_layer_norm_eps(t.layer_norm_eps)
            .init::<B>(device)
            .encoder;
        let normal = |std: f64| burn::nn::Initializer::Normal { mean: 0.0, std };
        let text_model = SiglipText {
            embeddings: SiglipTextEmbeddings {
                token_embedding: EmbeddingConfig::new(t.vocab_size, t.hidden_size).init(device),
                position_embedding: EmbeddingConfig::new(t.max_position_embeddings, t.hidden_size)
                    .with_initializer(normal((t.hidden_size as f64).powf(-0.5)))
                    .init(device),
            },
            encoder: blocks,
            final_layer_norm: LayerNormConfig::new(t.hidden_size)
                .with_epsilon(t.layer_norm_eps)
                .init(device),
            head: LinearConfig::new(t.hidden_size, t.projection_size).init(device),
        };
        TwoTower {
            vision_model: self.vision.init_with_head(device),
            text_model,
            logit_scale: Param::from_tensor(Tensor::from_floats([10f32.ln()], device)),
            logit_bias: Param::from_tensor(Tensor::from_floats([-10.0], device)),
        }
    }

    /// The HF `config.json` of a `SiglipModel` (transformers 5.24 field names). Token ids come
    /// from the tokenizer the text tower reads.
    pub fn to_hf(&self, pad: u64, bos: u64, eos: u64) -> Value {
        let (v, t) = (&self.vision, &self.text);
        json!({
            "architectures": ["SiglipModel"],
            "model_type": "siglip",
            "initializer_factor": 1.0,
            "text_config": {
                "model_type": "siglip_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "max_position_embeddings": t.max_position_embeddings,
                "projection_size": t.projection_size,
                "layer_norm_eps": t.layer_norm_eps,
                "hidden_act": "gelu_pytorch_tanh",
                "pad_token_id": pad,
                "bos_token_id": bos,
                "eos_token_id": eos,
            },
            "vision_config": crate::hf::siglip_vision_json(v, true),
        })
    }

    /// Reads an HF `SiglipModel` `config.json` (HF's defaults for missing fields).
    pub fn from_hf(path: &Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let field = |section: &str, k: &str| v.get(section).and_then(|s| s.get(k));
        let num = |section: &str, k: &str, default: Option<u64>| -> crate::Result<usize> {
            match field(section, k) {
                Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| Error::Config {
                    path: path.to_path_buf(),
                    field: format!("{section}.{k}"),
                    msg: format!("expected a non-negative integer, found {x}"),
                }),
                None => default.map(|d| d as usize).ok_or_else(|| Error::Config {
                    path: path.to_path_buf(),
                    field: format!("{section}.{k}"),
                    msg: "missing".into(),
                }),
            }
        };
        let eps = |section: &str| field(section, "layer_norm_eps").and_then(Value::as_f64);
        let vision = SiglipConfig::new()
            .with_image_size(num("vision_config", "image_size", Some(224))?)
            .with_patch_size(num("vision_config", "patch_size", Some(16))?)
            .with_hidden_size(num("vision_config", "hidden_size", Some(768))?)
            .with_intermediate_size(num("vision_config", "intermediate_size", Some(3072))?)
            .with_num_layers(num("vision_config", "num_hidden_layers", Some(12))?)
            .with_num_heads(num("vision_config", "num_attention_heads", Some(12))?)
            .with_layer_norm_eps(eps("vision_config").unwrap_or(1e-6));
        let hidden = num("text_config", "hidden_size", Some(768))?;
        let text = SiglipTextConfig::new(
            num("text_config", "vocab_size", Some(32000))?,
            num("text_config", "projection_size", Some(hidden as u64))?,
        )
        .with_hidden_size(hidden)
        .with_intermediate_size(num("text_config", "intermediate_size", Some(3072))?)
        .with_num_layers(num("text_config", "num_hidden_layers", Some(12))?)
        .with_num_heads(num("text_config", "num_attention_heads", Some(12))?)
        .with_max_position_embeddings(num("text_config", "max_position_embeddings", Some(64))?)
        .with_layer_norm_eps(eps("text_config").unwrap_or(1e-6));
        Ok(Self { vision, text })
    }
}

impl<B: Backend> SiglipText<B> {
    /// # Shapes
    /// - ids: [n, L] (L ≤ `max_position_embeddings`) → [n, projection_size], not normalised
    pub fn pooled(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [n, l] = ids.dims();
        let d = self.final_layer_norm.gamma.dims()[0];
        let pos = self
            .embeddings
            .position_embedding
            .weight
            .val()
            .slice([0..l, 0..d])
            .unsqueeze::<3>();
        let mut x = self.embeddings.token_embedding.forward(ids) + pos;
        for layer in &self.encoder.layers {
            x = layer.forward(x);
        }
        let last = self
            .final_layer_norm
            .forward(x.slice([0..n, l - 1..l, 0..d]))
            .reshape([n, d]);
        self.head.forward(last)
    }
}

/// Rows scaled to unit L2 norm.
fn normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt();
    x / norm
}

impl<B: Backend> TwoTower<B> {
    /// # Shapes
    /// - pixels: [n, 3, R, R] in [−1, 1], ids: [m, L] → logits [n, m]
    pub fn forward(&self, pixels: Tensor<B, 4>, ids: Tensor<B, 2, Int>) -> TwoTowerOutput<B> {
        let image_embeds = normalize(self.vision_model.pooled(pixels));
        let text_embeds = normalize(self.text_model.pooled(ids));
        let scale = self.logit_scale.val().exp().reshape([1, 1]);
        let bias = self.logit_bias.val().reshape([1, 1]);
        let logits_per_image =
            image_embeds.clone().matmul(text_embeds.clone().transpose()) * scale + bias;
        TwoTowerOutput {
            image_embeds,
            text_embeds,
            logits_per_image,
        }
    }
}

/// SigLIP's sigmoid loss of a square logit matrix (pair i, i positive): the sum over all n²
/// pairs of `−log σ(±logit)`, divided by n.
///
/// # Shapes
/// - logits: [n, n] → [1]
pub fn sigmoid_loss<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, m] = logits.dims();
    assert_eq!(n, m, "the sigmoid loss pairs image i with text i");
    let device = logits.device();
    // +1 on the diagonal, −1 elsewhere.
    let labels = Tensor::<B, 2>::eye(n, &device)
        .mul_scalar(2.0)
        .sub_scalar(1.0);
    log_sigmoid(labels * logits)
        .sum()
        .neg()
        .div_scalar(n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{load_into, save_safetensors, TensorFile, Tower};
    use crate::TestBackend as B;

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/siglip")
    }

    fn close(name: &str, got: Tensor<B, 2>, want: (Vec<f32>, Vec<usize>), tol: f32) {
        assert_eq!(got.dims().to_vec(), want.1, "{name} shape");
        let got: Vec<f32> = got.into_data().to_vec().unwrap();
        let worst = got
            .iter()
            .zip(&want.0)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= tol,
            "{name}: max |pali − HF| = {worst:e} > {tol:e}"
        );
    }

    fn load(device: &burn::tensor::Device<B>) -> (TwoTowerConfig, TwoTower<B>) {
        let dir = fixture().join("model");
        let cfg = TwoTowerConfig::from_hf(&dir.join("config.json")).unwrap();
        let file = TensorFile::open(&dir).unwrap();
        let m = load_into(cfg.init::<B>(device), &file, Tower::Exact).unwrap();
        (cfg, m)
    }

    /// HF `SiglipModel` (transformers 5.24) on the same weights and batch:
    /// scripts/siglip_reference.py.
    #[test]
    fn two_towers_match_hf_siglip_model() {
        let device = Default::default();
        let (_, m) = load(&device);
        let r = TensorFile::open(&fixture().join("reference.safetensors")).unwrap();
        let (px, ps) = r.f32("pixel_values").unwrap();
        let pixels = Tensor::<B, 1>::from_floats(px.as_slice(), &device)
            .reshape([ps[0], ps[1], ps[2], ps[3]]);
        let (ids, is) = r.i64("input_ids").unwrap();
        let ids = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([is[0], is[1]]);
        let pooled = m.vision_model.pooled(pixels.clone());
        close(
            "pooler_output",
            pooled,
            r.f32("pooler_output").unwrap(),
            1e-5,
        );
        let out = m.forward(pixels, ids);
        close(
            "image_embeds",
            out.image_embeds,
            r.f32("image_embeds").unwrap(),
            1e-5,
        );
        close(
            "text_embeds",
            out.text_embeds,
            r.f32("text_embeds").unwrap(),
            1e-5,
        );
        close(
            "logits_per_image",
            out.logits_per_image.clone(),
            r.f32("logits_per_image").unwrap(),
            1e-4,
        );
        let loss = sigmoid_loss(out.logits_per_image).reshape([1, 1]);
        let (want, _) = r.f32("loss").unwrap();
        close("loss", loss, (want, vec![1, 1]), 1e-5);
    }

    /// What pali writes is what HF wrote: the same names, shapes and values (so HF's
    /// `from_pretrained` reads it), and a config that parses back to the same towers.
    #[test]
    fn saved_two_towers_keep_hf_names() {
        let device = Default::default();
        let (cfg, m) = load(&device);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_safetensors(&m, &path).unwrap();
        let ours = TensorFile::open(&path).unwrap();
        let theirs = TensorFile::open(&fixture().join("model")).unwrap();
        let names = |f: &TensorFile| f.names().map(String::from).collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&theirs));
        for n in names(&theirs) {
            assert_eq!(ours.f32(&n).unwrap(), theirs.f32(&n).unwrap(), "{n}");
        }
        let cp = dir.path().join("config.json");
        std::fs::write(&cp, cfg.to_hf(0, 2, 1).to_string()).unwrap();
        assert_eq!(TwoTowerConfig::from_hf(&cp).unwrap(), cfg);
    }

    #[test]
    fn sigmoid_loss_is_the_mean_over_images_of_summed_pair_losses() {
        let device = Default::default();
        let logits = Tensor::<B, 2>::from_floats([[2.0, -1.0], [0.5, 3.0]], &device);
        let sp = |x: f64| (1.0 + (-x).exp()).ln(); // −log σ(x)
        let want = (sp(2.0) + sp(1.0) + sp(-0.5) + sp(3.0)) / 2.0;
        let got: f32 = sigmoid_loss(logits).into_scalar();
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }
}
