//! The VQ-VAE mask tokenizer of PaliGemma's segmentation: a 64×64 mask crop ⇄ 16 codes
//! (`<seg000>`…`<seg127>`), architecture and parameter names as big_vision's
//! `pp/proj/paligemma/segmentation.py` (encoder) and `evaluators/.../segmentation.py` (decoder),
//! after Ning et al. 2023.
//!
//! Encoder: input `2·(m − 0.5)`; 4 × (conv stride 2, TF `SAME` padding, ReLU) 64 → 4; 2 residual
//! blocks (3×3 conv, ReLU, 3×3 conv, ReLU, 1×1 conv, + skip); a 1×1 conv to the codebook width D.
//! Quantiser: nearest of K codebook rows per cell, row-major over the 4×4 grid.
//! Decoder: 1×1 conv + ReLU, 2 residual blocks, 4 × (transposed conv k4 s2 + ReLU, widths
//! halving from `dec_channels`), a 1×1 conv to one channel; inside the mask where > 0.
//!
//! Parameters use the PyTorch names of big_vision's `vae-oid.npz` (`encoder.{0,2,4,6}`,
//! `encoder.{8,9}.net.{0,2,4}`, `encoder.10`, `_vq_vae._embedding`, `decoder.0`,
//! `decoder.{2,3}.net.{0,2,4}`, `decoder.{4,6,8,10}`, `decoder.12`; conv weights OIHW,
//! transposed-conv weights (in, out, kh, kw)), so that file loads as is.

use std::collections::BTreeMap;
use std::path::Path;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use crate::error::Error;
pub use crate::npz::NamedTensors;

/// Side of the mask crop the VQ-VAE sees.
pub const MASK_SIZE: usize = 64;
/// Codes per mask (a 4×4 grid).
pub const NUM_CODES: usize = 16;

#[derive(Config, Debug, PartialEq)]
pub struct VqVaeConfig {
    /// Output widths of the four stride-2 encoder convs.
    #[config(default = "[16, 32, 64, 128]")]
    pub enc_channels: [usize; 4],
    /// Kernel of the stride-2 encoder convs.
    #[config(default = 4)]
    pub enc_kernel: usize,
    /// Hidden width inside the encoder's residual blocks.
    #[config(default = 128)]
    pub enc_res_hidden: usize,
    /// Codebook entry width D.
    #[config(default = 64)]
    pub embed_dim: usize,
    /// Codebook entries K (128 `<seg>` tokens).
    #[config(default = 128)]
    pub codebook_size: usize,
    /// Width after the decoder's first conv; the transposed convs output this, /2, /4, /8.
    #[config(default = 128)]
    pub dec_channels: usize,
    /// Hidden width inside the decoder's residual blocks.
    #[config(default = 128)]
    pub dec_res_hidden: usize,
}

#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    pub conv0: Conv2d<B>,
    pub conv1: Conv2d<B>,
    pub conv2: Conv2d<B>,
}

