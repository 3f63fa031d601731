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

/// An RGB image as bytes, HWC: what a decoder gives, resized without a float copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes JPEG/PNG/WebP/GIF/BMP (first frame), applies the EXIF orientation, converts
/// gray/alpha/CMYK to RGB.
pub fn decode(bytes: &[u8], what: &Path) -> Result<Rgb> {
    let im = decode8(bytes, what)?;
    Ok(Rgb::from_u8(im.width, im.height, &im.data))
}

/// [`decode`] to bytes.
pub fn decode8(bytes: &[u8], what: &Path) -> Result<Rgb8> {
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
    let rgb = img.into_rgb8();
    Ok(Rgb8 {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    })
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
    decode(&read(path)?, path)
}

/// [`load`] to bytes.
pub fn load8(path: &Path) -> Result<Rgb8> {
    decode8(&read(path)?, path)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
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
    let planes = resize_planes(&img.data, img.width, img.height, out_w, out_h, method);
    interleave(&planes, out_w, out_h)
}

/// [`resize`] from bytes (the same values: every byte is exact in f32).
pub fn resize8(img: &Rgb8, out_w: usize, out_h: usize, method: ResizeMethod) -> Rgb {
    if img.width == out_w && img.height == out_h {
        return Rgb::from_u8(img.width, img.height, &img.data);
    }
    let planes = resize_planes(&img.data, img.width, img.height, out_w, out_h, method);
    interleave(&planes, out_w, out_h)
}

fn interleave(planes: &[f32], w: usize, h: usize) -> Rgb {
    let n = w * h;
    let mut data = Vec::with_capacity(3 * n);
    for i in 0..n {
        data.extend([planes[i], planes[n + i], planes[2 * n + i]]);
    }
    Rgb {
        width: w,
        height: h,
        data,
    }
}

/// `x.round().clamp(0.0, 255.0)`, bit for bit (−0.0 included), without `round`'s libm call
/// (baseline x86-64 has no rounding instruction): |x| + 0.5 is exact in f64 and the
/// conversion truncates, for every |x| < 2³¹ (a resize's sums stay within ±2000).
fn round8(x: f32) -> f32 {
    let r = (f64::from(x.abs()) + 0.5) as i32 as f32;
    r.copysign(x).clamp(0.0, 255.0)
}

/// The separable resize of HWC RGB samples into three planes (CHW), values rounded to
/// [0, 255] after each pass. Each output sums its taps in ascending order from 0.0, as PIL's
/// loop does, so the result does not depend on the loop order; the loops run over whole
/// columns (horizontal pass, on a transposed copy) and whole rows (vertical pass), which the
/// compiler vectorises.
fn resize_planes<T: Copy + Into<f32>>(
    data: &[T],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    method: ResizeMethod,
) -> Vec<f32> {
    // Each output row d = round8(Σ_k w_k · src row lo + k), rows `len` long, summed in
    // blocks of 16 held in registers.
    let pass = |src: &[f32], dst: &mut [f32], coeffs: &[(usize, Vec<f32>)], len: usize| {
        for ((lo, w), d) in coeffs.iter().zip(dst.chunks_exact_mut(len)) {
            let rows = &src[lo * len..];
            let mut blocks = d.chunks_exact_mut(16);
            let mut at = 0;
            for b in &mut blocks {
                let mut acc = [0f32; 16];
                for (k, wk) in w.iter().enumerate() {
                    let s: &[f32; 16] = rows[k * len + at..][..16].try_into().expect("16");
                    for (a, x) in acc.iter_mut().zip(s) {
                        *a += wk * x;
                    }
                }
                for (o, a) in b.iter_mut().zip(acc) {
                    *o = round8(a);
                }
                at += 16;
            }
            let tail = blocks.into_remainder();
            for (j, o) in tail.iter_mut().enumerate() {
                let mut a = 0f32;
                for (k, wk) in w.iter().enumerate() {
                    a += wk * rows[k * len + at + j];
                }
                *o = round8(a);
            }
        }
    };
    // The input as planes of columns t[c][x][y], the horizontal pass's columns, and its
    // rows r[c][y][x], in buffers each thread keeps: fresh multi-megabyte allocations are
    // fresh pages, and their page faults cost more than the arithmetic.
    let (n_in, n_mid, n_out) = (width * height, out_w * height, out_w * out_h);
    SCRATCH.with_borrow_mut(|[t, mid, r]| {
        t.resize(3 * n_in, 0.0);
        for y0 in (0..height).step_by(16) {
            for x in 0..width {
                for y in y0..(y0 + 16).min(height) {
                    let p = &data[(y * width + x) * 3..][..3];
                    for (c, v) in p.iter().enumerate() {
                        t[c * n_in + x * height + y] = (*v).into();
                    }
                }
            }
        }
        let cx = coefficients(width, out_w, method);
        mid.resize(3 * n_mid, 0.0);
        for c in 0..3 {
            pass(
                &t[c * n_in..][..n_in],
                &mut mid[c * n_mid..][..n_mid],
                &cx,
                height,
            );
        }
        r.resize(3 * n_mid, 0.0);
        for c in 0..3 {
            let (m, rc) = (&mid[c * n_mid..][..n_mid], &mut r[c * n_mid..][..n_mid]);
            for y0 in (0..height).step_by(16) {
                for x in 0..out_w {
                    for y in y0..(y0 + 16).min(height) {
                        rc[y * out_w + x] = m[x * height + y];
                    }
                }
            }
        }
        let cy = coefficients(height, out_h, method);
        let mut out = vec![0f32; 3 * n_out];
        for c in 0..3 {
            pass(
                &r[c * n_mid..][..n_mid],
                &mut out[c * n_out..][..n_out],
                &cy,
                out_w,
            );
        }
        out
    })
}

