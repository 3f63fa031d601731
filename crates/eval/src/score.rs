//! Offline scoring: predictions and references as JSONL files (formats in docs/eval.md), one
//! task's metrics as a JSON object.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Map, Value};

use crate::caption;
use crate::detection::{coco_map, parse_detections, DetImage};
use crate::error::{Error, Result};
use crate::ptb;
use crate::segmentation::{Mask, MaskDecoder, RefcocoScores, RleCounts};
use crate::vqa;

/// The evaluation tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Caption,
    Vqa,
    Vqav2,
    Docvqa,
    Chartqa,
    Detect,
    Refcoco,
    Perplexity,
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "caption" => Task::Caption,
            "vqa" => Task::Vqa,
            "vqav2" => Task::Vqav2,
            "docvqa" => Task::Docvqa,
            "chartqa" => Task::Chartqa,
            "detect" => Task::Detect,
            "refcoco" => Task::Refcoco,
            "perplexity" => Task::Perplexity,
            _ => {
                return Err(format!(
                    "unknown task `{s}` (caption, vqa, vqav2, docvqa, chartqa, detect, refcoco, \
                     perplexity)"
                ))
            }
        })
    }
}

/// One line of a predictions file.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub id: String,
    pub prediction: String,
    /// Confidence of each detected object (from token log-probabilities); 1 when absent.
    pub scores: Option<Vec<f64>>,
}

/// What one example is scored against.
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    /// Reference captions or accepted answers.
    Texts(Vec<String>),
    Boxes {
        width: f64,
        height: f64,
        boxes: Vec<[f64; 4]>,
        labels: Vec<String>,
    },
    Region {
        width: usize,
        height: usize,
        bbox: [f64; 4],
        /// `None`: the box is the mask.
        mask: Option<Mask>,
    },
}

/// A JSONL line's position, for error messages.
#[derive(Clone)]
struct At<'a> {
    path: &'a Path,
    line: usize,
}

impl At<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Line {
            path: self.path.to_path_buf(),
            line: self.line,
            msg: msg.into(),
        }
    }
    fn field<'v>(&self, obj: &'v Map<String, Value>, key: &str) -> Result<&'v Value> {
        obj.get(key)
            .ok_or_else(|| self.err(format!("missing field `{key}`")))
    }
    fn string(&self, obj: &Map<String, Value>, key: &str) -> Result<String> {
        match self.field(obj, key)? {
            Value::String(s) => Ok(s.clone()),
            // Numeric ids are common (COCO, VQAv2); they are compared as text.
            Value::Number(n) if key == "id" => Ok(n.to_string()),
            v => Err(self.err(format!("field `{key}`: expected a string, found {v}"))),
        }
    }
    fn strings(&self, obj: &Map<String, Value>, key: &str) -> Result<Vec<String>> {
        let bad = || self.err(format!("field `{key}`: expected a list of strings"));
        match self.field(obj, key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().map(String::from).ok_or_else(bad))
                .collect(),
            _ => Err(bad()),
        }
    }
    fn number(&self, obj: &Map<String, Value>, key: &str) -> Result<f64> {
        self.field(obj, key)?
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| self.err(format!("field `{key}`: expected a number")))
    }
    fn size(&self, obj: &Map<String, Value>, key: &str) -> Result<usize> {
        let v = self.number(obj, key)?;
        if v < 1.0 || v.fract() != 0.0 {
            return Err(self.err(format!(
                "field `{key}`: expected a positive integer, found {v}"
            )));
        }
        Ok(v as usize)
    }
    fn xyxy(&self, v: &Value, what: &str) -> Result<[f64; 4]> {
        let bad = || self.err(format!("{what}: expected [x0, y0, x1, y1] numbers"));
        let a = v.as_array().filter(|a| a.len() == 4).ok_or_else(bad)?;
        let mut b = [0.0; 4];
        for (o, x) in b.iter_mut().zip(a) {
            *o = x.as_f64().ok_or_else(bad)?;
        }
        if b[2] < b[0] || b[3] < b[1] {
            return Err(self.err(format!("{what}: x1 < x0 or y1 < y0 in {b:?}")));
        }
        Ok(b)
    }
}

