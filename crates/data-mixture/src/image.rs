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
    if w == 0 || h == 0 {
        return Err(bad(format!("{w}×{h} pixels: an image has none")));
    }
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
    Rgb {
        width: out_w,
        height: out_h,
        data: resize_hwc(
            &img.data,
            img.width,
            img.height,
            out_w,
            out_h,
            method,
            <[f32]>::to_vec,
        ),
    }
}

/// `x.round().clamp(0.0, 255.0)`, bit for bit (−0.0 included), in operations that vectorise
/// (`round` is a libm call on baseline x86-64, and was half the resize's time): for x ≥ 0.5,
/// x + 0.5 is exact or rounds without crossing an integer (0.5 is a multiple of x's ulp), so
/// truncation gives round-half-away; below 0.5 the clamped result is ±0.
fn round8(x: f32) -> f32 {
    let up = ((x + 0.5) as i32 as f32).min(255.0);
    let zero = if x.is_sign_negative() && x > -0.5 {
        -0.0
    } else {
        0.0
    };
    if x >= 0.5 {
        up
    } else {
        zero
    }
}

/// The separable resize of HWC RGB samples, values rounded to [0, 255] after each pass. Each
/// output sums its taps in ascending order from 0.0, as PIL's loop does, so the result does
/// not depend on how the loops are arranged: the horizontal pass keeps a pixel's three
/// channels in one 4-lane accumulator and four output pixels in flight (independent sums
/// instead of one dependency chain), the vertical pass sums whole rows held in registers 16
/// at a time. Buffers are per thread: fresh multi-megabyte allocations are fresh pages, whose
/// faults cost more than the arithmetic.
fn resize_hwc<T: Copy + Into<f32>, R>(
    data: &[T],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    method: ResizeMethod,
    finish: impl FnOnce(&[f32]) -> R,
) -> R {
    if width == 0 || height == 0 || out_w == 0 || out_h == 0 {
        return finish(&vec![0.0; out_w * out_h * 3]);
    }
    let cx = coefficients(width, out_w, method);
    let cy = coefficients(height, out_h, method);
    let (row_in, row_out) = (width * 3, out_w * 3);
    SCRATCH.with_borrow_mut(|bufs| {
        let [line, mid, out] = bufs;
        // One input row as f32, one spare lane at the end for the last pixel's 4-lane load.
        line.resize(row_in + 1, 0.0);
        mid.resize(height * row_out, 0.0);
        for (src, dst) in data.chunks_exact(row_in).zip(mid.chunks_exact_mut(row_out)) {
            for (l, v) in line.iter_mut().zip(src) {
                *l = (*v).into();
            }
            horizontal(line, &cx, dst);
        }
        out.resize(out_h * row_out, 0.0);
        for ((lo, w), d) in cy.iter().zip(out.chunks_exact_mut(row_out)) {
            let rows = &mid[lo * row_out..];
            let mut blocks = d.chunks_exact_mut(16);
            let mut at = 0;
            for b in &mut blocks {
                let mut acc = [0f32; 16];
                for (k, wk) in w.iter().enumerate() {
                    let s: &[f32; 16] = rows[k * row_out + at..][..16].try_into().expect("16");
                    for (a, x) in acc.iter_mut().zip(s) {
                        *a += wk * x;
                    }
                }
                for (o, a) in b.iter_mut().zip(acc) {
                    *o = round8(a);
                }
                at += 16;
            }
            for (j, o) in blocks.into_remainder().iter_mut().enumerate() {
                let mut a = 0f32;
                for (k, wk) in w.iter().enumerate() {
                    a += wk * rows[k * row_out + at + j];
                }
                *o = round8(a);
            }
        }
        let r = finish(out);
        // A window of a large image can need 100 MB here: give such buffers back.
        for b in bufs.iter_mut().filter(|b| b.capacity() > 1 << 22) {
            *b = Vec::new();
        }
        r
    })
}

/// One row's horizontal pass: `line` is the row's samples (RGB RGB …) plus one spare value,
/// `dst` gets `coeffs.len()` rounded RGB pixels.
fn horizontal(line: &[f32], coeffs: &[(usize, Vec<f32>)], dst: &mut [f32]) {
    let mut groups = coeffs.chunks_exact(4);
    let mut x = 0;
    for g in &mut groups {
        let acc = group4(line, g.try_into().expect("4 outputs"));
        for (j, a) in acc.iter().enumerate() {
            for c in 0..3 {
                dst[(x + j) * 3 + c] = round8(a[c]);
            }
        }
        x += 4;
    }
    for (j, (lo, w)) in groups.remainder().iter().enumerate() {
        let mut a = [0f32; 4];
        for (k, wk) in w.iter().enumerate() {
            let p = &line[(lo + k) * 3..][..4];
            for l in 0..4 {
                a[l] += wk * p[l];
            }
        }
        for c in 0..3 {
            dst[(x + j) * 3 + c] = round8(a[c]);
        }
    }
}

/// The sums of four output pixels (RGB and a spare lane each), tap by tap in ascending order.
fn group4(line: &[f32], g: &[(usize, Vec<f32>); 4]) -> [[f32; 4]; 4] {
    let taps = g.iter().map(|(_, w)| w.len()).max().unwrap_or(0);
    let mut acc = [[0f32; 4]; 4];
    for k in 0..taps {
        for (a, (lo, w)) in acc.iter_mut().zip(g) {
            if let Some(wk) = w.get(k) {
                let p = &line[(lo + k) * 3..][..4];
                for l in 0..4 {
                    a[l] += wk * p[l];
                }
            }
        }
    }
    acc
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
    chw(&img.data)
}

/// HWC RGB values in [0, 255] → CHW in [−1, 1].
fn chw(data: &[f32]) -> Vec<f32> {
    let n = data.len() / 3;
    let mut out = vec![0f32; 3 * n];
    let (r, gb) = out.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for (i, px) in data.chunks_exact(3).enumerate() {
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
    resize_hwc(&img.data, img.width, img.height, res, res, method, chw)
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
        let random =
            (0..200_000).map(|i| r.range(-600.0, 600.0) / if i % 2 == 0 { 1.0 } else { 300.0 });
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
            (61, 45, 33, 37),
            (1, 9, 37, 5),
            (130, 1, 1, 3),
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
                let got8: Vec<u32> = resize_hwc(&img8.data, w, h, ow, oh, m, <[f32]>::to_vec)
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
