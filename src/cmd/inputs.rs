//! HF-named model inputs from a safetensors file (`pixel_values`, `input_ids`,
//! `attention_mask`, `token_type_ids`, `labels`), as `pali forward` / `pali generate` take them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use pali_model::checkpoint::TensorFile;
use pali_model::mask::hf_attention_masks;
use pali_model::paligemma::bool_tensor;
use pali_model::{ModelInput, PaliGemmaConfig};

/// RoPE numbering.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// 1-indexed, as HF transformers.
    Hf,
    /// 0-indexed, as big_vision.
    #[value(name = "big_vision", alias = "big-vision")]
    BigVision,
}

pub struct Inputs<B: Backend> {
    pub input: ModelInput<B>,
    pub input_mask: Tensor<B, 2, Bool>,
    pub labels: Option<Tensor<B, 2, Int>>,
}

pub fn load<B: Backend>(
    path: &Path,
    config: &PaliGemmaConfig,
    positions: Positions,
    device: &B::Device,
) -> Result<Inputs<B>> {
    let f = TensorFile::open(path).with_context(|| format!("reading inputs {}", path.display()))?;
    let (px, pshape) = f
        .f32("pixel_values")
        .context("inputs need `pixel_values` f32 [B,3,H,W]")?;
    let pixel_values = match pshape.as_slice() {
        [b, c, h, w] => Tensor::<B, 5>::from_data(TensorData::new(px, [*b, 1, *c, *h, *w]), device),
        [b, fr, c, h, w] => {
            Tensor::<B, 5>::from_data(TensorData::new(px, [*b, *fr, *c, *h, *w]), device)
        }
        s => bail!(
            "{}: `pixel_values` has shape {s:?}, expected [B,3,H,W] or [B,F,3,H,W]",
            path.display()
        ),
    };
    let int2 = |name: &str| -> Result<Option<(Vec<i64>, [usize; 2])>> {
        if f.shape(name).is_none() {
            return Ok(None);
        }
        let (v, s) = f.i64(name)?;
        match s.as_slice() {
            [b, t] => Ok(Some((v, [*b, *t]))),
            s => bail!(
                "{}: `{name}` has shape {s:?}, expected [B, T]",
                path.display()
            ),
        }
    };
    let (ids, shape) = int2("input_ids")?.context("inputs need `input_ids` i64 [B,T]")?;
    let [b, t] = shape;
    let check = |name: &str, s: [usize; 2]| {
        if s != shape {
            bail!(
                "{}: `{name}` has shape {s:?} but `input_ids` has {shape:?}",
                path.display()
            )
        }
        Ok(())
    };
    if pshape[0] != b {
        bail!(
            "{}: `pixel_values` has {} images but `input_ids` {b} rows",
            path.display(),
            pshape[0]
        );
    }
    let [c, h, w] = [pshape.len() - 3, pshape.len() - 2, pshape.len() - 1].map(|i| pshape[i]);
    if let pali_model::ImageEncoder::Siglip(v) = &config.vision {
        if (c, h, w) != (3, v.image_size, v.image_size) {
            let (p, n) = (path.display(), v.image_size);
            bail!("{p}: `pixel_values` images are {c}×{h}×{w}; the checkpoint takes 3×{n}×{n}");
        }
    }
    let vocab = config.text.vocab_size as i64;
    let out_of_range = |name: &str, v: &[i64], ok: &dyn Fn(i64) -> bool| -> Result<()> {
        if let Some(i) = v.iter().position(|x| !ok(*x)) {
            bail!(
                "{}: `{name}`[{}, {}] = {} is outside the vocabulary (0..{vocab})",
                path.display(),
                i / t,
                i % t,
                v[i]
            );
        }
        Ok(())
    };
    out_of_range("input_ids", &ids, &|x| (0..vocab).contains(&x))?;
    let attn = match int2("attention_mask")? {
        Some((v, s)) => {
            check("attention_mask", s)?;
            v
        }
        None => vec![1; b * t],
    };
    let tt = match int2("token_type_ids")? {
        Some((v, s)) => {
            check("token_type_ids", s)?;
            v
        }
        // Without token types HF uses a plain causal mask (every token is its own block).
        None => vec![1; b * t],
    };
    let labels = match int2("labels")? {
        Some((v, s)) => {
            check("labels", s)?;
            out_of_range("labels", &v, &|x| x == -100 || (0..vocab).contains(&x))?;
            Some(Tensor::<B, 2, Int>::from_data(
                TensorData::new(v, shape),
                device,
            ))
        }
        None => None,
    };
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device);
    let masks = hf_attention_masks(int(tt), int(attn.clone()), config.text.sliding_window);
    let offset = match positions {
        Positions::Hf => 1,
        Positions::BigVision => 0,
    };
    let pos: Vec<i64> = (0..b)
        .flat_map(|_| (0..t as i64).map(move |i| i + offset))
        .collect();
    let input_mask = bool_tensor::<B, 2>(attn.iter().map(|a| *a != 0).collect(), shape, device);
    Ok(Inputs {
        input: ModelInput {
            pixel_values,
            input_ids: int(ids),
            positions: int(pos),
            masks,
        },
        input_mask,
        labels,
    })
}
