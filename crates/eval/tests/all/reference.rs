//! The metrics against numbers computed by the reference Python packages (pycocoevalcap 1.2,
//! pycocotools 2.0.11) on the same inputs; `scripts/eval_reference.py` made the fixture.

use pali_eval::caption::{bleu, cider_d};
use pali_eval::detection::{coco_map, DetImage};
use pali_eval::ptb::{tokenize, tokenize_lines};
use pali_eval::segmentation::{Mask, RefcocoScores, RleCounts};
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/eval/reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn ptb_tokenizer_matches_stanford_corenlp() {
    let f = fixture();
    let cases = f["caption"]["ptb"].as_array().unwrap();
    let mut wrong = Vec::new();
    for c in cases {
        let (text, want) = (c["text"].as_str().unwrap(), c["tokens"].as_str().unwrap());
        let got = tokenize(text);
        if got != want {
            wrong.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} differ:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// The large corpus of `scripts/ptb_reference.py` (4842 captions: every ASCII punctuation
/// mark alone, repeated, mixed and glued to words, abbreviations, numbers, quotes, brackets,
/// contractions, URLs, smileys, entities), through pycocoevalcap's own PTBTokenizer call: every
/// caption tokenised the same.
#[test]
fn ptb_tokenizer_matches_corenlp_on_a_punctuation_corpus() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/eval/ptb.json"
    );
    let f: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let (lines, want) = (strings(&f["lines"]), strings(&f["tokens"]));
    assert!(lines.len() > 4000);
    let got = tokenize_lines(&lines);
    assert_eq!((got.len(), want.len()), (lines.len(), lines.len()));
    let wrong: Vec<String> = lines
        .iter()
        .zip(got.iter().zip(&want))
        .filter(|(_, (g, w))| g != w)
        .map(|(l, (g, w))| format!("{l:?}: got {g:?}, want {w:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} differ:\n{}",
        wrong.len(),
        lines.len(),
        wrong
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// BLEU-1..4 and CIDEr-D of three random corpora of `ptb.json` (150 images, five references
/// each, punctuation everywhere) equal pycocoevalcap's to 1e-9, tokenised as COCOEvalCap does:
/// the references in one call, the predictions in another.
#[test]
fn bleu_and_cider_match_pycocoevalcap_on_random_corpora() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/eval/ptb.json"
    );
    let f: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    for (c, corpus) in f["corpora"].as_array().unwrap().iter().enumerate() {
        let ex = corpus["examples"].as_array().unwrap();
        let preds: Vec<String> = ex
            .iter()
            .map(|e| e["prediction"].as_str().unwrap().to_string())
            .collect();
        let preds = tokenize_lines(&preds);
        let refs: Vec<Vec<String>> = ex.iter().map(|e| strings(&e["references"])).collect();
        let mut flat = tokenize_lines(&refs.concat()).into_iter();
        let refs: Vec<Vec<String>> = refs
            .iter()
            .map(|r| flat.by_ref().take(r.len()).collect())
            .collect();
        let b = bleu(&preds, &refs);
        for k in 0..4 {
            let want = corpus["bleu"][k].as_f64().unwrap();
            assert!(
                rel(b[k], want) < 1e-9,
                "corpus {c} BLEU-{}: {} vs {want}",
                k + 1,
                b[k]
            );
        }
        let (mean, per) = cider_d(&preds, &refs);
        let want = corpus["cider"].as_f64().unwrap();
        assert!(
            rel(mean, want) < 1e-9,
            "corpus {c} CIDEr-D {mean} vs {want}"
        );
        for (i, (g, w)) in per
            .iter()
            .zip(strings_f64(&corpus["cider_per_example"]))
            .enumerate()
        {
            assert!((g - w).abs() < 1e-9, "corpus {c} example {i}: {g} vs {w}");
        }
    }
}

fn strings_f64(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn bleu_and_cider_match_pycocoevalcap() {
    let f = fixture();
    let c = &f["caption"];
    let ex = c["examples"].as_array().unwrap();
    let preds: Vec<String> = ex
        .iter()
        .map(|e| tokenize(e["prediction"].as_str().unwrap()))
        .collect();
    let refs: Vec<Vec<String>> = ex
        .iter()
        .map(|e| {
            strings(&e["references"])
                .iter()
                .map(|r| tokenize(r))
                .collect()
        })
        .collect();
    let b = bleu(&preds, &refs);
    for k in 0..4 {
        let want = c["bleu"][k].as_f64().unwrap();
        assert!(rel(b[k], want) < 1e-9, "BLEU-{}: {} vs {want}", k + 1, b[k]);
    }
    let (mean, per) = cider_d(&preds, &refs);
    let want = c["cider"].as_f64().unwrap();
    assert!(rel(mean, want) < 1e-9, "CIDEr-D {mean} vs {want}");
    for (i, (g, w)) in per
        .iter()
        .zip(c["cider_per_example"].as_array().unwrap())
        .enumerate()
    {
        let w = w.as_f64().unwrap();
        assert!((g - w).abs() < 1e-9, "example {i}: {g} vs {w}");
    }
}

#[test]
fn coco_map_matches_pycocotools() {
    let f = fixture();
    let d = &f["detection"];
    let images: Vec<DetImage> = d["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bx = |v: &Value| -> [f64; 4] {
                let a = v.as_array().unwrap();
                [0, 1, 2, 3].map(|i| a[i].as_f64().unwrap())
            };
            DetImage {
                gt: e["boxes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(bx)
                    .zip(strings(&e["labels"]))
                    .collect(),
                pred: e["predictions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            bx(&p["box"]),
                            p["label"].as_str().unwrap().to_string(),
                            p["score"].as_f64().unwrap(),
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    let m = coco_map(&images);
    for (got, key) in [(m.map, "map"), (m.map50, "map50"), (m.map75, "map75")] {
        let want = d[key].as_f64().unwrap();
        assert!(rel(got, want) < 1e-9, "{key}: {got} vs {want}");
    }
}

#[test]
fn rle_and_mask_iou_match_pycocotools() {
    let f = fixture();
    for (i, c) in f["masks"].as_array().unwrap().iter().enumerate() {
        let h = c["size"][0].as_u64().unwrap() as usize;
        let w = c["size"][1].as_u64().unwrap() as usize;
        let counts = c["counts"].as_str().unwrap().to_string();
        let m = Mask::from_rle(h, w, &RleCounts::Compressed(counts.clone())).unwrap();
        assert_eq!(m.area() as u64, c["area"].as_u64().unwrap(), "mask {i}");
        assert_eq!(m.to_rle_string(), counts, "mask {i} re-encoded");
        // The predicted box filled in, scored the big_vision way, against pycocotools' IoU.
        let loc: Vec<u64> = c["loc"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let pred = format!(
            "<loc{:04}><loc{:04}><loc{:04}><loc{:04}>",
            loc[0], loc[1], loc[2], loc[3]
        );
        let mut s = RefcocoScores::default();
        s.add(&pred, [0.0, 0.0, w as f64, h as f64], &m, None);
        let want = c["iou_box_vs_mask"].as_f64().unwrap();
        assert!(
            (s.miou() - want).abs() < 1e-12,
            "mask {i}: {} vs {want}",
            s.miou()
        );
        let boxm = Mask::from_rle(
            h,
            w,
            &RleCounts::Compressed(c["box_mask_counts"].as_str().unwrap().into()),
        )
        .unwrap();
        assert_eq!(s.box_only, 1);
        assert!(boxm.area() > 0 || want == 0.0);
    }
}
