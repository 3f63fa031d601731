//! Binary masks for the segmentation tokens: synthetic masks to train the VQ-VAE on, the crop to
//! the box and resize to 64×64 that big_vision's `refcoco_mask2str` applies, and PNG IO.

use std::path::Path;

use crate::error::{Error, Result};
use crate::image::{resize, ResizeMethod, Rgb};
use crate::rng::Rng;
use crate::synth::Scene;

/// Turns a 64×64 mask crop (values in [0, 1]) into its 16 `<seg>` codes: the VQ-VAE encoder
/// (implemented where a Burn backend is at hand, `pali_eval::segmentation::VqVaeEncoder`).
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
        let img = ::image::open(path)
            .map_err(|e| Error::Invalid(format!("{}: cannot read mask: {e}", path.display())))?
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
