//! The PaliGemma model: SigLIP image encoder → projector → Gemma / Gemma 2 decoder, HF
//! checkpoint IO, masks and losses. Generic over any Burn `Backend`.

pub mod activation;
pub mod big_vision;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gemma;
pub mod hf;
pub mod loss;
pub mod mask;
pub mod npz;
pub mod paligemma;
pub mod precision;
pub mod presets;
pub mod projector;
pub mod shards;
pub mod siglip;
pub mod two_tower;
pub mod vqvae;

pub use config::{
    GemmaConfig, ImageEncoder, LayerType, PaliGemmaConfig, PosembInit, ProjectorKind, SiglipConfig,
};
pub use error::{Error, Result};
pub use gemma::AttentionMasks;
pub use paligemma::{ForwardOptions, ModelInput, ModelOutput, PaliGemma, Trace};
pub use precision::Compute;

use std::path::Path;

use burn::tensor::backend::Backend;

/// Loads an HF PaliGemma checkpoint directory (`config.json` + safetensors, single or sharded).
pub fn load_hf<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(PaliGemmaConfig, PaliGemma<B>)> {
    let config = hf::parse_config(&dir.join("config.json"))?;
    let file = checkpoint::TensorFile::open(dir)?;
    let model = checkpoint::load_into(config.init::<B>(device), &file, checkpoint::Tower::All)?;
    Ok((config, model))
}

/// Saves `model` as an HF checkpoint directory (`config.json` + `model.safetensors`, or 5 GB
/// shards with their index, as HF writes them).
pub fn save_hf<B: Backend>(
    model: &PaliGemma<B>,
    config: &PaliGemmaConfig,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(error::io_err(dir))?;
    let json = hf::to_hf_config(config).map_err(Error::Input)?;
    let path = dir.join("config.json");
    let tmp = dir.join("config.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&json).expect("json"))
        .map_err(error::io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(error::io_err(&path))?;
    checkpoint::save_sharded(
        model,
        dir,
        "model",
        shards::SHARD_BYTES,
        checkpoint::SaveDtype::F32,
    )
    .map(|_| ())
}

#[cfg(test)]
pub(crate) type TestBackend = burn::backend::Flex;
