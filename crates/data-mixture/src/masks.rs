//! Binary masks for the segmentation tokens: synthetic masks to train the VQ-VAE on, the crop to
//! the box and resize to 64×64 that big_vision's `refcoco_mask2str` applies, and PNG IO.

use std::path::Path;

use crate::error::{Error, Result};
use crate::image::{resize, ResizeMethod, Rgb};
use crate::rng::Rng;
use crate::synth::Scene;

/// Turns a 64×64 mask crop (values in [0, 1]) into its 16 `<seg>` codes: the VQ-VAE encoder
/// (implemented where a Burn backend is at hand, `pali_trainer::vqvae::VqVaeEncoder`).
pub trait MaskEncoder: Send + Sync {
    fn encode(&self, crop64: &[f32]) -> Result<[u32; 16]>;
}

impl std::fmt::Debug for dyn MaskEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskEncoder")
    }
}

/// A binary mask, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryMask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<bool>,
}

impl BinaryMask {
    pub fn area(&self) -> usize {
        self.data.iter().filter(|x| **x).count()
    }

    /// Tight box `[y_min, x_min, y_max, x_max]` in [0, 1] (pixel edges), `None` when empty.
    pub fn bbox(&self) -> Option<[f32; 4]> {
        let (mut y0, mut x0, mut y1, mut x1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..self.height {
            for x in 0..self.width {
                if self.data[y * self.width + x] {
                    (y0, x0, y1, x1) = (y0.min(y), x0.min(x), y1.max(y + 1), x1.max(x + 1));
                }
            }
        }
        (y0 != usize::MAX).then(|| {
            let (h, w) = (self.height as f32, self.width as f32);
            [y0 as f32 / h, x0 as f32 / w, y1 as f32 / h, x1 as f32 / w]
        })
    }

    /// The box's pixels (`round(coord·size)`, as big_vision) resized to 64×64 with antialiased
    /// bilinear filtering, in [0, 1]: the VQ-VAE's input.
    pub fn crop64(&self, bbox: [f32; 4]) -> Result<Vec<f32>> {
        let (h, w) = (self.height as f32, self.width as f32);
        let y1 = (h * bbox[0]).round().clamp(0.0, h) as usize;
        let x1 = (w * bbox[1]).round().clamp(0.0, w) as usize;
        let y2 = (h * bbox[2]).round().clamp(0.0, h) as usize;
        let x2 = (w * bbox[3]).round().clamp(0.0, w) as usize;
        if y2 <= y1 || x2 <= x1 {
            return Err(Error::Invalid(format!(
                "mask box {bbox:?} covers no pixel of a {}x{} mask",
                self.width, self.height
            )));
        }
        let (cw, ch) = (x2 - x1, y2 - y1);
        let mut data = Vec::with_capacity(cw * ch * 3);
        for y in y1..y2 {
            for x in x1..x2 {
                let v = if self.data[y * self.width + x] {
                    255.0
                } else {
                    0.0
                };
                data.extend([v, v, v]);
            }
        }
        let crop = Rgb {
            width: cw,
            height: ch,
            data,
        };
        let r = resize(&crop, 64, 64, ResizeMethod::Bilinear);
        Ok(r.data.chunks(3).map(|p| p[0] / 255.0).collect())
    }

    /// Reads a PNG/JPEG/… mask: pixels brighter than mid-grey are inside.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |e: String| Error::Invalid(format!("{}: cannot read mask: {e}", path.display()));
        // The header's size first: a small file can claim billions of pixels.
        let (w, h) = ::image::image_dimensions(path).map_err(|e| bad(e.to_string()))?;
        let (mp, limit) = (w as f64 * h as f64 / 1e6, crate::image::max_megapixels());
        if mp > limit {
            return Err(bad(format!(
                "{w}×{h} is {mp:.0} megapixels, over the limit of {limit} (set \
                 PALI_MAX_MEGAPIXELS to raise it)"
            )));
        }
        let img = ::image::open(path)
            .map_err(|e| bad(e.to_string()))?
            .to_luma8();
        Ok(Self {
            width: img.width() as usize,
            height: img.height() as usize,
            data: img.as_raw().iter().map(|v| *v > 127).collect(),
        })
    }

    /// Writes the mask as an 8-bit grey PNG (255 inside).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self.data.iter().map(|b| if *b { 255 } else { 0 }).collect();
        ::image::save_buffer(
            path,
            &bytes,
            self.width as u32,
            self.height as u32,
            ::image::ExtendedColorType::L8,
        )
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }
}

