//! Prefix/suffix builders, one function per task family, shared by every dataset (synthetic,
//! JSONL importers). Formats follow big_vision / the paper (§3.2.5, App. B):
//!
//! | task | prefix | suffix |
//! | --- | --- | --- |
//! | caption | `caption {lang}` | text |
//! | ocr | `ocr` | text |
//! | vqa | `answer {lang} {question}` | answer |
//! | vqg | `question {lang} {answer}` | question |
//! | detect | `detect a ; b` | `<loc×4> a ; <loc×4> b` (y_min x_min y_max x_max) |
//! | grounded caption | `caption <loc×4>` | text |
//! | segment | `segment a` | `<loc×4><seg×16> a` (codes from the VQ-VAE mask encoder) |
//!
//! With `task_prefix = false` (the paper's ablation) the task words are dropped: a question stays,
//! `caption en` becomes empty.

/// `<locNNNN>` of a normalised coordinate: `clip(round(c·1023), 0, 1023)` (big_vision
/// `segmentation.py`; decoded as `/1023` by its evaluator).
pub fn loc_token(c: f32) -> String {
    format!("<loc{:04}>", (c * 1023.0).round().clamp(0.0, 1023.0) as u32)
}

/// Four location tokens of a normalised box `[y_min, x_min, y_max, x_max]`.
pub fn loc_box(b: [f32; 4]) -> String {
    b.iter().map(|c| loc_token(*c)).collect()
}

pub fn caption(lang: &str, text: &str, task_prefix: bool) -> (String, String) {
    (
        if task_prefix {
            format!("caption {lang}")
        } else {
            String::new()
        },
        text.to_string(),
    )
}

pub fn ocr(text: &str, task_prefix: bool) -> (String, String) {
    (
        if task_prefix {
            "ocr".into()
        } else {
            String::new()
        },
        text.to_string(),
    )
}

pub fn vqa(lang: &str, question: &str, answer: &str, task_prefix: bool) -> (String, String) {
    let p = if task_prefix {
        format!("answer {lang} {question}")
    } else {
        question.to_string()
    };
    (p, answer.to_string())
}

pub fn vqg(lang: &str, answer: &str, question: &str, task_prefix: bool) -> (String, String) {
    let p = if task_prefix {
        format!("question {lang} {answer}")
    } else {
        answer.to_string()
    };
    (p, question.to_string())
}

/// Detection of the `classes` asked for; `objects` are (label, box) in the order to emit.
pub fn detect(
    classes: &[&str],
    objects: &[(&str, [f32; 4])],
    task_prefix: bool,
) -> (String, String) {
    let q = classes.join(" ; ");
    let p = if task_prefix {
        format!("detect {q}")
    } else {
        q
    };
    let s = objects
        .iter()
        .filter(|(l, _)| classes.contains(l))
        .map(|(l, b)| format!("{} {l}", loc_box(*b)))
        .collect::<Vec<_>>()
        .join(" ; ");
    (p, s)
}

/// PaliGemma 2 detection: the objects of the `classes` asked for in random order, then noise
/// boxes (random coordinates, class `<noise>`) up to `total` entries; the sequence builder
/// keeps the loss off the noise coordinates.
pub fn detect_with_noise(
    classes: &[&str],
    objects: &[(&str, [f32; 4])],
    total: usize,
    task_prefix: bool,
    rng: &mut crate::rng::Rng,
) -> (String, String) {
    let mut objs: Vec<(&str, [f32; 4])> = objects
        .iter()
        .filter(|(l, _)| classes.contains(l))
        .copied()
        .collect();
    rng.shuffle(&mut objs);
    let (p, s) = detect(classes, &objs, task_prefix);
    let noise = (objs.len()..total).map(|_| {
        let (a, b) = (rng.f32(), rng.f32());
        let (c, d) = (rng.f32(), rng.f32());
        let bx = [a.min(b), c.min(d), a.max(b), c.max(d)];
        format!("{} <noise>", loc_box(bx))
    });
    let parts: Vec<String> = Some(s)
        .filter(|s| !s.is_empty())
        .into_iter()
        .chain(noise)
        .collect();
    (p, parts.join(" ; "))
}

/// The 16 `<segNNN>` tokens of VQ-VAE codes.
pub fn seg_tokens(codes: &[u32; 16]) -> String {
    codes.iter().map(|c| format!("<seg{c:03}>")).collect()
}

pub fn grounded_caption(b: [f32; 4], text: &str, task_prefix: bool) -> (String, String) {
    let p = if task_prefix {
        format!("caption {}", loc_box(b))
    } else {
        loc_box(b)
    };
    (p, text.to_string())
}

/// Referring segmentation of one object: `segment {label}` → `<loc×4><seg×16> {label}`, the
/// codes from the VQ-VAE mask encoder.
pub fn segment(label: &str, b: [f32; 4], codes: &[u32; 16], task_prefix: bool) -> (String, String) {
    let p = if task_prefix {
        format!("segment {label}")
    } else {
        label.to_string()
    };
    (p, format!("{}{} {label}", loc_box(b), seg_tokens(codes)))
}

/// Parses the boxes of a detection string back (for evaluation and tests).
pub fn parse_detections(s: &str) -> Vec<(String, [f32; 4])> {
    let mut out = Vec::new();
    for part in s.split(';') {
        let part = part.trim();
        let mut coords = Vec::new();
        let mut rest = part;
        while let Some(r) = rest.strip_prefix("<loc") {
            let Some(end) = r.find('>') else { break };
            let Ok(v) = r[..end].parse::<u32>() else {
                break;
            };
            coords.push(v as f32 / 1023.0);
            rest = &r[end + 1..];
        }
        if coords.len() == 4 {
            out.push((
                rest.trim().to_string(),
                [coords[0], coords[1], coords[2], coords[3]],
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loc_tokens_round_and_clip() {
        assert_eq!(loc_token(0.0), "<loc0000>");
        assert_eq!(loc_token(1.0), "<loc1023>");
        assert_eq!(loc_token(0.5), "<loc0512>"); // 511.5 rounds away from zero
        assert_eq!(loc_token(1.7), "<loc1023>");
        assert_eq!(loc_token(-0.1), "<loc0000>");
    }

    #[test]
    fn detect_round_trips() {
        let objs = [
            ("cat", [0.1, 0.2, 0.5, 0.6]),
            ("dog", [0.0, 0.0, 1.0, 1.0]),
            ("car", [0.3, 0.3, 0.4, 0.4]),
        ];
        let (p, s) = detect(&["cat", "dog"], &objs, true);
        assert_eq!(p, "detect cat ; dog");
        assert!(
            s.starts_with("<loc0102><loc0205><loc0512><loc0614> cat ; <loc0000>"),
            "{s}"
        );
        let back = parse_detections(&s);
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].0, "dog");
        assert!((back[0].1[1] - 0.2).abs() < 1.0 / 1023.0);
        assert_eq!(detect(&["cat"], &objs, false).0, "cat");
    }

    #[test]
    fn no_task_prefix_keeps_the_content() {
        assert_eq!(
            vqa("en", "what color?", "red", false),
            ("what color?".into(), "red".into())
        );
        assert_eq!(caption("en", "a cat", false).0, "");
        assert_eq!(
            vqa("en", "what color?", "red", true).0,
            "answer en what color?"
        );
    }
}