/// Reads a JSONL file of objects, calling `f` with each object and its position.
fn read_jsonl<T>(
    path: &Path,
    mut f: impl FnMut(&Map<String, Value>, &At) -> Result<T>,
) -> Result<Vec<(usize, T)>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = At { path, line: i + 1 };
        let v: Value =
            serde_json::from_str(line).map_err(|e| at.err(format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| at.err("expected a JSON object"))?;
        out.push((i + 1, f(obj, &at)?));
    }
    Ok(out)
}

/// Reads a predictions file: `{"id": str, "prediction": str}` per line, optionally `"scores"`.
pub fn read_predictions(path: &Path) -> Result<Vec<(usize, Prediction)>> {
    read_jsonl(path, |o, at| {
        let scores = match o.get("scores") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_f64())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| at.err("field `scores`: expected a list of numbers"))?,
            ),
            Some(_) => return Err(at.err("field `scores`: expected a list of numbers")),
        };
        Ok(Prediction {
            id: at.string(o, "id")?,
            prediction: at.string(o, "prediction")?,
            scores,
        })
    })
}

/// Reads a references file in the format of `task`.
pub fn read_references(path: &Path, task: Task) -> Result<Vec<(usize, (String, Reference))>> {
    read_jsonl(path, |o, at| {
        let id = at.string(o, "id")?;
        let r =
            match task {
                Task::Caption => {
                    let r = at.strings(o, "references")?;
                    if r.is_empty() {
                        return Err(at.err("field `references`: empty"));
                    }
                    Reference::Texts(r)
                }
                Task::Vqa | Task::Vqav2 | Task::Docvqa | Task::Chartqa => {
                    let a = at.strings(o, "answers")?;
                    if a.is_empty() {
                        return Err(at.err("field `answers`: empty"));
                    }
                    Reference::Texts(a)
                }
                Task::Detect => {
                    let boxes = match at.field(o, "boxes")? {
                        Value::Array(a) => a
                            .iter()
                            .enumerate()
                            .map(|(k, b)| at.xyxy(b, &format!("field `boxes[{k}]`")))
                            .collect::<Result<Vec<_>>>()?,
                        _ => return Err(at.err("field `boxes`: expected a list of boxes")),
                    };
                    let labels = at.strings(o, "labels")?;
                    if labels.len() != boxes.len() {
                        return Err(at.err(format!(
                            "field `labels`: {} labels for {} boxes",
                            labels.len(),
                            boxes.len()
                        )));
                    }
                    Reference::Boxes {
                        width: at.number(o, "width")?,
                        height: at.number(o, "height")?,
                        boxes,
                        labels,
                    }
                }
                Task::Refcoco => {
                    let (width, height) = (at.size(o, "width")?, at.size(o, "height")?);
                    let bbox = at.xyxy(at.field(o, "box")?, "field `box`")?;
                    let mask = match o.get("mask_rle") {
                        None | Some(Value::Null) => None,
                        Some(m) => {
                            #[derive(serde::Deserialize)]
                            #[serde(deny_unknown_fields)]
                            struct Rle {
                                size: [usize; 2],
                                counts: RleCounts,
                            }
                            let rle: Rle = serde_json::from_value(m.clone())
                                .map_err(|e| at.err(format!("field `mask_rle`: {e}")))?;
                            if rle.size != [height, width] {
                                return Err(at.err(format!(
                                "field `mask_rle`: size {:?} is not [height, width] = [{height}, \
                                 {width}]",
                                rle.size
                            )));
                            }
                            Some(
                                Mask::from_rle(height, width, &rle.counts)
                                    .map_err(|e| at.err(format!("field `mask_rle`: {e}")))?,
                            )
                        }
                    };
                    Reference::Region {
                        width,
                        height,
                        bbox,
                        mask,
                    }
                }
                Task::Perplexity => return Err(at.err(
                    "perplexity is computed from the model (`pali eval --task perplexity`), not \
                     from predictions",
                )),
            };
        Ok((id, r))
    })
}

