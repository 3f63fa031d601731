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
/// pixel coordinates) rasterised as pycocotools does (`frPyObjects` + `merge` + `decode`: each
/// polygon by [`polygon_rle`], the object's polygons united), or RLE
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
            // The rasteriser walks the outline point by point: a coordinate far outside the
            // image (garbage, or another image's) would make that walk billions of points long.
            // Allowed: up to the image's longer side beyond any border.
            let side = width.max(height).max(1) as f64;
            for (i, v) in pts.iter().enumerate() {
                let (name, size) = if i % 2 == 0 {
                    ("x", width)
                } else {
                    ("y", height)
                };
                if !(-side..=size as f64 + side).contains(v) {
                    return Err(format!(
                        "polygon coordinate {name} = {v} lies far outside the {width}x{height} image"
                    ));
                }
            }
            let runs: Vec<i64> = polygon_rle(&pts, height, width)?
                .into_iter()
                .map(i64::from)
                .collect();
            let one = rle_decode(height, width, &RleCounts::List(runs))?;
            for (d, p) in data.iter_mut().zip(one) {
                *d |= p; // pycocotools' `merge`: the union
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

/// C's `(int)` of a double as x86-64 computes it: truncation, and INT_MIN for NaN or a value out
/// of range (a repeated vertex makes pycocotools divide 0 by 0).
fn c_int(x: f64) -> i64 {
    if x.is_nan() || x >= 2147483648.0 || x <= -2147483649.0 {
        i64::from(i32::MIN)
    } else {
        x as i64
    }
}

/// pycocotools' `rleFrPoly` (common/maskApi.c), step for step: the outline is drawn on a grid 5×
/// finer than the pixels, each crossing of a pixel-centre column becomes the first pixel of a
/// run in that column, and the sorted boundaries become COCO RLE counts (column-major, starting
/// with a run of 0s). This is its own rule, not the even-odd fill at pixel centres: borders and
/// thin parts differ.
///
/// The outline is walked point by point; one of more than [`MAX_OUTLINE_POINTS`] (a polygon of
/// thousands of long zig-zag edges) is refused before anything is allocated.
pub fn polygon_rle(xy: &[f64], h: usize, w: usize) -> std::result::Result<Vec<u32>, String> {
    const SCALE: f64 = 5.0;
    let k = xy.len() / 2;
    let up = |i: usize| c_int(SCALE * xy[i] + 0.5);
    let mut x: Vec<i64> = (0..k).map(|j| up(2 * j)).collect();
    let mut y: Vec<i64> = (0..k).map(|j| up(2 * j + 1)).collect();
    x.push(x[0]);
    y.push(y[0]);
    let points: i64 = (0..k)
        .map(|j| (x[j] - x[j + 1]).abs().max((y[j] - y[j + 1]).abs()) + 1)
        .sum();
    if points > MAX_OUTLINE_POINTS {
        return Err(format!(
            "a polygon's outline has {points} points on pycocotools' 5x grid (at most \
             {MAX_OUTLINE_POINTS})"
        ));
    }
    // Every point of the upsampled outline.
    let (mut u, mut v) = (Vec::new(), Vec::new());
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let (dx, dy) = ((xe - xs).abs(), (ys - ye).abs());
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        if dx >= dy {
            let s = (ye - ys) as f64 / dx as f64;
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                u.push(t + xs);
                v.push(c_int(ys as f64 + s * t as f64 + 0.5));
            }
        } else {
            let s = (xe - xs) as f64 / dy as f64;
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push(t + ys);
                u.push(c_int(xs as f64 + s * t as f64 + 0.5));
            }
        }
    }
    // Where the outline crosses a pixel-centre column: (column, first row inside).
    let mut bounds: Vec<u32> = Vec::new();
    for j in 1..u.len() {
        if u[j] == u[j - 1] {
            continue;
        }
        let xd = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 } as f64;
        let xd = (xd + 0.5) / SCALE - 0.5;
        if xd.floor() != xd || xd < 0.0 || xd > w as f64 - 1.0 {
            continue;
        }
        let yd = (v[j].min(v[j - 1]) as f64 + 0.5) / SCALE - 0.5;
        let yd = yd.clamp(0.0, h as f64).ceil();
        bounds.push((xd as i64 * h as i64 + yd as i64) as u32);
    }
    bounds.push((h * w) as u32);
    bounds.sort_unstable();
    let mut prev = 0u32;
    for b in bounds.iter_mut() {
        let t = *b;
        *b = b.wrapping_sub(prev);
        prev = t;
    }
    // Zero-length runs merge their neighbours, as the C code does.
    let mut counts = vec![bounds[0]];
    let mut j = 1;
    while j < bounds.len() {
        if bounds[j] > 0 {
            counts.push(bounds[j]);
            j += 1;
        } else {
            j += 1;
            if j < bounds.len() {
                *counts.last_mut().expect("one count") += bounds[j];
                j += 1;
            }
        }
    }
    Ok(counts)
}

/// 16 bytes a point: 256 MiB of outline at most.
pub const MAX_OUTLINE_POINTS: i64 = 16 << 20;

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

    /// Polygons → masks equal pycocotools' `decode(merge(frPyObjects(polygons, h, w)))` pixel for
    /// pixel (tests/fixtures/masks/polygons.json, made by scripts/mask_reference.py): overlapping
    /// polygons of one object, concave and self-intersecting outlines, image borders, half-pixel
    /// vertices, repeated vertices, slivers, and 120 random objects.
    #[test]
    fn polygons_rasterise_as_pycocotools() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/masks/polygons.json"
        );
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = r["cases"].as_array().unwrap();
        assert!(cases.len() > 100);
        for c in cases {
            let (h, w) = (
                c["height"].as_u64().unwrap() as usize,
                c["width"].as_u64().unwrap() as usize,
            );
            let name = c["name"].as_str().unwrap();
            let counts = RleCounts::Compressed(c["counts"].as_str().unwrap().to_string());
            let want = rle_decode(h, w, &counts).unwrap();
            let got = from_coco_segmentation(&c["polygons"], h, w).unwrap();
            assert_eq!(
                got.area(),
                c["area"].as_u64().unwrap() as usize,
                "{name}: area"
            );
            let wrong: Vec<(usize, usize)> = (0..h * w)
                .filter(|&i| got.data[i] != want[i])
                .map(|i| (i % w, i / w))
                .collect();
            assert!(wrong.is_empty(), "{name}: pixels (x, y) differ: {wrong:?}");
        }
        // A thousand-vertex zig-zag across a large image.
        let zig: Vec<f64> = (0..1000)
            .flat_map(|i| [if i % 2 == 0 { 0.0 } else { 3999.0 }, i as f64 * 4.0])
            .collect();
        let e = from_coco_segmentation(&serde_json::json!([zig]), 4000, 4000).unwrap_err();
        assert!(e.contains("outline has") && e.contains("points"), "{e}");
        let far = serde_json::json!([[0.0, 0.0, 5.0, 0.0, 1e12, 5.0]]);
        let e = from_coco_segmentation(&far, 10, 10).unwrap_err();
        assert!(
            e.contains("x = 1000000000000 lies far outside the 10x10 image"),
            "{e}"
        );
    }
}
