//! Importers: public dataset annotation files → pali JSONL (`{"id", "image", "prefix",
//! "suffix"}`) and the matching references file of `pali eval --references` (docs/eval.md).
//!
//! - COCO captions (`captions_*.json`): `caption en` → one caption; per caption for training,
//!   or per image (first caption as suffix, all as references) for evaluation;
//! - VQAv2 (`v2_OpenEnded_mscoco_*_questions.json` + `v2_mscoco_*_annotations.json`):
//!   `answer en {question}` → the most common answer; the 10 answers as references;
//! - COCO detection (`instances_*.json`): `detect a ; b` (the classes present, sorted) →
//!   `<loc×4> label ; …` (y_min x_min y_max x_max, `round(coord·1023)`); crowd boxes left out;
//! - RefCOCO/+/g (`refs.json`, the `refs(*).p` pickle saved as JSON, + COCO `instances.json`):
//!   one line per referring sentence, `detect {sentence}` → `<loc×4>`, or with a mask encoder
//!   (the VQ-VAE) `segment {sentence}` → `<loc×4><seg×16>` (big_vision's RefCOCO transfer: no
//!   label, no space).
//!
//! Image paths are `image_dir/FILE`, with `image_dir` as the JSONL should see it (relative to
//! the JSONL file). Problems name the file and the entry (`annotations[12].bbox`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::masks::{from_coco_segmentation, MaskEncoder};
use crate::tasks::{self, loc_box, seg_tokens};

/// What an importer produced.
#[derive(Debug, Default)]
pub struct Imported {
    /// Lines of the dataset.
    pub data: Vec<Value>,
    /// Lines of the references file, paired by `id`.
    pub references: Vec<Value>,
    /// Entries left out, with the reason.
    pub skipped: Vec<String>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: invalid JSON: {e}", path.display())))
}

/// `file: where: what`.
fn bad(path: &Path, at: String, what: &str) -> Error {
    Error::Invalid(format!("{}: {at}: {what}", path.display()))
}

fn list<'a>(path: &Path, v: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    v[key]
        .as_array()
        .ok_or_else(|| bad(path, key.to_string(), "missing or not a list"))
}

fn field<'a>(path: &Path, v: &'a Value, at: &str, key: &str) -> Result<&'a Value> {
    match v.get(key) {
        Some(x) if !x.is_null() => Ok(x),
        _ => Err(bad(path, format!("{at}.{key}"), "missing")),
    }
}

fn int(path: &Path, v: &Value, at: &str, key: &str) -> Result<i64> {
    field(path, v, at, key)?
        .as_i64()
        .ok_or_else(|| bad(path, format!("{at}.{key}"), "not an integer"))
}

fn text<'a>(path: &Path, v: &'a Value, at: &str, key: &str) -> Result<&'a str> {
    field(path, v, at, key)?
        .as_str()
        .ok_or_else(|| bad(path, format!("{at}.{key}"), "not a string"))
}

fn join(dir: &str, file: &str) -> String {
    if dir.is_empty() {
        file.to_string()
    } else {
        format!("{}/{file}", dir.trim_end_matches('/'))
    }
}

/// COCO `images`: id → (file name, width, height).
fn coco_images(path: &Path, v: &Value) -> Result<HashMap<i64, (String, f64, f64)>> {
    let mut out = HashMap::new();
    for (i, im) in list(path, v, "images")?.iter().enumerate() {
        let at = format!("images[{i}]");
        let id = int(path, im, &at, "id")?;
        let file = text(path, im, &at, "file_name")?.to_string();
        let w = int(path, im, &at, "width")? as f64;
        let h = int(path, im, &at, "height")? as f64;
        // Masks are rasterised at this size: refuse what no image has before allocating it.
        let limit = crate::image::max_megapixels();
        if w < 1.0 || h < 1.0 || w * h / 1e6 > limit {
            return Err(bad(
                path,
                format!("{at}.width/height"),
                &format!(
                    "{w}×{h} is not an image size up to {limit} megapixels (PALI_MAX_MEGAPIXELS)"
                ),
            ));
        }
        out.insert(id, (file, w, h));
    }
    Ok(out)
}

