//! Detection: parsing `<loc×4> label ; …` outputs, and COCO box mAP as pycocotools' `COCOeval`
//! computes it with its default parameters (IoU thresholds .50:.05:.95, 101 recall points,
//! at most 100 detections per image, area range "all").

use std::collections::BTreeSet;

/// An axis-aligned box `[x0, y0, x1, y1]` (pixels or any consistent unit).
pub type XyBox = [f64; 4];

/// One parsed object of a detection output.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// `[y_min, x_min, y_max, x_max]` in [0, 1] (location token / 1023).
    pub yxyx: [f64; 4],
    pub label: String,
    /// Index of the first location token within the output's objects (for confidences).
    pub index: usize,
}

impl Detection {
    /// The box in pixels of a `width × height` image, as `[x0, y0, x1, y1]`.
    pub fn to_pixels(&self, width: f64, height: f64) -> XyBox {
        let [y0, x0, y1, x1] = self.yxyx;
        [x0 * width, y0 * height, x1 * width, y1 * height]
    }
}

/// Parses `<locAAAA><locBBBB><locCCCC><locDDDD> label ; …`. Objects without four location tokens
/// are skipped and counted as invalid (second value); the label may be empty.
pub fn parse_detections(text: &str) -> (Vec<Detection>, usize) {
    let mut out = Vec::new();
    let mut invalid = 0;
    for part in text.split(';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (locs, rest) = take_tokens::<4>(part, "<loc");
        match locs {
            Some(l) if l.iter().all(|v| *v <= 1023) => {
                // Segmentation tokens may follow; a detection ignores them.
                let (_, rest) = take_tokens::<16>(rest, "<seg");
                out.push(Detection {
                    yxyx: l.map(|v| v as f64 / 1023.0),
                    label: rest.trim().to_string(),
                    index: out.len(),
                });
            }
            _ => invalid += 1,
        }
    }
    (out, invalid)
}

/// Reads `N` tokens `{prefix}DIGITS>` from the start of `s` (whitespace between them allowed).
/// Returns `None` when fewer than `N` are there, and the text after the last one read.
pub fn take_tokens<'a, const N: usize>(s: &'a str, prefix: &str) -> (Option<[u32; N]>, &'a str) {
    let mut vals = [0u32; N];
    let mut rest = s;
    for v in vals.iter_mut() {
        let r = rest.trim_start();
        let Some(after) = r.strip_prefix(prefix) else {
            return (None, rest);
        };
        let Some(end) = after.find('>') else {
            return (None, rest);
        };
        let digits = &after[..end];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return (None, rest);
        }
        let Ok(x) = digits.parse() else {
            return (None, rest);
        };
        *v = x;
        rest = &after[end + 1..];
    }
    (Some(vals), rest)
}

/// IoU of two `[x0, y0, x1, y1]` boxes (pycocotools' bbox IoU: no +1 on sizes).
pub fn box_iou(a: &XyBox, b: &XyBox) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &XyBox| (r[2] - r[0]) * (r[3] - r[1]);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Ground truth and predictions of one image.
#[derive(Debug, Clone, Default)]
pub struct DetImage {
    pub gt: Vec<(XyBox, String)>,
    /// (box, label, score) in the order the model wrote them.
    pub pred: Vec<(XyBox, String, f64)>,
}

/// COCO summary numbers (area "all", 100 detections per image).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocoMap {
    /// mAP@[.50:.95]
    pub map: f64,
    pub map50: f64,
    pub map75: f64,
}

