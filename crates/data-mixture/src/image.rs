//! Image decoding and resizing to the stage's square resolution, values scaled to [−1, 1].
//!
//! Resizing is a separable convolution with PIL's kernels and support rule (PIL
//! `ImagingResample`, which torchvision's `antialias=True` reproduces): each output pixel's
//! centre maps to `(i + 0.5)·scale`, and when downscaling the kernel is stretched by the scale
//! (antialiasing). Without antialias the kernel keeps its size, which is TF/big_vision's
//! `resize(..., antialias=False)` (half-pixel centres).

use std::io::Cursor;
use std::path::Path;

use ::image::{DynamicImage, ImageDecoder, ImageReader};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to resample.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMethod {
    /// Bicubic (a = −0.5) with antialias, as HF SiglipImageProcessor (PIL / torchvision).
    #[default]
    Bicubic,
    /// Bilinear with antialias.
    Bilinear,
    /// Bilinear without antialias, as big_vision's default `resize`.
    BilinearNoAntialias,
}

/// An RGB image as f32 in [0, 255], HWC.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Rgb {
    pub fn from_u8(width: usize, height: usize, data: &[u8]) -> Self {
        Self {
            width,
            height,
            data: data.iter().map(|x| *x as f32).collect(),
        }
    }
    /// Rounded, clamped bytes.
    pub fn to_u8(&self) -> Vec<u8> {
        self.data
            .iter()
            .map(|x| x.round().clamp(0.0, 255.0) as u8)
            .collect()
    }
}

/// Decodes JPEG/PNG/WebP/GIF/BMP (first frame), applies the EXIF orientation, converts
/// gray/alpha/CMYK to RGB.
pub fn decode(bytes: &[u8], what: &Path) -> Result<Rgb> {
    let bad =
        |msg: String| Error::Invalid(format!("{}: cannot decode image: {msg}", what.display()));
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    let mut decoder = reader.into_decoder().map_err(|e| bad(e.to_string()))?;
    // The header's size is checked before anything is allocated: a small file can claim
    // 40000×40000 pixels (6.4 GB as f32 RGB).
    let (w, h) = decoder.dimensions();
    let limit = max_megapixels();
    let mp = w as f64 * h as f64 / 1e6;
    if mp > limit {
        return Err(bad(format!(
            "{w}×{h} is {mp:.0} megapixels, over the limit of {limit} (set PALI_MAX_MEGAPIXELS \
             to raise it)"
        )));
    }
    let orientation = decoder.orientation().map_err(|e| bad(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| bad(e.to_string()))?;
    img.apply_orientation(orientation);
    let rgb = img.to_rgb8();
    Ok(Rgb::from_u8(
        rgb.width() as usize,
        rgb.height() as usize,
        rgb.as_raw(),
    ))
}

/// Largest image decoded, in megapixels: `PALI_MAX_MEGAPIXELS`, 100 by default.
pub fn max_megapixels() -> f64 {
    std::env::var("PALI_MAX_MEGAPIXELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .unwrap_or(100.0)
}

/// Reads and decodes an image file.
pub fn load(path: &Path) -> Result<Rgb> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes, path)
}

fn cubic(x: f32) -> f32 {
    // PIL's bicubic, a = -0.5.
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

fn triangle(x: f32) -> f32 {
    (1.0 - x.abs()).max(0.0)
}

/// For each output index: first input index and normalised weights.
fn coefficients(in_size: usize, out_size: usize, method: ResizeMethod) -> Vec<(usize, Vec<f32>)> {
    let (kernel, support): (fn(f32) -> f32, f32) = match method {
        ResizeMethod::Bicubic => (cubic, 2.0),
        _ => (triangle, 1.0),
    };
    let scale = in_size as f32 / out_size as f32;
    let filter_scale = match method {
        ResizeMethod::BilinearNoAntialias => 1.0,
        _ => scale.max(1.0),
    };
    let support = support * filter_scale;
    (0..out_size)
        .map(|i| {
            let center = (i as f32 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(in_size);
            let mut w: Vec<f32> = (lo..hi)
                .map(|j| kernel((j as f32 - center + 0.5) / filter_scale))
                .collect();
            let sum: f32 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|x| *x /= sum);
            }
            (lo, w)
        })
        .collect()
}

/// Resizes to `out_w × out_h` (no aspect ratio kept, as big_vision and HF).
/// Like PIL, the horizontal pass runs first and the intermediate is rounded to 8 bits.
pub fn resize(img: &Rgb, out_w: usize, out_h: usize, method: ResizeMethod) -> Rgb {
    if img.width == out_w && img.height == out_h {
        return img.clone();
    }
    let round8 = |x: f32| x.round().clamp(0.0, 255.0);
    let cx = coefficients(img.width, out_w, method);
    let mut tmp = vec![0f32; img.height * out_w * 3];
    for y in 0..img.height {
        for (x, (lo, w)) in cx.iter().enumerate() {
            for c in 0..3 {
                let mut acc = 0.0;
                for (k, wk) in w.iter().enumerate() {
                    acc += wk * img.data[(y * img.width + lo + k) * 3 + c];
                }
                tmp[(y * out_w + x) * 3 + c] = round8(acc);
            }
        }
    }
    let cy = coefficients(img.height, out_h, method);
    let mut out = vec![0f32; out_h * out_w * 3];
    for (y, (lo, w)) in cy.iter().enumerate() {
        for x in 0..out_w {
            for c in 0..3 {
                let mut acc = 0.0;
                for (k, wk) in w.iter().enumerate() {
                    acc += wk * tmp[((lo + k) * out_w + x) * 3 + c];
                }
                out[(y * out_w + x) * 3 + c] = round8(acc);
            }
        }
    }
    Rgb {
        width: out_w,
        height: out_h,
        data: out,
    }
}

/// Resizes one float plane (HW, row-major) like PIL's mode "F": the same separable filters as
/// [`resize`], horizontal pass first, without rounding to 8 bits. Used to bring a decoded 64×64
/// segmentation map to its box size.
pub fn resize_plane(
    data: &[f32],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    method: ResizeMethod,
) -> Vec<f32> {
    let cx = coefficients(width, out_w, method);
    let mut tmp = vec![0f32; height * out_w];
    for y in 0..height {
        for (x, (lo, w)) in cx.iter().enumerate() {
            tmp[y * out_w + x] = w
                .iter()
                .enumerate()
                .map(|(k, wk)| wk * data[y * width + lo + k])
                .sum();
        }
    }
    let cy = coefficients(height, out_h, method);
    let mut out = vec![0f32; out_h * out_w];
    for (y, (lo, w)) in cy.iter().enumerate() {
        for x in 0..out_w {
            out[y * out_w + x] = w
                .iter()
                .enumerate()
                .map(|(k, wk)| wk * tmp[(lo + k) * out_w + x])
                .sum();
        }
    }
    out
}

/// CHW f32 in [−1, 1]: `(x/255 − 0.5)/0.5` (equals big_vision's `value_range(-1, 1)`).
pub fn to_pixel_values(img: &Rgb) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let mut out = vec![0f32; 3 * w * h];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                out[c * w * h + y * w + x] = (img.data[(y * w + x) * 3 + c] / 255.0 - 0.5) / 0.5;
            }
        }
    }
    out
}

/// Decode → resize to `res × res` → [−1, 1] CHW.
pub fn preprocess(img: &Rgb, res: usize, method: ResizeMethod) -> Vec<f32> {
    to_pixel_values(&resize(img, res, res, method))
}