impl<B: Backend> ResBlock<B> {
    fn new(channels: usize, hidden: usize, device: &B::Device) -> Self {
        let c3 = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device)
        };
        ResBlock {
            conv0: c3(channels, hidden),
            conv1: c3(hidden, hidden),
            conv2: Conv2dConfig::new([hidden, channels], [1, 1]).init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = relu(self.conv0.forward(x.clone()));
        let h = relu(self.conv1.forward(h));
        x + self.conv2.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct VqVae<B: Backend> {
    /// encoder.{0,2,4,6}
    pub down: Vec<Conv2d<B>>,
    /// encoder.{8,9}
    pub enc_res: Vec<ResBlock<B>>,
    /// encoder.10
    pub enc_out: Conv2d<B>,
    /// `_vq_vae._embedding` [K, D]
    pub codebook: Param<Tensor<B, 2>>,
    /// decoder.0
    pub dec_in: Conv2d<B>,
    /// decoder.{2,3}
    pub dec_res: Vec<ResBlock<B>>,
    /// decoder.{4,6,8,10}
    pub up: Vec<ConvTranspose2d<B>>,
    /// decoder.12
    pub dec_out: Conv2d<B>,
}

impl VqVaeConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> VqVae<B> {
        let k = self.enc_kernel;
        let c = self.enc_channels;
        let ins = [1, c[0], c[1], c[2]];
        let down = (0..4)
            .map(|i| {
                Conv2dConfig::new([ins[i], c[i]], [k, k])
                    .with_stride([2, 2])
                    .with_padding(PaddingConfig2d::Same)
                    .init(device)
            })
            .collect();
        let dc = self.dec_channels;
        let widths = [dc, dc, dc / 2, dc / 4, dc / 8];
        let up = (0..4)
            .map(|i| {
                ConvTranspose2dConfig::new([widths[i], widths[i + 1]], [4, 4])
                    .with_stride([2, 2])
                    .with_padding([1, 1])
                    .init(device)
            })
            .collect();
        VqVae {
            down,
            enc_res: (0..2)
                .map(|_| ResBlock::new(c[3], self.enc_res_hidden, device))
                .collect(),
            enc_out: Conv2dConfig::new([c[3], self.embed_dim], [1, 1]).init(device),
            codebook: Param::from_tensor(Tensor::random(
                [self.codebook_size, self.embed_dim],
                Distribution::Uniform(
                    -1.0 / self.codebook_size as f64,
                    1.0 / self.codebook_size as f64,
                ),
                device,
            )),
            dec_in: Conv2dConfig::new([self.embed_dim, dc], [1, 1]).init(device),
            dec_res: (0..2)
                .map(|_| ResBlock::new(dc, self.dec_res_hidden, device))
                .collect(),
            up,
            dec_out: Conv2dConfig::new([dc / 8, 1], [1, 1]).init(device),
        }
    }
}

/// What one training forward pass gives.
pub struct VqOutput<B: Backend> {
    /// [B, 1, 64, 64] decoder output (inside the mask where > 0).
    pub recon: Tensor<B, 4>,
    /// [B, D, 4, 4] encoder output.
    pub z: Tensor<B, 4>,
    /// [B, D, 4, 4] the chosen codebook rows.
    pub quantized: Tensor<B, 4>,
    /// [B, 16] code of each cell, row-major.
    pub codes: Tensor<B, 2, Int>,
}

impl<B: Backend> VqVae<B> {
    pub fn embed_dim(&self) -> usize {
        self.codebook.dims()[1]
    }

    pub fn codebook_size(&self) -> usize {
        self.codebook.dims()[0]
    }

    /// Encoder output.
    ///
    /// # Shapes
    /// - masks: [B, 1, 64, 64] in [0, 1] → [B, D, 4, 4]
    pub fn encode(&self, masks: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = (masks - 0.5) * 2.0;
        for c in &self.down {
            x = relu(c.forward(x));
        }
        for r in &self.enc_res {
            x = r.forward(x);
        }
        self.enc_out.forward(x)
    }

    /// Nearest codebook row of every cell: ([B, 16] codes, [B, D, 4, 4] rows).
    pub fn quantize(&self, z: Tensor<B, 4>) -> (Tensor<B, 2, Int>, Tensor<B, 4>) {
        let [b, d, h, w] = z.dims();
        let flat = z.permute([0, 2, 3, 1]).reshape([b * h * w, d]); // row-major cells
        let e = self.codebook.val(); // [K, D]
        let dist = flat.clone().powf_scalar(2.0).sum_dim(1) // [N, 1]
            + e.clone().powf_scalar(2.0).sum_dim(1).transpose() // [1, K]
            - flat.matmul(e.clone().transpose()) * 2.0; // [N, K]
        let codes = dist.argmin(1).reshape([b * h * w]);
        let q = self.lookup(codes.clone(), b, h, w);
        (codes.reshape([b, h * w]), q)
    }

    /// Codebook rows of `codes` ([B·h·w]) as a [B, D, h, w] grid.
    fn lookup(&self, codes: Tensor<B, 1, Int>, b: usize, h: usize, w: usize) -> Tensor<B, 4> {
        let d = self.embed_dim();
        self.codebook
            .val()
            .select(0, codes)
            .reshape([b, h, w, d])
            .permute([0, 3, 1, 2])
    }

    /// Decoder output from a grid of codebook rows.
    ///
    /// # Shapes
    /// - quantized: [B, D, 4, 4] → [B, 1, 64, 64]
    pub fn decode_quantized(&self, quantized: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = relu(self.dec_in.forward(quantized));
        for r in &self.dec_res {
            x = r.forward(x);
        }
        for u in &self.up {
            x = relu(u.forward(x));
        }
        self.dec_out.forward(x)
    }