/// COCO box mAP over `images`. Categories are the labels present in the ground truth;
/// predictions of other labels are ignored (as pycocotools ignores unknown category ids);
/// a category without ground truth does not count.
pub fn coco_map(images: &[DetImage]) -> CocoMap {
    // pycocotools: np.linspace(.5, .95, 10) and np.linspace(0, 1, 101); same floating ops.
    let iou_thrs: Vec<f64> = (0..10)
        .map(|i| {
            if i == 9 {
                0.95
            } else {
                i as f64 * ((0.95 - 0.5) / 9.0) + 0.5
            }
        })
        .collect();
    let rec_thrs: Vec<f64> = (0..101)
        .map(|i| {
            if i == 100 {
                1.0
            } else {
                i as f64 * (1.0 / 100.0)
            }
        })
        .collect();
    let max_det = 100;
    let cats: BTreeSet<&str> = images
        .iter()
        .flat_map(|im| im.gt.iter().map(|g| g.1.as_str()))
        .collect();
    let t = iou_thrs.len();
    // precision[t][r] per category; -1 marks "absent".
    let mut precisions: Vec<Vec<Vec<f64>>> = Vec::new();
    for cat in &cats {
        // Per image: detections sorted by score (stable), matched greedily per threshold.
        let mut scores: Vec<f64> = Vec::new();
        let mut matched: Vec<Vec<bool>> = vec![Vec::new(); t];
        let mut npig = 0usize;
        for im in images {
            let gts: Vec<&XyBox> = im.gt.iter().filter(|g| g.1 == *cat).map(|g| &g.0).collect();
            let mut dts: Vec<(&XyBox, f64)> = im
                .pred
                .iter()
                .filter(|p| p.1 == *cat)
                .map(|p| (&p.0, p.2))
                .collect();
            dts.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
            dts.truncate(max_det);
            npig += gts.len();
            for (ti, thr) in iou_thrs.iter().enumerate() {
                let mut gt_taken = vec![false; gts.len()];
                for (d, _) in &dts {
                    let mut best = thr.min(1.0 - 1e-10);
                    let mut m = None;
                    for (gi, g) in gts.iter().enumerate() {
                        if gt_taken[gi] {
                            continue;
                        }
                        let iou = box_iou(d, g);
                        if iou < best {
                            continue;
                        }
                        best = iou;
                        m = Some(gi);
                    }
                    if let Some(gi) = m {
                        gt_taken[gi] = true;
                    }
                    matched[ti].push(m.is_some());
                }
            }
            scores.extend(dts.iter().map(|d| d.1));
        }
        if npig == 0 {
            continue;
        }
        // Global order by score over all images; stable, like numpy's mergesort.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|a, b| {
            scores[*b]
                .partial_cmp(&scores[*a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut per_t = Vec::with_capacity(t);
        for m in &matched {
            let (mut tp, mut fp) = (0.0f64, 0.0f64);
            let mut rc = Vec::with_capacity(order.len());
            let mut pr = Vec::with_capacity(order.len());
            for &i in &order {
                if m[i] {
                    tp += 1.0;
                } else {
                    fp += 1.0;
                }
                rc.push(tp / npig as f64);
                pr.push(tp / (fp + tp + f64::EPSILON));
            }
            for i in (1..pr.len()).rev() {
                if pr[i] > pr[i - 1] {
                    pr[i - 1] = pr[i];
                }
            }
            // np.searchsorted(rc, thr, side='left'); thresholds past the last recall keep 0.
            let q: Vec<f64> = rec_thrs
                .iter()
                .map(|thr| {
                    let idx = rc.partition_point(|r| r < thr);
                    pr.get(idx).copied().unwrap_or(0.0)
                })
                .collect();
            per_t.push(q);
        }
        precisions.push(per_t);
    }
    let mean = |ts: &[usize]| {
        let vals: Vec<f64> = precisions
            .iter()
            .flat_map(|c| ts.iter().flat_map(move |t| c[*t].iter().copied()))
            .collect();
        if vals.is_empty() {
            -1.0
        } else {
            vals.iter().sum::<f64>() / vals.len() as f64
        }
    };
    let all: Vec<usize> = (0..t).collect();
    CocoMap {
        map: mean(&all),
        map50: mean(&[0]),
        map75: mean(&[5]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_objects_and_counts_invalid() {
        let (d, bad) = parse_detections(
            "<loc0000><loc0100><loc0512><loc1023> cat ; <loc0001><loc0002> dog ; \
             <loc0010> <loc0020> <loc0030> <loc0040> big dog",
        );
        assert_eq!(bad, 1);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].label, "cat");
        assert_eq!(d[0].yxyx[3], 1.0);
        assert_eq!(d[1].label, "big dog");
        assert_eq!(d[1].to_pixels(1023.0, 2046.0), [20.0, 20.0, 40.0, 60.0]);
        assert_eq!(parse_detections("").0.len(), 0);
        assert_eq!(parse_detections("<loc9999><loc0><loc0><loc0> x").1, 1);
    }

    #[test]
    fn perfect_detections_score_one() {
        let im = DetImage {
            gt: vec![
                ([0.0, 0.0, 10.0, 10.0], "a".into()),
                ([20.0, 20.0, 30.0, 40.0], "b".into()),
            ],
            pred: vec![
                ([0.0, 0.0, 10.0, 10.0], "a".into(), 1.0),
                ([20.0, 20.0, 30.0, 40.0], "b".into(), 1.0),
            ],
        };
        let m = coco_map(&[im]);
        // tp / (tp + fp + ε), as pycocotools: a hair under 1.
        assert!(
            (m.map - 1.0).abs() < 1e-12 && (m.map50 - 1.0).abs() < 1e-12,
            "{m:?}"
        );
    }
}