/// Whether (x, y) in [0, 1]² is inside a random shape: ellipse, rotated rectangle or triangle.
fn random_shape(rng: &mut Rng) -> impl Fn(f32, f32) -> bool {
    let kind = rng.below(3);
    let (cx, cy) = (rng.range(0.2, 0.8), rng.range(0.2, 0.8));
    let (a, b) = (rng.range(0.08, 0.4), rng.range(0.08, 0.4));
    let t = rng.range(0.0, std::f32::consts::PI);
    let tri: Vec<(f32, f32)> = (0..3)
        .map(|_| (rng.range(0.0, 1.0), rng.range(0.0, 1.0)))
        .collect();
    move |x: f32, y: f32| {
        let (dx, dy) = (x - cx, y - cy);
        let (u, v) = (dx * t.cos() + dy * t.sin(), -dx * t.sin() + dy * t.cos());
        match kind {
            0 => (u / a).powi(2) + (v / b).powi(2) <= 1.0,
            1 => u.abs() <= a && v.abs() <= b,
            _ => {
                let s = |p: (f32, f32), q: (f32, f32)| {
                    (q.0 - p.0) * (y - p.1) - (q.1 - p.1) * (x - p.0)
                };
                let (d0, d1, d2) = (s(tri[0], tri[1]), s(tri[1], tri[2]), s(tri[2], tri[0]));
                (d0 >= 0.0 && d1 >= 0.0 && d2 >= 0.0) || (d0 <= 0.0 && d1 <= 0.0 && d2 <= 0.0)
            }
        }
    }
}

/// Synthetic mask number `index` of a stream: even indices are objects of the synthetic shapes
/// world (what the `segment` task needs), odd ones unions of random ellipses, rectangles and
/// triangles, sometimes with a bite taken out (occlusion). Never empty.
pub fn synthetic_mask(seed: u64, index: u64) -> BinaryMask {
    let mut rng = Rng::derive(seed, &[index, 0x5E6]);
    let size = 32 + rng.below(97); // 32..128 px
    if index.is_multiple_of(2) {
        let scene = Scene::generate(seed, 3 + rng.below(1 << 20) as u64, index);
        let i = rng.below(scene.shapes.len());
        let data = scene.mask(i, size);
        if data.iter().any(|x| *x) {
            return BinaryMask {
                width: size,
                height: size,
                data,
            };
        }
    }
    loop {
        let n = 1 + rng.below(3);
        let shapes: Vec<_> = (0..n).map(|_| random_shape(&mut rng)).collect();
        let cut = (rng.below(5) == 0).then(|| random_shape(&mut rng));
        let mut data = vec![false; size * size];
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (
                    (x as f32 + 0.5) / size as f32,
                    (y as f32 + 0.5) / size as f32,
                );
                data[y * size + x] =
                    shapes.iter().any(|s| s(fx, fy)) && !cut.as_ref().is_some_and(|c| c(fx, fy));
            }
        }
        if data.iter().filter(|x| **x).count() >= 4 {
            return BinaryMask {
                width: size,
                height: size,
                data,
            };
        }
    }
}

/// A COCO `segmentation` field as a mask of `height × width`: polygons (`[[x, y, x, y, …], …]`,
/// pixel coordinates, filled with the even-odd rule at pixel centres) or RLE
/// (`{"size": [h, w], "counts": [..] | "…"}`).
pub fn from_coco_segmentation(
    seg: &serde_json::Value,
    height: usize,
    width: usize,
) -> std::result::Result<BinaryMask, String> {
    if let Some(polys) = seg.as_array() {
        let mut data = vec![false; height * width];
        for poly in polys {
            let pts: Vec<f64> = poly
                .as_array()
                .ok_or("a polygon is not a list of numbers")?
                .iter()
                .map(|v| v.as_f64().ok_or("a polygon coordinate is not a number"))
                .collect::<std::result::Result<_, _>>()?;
            if pts.len() < 6 || !pts.len().is_multiple_of(2) {
                return Err(format!("a polygon has {} coordinates", pts.len()));
            }
            let n = pts.len() / 2;
            for y in 0..height {
                let cy = y as f64 + 0.5;
                // x positions where the polygon's edges cross this row's centre line.
                let mut xs: Vec<f64> = (0..n)
                    .filter_map(|i| {
                        let (x0, y0) = (pts[2 * i], pts[2 * i + 1]);
                        let (x1, y1) = (pts[2 * ((i + 1) % n)], pts[2 * ((i + 1) % n) + 1]);
                        ((y0 <= cy) != (y1 <= cy)).then(|| x0 + (cy - y0) * (x1 - x0) / (y1 - y0))
                    })
                    .collect();
                xs.sort_by(|a, b| a.total_cmp(b));
                for pair in xs.chunks_exact(2) {
                    let lo = (pair[0] - 0.5).ceil().max(0.0) as usize;
                    let hi = ((pair[1] - 0.5).floor() + 1.0).clamp(0.0, width as f64) as usize;
                    for x in lo..hi.max(lo) {
                        data[y * width + x] ^= true;
                    }
                }
            }
        }
        return Ok(BinaryMask {
            width,
            height,
            data,
        });
    }
    let counts: RleCounts = serde_json::from_value(seg["counts"].clone())
        .map_err(|_| "segmentation is neither polygons nor RLE with `counts`".to_string())?;
    Ok(BinaryMask {
        width,
        height,
        data: rle_decode(height, width, &counts)?,
    })
}