/// COCO `[x, y, w, h]` in pixels → `[y_min, x_min, y_max, x_max]` in [0, 1] and `[x0, y0, x1,
/// y1]` in pixels.
fn coco_box(path: &Path, a: &Value, at: &str, w: f64, h: f64) -> Result<([f32; 4], [f64; 4])> {
    let b: Vec<f64> = field(path, a, at, "bbox")?
        .as_array()
        .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    if b.len() != 4 || b[2] < 0.0 || b[3] < 0.0 {
        return Err(bad(path, format!("{at}.bbox"), "not [x, y, width, height]"));
    }
    let px = [b[0], b[1], b[0] + b[2], b[1] + b[3]];
    let norm = [
        (px[1] / h) as f32,
        (px[0] / w) as f32,
        (px[3] / h) as f32,
        (px[2] / w) as f32,
    ];
    Ok((norm, px))
}

/// COCO captions. `per_image`: one line per image (evaluation) instead of one per caption.
pub fn coco_captions(annotations: &Path, image_dir: &str, per_image: bool) -> Result<Imported> {
    let v = read_json(annotations)?;
    let images = coco_images(annotations, &v)?;
    let mut caps: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (i, a) in list(annotations, &v, "annotations")?.iter().enumerate() {
        let at = format!("annotations[{i}]");
        let id = int(annotations, a, &at, "image_id")?;
        if !images.contains_key(&id) {
            return Err(bad(annotations, format!("{at}.image_id"), "no such image"));
        }
        let c = text(annotations, a, &at, "caption")?.trim().to_string();
        caps.entry(id).or_default().push(c);
    }
    let mut out = Imported::default();
    for (id, cs) in &caps {
        let image = join(image_dir, &images[id].0);
        if per_image {
            let (prefix, suffix) = tasks::caption("en", &cs[0], true);
            out.data.push(
                json!({"id": id.to_string(), "image": image, "prefix": prefix, "suffix": suffix}),
            );
            out.references
                .push(json!({"id": id.to_string(), "references": cs}));
        } else {
            for (k, c) in cs.iter().enumerate() {
                let key = format!("{id}-{k}");
                let (prefix, suffix) = tasks::caption("en", c, true);
                out.data
                    .push(json!({"id": key, "image": image, "prefix": prefix, "suffix": suffix}));
                out.references.push(json!({"id": key, "references": cs}));
            }
        }
    }
    out.skipped = images
        .keys()
        .filter(|id| !caps.contains_key(id))
        .map(|id| format!("image {id}: no caption"))
        .collect();
    Ok(out)
}

/// VQAv2. `image_pattern` names an image from its id: `{id}` or `{id:012}` (zero-padded), e.g.
/// `COCO_val2014_{id:012}.jpg`. Without annotations (the test split) the suffix is empty.
pub fn vqav2(
    questions: &Path,
    annotations: Option<&Path>,
    image_dir: &str,
    image_pattern: &str,
) -> Result<Imported> {
    let q = read_json(questions)?;
    let mut answers: HashMap<i64, (String, Vec<String>)> = HashMap::new();
    if let Some(ap) = annotations {
        let a = read_json(ap)?;
        for (i, an) in list(ap, &a, "annotations")?.iter().enumerate() {
            let at = format!("annotations[{i}]");
            let qid = int(ap, an, &at, "question_id")?;
            let best = text(ap, an, &at, "multiple_choice_answer")?.to_string();
            let all = field(ap, an, &at, "answers")?
                .as_array()
                .ok_or_else(|| bad(ap, format!("{at}.answers"), "not a list"))?
                .iter()
                .enumerate()
                .map(|(k, x)| {
                    text(ap, x, &format!("{at}.answers[{k}]"), "answer").map(String::from)
                })
                .collect::<Result<Vec<_>>>()?;
            answers.insert(qid, (best, all));
        }
    }
    let mut out = Imported::default();
    for (i, qu) in list(questions, &q, "questions")?.iter().enumerate() {
        let at = format!("questions[{i}]");
        let qid = int(questions, qu, &at, "question_id")?;
        let img = int(questions, qu, &at, "image_id")?;
        let question = text(questions, qu, &at, "question")?;
        let file = image_pattern
            .replace("{id:012}", &format!("{img:012}"))
            .replace("{id}", &img.to_string());
        let (suffix, all) = match (annotations, answers.get(&qid)) {
            (None, _) => (String::new(), Vec::new()),
            (Some(_), Some((b, a))) => (b.clone(), a.clone()),
            (Some(_), None) => {
                out.skipped.push(format!("question {qid}: no annotation"));
                continue;
            }
        };
        let (prefix, suffix) = tasks::vqa("en", question, &suffix, true);
        out.data.push(
            json!({"id": qid.to_string(), "image": join(image_dir, &file),
                             "prefix": prefix, "suffix": suffix}),
        );
        if annotations.is_some() {
            out.references
                .push(json!({"id": qid.to_string(), "answers": all}));
        }
    }
    Ok(out)
}