    /// Decoder output of 16 codes per row.
    ///
    /// # Shapes
    /// - codes: [B, 16] → [B, 1, 64, 64]
    pub fn decode(&self, codes: Tensor<B, 2, Int>) -> Tensor<B, 4> {
        let [b, n] = codes.dims();
        let side = (n as f64).sqrt() as usize;
        let q = self.lookup(codes.reshape([b * n]), b, side, side);
        self.decode_quantized(q)
    }

    /// Encoder, quantiser and decoder; the decoder sees the codebook rows through the
    /// straight-through estimator (`z + sg(q − z)`), so gradients reach the encoder.
    pub fn forward(&self, masks: Tensor<B, 4>) -> VqOutput<B> {
        let z = self.encode(masks);
        let (codes, q) = self.quantize(z.clone());
        let st = z.clone() + (q.clone() - z.clone()).detach();
        VqOutput {
            recon: self.decode_quantized(st),
            z,
            quantized: q,
            codes,
        }
    }

    /// Every parameter under its PyTorch name: (name, shape, values).
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        for (i, c) in self.down.iter().enumerate() {
            push_conv(&mut out, &format!("encoder.{}", 2 * i), &c.weight, &c.bias);
        }
        for (i, r) in self.enc_res.iter().enumerate() {
            push_res(&mut out, &format!("encoder.{}", 8 + i), r);
        }
        push_conv(
            &mut out,
            "encoder.10",
            &self.enc_out.weight,
            &self.enc_out.bias,
        );
        push(&mut out, "_vq_vae._embedding".into(), self.codebook.val());
        push_conv(
            &mut out,
            "decoder.0",
            &self.dec_in.weight,
            &self.dec_in.bias,
        );
        for (i, r) in self.dec_res.iter().enumerate() {
            push_res(&mut out, &format!("decoder.{}", 2 + i), r);
        }
        for (i, u) in self.up.iter().enumerate() {
            push_conv(
                &mut out,
                &format!("decoder.{}", 4 + 2 * i),
                &u.weight,
                &u.bias,
            );
        }
        push_conv(
            &mut out,
            "decoder.12",
            &self.dec_out.weight,
            &self.dec_out.bias,
        );
        out
    }
}

type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

fn push<B: Backend, const D: usize>(out: &mut Named, name: String, t: Tensor<B, D>) {
    let shape = t.dims().to_vec();
    out.push((name, shape, t.into_data().iter::<f32>().collect()));
}

fn push_conv<B: Backend>(
    out: &mut Named,
    name: &str,
    w: &Param<Tensor<B, 4>>,
    b: &Option<Param<Tensor<B, 1>>>,
) {
    push(out, format!("{name}.weight"), w.val());
    if let Some(b) = b {
        push(out, format!("{name}.bias"), b.val());
    }
}

fn push_res<B: Backend>(out: &mut Named, prefix: &str, r: &ResBlock<B>) {
    for (k, c) in [(0, &r.conv0), (2, &r.conv1), (4, &r.conv2)] {
        push_conv(out, &format!("{prefix}.net.{k}"), &c.weight, &c.bias);
    }
}