/// Decodes COCO RLE (run lengths over the column-major pixels, starting with a run of 0s, as a
/// list or pycocotools' compressed string) into row-major pixels.
pub fn rle_decode(
    height: usize,
    width: usize,
    counts: &RleCounts,
) -> std::result::Result<Vec<bool>, String> {
    let runs = match counts {
        RleCounts::List(v) => v.clone(),
        RleCounts::Compressed(s) => rle_from_string(s)?,
    };
    let n = height * width;
    let mut col_major = vec![false; n];
    let mut pos = 0usize;
    for (i, r) in runs.iter().enumerate() {
        let r = usize::try_from(*r).map_err(|_| format!("negative run length {r}"))?;
        if pos + r > n {
            return Err(format!(
                "runs cover more than the {height}x{width} = {n} pixels of the mask"
            ));
        }
        if i % 2 == 1 {
            col_major[pos..pos + r].iter_mut().for_each(|x| *x = true);
        }
        pos += r;
    }
    if pos != n {
        return Err(format!(
            "runs cover {pos} of the {height}x{width} = {n} pixels of the mask"
        ));
    }
    let mut data = vec![false; n];
    for x in 0..width {
        for y in 0..height {
            data[y * width + x] = col_major[x * height + y];
        }
    }
    Ok(data)
}

/// Compressed COCO RLE of row-major pixels (column-major runs, starting with 0s).
pub fn rle_encode(height: usize, width: usize, data: &[bool]) -> String {
    let mut runs = Vec::new();
    let (mut cur, mut len) = (false, 0i64);
    for x in 0..width {
        for y in 0..height {
            if data[y * width + x] != cur {
                runs.push(len);
                cur = !cur;
                len = 0;
            }
            len += 1;
        }
    }
    runs.push(len);
    rle_to_string(&runs)
}

impl BinaryMask {
    /// Compressed COCO RLE counts of this mask.
    pub fn to_rle_string(&self) -> String {
        rle_encode(self.height, self.width, &self.data)
    }
}

/// RLE counts as they appear in COCO JSON.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum RleCounts {
    List(Vec<i64>),
    Compressed(String),
}

/// pycocotools' `rleFrString`: 5-bit groups with a continuation bit, offset by 48; from the
/// third count on, each is stored as a difference to the count two before.
pub fn rle_from_string(s: &str) -> std::result::Result<Vec<i64>, String> {
    let b = s.as_bytes();
    let mut counts: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < b.len() {
        let (mut x, mut k, mut more) = (0i64, 0u32, true);
        while more {
            let Some(&ch) = b.get(p) else {
                return Err("compressed RLE string ends in the middle of a number".into());
            };
            if !(48..48 + 64).contains(&ch) {
                return Err(format!(
                    "invalid character {:?} in compressed RLE",
                    ch as char
                ));
            }
            let c = (ch - 48) as i64;
            x |= (c & 0x1f) << (5 * k);
            more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more && c & 0x10 != 0 {
                x |= -1i64 << (5 * k);
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2];
        }
        counts.push(x);
    }
    Ok(counts)
}

/// pycocotools' `rleToString`.
pub fn rle_to_string(counts: &[i64]) -> String {
    let mut s = String::new();
    for i in 0..counts.len() {
        let mut x = counts[i];
        if i > 2 {
            x -= counts[i - 2];
        }
        let mut more = true;
        while more {
            let mut c = x & 0x1f;
            x >>= 5;
            more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            s.push((c as u8 + 48) as char);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_masks_are_deterministic_varied_and_crop_to_their_box() {
        assert_eq!(synthetic_mask(1, 5), synthetic_mask(1, 5));
        assert_ne!(synthetic_mask(1, 5), synthetic_mask(1, 7));
        for i in 0..20 {
            let m = synthetic_mask(3, i);
            let b = m.bbox().unwrap();
            let c = m.crop64(b).unwrap();
            assert_eq!(c.len(), 64 * 64);
            // Cropped to its own box, the mask touches every border of the crop.
            let inside = |x: usize, y: usize| c[y * 64 + x] > 0.0;
            assert!(
                (0..64).any(|x| inside(x, 0)) && (0..64).any(|x| inside(x, 63)),
                "mask {i}"
            );
            assert!(
                (0..64).any(|y| inside(0, y)) && (0..64).any(|y| inside(63, y)),
                "mask {i}"
            );
        }
        let empty = BinaryMask {
            width: 4,
            height: 4,
            data: vec![false; 16],
        };
        assert!(empty.bbox().is_none());
        assert!(empty.crop64([0.5, 0.5, 0.5, 0.9]).is_err());
    }
}
