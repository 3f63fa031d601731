//! Referring expression segmentation (RefCOCO): parsing `<loc×4><seg×16>`, COCO RLE masks, and
//! big_vision's `segmentation.py` metrics: mIoU in original resolution (invalid outputs count
//! as 0) and box accuracy at IoU 0.5 in normalised coordinates.

use pali_data::image::{resize_plane, ResizeMethod};

use crate::detection::take_tokens;

/// Turns 16 `<segNNN>` codes into a 64×64 map (values > 0 are inside the mask); the VQ-VAE mask
/// decoder implements it.
pub trait MaskDecoder {
    fn decode(&self, codes: &[u32; 16]) -> Vec<f32>;
}

/// A binary mask, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub height: usize,
    pub width: usize,
    pub data: Vec<bool>,
}

impl Mask {
    pub fn area(&self) -> usize {
        self.data.iter().filter(|x| **x).count()
    }

    /// Decodes COCO RLE: run lengths over the column-major pixels, starting with a run of 0s,
    /// either as a list of numbers or as pycocotools' compressed string.
    pub fn from_rle(height: usize, width: usize, counts: &RleCounts) -> Result<Mask, String> {
        Ok(Mask {
            height,
            width,
            data: pali_data::masks::rle_decode(height, width, counts)?,
        })
    }

    /// Compressed COCO RLE string of this mask.
    pub fn to_rle_string(&self) -> String {
        pali_data::masks::rle_encode(self.height, self.width, &self.data)
    }
}

pub use pali_data::masks::{rle_from_string, rle_to_string, RleCounts};

/// Reads `[<loc×4>]<seg×16>`: the optional box tokens and the 16 codes. Errors name what is
/// wrong (too few tokens, a code outside `0..codebook_size`).
pub fn parse_seg_tokens(
    text: &str,
    codebook_size: usize,
) -> crate::Result<(Option<[u32; 4]>, [u32; 16])> {
    let bad = |m: String| crate::Error::Other(format!("segmentation tokens `{text}`: {m}"));
    let (loc, rest) = take_tokens::<4>(text.trim(), "<loc");
    if let Some(l) = loc {
        if let Some(v) = l.iter().find(|v| **v > 1023) {
            return Err(bad(format!("location {v} outside 0..1023")));
        }
    }
    let (seg, tail) = take_tokens::<16>(rest, "<seg");
    let seg = seg.ok_or_else(|| {
        let n = rest.matches("<seg").count();
        bad(format!("expected 16 <segNNN> tokens, found {n}"))
    })?;
    if let Some(v) = seg.iter().find(|v| **v as usize >= codebook_size) {
        return Err(bad(format!("code {v} outside 0..{}", codebook_size - 1)));
    }
    if !tail.trim().is_empty() && tail.trim_start().starts_with('<') {
        return Err(bad(format!(
            "unexpected `{}` after the 16 codes",
            tail.trim()
        )));
    }
    Ok((loc, seg))
}

/// A decoded 64×64 map placed into a `width × height` image: inside its box (location tokens,
/// turned into pixels as big_vision's evaluator does) or stretched over the whole image; bilinear
/// resize, inside where > 0.
pub fn place_mask(
    m64: &[f32],
    loc: Option<[u32; 4]>,
    width: usize,
    height: usize,
) -> pali_data::masks::BinaryMask {
    let (y1, x1, y2, x2) = match loc {
        Some(l) => (
            (l[0] as f64 / 1023.0 * height as f64) as usize,
            (l[1] as f64 / 1023.0 * width as f64) as usize,
            ((l[2] as f64 / 1023.0 * height as f64) as usize).min(height),
            ((l[3] as f64 / 1023.0 * width as f64) as usize).min(width),
        ),
        None => (0, 0, height, width),
    };
    let mut data = vec![false; width * height];
    if y2 > y1 && x2 > x1 {
        let (bw, bh) = (x2 - x1, y2 - y1);
        let r = resize_plane(m64, 64, 64, bw, bh, ResizeMethod::Bilinear);
        for y in 0..bh {
            for x in 0..bw {
                data[(y1 + y) * width + x1 + x] = r[y * bw + x] > 0.0;
            }
        }
    }
    pali_data::masks::BinaryMask {
        width,
        height,
        data,
    }
}

