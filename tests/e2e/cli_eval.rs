//! `pali score`, `pali eval` and `pali predict` as a user runs them: offline scores equal the
//! reference packages' numbers, bad files are named by file:line, and a checkpoint written by
//! `pali train` decodes, scores and draws.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::common::*;

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn write_lines(path: &Path, lines: impl IntoIterator<Item = Value>) {
    let text: String = lines.into_iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn score(task: &str, preds: &Path, refs: &Path) -> Value {
    let out = run_ok(
        pali()
            .args(["score", "--task", task, "--predictions"])
            .arg(preds)
            .arg("--references")
            .arg(refs),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn rel(a: &Value, b: &Value) -> f64 {
    let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
    (a - b).abs() / b.abs().max(1e-12)
}

/// Location tokens of a pixel box `[x0, y0, x1, y1]` in a `w × h` image.
fn locs(b: &Value, w: f64, h: f64) -> String {
    let c = |v: &Value, s: f64| ((v.as_f64().unwrap() / s * 1023.0).round() as i64).clamp(0, 1023);
    format!(
        "<loc{:04}><loc{:04}><loc{:04}><loc{:04}>",
        c(&b[1], h),
        c(&b[0], w),
        c(&b[3], h),
        c(&b[2], w)
    )
}

#[test]
fn score_matches_pycocoevalcap_and_pycocotools() {
    let f = reference();
    let d = tempfile::tempdir().unwrap();
    let (p, r) = (d.path().join("preds.jsonl"), d.path().join("refs.jsonl"));

    let ex = f["caption"]["examples"].as_array().unwrap();
    write_lines(
        &p,
        ex.iter()
            .map(|e| json!({"id": e["id"], "prediction": e["prediction"]})),
    );
    write_lines(
        &r,
        ex.iter()
            .map(|e| json!({"id": e["id"], "references": e["references"]})),
    );
    let m = score("caption", &p, &r);
    assert!(rel(&m["cider"], &f["caption"]["cider"]) < 1e-9, "{m}");
    assert!(rel(&m["bleu4"], &f["caption"]["bleu"][3]) < 1e-9, "{m}");
    assert_eq!(m["n"], 40);

    // Detection: predictions written as PaliGemma writes them; the fixture's predicted boxes
    // lie on the location-token grid, so the text decodes to exactly the boxes pycocotools saw.
    let ex = f["detection"]["examples"].as_array().unwrap();
    let mut preds = Vec::new();
    let mut refs = Vec::new();
    for e in ex {
        let (w, h) = (e["width"].as_f64().unwrap(), e["height"].as_f64().unwrap());
        let objs = e["predictions"].as_array().unwrap();
        let text: Vec<String> = objs
            .iter()
            .map(|o| format!("{} {}", locs(&o["box"], w, h), o["label"].as_str().unwrap()))
            .collect();
        let scores: Vec<f64> = objs.iter().map(|o| o["score"].as_f64().unwrap()).collect();
        preds.push(json!({"id": e["id"], "prediction": text.join(" ; "), "scores": scores}));
        refs.push(json!({"id": e["id"], "width": w, "height": h, "boxes": e["boxes"], "labels": e["labels"]}));
    }
    write_lines(&p, preds);
    write_lines(&r, refs);
    let m = score("detect", &p, &r);
    for k in ["map", "map50", "map75"] {
        assert!(rel(&m[k], &f["detection"][k]) < 1e-9, "{k}: {m}");
    }
    assert_eq!(m["invalid"], 0);
}

#[test]
fn score_names_the_file_and_line_of_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let (p, r) = (d.path().join("preds.jsonl"), d.path().join("refs.jsonl"));
    let fails = |task: &str, preds: &str, refs: &str| -> String {
        std::fs::write(&p, preds).unwrap();
        std::fs::write(&r, refs).unwrap();
        run_err(
            pali()
                .args(["score", "--task", task, "--predictions"])
                .arg(&p)
                .arg("--references")
                .arg(&r),
        )
    };
    let good_refs =
        "{\"id\": \"a\", \"answers\": [\"x\"]}\n{\"id\": \"b\", \"answers\": [\"y\"]}\n";
    let e = fails(
        "vqa",
        "{\"id\": \"a\", \"prediction\": \"x\"}\n{\"id\": \"b\", \"prediction\": \n",
        good_refs,
    );
    assert!(e.contains("preds.jsonl:2: not valid JSON"), "{e}");
    let e = fails(
        "vqa",
        "{\"id\": \"a\", \"prediction\": \"x\"}\n{\"id\": \"b\"}\n",
        good_refs,
    );
    assert!(
        e.contains("preds.jsonl:2: missing field `prediction`"),
        "{e}"
    );
    let e = fails("vqa", "{\"id\": \"a\", \"prediction\": \"x\"}\n", good_refs);
    assert!(e.contains("refs.jsonl:2: no prediction with id `b`"), "{e}");
    let e = fails(
        "vqa",
        "{\"id\": \"a\", \"prediction\": \"x\"}\n{\"id\": \"a\", \"prediction\": \"x\"}\n",
        good_refs,
    );
    assert!(e.contains("preds.jsonl:2: duplicate id `a`"), "{e}");
    let e = fails(
        "vqa",
        "{\"id\": \"a\", \"prediction\": \"x\"}\n",
        "{\"id\": \"a\", \"answers\": \"x\"}\n",
    );
    assert!(
        e.contains("refs.jsonl:1: field `answers`: expected a list of strings"),
        "{e}"
    );
    let e = fails(
        "refcoco",
        "{\"id\": \"a\", \"prediction\": \"x\"}\n",
        "{\"id\": \"a\", \"width\": 4, \"height\": 3, \"box\": [0, 0, 2, 2], \"mask_rle\": {\"size\": [3, 4], \"counts\": [1, 2]}}\n",
    );
    assert!(
        e.contains("refs.jsonl:1: field `mask_rle`: runs cover 3 of the 3x4"),
        "{e}"
    );
    let e = fails(
        "detect",
        "{\"id\": \"a\", \"prediction\": \"x\"}\n",
        "{\"id\": \"a\", \"width\": 4, \"height\": 3, \"boxes\": [[0, 0, 2]], \"labels\": [\"cat\"]}\n",
    );
    assert!(
        e.contains("refs.jsonl:1: field `boxes[0]`: expected [x0, y0, x1, y1]"),
        "{e}"
    );
    let e = fails("sing", "", "");
    assert!(e.contains("unknown task `sing`"), "{e}");
}

fn tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json")
}

#[test]
fn train_then_eval_predict_and_draw() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
name = "e"
out_dir = "{out}"
seed = 1

[model]
preset = "tiny"

[tokenizer]
path = "{tok}"

[[stage]]
name = "s1"
resolution = 32
text_len = 24
steps = 4
batch_size = 4
lr = 3e-3
log_every = 2
eval_examples = 4
eval_every = 2
source = [{{ kind = "synth", task = "detect", size = 50 }}, {{ kind = "synth", task = "vqa", size = 50 }}]
"#,
            out = d.path().join("out").display(),
            tok = tokenizer().display()
        ),
    )
    .unwrap();
    run_ok(pali().args(["train", "--quiet"]).arg(&cfg));
    // The trainer's evaluations (before the first step, every 2 steps, and at the end) used the
    // eval crate.
    let evals: Vec<Value> = std::fs::read_to_string(d.path().join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect();
    assert_eq!(evals.len(), 3, "{evals:?}");
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps[0], 0, "{steps:?}");
    for e in &evals {
        assert!(e["eval"]["map"].is_number(), "{e}");
        let ppl = &e["val_perplexity"];
        for task in ["detect", "vqa"] {
            let p = ppl[task].as_f64().unwrap_or(f64::NAN);
            assert!(p.is_finite() && p > 1.0, "{task}: {e}");
        }
    }

    let ckpt = d.path().join("out/checkpoints/step-00000004");
    let data = d.path().join("shapes");
    run_ok(
        pali()
            .args([
                "data",
                "synth",
                "--n",
                "3",
                "--resolution",
                "32",
                "--split",
                "1",
                "--out",
            ])
            .arg(&data),
    );
    let preds = d.path().join("preds.jsonl");
    let eval = |task: &str, extra: &[&str]| -> Value {
        let file = if task == "perplexity" { "vqa" } else { task };
        let out = run_ok(
            pali()
                .args([
                    "eval",
                    "--quiet",
                    "--task",
                    task,
                    "--max-new-tokens",
                    "8",
                    "--checkpoint",
                ])
                .arg(&ckpt)
                .arg("--data")
                .arg(data.join(format!("{file}.jsonl")))
                .arg("--out")
                .arg(&preds)
                .args(extra),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let m = eval("vqa", &[]);
    assert_eq!(m["n"], 3, "{m}");
    for k in ["accuracy", "anls", "invalid", "decode_tokens_per_s"] {
        assert!(m[k].is_number(), "{k}: {m}");
    }
    assert_eq!(std::fs::read_to_string(&preds).unwrap().lines().count(), 3);
    let beam = eval("vqa", &["--decode", "beam:2"]);
    assert_eq!(beam["n"], 3);
    let nocache = eval("vqa", &["--no-cache"]);
    assert_eq!(
        nocache["accuracy"], m["accuracy"],
        "the cache must not change greedy outputs"
    );
    let det = eval("detect", &[]);
    assert!(det["map"].is_number() && det["map50"].is_number(), "{det}");
    let ppl = eval("perplexity", &[]);
    assert!(ppl["perplexity"].as_f64().unwrap() > 1.0, "{ppl}");
    // Mixed precision: bf16 matmuls move the perplexity, a little.
    let ppl16 = eval("perplexity", &["--dtype", "bf16"]);
    assert_eq!(ppl16["dtype"], "bf16", "{ppl16}");
    let (p32, p16) = (
        ppl["perplexity"].as_f64().unwrap(),
        ppl16["perplexity"].as_f64().unwrap(),
    );
    assert!(
        p16 != p32 && (p16 / p32 - 1.0).abs() < 0.02,
        "f32 {p32}, bf16 {p16}"
    );

    let png = d.path().join("drawn.png");
    let out = run_ok(
        pali()
            .args([
                "predict",
                "--max-new-tokens",
                "8",
                "--prompt",
                "detect circle ; square",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--image")
            .arg(data.join("images/000000.png"))
            .arg("--draw")
            .arg(&png),
    );
    assert!(png.is_file(), "{out}");
    let e = run_err(
        pali()
            .args(["predict", "--prompt", "caption en", "--checkpoint"])
            .arg(&ckpt)
            .arg("--image")
            .arg(d.path().join("nope.png")),
    );
    assert!(e.contains("nope.png"), "{e}");
}