/// COCO detection (`instances_*.json`). Images without (non-crowd) objects are left out.
pub fn coco_detection(instances: &Path, image_dir: &str) -> Result<Imported> {
    let v = read_json(instances)?;
    let images = coco_images(instances, &v)?;
    let mut names = HashMap::new();
    for (i, c) in list(instances, &v, "categories")?.iter().enumerate() {
        let at = format!("categories[{i}]");
        names.insert(
            int(instances, c, &at, "id")?,
            text(instances, c, &at, "name")?.to_string(),
        );
    }
    // Per image: (label, normalised box, pixel box).
    type Object = (String, [f32; 4], [f64; 4]);
    let mut objects: BTreeMap<i64, Vec<Object>> = BTreeMap::new();
    let mut crowd = 0;
    for (i, a) in list(instances, &v, "annotations")?.iter().enumerate() {
        let at = format!("annotations[{i}]");
        if a["iscrowd"].as_i64() == Some(1) {
            crowd += 1;
            continue;
        }
        let id = int(instances, a, &at, "image_id")?;
        let (_, w, h) = images
            .get(&id)
            .ok_or_else(|| bad(instances, format!("{at}.image_id"), "no such image"))?;
        let cat = int(instances, a, &at, "category_id")?;
        let name = names
            .get(&cat)
            .ok_or_else(|| bad(instances, format!("{at}.category_id"), "no such category"))?;
        let (norm, px) = coco_box(instances, a, &at, *w, *h)?;
        objects
            .entry(id)
            .or_default()
            .push((name.clone(), norm, px));
    }
    let mut out = Imported::default();
    for (id, objs) in &objects {
        let (file, w, h) = &images[id];
        let mut classes: Vec<&str> = objs.iter().map(|o| o.0.as_str()).collect();
        classes.sort();
        classes.dedup();
        let labelled: Vec<(&str, [f32; 4])> =
            objs.iter().map(|(n, b, _)| (n.as_str(), *b)).collect();
        let (prefix, suffix) = tasks::detect(&classes, &labelled, true);
        out.data
            .push(json!({"id": id.to_string(), "image": join(image_dir, file),
                             "prefix": prefix, "suffix": suffix}));
        out.references
            .push(json!({"id": id.to_string(), "width": w, "height": h,
            "boxes": objs.iter().map(|o| o.2).collect::<Vec<_>>(),
            "labels": objs.iter().map(|o| &o.0).collect::<Vec<_>>()}));
    }
    out.skipped = images
        .keys()
        .filter(|id| !objects.contains_key(id))
        .map(|id| format!("image {id}: no object"))
        .collect();
    if crowd > 0 {
        out.skipped.push(format!("{crowd} crowd annotations"));
    }
    Ok(out)
}

