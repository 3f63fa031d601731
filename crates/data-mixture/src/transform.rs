//! Image transforms of a stage, between decoding and the model's pixels.
//!
//! Deterministic ones apply to training and evaluation alike (they change what the model is):
//! - `downscale = R0`: resize to R0 first, then to the stage's resolution R: the information of
//!   R0 at the sequence length of R (the paper's resolution-vs-sequence-length ablation, §5.7.1);
//! - `window = W`: resize to W·R and cut W×W tiles of R, each encoded as its own frame, in
//!   row-major order (the paper's windowing ablation, §5.7.3: W² times the image tokens).
//!
//! Augmentations ([`Augment`]) apply to training only. Each draw of an example gets its own
//! stream, seeded by the run and the draw (not the thread), so batches stay reproducible:
//! - `crop_min_area`: an Inception-style crop covering at least this fraction of the image
//!   (aspect ratio in [3/4, 4/3]); it moves objects, so stages with box or mask targets refuse it;
//! - `jpeg_quality = [lo, hi]`: a JPEG re-encode, at the model's resolution, at a quality drawn
//!   in that range;
//! - `random_resize`: the resize method drawn among bicubic, bilinear and bilinear without
//!   antialias.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::dataset::ImageSource;
use crate::error::{Error, Result};
use crate::image::{self as img, ResizeMethod, Rgb};
use crate::rng::Rng;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_min_area: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jpeg_quality: Option<[u8; 2]>,
    #[serde(default)]
    pub random_resize: bool,
}

impl Augment {
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(a) = self.crop_min_area {
            if !(a > 0.0 && a <= 1.0) {
                return Err(format!("augment.crop_min_area: {a} is not in (0, 1]"));
            }
        }
        if let Some([lo, hi]) = self.jpeg_quality {
            if lo == 0 || lo > hi || hi > 100 {
                return Err(format!(
                    "augment.jpeg_quality: [{lo}, {hi}] is not a range within 1..=100"
                ));
            }
        }
        Ok(())
    }
}

/// The deterministic transforms and the augmentations of a stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transforms {
    pub downscale: Option<usize>,
    pub window: usize,
    pub augment: Augment,
    /// Seeds the augmentation streams (the run's seed and the stage).
    pub seed: u64,
}

impl Default for Transforms {
    fn default() -> Self {
        Self {
            downscale: None,
            window: 1,
            augment: Augment::default(),
            seed: 0,
        }
    }
}

impl Transforms {
    /// Frames each image becomes.
    pub fn frames_per_image(&self) -> usize {
        self.window.max(1).pow(2)
    }

    /// CHW pixels in [−1, 1] of every frame of `im` at `res × res`, concatenated.
    /// `draw` identifies this draw of the example (augmentations only; `None` = no augmentation).
    pub fn pixels(
        &self,
        im: &ImageSource,
        res: usize,
        method: ResizeMethod,
        draw: Option<u64>,
    ) -> Result<Vec<f32>> {
        let w = self.window.max(1);
        let augment = draw.filter(|_| !self.augment.is_off());
        if w == 1 && self.downscale.is_none() && augment.is_none() {
            return im.pixels(res, method); // the plain path (HF-equal preprocessing)
        }
        // A synthetic scene renders natively at the size that is needed first.
        let native = self.downscale.unwrap_or(res * w);
        let mut rgb = im.rgb(native)?;
        let mut method = method;
        let mut rng = augment.map(|d| Rng::derive(self.seed, &[d]));
        let mut quality = None;
        if let Some(rng) = rng.as_mut() {
            let a = &self.augment;
            if let Some(min) = a.crop_min_area {
                rgb = inception_crop(&rgb, min, rng);
            }
            if let Some([lo, hi]) = a.jpeg_quality {
                quality = Some(lo + rng.below((hi - lo) as usize + 1) as u8);
            }
            if a.random_resize {
                method = *rng.pick(&[
                    ResizeMethod::Bicubic,
                    ResizeMethod::Bilinear,
                    ResizeMethod::BilinearNoAntialias,
                ]);
            }
        }
        if let Some(d) = self.downscale {
            rgb = img::resize(&rgb, d, d, method);
        }
        let mut big = img::resize(&rgb, res * w, res * w, method);
        if let Some(q) = quality {
            // At the model's resolution: the artefacts it sees, and a small image to encode.
            big = jpeg_roundtrip(&big, q)?;
        }
        let mut out = Vec::with_capacity(w * w * 3 * res * res);
        for ty in 0..w {
            for tx in 0..w {
                out.extend(img::to_pixel_values(&crop(
                    &big,
                    tx * res,
                    ty * res,
                    res,
                    res,
                )));
            }
        }
        Ok(out)
    }
}

/// The `cw × ch` region at (`x0`, `y0`).
pub fn crop(im: &Rgb, x0: usize, y0: usize, cw: usize, ch: usize) -> Rgb {
    let mut data = Vec::with_capacity(cw * ch * 3);
    for y in y0..y0 + ch {
        let row = (y * im.width + x0) * 3;
        data.extend_from_slice(&im.data[row..row + cw * 3]);
    }
    Rgb {
        width: cw,
        height: ch,
        data,
    }
}