/// Builds a VQ-VAE from named tensors (a `vae-oid.npz` or a `pali vqvae train` checkpoint),
/// reading every width from the shapes. Missing tensors and inconsistent shapes are errors
/// naming the tensor; other tensors are ignored.
pub fn from_tensors<B: Backend>(
    t: &NamedTensors,
    what: &str,
    device: &B::Device,
) -> crate::error::Result<(VqVaeConfig, VqVae<B>)> {
    let get = |name: &str, rank: usize| -> crate::error::Result<&(Vec<usize>, Vec<f32>)> {
        let v = t.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            expected: vec![],
            source_desc: what.into(),
        })?;
        if v.0.len() != rank {
            return Err(Error::Input(format!(
                "{what}: tensor `{name}` has shape {:?}, expected {rank} dimensions",
                v.0
            )));
        }
        Ok(v)
    };
    let e0 = &get("encoder.0.weight", 4)?.0;
    let emb = &get("_vq_vae._embedding", 2)?.0;
    let c = [
        e0[0],
        get("encoder.2.weight", 4)?.0[0],
        get("encoder.4.weight", 4)?.0[0],
        get("encoder.6.weight", 4)?.0[0],
    ];
    let cfg = VqVaeConfig::new()
        .with_enc_channels(c)
        .with_enc_kernel(e0[2])
        .with_enc_res_hidden(get("encoder.8.net.0.weight", 4)?.0[0])
        .with_embed_dim(emb[1])
        .with_codebook_size(emb[0])
        .with_dec_channels(get("decoder.0.weight", 4)?.0[0])
        .with_dec_res_hidden(get("decoder.2.net.0.weight", 4)?.0[0]);
    let mut model = cfg.init::<B>(device);
    // Every expected tensor, with the shape the config implies.
    let expected: BTreeMap<String, Vec<usize>> = model
        .named_tensors()
        .into_iter()
        .map(|(n, s, _)| (n, s))
        .collect();
    for (name, shape) in &expected {
        let (found, _) = t.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            expected: shape.clone(),
            source_desc: what.into(),
        })?;
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: name.clone(),
                expected: shape.clone(),
                found: found.clone(),
                source_desc: what.into(),
            });
        }
    }
    let p4 = |name: &str| -> Param<Tensor<B, 4>> {
        let (s, v) = &t[name];
        Param::from_tensor(Tensor::from_data(
            TensorData::new(v.clone(), [s[0], s[1], s[2], s[3]]),
            device,
        ))
    };
    let p1 = |name: &str| -> Option<Param<Tensor<B, 1>>> {
        let (s, v) = &t[name];
        Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(v.clone(), [s[0]]),
            device,
        )))
    };
    let set = |c: &mut Conv2d<B>, name: &str| {
        c.weight = p4(&format!("{name}.weight"));
        c.bias = p1(&format!("{name}.bias"));
    };
    for (i, c) in model.down.iter_mut().enumerate() {
        set(c, &format!("encoder.{}", 2 * i));
    }
    for (i, r) in model.enc_res.iter_mut().enumerate() {
        for (k, c) in [(0, &mut r.conv0), (2, &mut r.conv1), (4, &mut r.conv2)] {
            set(c, &format!("encoder.{}.net.{k}", 8 + i));
        }
    }
    set(&mut model.enc_out, "encoder.10");
    let (s, v) = &t["_vq_vae._embedding"];
    model.codebook = Param::from_tensor(Tensor::from_data(
        TensorData::new(v.clone(), [s[0], s[1]]),
        device,
    ));
    set(&mut model.dec_in, "decoder.0");
    for (i, r) in model.dec_res.iter_mut().enumerate() {
        for (k, c) in [(0, &mut r.conv0), (2, &mut r.conv1), (4, &mut r.conv2)] {
            set(c, &format!("decoder.{}.net.{k}", 2 + i));
        }
    }
    for (i, u) in model.up.iter_mut().enumerate() {
        u.weight = p4(&format!("decoder.{}.weight", 4 + 2 * i));
        u.bias = p1(&format!("decoder.{}.bias", 4 + 2 * i));
    }
    set(&mut model.dec_out, "decoder.12");
    Ok((cfg, model))
}

/// Loads a VQ-VAE from a `.npz` (big_vision's `vae-oid.npz` layout) or a `.safetensors` file.
pub fn load<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> crate::error::Result<(VqVaeConfig, VqVae<B>)> {
    let tensors = if path.extension().is_some_and(|e| e == "npz") {
        crate::npz::read(path)?
    } else {
        let f = crate::checkpoint::TensorFile::open(path)?;
        let names: Vec<String> = f.names().map(String::from).collect();
        let mut t = NamedTensors::new();
        for n in names {
            let (v, s) = f.f32(&n)?;
            t.insert(n, (s, v));
        }
        t
    };
    from_tensors(&tensors, &path.display().to_string(), device)
}

/// Writes the parameters as safetensors (PyTorch names), atomically.
pub fn save<B: Backend>(model: &VqVae<B>, path: &Path) -> crate::error::Result<()> {
    let named = model.named_tensors();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("sizes match"),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, data).map_err(crate::error::io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(crate::error::io_err(path))
}