thread_local! {
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = Default::default();
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
    let n = img.width * img.height;
    let mut out = vec![0f32; 3 * n];
    let (r, gb) = out.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        r[i] = normalise(px[0]);
        g[i] = normalise(px[1]);
        b[i] = normalise(px[2]);
    }
    out
}

/// Decode → resize to `res × res` → [−1, 1] CHW.
pub fn preprocess(img: &Rgb, res: usize, method: ResizeMethod) -> Vec<f32> {
    to_pixel_values(&resize(img, res, res, method))
}

/// [`preprocess`] from bytes: the loader's path from an image file.
pub fn preprocess8(img: &Rgb8, res: usize, method: ResizeMethod) -> Vec<f32> {
    if img.width == res && img.height == res {
        return to_pixel_values(&Rgb::from_u8(res, res, &img.data));
    }
    let mut planes = resize_planes(&img.data, img.width, img.height, res, res, method);
    planes.iter_mut().for_each(|x| *x = normalise(*x));
    planes
}

/// One value of [0, 255] in [−1, 1].
fn normalise(x: f32) -> f32 {
    (x / 255.0 - 0.5) / 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resize as first written: one output element at a time, strided reads.
    fn reference(img: &Rgb, out_w: usize, out_h: usize, method: ResizeMethod) -> Vec<f32> {
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
        out
    }

    #[test]
    fn round8_is_round_then_clamp() {
        let mut r = crate::rng::Rng::new(1);
        let edges = [
            0.5f32,
            0.49999997,
            -0.49999997,
            -0.5,
            -0.0,
            0.0,
            254.5,
            255.49,
            1e9,
            -3.7,
        ];
        let random = (0..100_000).map(|_| r.range(-600.0, 600.0));
        for x in edges.into_iter().chain(random) {
            let want = x.round().clamp(0.0, 255.0);
            assert_eq!(round8(x).to_bits(), want.to_bits(), "{x}");
        }
    }

    #[test]
    fn fast_resize_is_bit_identical_to_the_reference() {
        let mut r = crate::rng::Rng::new(4);
        for (w, h, ow, oh) in [
            (97, 61, 32, 40),
            (480, 480, 224, 224),
            (20, 30, 64, 48),
            (50, 70, 24, 24),
        ] {
            let bytes: Vec<u8> = (0..w * h * 3).map(|_| r.below(256) as u8).collect();
            let (img8, img) = (
                Rgb8 {
                    width: w,
                    height: h,
                    data: bytes.clone(),
                },
                Rgb::from_u8(w, h, &bytes),
            );
            for m in [
                ResizeMethod::Bicubic,
                ResizeMethod::Bilinear,
                ResizeMethod::BilinearNoAntialias,
            ] {
                let want: Vec<u32> = reference(&img, ow, oh, m)
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let got: Vec<u32> = resize(&img, ow, oh, m)
                    .data
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let got8: Vec<u32> = resize8(&img8, ow, oh, m)
                    .data
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert!(want == got && want == got8, "{w}x{h} → {ow}x{oh} {m:?}");
                if ow == oh {
                    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(preprocess8(&img8, ow, m)),
                        bits(preprocess(&img, ow, m))
                    );
                }
            }
        }
    }
}
