//! `pali model info|list|export|init|convert`.

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

pub fn export(
    checkpoint: &Path,
    tower: &str,
    vocab: Option<usize>,
    dtype: &str,
    out: &Path,
) -> Result<()> {
    let t = pali_model::checkpoint::tower_by_name(tower)?;
    let dtype = dtype.parse().map_err(anyhow::Error::msg)?;
    let n = pali_model::checkpoint::export_tower(checkpoint, t, vocab, dtype, out)?;
    println!("{n} tensors → {}", out.display());
    Ok(())
}

pub fn convert(
    npz: &Path,
    config: Option<&str>,
    tokenizer: Option<&Path>,
    out: &Path,
) -> Result<()> {
    let (name, c) = match config {
        Some(name) => (name.to_string(), resolve(name)?),
        None => {
            let (name, c) = pali_model::big_vision::infer_config(npz)?;
            (format!("{name} (matched by shapes)"), c)
        }
    };
    // The tokenizer is read first: a bad one must not leave a converted directory behind.
    let tok = match tokenizer {
        Some(tok) => {
            let text = std::fs::read_to_string(tok)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tok.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json: {e}", tok.display()))?;
            Some((text, json))
        }
        None => None,
    };
    // Written inside the new directory before it appears.
    let mut extra: Vec<(&str, Vec<u8>)> = Vec::new();
    if let Some((text, json)) = tok {
        extra.push(("tokenizer.json", text.into_bytes()));
        let files = hf::processor_files(&c, hf::special_ids(&json)).map_err(anyhow::Error::msg)?;
        for (file, j) in files {
            extra.push((file, serde_json::to_string_pretty(&j)?.into_bytes()));
        }
    }
    let n = pali_model::big_vision::convert(npz, &c, &extra, out)?;
    println!("{n} tensors → {} (model {name})", out.display());
    Ok(())
}

pub fn init(name: &str, seed: u64, out: &Path) -> Result<()> {
    use burn::tensor::backend::Backend;
    if out.exists() {
        anyhow::bail!("{}: already exists; choose a new directory", out.display());
    }
    let c = resolve(name)?;
    let device = Default::default();
    crate::backend::Cpu::seed(&device, seed);
    let model = c.init::<crate::backend::Cpu>(&device);
    // Parameters initialise lazily, on first read: build them all before the save.
    struct Build;
    impl<B: Backend> burn::module::ModuleVisitor<B> for Build {
        fn visit_float<const D: usize>(
            &mut self,
            p: &burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) {
            let _ = p.val();
        }
    }
    burn::module::Module::visit(&model, &mut Build);
    // The save's own peak: the resident memory with the model built, then the high-water mark
    // reset (Linux `clear_refs`), so the peak read after the save is the save's alone.
    let before = crate::cmd::bench::status_mib("VmRSS:");
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let tmp = pali_model::big_vision::partial_dir(out);
    let written = pali_model::save_hf(&model, &c, &tmp).and_then(|_| {
        std::fs::rename(&tmp, out).map_err(|e| pali_model::Error::Io {
            path: out.to_path_buf(),
            source: e,
        })
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    let n = count_params(&c).total();
    println!(
        "{name}: {} parameters ({}) → {}",
        n,
        human(n),
        out.display()
    );
    if let (Some(before), Some(peak), true) =
        (before, crate::cmd::bench::status_mib("VmHWM:"), reset)
    {
        let weights = n as f64 * 4.0 / (1u64 << 20) as f64;
        println!(
            "memory: {before:.0} MiB resident with the model built ({:.2}× its {weights:.0} MiB of \
             f32 weights); peak while saving {peak:.0} MiB ({:.2}×, {:+.0} MiB)",
            before / weights,
            peak / weights,
            peak - before
        );
    }
    Ok(())
}