/// The VQ-VAE as the RefCOCO evaluator's mask decoder.
pub struct VqVaeDecoder<B: burn::tensor::backend::Backend> {
    pub model: pali_model::vqvae::VqVae<B>,
    pub device: B::Device,
}

impl<B: burn::tensor::backend::Backend> VqVaeDecoder<B> {
    /// The VQ-VAE checkpoint at `path` (`.npz` or safetensors).
    pub fn load(path: &std::path::Path, device: &B::Device) -> pali_model::Result<Self> {
        Ok(Self {
            model: pali_model::vqvae::load(path, device)?.1,
            device: device.clone(),
        })
    }
}

impl<B: burn::tensor::backend::Backend> MaskDecoder for VqVaeDecoder<B> {
    fn decode(&self, codes: &[u32; 16]) -> Vec<f32> {
        let t = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(
                codes.iter().map(|c| *c as i64).collect::<Vec<_>>(),
                [1, 16],
            ),
            &self.device,
        );
        self.model.decode(t).into_data().iter::<f32>().collect()
    }
}

/// A parsed referring-expression output.
#[derive(Debug, Clone, PartialEq)]
pub struct SegPrediction {
    /// Location tokens `[y_min, x_min, y_max, x_max]` in 0..=1023.
    pub loc: [u32; 4],
    /// The 16 mask codes, when the output has them.
    pub seg: Option<[u32; 16]>,
}

/// Parses the first `<loc×4>` (optionally followed by `<seg×16>`) of an output. `None` when the
/// output is not a valid prediction: fewer than four location tokens, a token out of range, or
/// a degenerate box (big_vision's checks).
pub fn parse_segmentation(text: &str) -> Option<SegPrediction> {
    let (loc, rest) = take_tokens::<4>(text.trim(), "<loc");
    let loc = loc?;
    if loc.iter().any(|v| *v > 1023) || loc[2] <= loc[0] || loc[3] <= loc[1] {
        return None;
    }
    let (seg, _) = take_tokens::<16>(rest, "<seg");
    if seg.is_some_and(|s| s.iter().any(|v| *v > 127)) {
        return None;
    }
    Some(SegPrediction { loc, seg })
}

/// Running sums of the RefCOCO metrics.
#[derive(Debug, Clone, Default)]
pub struct RefcocoScores {
    pub n: usize,
    pub invalid: usize,
    /// Valid predictions whose mask was the filled box (no `<seg>` tokens, or no decoder).
    pub box_only: usize,
    sum_iou: f64,
    box_hits50: usize,
}

