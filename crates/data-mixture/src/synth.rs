//! The built-in "shapes" world: deterministic images of coloured shapes and a short rendered
//! text, with ground truth for every task (caption, VQA, detection, OCR, grounded captioning,
//! counting, segmentation masks), at any resolution.
//!
//! Scenes live in normalised coordinates, so one scene renders at any resolution. The text is
//! small (glyph height 4–6 % of the image: ~2 px at 32 px, ~11 px at 224 px), so OCR needs
//! resolution, which gives stage 2 (resolution increase) something measurable to improve.

use crate::font::{ink, GLYPH_H, GLYPH_W};
use crate::image::Rgb;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Circle,
    Square,
    Triangle,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Circle, Kind::Square, Kind::Triangle];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Circle => "circle",
            Kind::Square => "square",
            Kind::Triangle => "triangle",
        }
    }
}

pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 200, 30]),
    ("purple", [140, 50, 170]),
    ("orange", [245, 130, 20]),
];

#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub kind: Kind,
    pub color: usize,
    /// Normalised box: y_min, x_min, y_max, x_max.
    pub bbox: [f32; 4],
}

impl Shape {
    pub fn color_name(&self) -> &'static str {
        COLORS[self.color].0
    }
    pub fn label(&self) -> String {
        format!("{} {}", self.color_name(), self.kind.name())
    }
    /// Does the shape cover normalised point (x, y)?
    pub fn covers(&self, x: f32, y: f32) -> bool {
        let [y0, x0, y1, x1] = self.bbox;
        if x < x0 || x > x1 || y < y0 || y > y1 {
            return false;
        }
        let (cx, cy, r) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0, (x1 - x0) / 2.0);
        match self.kind {
            Kind::Square => true,
            Kind::Circle => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            // Apex at the top centre, base at the bottom.
            Kind::Triangle => (x - cx).abs() <= r * (y - y0) / (y1 - y0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextItem {
    pub text: String,
    /// Normalised top-left corner and glyph height.
    pub x: f32,
    pub y: f32,
    pub glyph_h: f32,
}

impl TextItem {
    pub fn bbox(&self) -> [f32; 4] {
        let cell = self.glyph_h / GLYPH_H as f32;
        let w = cell * ((GLYPH_W + 1) * self.text.len()) as f32;
        [self.y, self.x, self.y + self.glyph_h, self.x + w]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub background: [u8; 3],
    pub shapes: Vec<Shape>,
    pub text: TextItem,
}

fn overlaps(a: [f32; 4], b: [f32; 4], margin: f32) -> bool {
    !(a[2] + margin < b[0] || b[2] + margin < a[0] || a[3] + margin < b[1] || b[3] + margin < a[1])
}

impl Scene {
    /// The scene of example `index` of `split` under `seed`.
    pub fn generate(seed: u64, split: u64, index: u64) -> Scene {
        let mut rng = Rng::derive(seed, &[split, index]);
        let g = 225 + rng.below(25) as u8;
        let background = [g, g - rng.below(10) as u8, g - rng.below(10) as u8];
        let glyph_h = rng.range(0.04, 0.06);
        let len = 3 + rng.below(2);
        let chars: Vec<char> = crate::font::alphabet().collect();
        let text: String = (0..len).map(|_| *rng.pick(&chars)).collect();
        let tw = glyph_h / GLYPH_H as f32 * ((GLYPH_W + 1) * len) as f32;
        let text = TextItem {
            x: rng.range(0.02, 0.98 - tw),
            y: rng.range(0.02, 0.96 - glyph_h),
            text,
            glyph_h,
        };
        let n = 1 + rng.below(3);
        let mut shapes: Vec<Shape> = Vec::new();
        for _ in 0..n {
            for _attempt in 0..30 {
                let s = rng.range(0.16, 0.32);
                let (x0, y0) = (rng.range(0.02, 0.98 - s), rng.range(0.02, 0.98 - s));
                let bbox = [y0, x0, y0 + s, x0 + s];
                if overlaps(bbox, text.bbox(), 0.02)
                    || shapes.iter().any(|o| overlaps(bbox, o.bbox, 0.02))
                {
                    continue;
                }
                shapes.push(Shape {
                    kind: *rng.pick(&Kind::ALL),
                    color: rng.below(COLORS.len()),
                    bbox,
                });
                break;
            }
        }
        // Left to right, so captions and detections list shapes in a fixed order.
        shapes.sort_by(|a, b| a.bbox[1].partial_cmp(&b.bbox[1]).unwrap());
        Scene {
            background,
            shapes,
            text,
        }
    }

    /// Renders at `res × res` with 2×2 supersampling.
    pub fn render(&self, res: usize) -> Rgb {
        let mut data = vec![0f32; res * res * 3];
        let cell = self.text.glyph_h / GLYPH_H as f32;
        for py in 0..res {
            for px in 0..res {
                let mut acc = [0f32; 3];
                for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                    let (x, y) = ((px as f32 + sx) / res as f32, (py as f32 + sy) / res as f32);
                    let mut c = self.background;
                    for s in &self.shapes {
                        if s.covers(x, y) {
                            c = COLORS[s.color].1;
                        }
                    }
                    let (gx, gy) = ((x - self.text.x) / cell, (y - self.text.y) / cell);
                    if gx >= 0.0 && gy >= 0.0 && (gy as usize) < GLYPH_H {
                        let (col, row) = (gx as usize, gy as usize);
                        let (ch, cx) = (col / (GLYPH_W + 1), col % (GLYPH_W + 1));
                        if let Some(chr) = self.text.text.chars().nth(ch) {
                            if cx < GLYPH_W && ink(chr, cx, row) {
                                c = [20, 20, 20];
                            }
                        }
                    }
                    for k in 0..3 {
                        acc[k] += c[k] as f32 / 4.0;
                    }
                }
                data[(py * res + px) * 3..(py * res + px) * 3 + 3]
                    .copy_from_slice(&acc.map(|v| v.round()));
            }
        }
        Rgb {
            width: res,
            height: res,
            data,
        }
    }

    /// Binary mask of shape `i` at `res × res` (pixel centres).
    pub fn mask(&self, i: usize, res: usize) -> Vec<bool> {
        let mut m = vec![false; res * res];
        for py in 0..res {
            for px in 0..res {
                let (x, y) = (
                    (px as f32 + 0.5) / res as f32,
                    (py as f32 + 0.5) / res as f32,
                );
                // Later shapes are drawn on top; they never overlap here, but stay exact anyway.
                let top = self.shapes.iter().rposition(|s| s.covers(x, y));
                m[py * res + px] = top == Some(i);
            }
        }
        m
    }

    pub fn count(&self, kind: Option<Kind>) -> usize {
        self.shapes
            .iter()
            .filter(|s| kind.is_none_or(|k| s.kind == k))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_split_dependent() {
        assert_eq!(Scene::generate(7, 0, 3), Scene::generate(7, 0, 3));
        assert_ne!(Scene::generate(7, 0, 3), Scene::generate(7, 1, 3));
        assert_ne!(Scene::generate(7, 0, 3), Scene::generate(8, 0, 3));
    }

    #[test]
    fn render_shows_shapes_and_text() {
        for i in 0..20 {
            let s = Scene::generate(1, 0, i);
            assert!(!s.shapes.is_empty());
            let img = s.render(64);
            for (k, sh) in s.shapes.iter().enumerate() {
                // The pixel at the shape's centre-bottom is its colour.
                let [y0, x0, y1, x1] = sh.bbox;
                let (px, py) = (
                    ((x0 + x1) / 2.0 * 64.0) as usize,
                    ((y0 + 0.8 * (y1 - y0)) * 64.0) as usize,
                );
                let got = &img.data[(py * 64 + px) * 3..(py * 64 + px) * 3 + 3];
                let want = COLORS[sh.color].1;
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| (a - b as f32).abs() < 1.0),
                    "scene {i} shape {k}"
                );
                assert!(s.mask(k, 64)[py * 64 + px]);
            }
            // Dark text pixels exist at 224 px.
            let big = s.render(224);
            assert!(
                big.data.chunks(3).any(|p| p.iter().all(|v| *v < 60.0)),
                "scene {i}: no text ink"
            );
        }
    }
}
