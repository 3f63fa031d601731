//! `pali model info|list|export`.

use std::path::Path;

use anyhow::Result;
use pali_model::presets::{count_params, preset, PRESETS};
use pali_model::{hf, ImageEncoder, PaliGemmaConfig};

pub fn list() -> Result<()> {
    for p in PRESETS {
        println!("{p}");
    }
    Ok(())
}

fn resolve(name: &str) -> Result<PaliGemmaConfig> {
    let p = Path::new(name);
    if p.is_dir() {
        return Ok(hf::parse_config(&p.join("config.json"))?);
    }
    if p.extension().is_some_and(|e| e == "json") {
        return Ok(hf::parse_config(p)?);
    }
    Ok(preset(name)?)
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn info(name: &str) -> Result<()> {
    let c = resolve(name)?;
    let n = count_params(&c);
    println!("model: {name}");
    match &c.vision {
        ImageEncoder::Siglip(v) => println!(
            "image encoder: SigLIP {}px / patch {} → {} tokens; width {}, depth {}, mlp {}, heads {}",
            v.image_size,
            v.patch_size,
            v.num_patches(),
            v.hidden_size,
            v.num_layers,
            v.intermediate_size,
            v.num_heads
        ),
        ImageEncoder::RawPatches { image_size, patch_size } => {
            println!("image encoder: none (raw {patch_size}px patches of {image_size}px images)")
        }
    }
    let t = &c.text;
    println!(
        "decoder: {} width {}, depth {}, mlp {}, heads {}/{} kv, head_dim {}, vocab rows {} (predictable {})",
        if t.post_norms { "Gemma 2" } else { "Gemma" },
        t.hidden_size,
        t.num_layers,
        t.intermediate_size,
        t.num_heads,
        t.num_kv_heads,
        t.head_dim,
        t.vocab_size,
        c.predictable_vocab()
    );
    println!(
        "parameters: vision {} ({}), projector {} ({}), language {} ({}), total {} ({})",
        n.vision,
        human(n.vision),
        n.projector,
        human(n.projector),
        n.language,
        human(n.language),
        n.total(),
        human(n.total())
    );
    Ok(())
}

pub fn export(checkpoint: &Path, tower: &str, vocab: Option<usize>, out: &Path) -> Result<()> {
    let t = pali_model::checkpoint::tower_by_name(tower)?;
    let n = pali_model::checkpoint::export_tower(checkpoint, t, vocab, out)?;
    println!("{n} tensors → {}", out.display());
    Ok(())
}