/// Pairs predictions with references by id, in reference order. Every reference needs exactly
/// one prediction; a prediction for an unknown id is an error too.
pub fn pair<'a>(
    predictions: &'a [(usize, Prediction)],
    pred_path: &Path,
    references: &'a [(usize, (String, Reference))],
    ref_path: &Path,
) -> Result<Vec<(&'a Prediction, &'a Reference)>> {
    let mut by_id: HashMap<&str, (usize, &Prediction)> = HashMap::new();
    for (line, p) in predictions {
        if let Some((first, _)) = by_id.insert(&p.id, (*line, p)) {
            return Err(Error::Line {
                path: pred_path.to_path_buf(),
                line: *line,
                msg: format!("duplicate id `{}` (first on line {first})", p.id),
            });
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(references.len());
    for (line, (id, r)) in references {
        if let Some(first) = seen.insert(id, *line) {
            return Err(Error::Line {
                path: ref_path.to_path_buf(),
                line: *line,
                msg: format!("duplicate id `{id}` (first on line {first})"),
            });
        }
        let (_, p) = by_id.get(id.as_str()).ok_or_else(|| Error::Line {
            path: ref_path.to_path_buf(),
            line: *line,
            msg: format!("no prediction with id `{id}` in {}", pred_path.display()),
        })?;
        out.push((*p, r));
    }
    if let Some((line, p)) = predictions
        .iter()
        .find(|(_, p)| !seen.contains_key(p.id.as_str()))
    {
        return Err(Error::Line {
            path: pred_path.to_path_buf(),
            line: *line,
            msg: format!("id `{}` has no reference in {}", p.id, ref_path.display()),
        });
    }
    Ok(out)
}

/// Metrics of `task` over paired examples, as the JSON object `pali score` prints.
pub fn score(
    task: Task,
    pairs: &[(&Prediction, &Reference)],
    decoder: Option<&dyn MaskDecoder>,
) -> Result<Value> {
    let n = pairs.len();
    if n == 0 {
        // Every metric over nothing is undefined (0/0 printed as -0.0, COCO's -1.0).
        return Err(Error::Mismatch("no examples to score".into()));
    }
    let texts = |r: &Reference| match r {
        Reference::Texts(t) => t.clone(),
        _ => Vec::new(),
    };
    let mean = |f: &dyn Fn(&Prediction, &[String]) -> f64| {
        pairs.iter().map(|(p, r)| f(p, &texts(r))).sum::<f64>() / n.max(1) as f64
    };
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("n", json!(n));
    match task {
        Task::Caption => {
            // As COCOEvalCap: the predictions in one tokenizer call, the references in another
            // (the lexer sees across captions, so this is not one call per caption).
            let preds: Vec<&str> = pairs.iter().map(|(p, _)| p.prediction.as_str()).collect();
            let preds = ptb::tokenize_lines(&preds);
            let refs: Vec<Vec<String>> = pairs.iter().map(|(_, r)| texts(r)).collect();
            let mut flat = ptb::tokenize_lines(&refs.concat()).into_iter();
            let refs: Vec<Vec<String>> = refs
                .iter()
                .map(|r| flat.by_ref().take(r.len()).collect())
                .collect();
            let b = caption::bleu(&preds, &refs);
            let (c, _) = caption::cider_d(&preds, &refs);
            m.insert("cider", json!(c));
            for (k, v) in b.iter().enumerate() {
                m.insert(["bleu1", "bleu2", "bleu3", "bleu4"][k], json!(v));
            }
        }
        Task::Vqa => {
            m.insert(
                "accuracy",
                json!(mean(&|p, a| vqa::vqa_accuracy(&p.prediction, a, false).0)),
            );
            m.insert(
                "accuracy_any",
                json!(mean(&|p, a| vqa::vqa_accuracy(&p.prediction, a, false).1)),
            );
            m.insert("anls", json!(mean(&|p, a| vqa::anls_max(&p.prediction, a))));
        }
        Task::Vqav2 => {
            m.insert(
                "vqa_accuracy",
                json!(mean(&|p, a| vqa::vqav2_accuracy(&p.prediction, a))),
            );
        }
        Task::Docvqa => {
            // DocVQA's ANLS compares lower-cased, stripped strings.
            let low = |s: &str| s.trim().to_lowercase();
            m.insert(
                "anls",
                json!(mean(&|p, a| {
                    let a: Vec<String> = a.iter().map(|x| low(x)).collect();
                    vqa::anls_max(&low(&p.prediction), &a)
                })),
            );
            m.insert(
                "accuracy",
                json!(mean(&|p, a| vqa::vqa_accuracy(&p.prediction, a, true).1)),
            );
        }
        Task::Chartqa => {
            let hit = |p: &Prediction, a: &[String]| {
                f64::from(u8::from(
                    a.iter().any(|t| vqa::relaxed_match(t, &p.prediction)),
                ))
            };
            m.insert("relaxed_accuracy", json!(mean(&hit)));
            m.insert(
                "accuracy",
                json!(mean(&|p, a| f64::from(u8::from(a.contains(&p.prediction))))),
            );
        }
        Task::Detect => {
            let mut invalid = 0;
            let mut images = Vec::with_capacity(n);
            for (p, r) in pairs {
                let Reference::Boxes {
                    width,
                    height,
                    boxes,
                    labels,
                } = r
                else {
                    continue;
                };
                let (dets, bad) = parse_detections(&p.prediction);
                invalid += bad;
                if let Some(s) = &p.scores {
                    if s.len() != dets.len() {
                        return Err(Error::Mismatch(format!(
                            "id `{}`: {} scores for {} detected objects",
                            p.id,
                            s.len(),
                            dets.len()
                        )));
                    }
                }
                images.push(DetImage {
                    gt: boxes.iter().copied().zip(labels.iter().cloned()).collect(),
                    pred: dets
                        .iter()
                        .enumerate()
                        .map(|(k, d)| {
                            let s = p.scores.as_ref().map_or(1.0, |s| s[k]);
                            (d.to_pixels(*width, *height), d.label.clone(), s)
                        })
                        .collect(),
                });
            }
            let c = coco_map(&images);
            m.insert("map", json!(c.map));
            m.insert("map50", json!(c.map50));
            m.insert("map75", json!(c.map75));
            m.insert("invalid", json!(invalid));
        }
        Task::Refcoco => {
            let mut s = RefcocoScores::default();
            for (p, r) in pairs {
                let Reference::Region {
                    width,
                    height,
                    bbox,
                    mask,
                } = r
                else {
                    continue;
                };
                let box_mask;
                let gt = match mask {
                    Some(m) => m,
                    None => {
                        box_mask = box_as_mask(*width, *height, *bbox);
                        &box_mask
                    }
                };
                s.add(&p.prediction, *bbox, gt, decoder);
            }
            m.insert("miou", json!(s.miou()));
            m.insert("box_acc50", json!(s.box_acc50()));
            m.insert("invalid", json!(s.invalid));
            m.insert("box_only", json!(s.box_only));
        }
        Task::Perplexity => {
            return Err(Error::Other(
                "perplexity needs the model: use `pali eval --task perplexity`".into(),
            ))
        }
    }
    Ok(Value::Object(
        m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    ))
}

/// The pixels whose centres lie inside `[x0, y0, x1, y1]`.
pub fn box_as_mask(width: usize, height: usize, b: [f64; 4]) -> Mask {
    let mut data = vec![false; width * height];
    for y in 0..height {
        for x in 0..width {
            let (cx, cy) = (x as f64 + 0.5, y as f64 + 0.5);
            data[y * width + x] = cx >= b[0] && cx < b[2] && cy >= b[1] && cy < b[3];
        }
    }
    Mask {
        height,
        width,
        data,
    }
}

/// `pali score`: reads both files, pairs them, scores (RefCOCO masks through `decoder`, else
/// the predicted box is the mask).
pub fn score_files(
    task: Task,
    predictions: &Path,
    references: &Path,
    decoder: Option<&dyn MaskDecoder>,
) -> Result<Value> {
    let preds = read_predictions(predictions)?;
    let refs = read_references(references, task)?;
    let pairs = pair(&preds, predictions, &refs, references)?;
    if pairs.is_empty() {
        return Err(Error::Mismatch(format!(
            "{}: no predictions to score",
            predictions.display()
        )));
    }
    score(task, &pairs, decoder)
}