impl RefcocoScores {
    /// Scores one output against the ground truth box (`[x0, y0, x1, y1]` pixels) and mask of an
    /// image of `gt_mask.width × gt_mask.height` pixels.
    pub fn add(
        &mut self,
        prediction: &str,
        gt_box: [f64; 4],
        gt_mask: &Mask,
        decoder: Option<&dyn MaskDecoder>,
    ) {
        let (h, w) = (gt_mask.height, gt_mask.width);
        self.n += 1;
        let parsed = parse_segmentation(prediction);
        // Box accuracy, in [0, 1] coordinates, as big_vision.
        let bb = parsed
            .as_ref()
            .map(|p| p.loc.map(|v| v as f64 / 1023.0))
            .unwrap_or([0.0; 4]);
        let gt = [
            gt_box[1] / h as f64,
            gt_box[0] / w as f64,
            gt_box[3] / h as f64,
            gt_box[2] / w as f64,
        ];
        let area = |b: [f64; 4]| (b[3] - b[1]).max(0.0) * (b[2] - b[0]).max(0.0);
        let inter = [
            bb[0].max(gt[0]),
            bb[1].max(gt[1]),
            bb[2].min(gt[2]),
            bb[3].min(gt[3]),
        ];
        let union = area(bb) + area(gt) - area(inter);
        let box_iou = if union > 0.0 {
            area(inter) / union
        } else {
            0.0
        };
        self.box_hits50 += usize::from(box_iou >= 0.5);

        // Mask IoU in original pixels.
        let Some(p) = parsed else {
            self.invalid += 1;
            return;
        };
        let y1 = (bb[0] * h as f64) as usize;
        let x1 = (bb[1] * w as f64) as usize;
        let y2 = (bb[2] * h as f64) as usize;
        let x2 = (bb[3] * w as f64) as usize;
        if x2 <= x1 || y2 <= y1 {
            self.invalid += 1;
            return;
        }
        let (bw, bh) = (x2 - x1, y2 - y1);
        let inside: Vec<bool> = match (p.seg, decoder) {
            (Some(codes), Some(d)) => {
                let m64 = d.decode(&codes);
                resize_plane(&m64, 64, 64, bw, bh, ResizeMethod::Bilinear)
                    .iter()
                    .map(|v| *v > 0.0)
                    .collect()
            }
            _ => {
                self.box_only += 1;
                vec![true; bw * bh]
            }
        };
        let mut inter = 0usize;
        for y in 0..bh {
            for x in 0..bw {
                inter += usize::from(inside[y * bw + x] && gt_mask.data[(y1 + y) * w + x1 + x]);
            }
        }
        let pred_area = inside.iter().filter(|v| **v).count();
        let union = gt_mask.area() + pred_area - inter;
        self.sum_iou += if union > 0 {
            inter as f64 / union as f64
        } else {
            0.0
        };
    }

    pub fn miou(&self) -> f64 {
        self.sum_iou / self.n.max(1) as f64
    }

    pub fn box_acc50(&self) -> f64 {
        self.box_hits50 as f64 / self.n.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_round_trip_and_errors() {
        let m = Mask {
            height: 3,
            width: 2,
            data: vec![false, true, true, true, false, false],
        };
        let s = m.to_rle_string();
        let back = Mask::from_rle(3, 2, &RleCounts::Compressed(s)).unwrap();
        assert_eq!(back, m);
        // Column-major runs: column 0 = [0,1,0], column 1 = [1,1,0] → 0:1, 1:1, 0:1, 1:2, 0:1.
        let l = Mask::from_rle(3, 2, &RleCounts::List(vec![1, 1, 1, 2, 1])).unwrap();
        assert_eq!(l, m);
        assert!(Mask::from_rle(3, 2, &RleCounts::List(vec![1, 1])).is_err());
        assert!(Mask::from_rle(3, 2, &RleCounts::List(vec![9])).is_err());
        assert!(rle_from_string("a\u{7f}").is_err());
    }

    #[test]
    fn parse_checks_ranges() {
        let ok = "<loc0100><loc0200><loc0300><loc0400><seg001><seg002><seg003><seg004>\
                  <seg005><seg006><seg007><seg008><seg009><seg010><seg011><seg012><seg013>\
                  <seg014><seg015><seg127>";
        let p = parse_segmentation(ok).unwrap();
        assert_eq!(p.loc, [100, 200, 300, 400]);
        assert_eq!(p.seg.unwrap()[15], 127);
        assert!(parse_segmentation("<loc0100><loc0200><loc0300><loc0400>")
            .unwrap()
            .seg
            .is_none());
        assert!(parse_segmentation("<loc0300><loc0200><loc0100><loc0400>").is_none());
        assert!(parse_segmentation("<loc0100><loc0200>").is_none());
        assert!(parse_segmentation(&ok.replace("<seg127>", "<seg128>")).is_none());
        assert!(parse_segmentation("garbage").is_none());
    }
}