/// RefCOCO-style referring expressions. `split` keeps only refs of that split (`train`,
/// `val`, `testA` …). With `encoder` the masks become `<seg>` tokens (`segment` prompts).
pub fn refcoco(
    refs: &Path,
    instances: &Path,
    image_dir: &str,
    split: Option<&str>,
    encoder: Option<&dyn MaskEncoder>,
) -> Result<Imported> {
    let r = read_json(refs)?;
    let v = read_json(instances)?;
    let images = coco_images(instances, &v)?;
    let anns: HashMap<i64, &Value> = list(instances, &v, "annotations")?
        .iter()
        .filter_map(|a| a["id"].as_i64().map(|id| (id, a)))
        .collect();
    let refs_list = r
        .as_array()
        .ok_or_else(|| bad(refs, "top level".into(), "not a list of refs"))?;
    let mut out = Imported::default();
    for (i, rf) in refs_list.iter().enumerate() {
        let at = format!("[{i}]");
        if let Some(s) = split {
            if text(refs, rf, &at, "split")? != s {
                continue;
            }
        }
        let ann_id = int(refs, rf, &at, "ann_id")?;
        let Some(a) = anns.get(&ann_id) else {
            return Err(bad(
                refs,
                format!("{at}.ann_id"),
                "not in the instances file",
            ));
        };
        let aat = format!("annotations(id {ann_id})");
        let img = int(instances, a, &aat, "image_id")?;
        let (file, w, h) = images
            .get(&img)
            .ok_or_else(|| bad(instances, format!("{aat}.image_id"), "no such image"))?;
        let (norm, px) = coco_box(instances, a, &aat, *w, *h)?;
        let mask = match a.get("segmentation") {
            Some(s) if !s.is_null() => Some(
                from_coco_segmentation(s, *h as usize, *w as usize)
                    .map_err(|m| bad(instances, format!("{aat}.segmentation"), &m))?,
            ),
            _ => None,
        };
        let codes = match (encoder, &mask) {
            (Some(e), Some(m)) => {
                let crop = m.crop64(norm)?;
                Some(e.encode(&crop)?)
            }
            (Some(_), None) => {
                out.skipped.push(format!("ref {at}: no segmentation"));
                continue;
            }
            _ => None,
        };
        for (k, s) in list(refs, rf, "sentences")?.iter().enumerate() {
            let sent = text(refs, s, &format!("{at}.sentences[{k}]"), "sent")?.trim();
            let id = format!("{ann_id}-{k}");
            let (prefix, suffix) = match &codes {
                Some(c) => (
                    format!("segment {sent}"),
                    format!("{}{}", loc_box(norm), seg_tokens(c)),
                ),
                None => (format!("detect {sent}"), loc_box(norm)),
            };
            out.data
                .push(json!({"id": id, "image": join(image_dir, file),
                                 "prefix": prefix, "suffix": suffix}));
            let mut reference = json!({"id": id, "width": w, "height": h, "box": px});
            if let Some(m) = &mask {
                reference["mask_rle"] =
                    json!({"size": [m.height, m.width], "counts": m.to_rle_string()});
            }
            out.references.push(reference);
        }
    }
    Ok(out)
}

