//! Unimodal initialisation (the paper's default start): the image encoder from a SigLIP
//! checkpoint (`vision_model.*`), the decoder from a Gemma checkpoint (`model.*`), the projector
//! zero-initialised. When the Gemma vocabulary lacks tokens the tokenizer has (the 1024 `<loc>`
//! and 128 `<seg>` tokens of a plain Gemma checkpoint), the embedding grows by that many rows,
//! initialised by `token_init`: N(0, 0.02) or the mean embedding plus small noise (the paper's
//! init ablation).

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use pali_model::checkpoint::{load_into, TensorFile, Tower};
use pali_model::{PaliGemma, PaliGemmaConfig};

use crate::config::{ModelSection, TokenInit};
use crate::error::{Error, Result};

/// Fills the towers named in `m` from their checkpoints; also returns a line per loaded tower.
pub fn unimodal<B: Backend>(
    mut model: PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    m: &ModelSection,
    device: &B::Device,
) -> Result<(PaliGemma<B>, Vec<String>)> {
    let mut notes = Vec::new();
    if let Some(p) = &m.init_siglip {
        let file = TensorFile::open(p)?;
        // A checkpoint of another resolution loads at its own and is resampled (as between
        // stages).
        let key = "vision_model.embeddings.position_embedding.weight";
        let n = file.shape(key).map(|s| s[0]).ok_or_else(|| {
            Error::Config(format!("model.init_siglip: {} has no `{key}`", p.display()))
        })?;
        let patch = cfg.vision.patch_size();
        let res = ((n as f64).sqrt().round() as usize) * patch;
        let want = cfg.vision.image_size();
        let mut c = cfg.clone();
        if let pali_model::ImageEncoder::Siglip(v) = &mut c.vision {
            v.image_size = res;
        }
        let loaded = load_into(c.init::<B>(device), &file, Tower::Vision)?;
        let loaded = crate::posemb::set_resolution(loaded, res, want);
        model.vision_tower = loaded.vision_tower;
        let skipped = pali_model::checkpoint::skipped_parts(&file);
        let unused = if skipped.is_empty() {
            String::new()
        } else {
            format!("; not used: {}", skipped.join(", "))
        };
        notes.push(format!(
            "image encoder from {} ({res} px{unused})",
            p.display()
        ));
    }
    if let Some(p) = &m.init_gemma {
        let (lm, added) = gemma(p, cfg, m.token_init, device)?;
        model.language_model = lm;
        notes.push(format!(
            "decoder from {}{}",
            p.display(),
            if added > 0 {
                format!(" ({added} new token rows, {:?})", m.token_init)
            } else {
                String::new()
            }
        ));
    }
    Ok((model, notes))
}

/// The Gemma decoder of checkpoint `path`, its embedding extended to the model's vocabulary.
/// Returns the decoder and the number of rows added.
fn gemma<B: Backend>(
    path: &Path,
    cfg: &PaliGemmaConfig,
    token_init: TokenInit,
    device: &B::Device,
) -> Result<(pali_model::gemma::Gemma<B>, usize)> {
    let file = TensorFile::open(path)?;
    let key = "model.embed_tokens.weight";
    let v0 = file.shape(key).map(|s| s[0]).ok_or_else(|| {
        Error::Config(format!(
            "model.init_gemma: {} has no `{key}`",
            path.display()
        ))
    })?;
    let v = cfg.text.vocab_size;
    if v0 > v {
        return Err(Error::Config(format!(
            "model.init_gemma: {} has {v0} embedding rows, more than the model's {v}",
            path.display()
        )));
    }
    // Load into a model of the checkpoint's vocabulary, then grow the table.
    let mut small = cfg.clone();
    small.text.vocab_size = v0;
    let mut lm = load_into(small.init::<B>(device), &file, Tower::Language)?.language_model;
    if v0 < v {
        let w = lm.embed_tokens.weight.val(); // [v0, D]
        let d = w.dims()[1];
        let extra = match token_init {
            TokenInit::Normal => {
                Tensor::random([v - v0, d], Distribution::Normal(0.0, 0.02), device)
            }
            TokenInit::AvgEmb => {
                w.clone().mean_dim(0).expand([v - v0, d])
                    + Tensor::random([v - v0, d], Distribution::Normal(0.0, 0.002), device)
            }
        };
        let grown = Tensor::cat(vec![w, extra], 0).detach().require_grad();
        lm.embed_tokens.weight = Param::from_tensor(grown);
    }
    Ok((lm, v - v0))
}

/// Draws every still-lazy parameter now, in module order.
///
/// Burn initialises a parameter on first use, and a clone of a parameter not yet drawn draws its
/// own values: a data-parallel replica forked before the first forward would hold other weights
/// than the main model. Module order is the order a first forward pass touches the parameters in,
/// so the values are the ones that pass would have drawn.
pub fn materialize<B: Backend, M: burn::module::Module<B>>(m: &M) {
    struct V;
    impl<B: Backend> burn::module::ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let _ = p.val();
        }
    }
    m.visit(&mut V);
}