/// A random crop of at least `min_area` of the image, aspect ratio in [3/4, 4/3] (log-uniform).
pub fn inception_crop(im: &Rgb, min_area: f64, rng: &mut Rng) -> Rgb {
    let (w, h) = (im.width as f64, im.height as f64);
    let area = w * h * rng.range(min_area as f32, 1.0) as f64;
    let ratio = (rng.range((3f32 / 4.0).ln(), (4f32 / 3.0).ln()) as f64).exp();
    let cw = ((area * ratio).sqrt().round() as usize).clamp(1, im.width);
    let ch = ((area / ratio).sqrt().round() as usize).clamp(1, im.height);
    let x0 = rng.below(im.width - cw + 1);
    let y0 = rng.below(im.height - ch + 1);
    crop(im, x0, y0, cw, ch)
}

/// Encodes as JPEG at `quality` and decodes again (compression artefacts as augmentation).
pub fn jpeg_roundtrip(im: &Rgb, quality: u8) -> Result<Rgb> {
    let mut buf = Vec::new();
    let enc = ::image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut buf), quality);
    ::image::ImageEncoder::write_image(
        enc,
        &im.to_u8(),
        im.width as u32,
        im.height as u32,
        ::image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Invalid(format!("JPEG re-encode: {e}")))?;
    img::decode(&buf, std::path::Path::new("<jpeg re-encode>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Rgb {
        let data = (0..w * h * 3).map(|i| (i % 251) as f32).collect();
        Rgb {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn crop_takes_the_region() {
        let im = ramp(5, 4);
        let c = crop(&im, 1, 2, 3, 2);
        assert_eq!((c.width, c.height), (3, 2));
        assert_eq!(&c.data[..3], &im.data[(2 * 5 + 1) * 3..(2 * 5 + 1) * 3 + 3]);
        assert_eq!(
            &c.data[9..12],
            &im.data[(3 * 5 + 1) * 3..(3 * 5 + 1) * 3 + 3]
        );
    }

    #[test]
    fn inception_crop_respects_area_and_bounds() {
        let im = ramp(100, 80);
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let c = inception_crop(&im, 0.5, &mut rng);
            let a = (c.width * c.height) as f64 / 8000.0;
            assert!(c.width <= 100 && c.height <= 80);
            // Clamping to the image can only lose area on the long side; 0.5·(3/4) bounds it.
            assert!(a > 0.37 && a <= 1.0, "area fraction {a}");
        }
    }

    #[test]
    fn jpeg_roundtrip_is_close_and_lossy() {
        let mut im = ramp(32, 32);
        im.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = ((i / 3) % 32 * 8) as f32);
        let mae = |q: u8| {
            let j = jpeg_roundtrip(&im, q).unwrap();
            let d: f32 = im
                .data
                .iter()
                .zip(&j.data)
                .map(|(a, b)| (a - b).abs())
                .sum();
            d / im.data.len() as f32
        };
        let (err, err10) = (mae(90), mae(10));
        assert!(err > 0.0 && err < 6.0, "mean abs error {err}");
        assert!(err10 > err, "{err10} vs {err}");
    }

    #[test]
    fn window_tiles_are_the_quarters_of_the_big_image() {
        let scene = crate::synth::Scene::generate(0, 1, 5);
        let im = ImageSource::Synth(Box::new(scene.clone()));
        let t = Transforms {
            window: 2,
            ..Default::default()
        };
        let px = t.pixels(&im, 16, ResizeMethod::Bicubic, None).unwrap();
        assert_eq!(px.len(), 4 * 3 * 16 * 16);
        // CHW 32×32.
        let big = img::to_pixel_values(&scene.render(32));
        // Tile 1 (top right), channel 0, row 3, column 5 = big (row 3, column 16 + 5).
        let tile1 = &px[3 * 256..2 * 3 * 256];
        assert_eq!(tile1[3 * 16 + 5], big[3 * 32 + 21]);
        // Tile 2 (bottom left), channel 2, row 0, column 0 = big (row 16, column 0).
        let tile2 = &px[2 * 3 * 256..3 * 3 * 256];
        assert_eq!(tile2[2 * 256], big[2 * 1024 + 16 * 32]);
    }

    #[test]
    fn downscale_loses_detail_but_keeps_size() {
        let scene = crate::synth::Scene::generate(0, 1, 7);
        let im = ImageSource::Synth(Box::new(scene.clone()));
        let t = Transforms {
            downscale: Some(16),
            ..Default::default()
        };
        let px = t.pixels(&im, 64, ResizeMethod::Bicubic, None).unwrap();
        let native = im.pixels(64, ResizeMethod::Bicubic).unwrap();
        let low = img::preprocess(&scene.render(16), 64, ResizeMethod::Bicubic);
        assert_eq!(px.len(), native.len());
        assert_eq!(px, low, "rendered at 16, resized to 64");
        assert_ne!(px, native);
    }

    #[test]
    fn augmentations_depend_on_the_draw_only() {
        let scene = crate::synth::Scene::generate(0, 1, 9);
        let im = ImageSource::Synth(Box::new(scene));
        let t = Transforms {
            augment: Augment {
                crop_min_area: Some(0.6),
                jpeg_quality: Some([50, 90]),
                random_resize: true,
            },
            seed: 1,
            ..Default::default()
        };
        let a = t.pixels(&im, 32, ResizeMethod::Bicubic, Some(4)).unwrap();
        let b = t.pixels(&im, 32, ResizeMethod::Bicubic, Some(4)).unwrap();
        let c = t.pixels(&im, 32, ResizeMethod::Bicubic, Some(5)).unwrap();
        let plain = t.pixels(&im, 32, ResizeMethod::Bicubic, None).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(plain, im.pixels(32, ResizeMethod::Bicubic).unwrap());
        assert!(Augment {
            jpeg_quality: Some([90, 50]),
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