/// Writes lines (JSON values, or JSONL text as it was read) atomically (temp file + rename).
pub fn write_jsonl<T: std::fmt::Display>(
    path: &Path,
    lines: impl IntoIterator<Item = T>,
) -> Result<()> {
    let mut s = String::new();
    for l in lines {
        s.push_str(&l.to_string());
        s.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, s).map_err(|e| Error::Invalid(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: Value) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    /// An image size no image has (masks would be rasterised at it) is refused by name.
    #[test]
    fn absurd_image_sizes_are_refused() {
        let v = json!({"images": [{"id": 1, "file_name": "a.jpg", "width": 10_000_000,
                                   "height": 10_000_000}]});
        let e = coco_images(Path::new("i.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("i.json: images[0].width/height: 10000000×10000000 is not an image size"),
            "{e}"
        );
        let v = json!({"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 5}]});
        assert!(coco_images(Path::new("i.json"), &v).is_err());
    }

    fn coco(dir: &Path) -> std::path::PathBuf {
        write(
            dir,
            "instances.json",
            json!({
                "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
                           {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}],
                "categories": [{"id": 3, "name": "cat"}, {"id": 4, "name": "dog"}],
                "annotations": [
                    {"id": 10, "image_id": 1, "category_id": 4, "bbox": [20, 10, 100, 50],
                     "iscrowd": 0, "segmentation": [[20, 10, 120, 10, 120, 60, 20, 60]]},
                    {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 200, 100], "iscrowd": 0},
                    {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1}
                ],
                "captions_unused": []
            }),
        )
    }

    #[test]
    fn detection_boxes_are_normalised_y_first() {
        let d = tempfile::tempdir().unwrap();
        let out = coco_detection(&coco(d.path()), "images").unwrap();
        assert_eq!(out.data.len(), 1);
        let l = &out.data[0];
        assert_eq!(l["image"], "images/a.jpg");
        assert_eq!(l["prefix"], "detect cat ; dog");
        // dog: y 10..60 of 100, x 20..120 of 200 → 0.1, 0.1, 0.6, 0.6.
        assert_eq!(
            l["suffix"],
            "<loc0102><loc0102><loc0614><loc0614> dog ; <loc0000><loc0000><loc1023><loc1023> cat"
        );
        assert_eq!(
            out.references[0]["boxes"][0],
            json!([20.0, 10.0, 120.0, 60.0])
        );
        assert!(
            out.skipped.iter().any(|s| s.contains("1 crowd")),
            "{:?}",
            out.skipped
        );
    }

    #[test]
    fn refcoco_lines_per_sentence_with_mask_reference() {
        let d = tempfile::tempdir().unwrap();
        let inst = coco(d.path());
        let refs = write(
            d.path(),
            "refs.json",
            json!([
                {"ann_id": 10, "image_id": 1, "split": "val",
                 "sentences": [{"sent": "the dog"}, {"sent": "left animal "}]},
                {"ann_id": 11, "image_id": 1, "split": "train", "sentences": [{"sent": "cat"}]}
            ]),
        );
        let out = refcoco(&refs, &inst, "", Some("val"), None).unwrap();
        assert_eq!(out.data.len(), 2);
        assert_eq!(out.data[1]["prefix"], "detect left animal");
        assert_eq!(
            out.data[0]["suffix"],
            "<loc0102><loc0102><loc0614><loc0614>"
        );
        let m = &out.references[0]["mask_rle"];
        assert_eq!(m["size"], json!([100, 200]));
        // The polygon is the box: 100 × 50 pixels.
        let mask = from_coco_segmentation(m, 100, 200).unwrap();
        assert_eq!(mask.area(), 100 * 50);
        assert!(mask.data[10 * 200 + 20] && !mask.data[10 * 200 + 19] && !mask.data[60 * 200 + 20]);

        struct Fixed;
        impl MaskEncoder for Fixed {
            fn encode(&self, crop: &[f32]) -> Result<[u32; 16]> {
                assert_eq!(crop.len(), 64 * 64);
                Ok([7; 16])
            }
        }
        let out = refcoco(&refs, &inst, "", Some("val"), Some(&Fixed)).unwrap();
        assert_eq!(out.data[0]["prefix"], "segment the dog");
        assert!(out.data[0]["suffix"]
            .as_str()
            .unwrap()
            .ends_with("<seg007>"));
        let bad_ref = write(
            d.path(),
            "bad.json",
            json!([{"ann_id": 99, "sentences": []}]),
        );
        let e = refcoco(&bad_ref, &inst, "", None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.json: [0].ann_id: not in the instances file"),
            "{e}"
        );
    }

    #[test]
    fn captions_and_vqav2() {
        let d = tempfile::tempdir().unwrap();
        let caps = write(
            d.path(),
            "captions.json",
            json!({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}],
                   "annotations": [{"image_id": 1, "caption": "A cat. "}, {"image_id": 1, "caption": "a pet"}]}),
        );
        let per_caption = coco_captions(&caps, "im", false).unwrap();
        assert_eq!(per_caption.data.len(), 2);
        assert_eq!(per_caption.data[1]["suffix"], "a pet");
        let per_image = coco_captions(&caps, "im", true).unwrap();
        assert_eq!(per_image.data.len(), 1);
        assert_eq!(
            per_image.references[0]["references"],
            json!(["A cat.", "a pet"])
        );

        let q = write(
            d.path(),
            "q.json",
            json!({"questions": [{"question_id": 5, "image_id": 42, "question": "What?"}]}),
        );
        let a = write(
            d.path(),
            "a.json",
            json!({"annotations": [{"question_id": 5, "multiple_choice_answer": "yes",
                                    "answers": [{"answer": "yes"}, {"answer": "no"}]}]}),
        );
        let out = vqav2(&q, Some(&a), "val2014", "COCO_val2014_{id:012}.jpg").unwrap();
        assert_eq!(
            out.data[0]["image"],
            "val2014/COCO_val2014_000000000042.jpg"
        );
        assert_eq!(out.data[0]["prefix"], "answer en What?");
        assert_eq!(out.data[0]["suffix"], "yes");
        assert_eq!(out.references[0]["answers"], json!(["yes", "no"]));
        let broken = write(
            d.path(),
            "b.json",
            json!({"questions": [{"question_id": 5}]}),
        );
        let e = vqav2(&broken, None, "", "{id}.jpg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.json: questions[0].image_id: missing"), "{e}");
    }
}
