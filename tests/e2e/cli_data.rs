//! `pali data synth|validate|inspect` and `pali tokenizer train`, as a user runs them.

use std::path::Path;

use crate::common::*;

#[test]
fn synth_then_validate_and_inspect() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("shapes");
    let s = run_ok(
        pali()
            .args(["data", "synth", "--n", "5", "--resolution", "48", "--out"])
            .arg(&out),
    );
    assert_eq!(
        s.lines().filter(|l| l.starts_with("wrote")).count(),
        6,
        "{s}"
    );
    assert!(out.join("images/000004.png").is_file());
    let s = run_ok(
        pali()
            .args(["data", "validate"])
            .arg(out.join("detect.jsonl"))
            .arg("--tokenizer")
            .arg(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("data/tokenizer/tokenizer.json"),
            ),
    );
    assert!(s.contains("5 examples, 5 images, 0 bad lines"), "{s}");

    // A broken line makes validate fail and name it.
    let bad = out.join("bad.jsonl");
    std::fs::write(&bad, "{\"image\": \"images/000000.png\", \"prefix\": \"p\", \"suffix\": \"s\"}\n{\"image\": \"images/missing.png\", \"prefix\": \"p\", \"suffix\": \"s\"}\n").unwrap();
    let out_err = pali()
        .args(["data", "validate"])
        .arg(&bad)
        .arg("--tokenizer")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out_err.stdout);
    assert!(!out_err.status.success());
    assert!(
        stdout.contains("bad.jsonl:2:") && stdout.contains("file not found"),
        "{stdout}"
    );

    // inspect prints masks token by token and writes the tensors the model gets
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    let batch = d.path().join("batch.safetensors");
    let s = run_ok(
        pali()
            .args(["data", "inspect", "--stage", "stage1", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&batch),
    );
    assert!(s.contains("\"<bos>\"") && s.contains("\"<eos>\""), "{s}");
    let f = open(&batch);
    let (_, shape) = f32s(&f, "pixel_values");
    assert_eq!(shape, vec![16, 3, 32, 32]);
    let (ar, shape) = i64s(&f, "mask_ar");
    assert_eq!(shape, vec![16, 33]);
    assert_eq!(ar[0], 0, "BOS is in the prefix block");
}

#[test]
fn tokenizer_train_writes_a_usable_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tok/tokenizer.json");
    let s = run_ok(
        pali()
            .args([
                "tokenizer",
                "train",
                "--n",
                "50",
                "--vocab-size",
                "400",
                "--out",
            ])
            .arg(&p),
    );
    assert!(s.contains("wrote"), "{s}");
    let t = pali_data::PaliTokenizer::from_file(&p).unwrap();
    assert_eq!(t.encode("\n").unwrap().len(), 1);
}

/// `pali data import`: COCO detection and RefCOCO (with the VQ-VAE) to JSONL + references,
/// which `pali score` then accepts.
#[test]
fn import_coco_and_refcoco() {
    let d = tempfile::tempdir().unwrap();
    let inst = d.path().join("instances.json");
    std::fs::write(
        &inst,
        serde_json::json!({
            "images": [{"id": 1, "file_name": "a.jpg", "width": 128, "height": 64}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [16, 8, 64, 32],
                             "iscrowd": 0, "segmentation": [[16, 8, 80, 8, 80, 40, 16, 40]]}]
        })
        .to_string(),
    )
    .unwrap();
    let refs = d.path().join("refs.json");
    std::fs::write(
        &refs,
        r#"[{"ann_id": 10, "image_id": 1, "split": "val", "sentences": [{"sent": "the cat"}]}]"#,
    )
    .unwrap();
    let out = d.path().join("det.jsonl");
    let r = d.path().join("det-refs.jsonl");
    run_ok(
        pali()
            .args(["data", "import", "coco-detection"])
            .arg(&inst)
            .args(["--image-dir", "images", "--out"])
            .arg(&out)
            .arg("--references")
            .arg(&r),
    );
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    assert_eq!(line["prefix"], "detect cat");
    assert_eq!(line["image"], "images/a.jpg");
    // The data's own suffix scores perfectly against the imported references.
    let preds = d.path().join("preds.jsonl");
    std::fs::write(
        &preds,
        format!(
            "{}\n",
            serde_json::json!({"id": "1", "prediction": line["suffix"]})
        ),
    )
    .unwrap();
    let s = run_ok(
        pali()
            .args(["score", "--task", "detect", "--predictions"])
            .arg(&preds)
            .arg("--references")
            .arg(&r),
    );
    let m: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert!(m["map50"].as_f64().unwrap() > 0.99, "{m}");

    let seg = d.path().join("seg.jsonl");
    let vq = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vqvae/tiny.npz");
    run_ok(
        pali()
            .args(["data", "import", "refcoco"])
            .arg(&refs)
            .arg("--instances")
            .arg(&inst)
            .arg("--vqvae")
            .arg(&vq)
            .args(["--split", "val", "--out"])
            .arg(&seg),
    );
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&seg).unwrap().trim()).unwrap();
    assert_eq!(line["prefix"], "segment the cat");
    let suffix = line["suffix"].as_str().unwrap();
    assert_eq!(suffix.matches("<loc").count(), 4, "{suffix}");
    assert_eq!(suffix.matches("<seg").count(), 16, "{suffix}");

    let e = run_err(
        pali()
            .args(["data", "import", "coco-detection"])
            .arg(&refs)
            .arg("--out")
            .arg(d.path().join("x.jsonl")),
    );
    assert!(
        e.contains("refs.json: images: missing or not a list"),
        "{e}"
    );
}

/// `pali data dedup`: a training line showing an evaluation image is removed and reported; the
/// output elsewhere keeps working image paths.
#[test]
fn dedup_removes_near_duplicates_of_eval_images() {
    let d = tempfile::tempdir().unwrap();
    for (split, dir) in [("0", "train"), ("1", "val")] {
        run_ok(
            pali()
                .args([
                    "data",
                    "synth",
                    "--n",
                    "6",
                    "--resolution",
                    "64",
                    "--split",
                    split,
                ])
                .arg("--out")
                .arg(d.path().join(dir)),
        );
    }
    let train = d.path().join("train/caption.jsonl");
    let mut text = std::fs::read_to_string(&train).unwrap();
    text.push_str(
        r#"{"image": "../val/images/000003.png", "prefix": "caption en", "suffix": "leak"}"#,
    );
    text.push('\n');
    std::fs::write(&train, text).unwrap();
    let out = d.path().join("clean/train.jsonl");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let o = pali()
        .args(["data", "dedup"])
        .arg(&train)
        .arg("--against")
        .arg(d.path().join("val/caption.jsonl"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("6 kept, 1 removed"), "{err}");
    let report = std::fs::read_to_string(d.path().join("clean/train.removed.jsonl")).unwrap();
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(r["line"], 7);
    assert_eq!(r["distance"], 0);
    assert!(
        r["matches"].as_str().unwrap().ends_with("000003.png"),
        "{r}"
    );
    let kept = std::fs::read_to_string(&out).unwrap();
    assert!(!kept.contains("leak"));
    run_ok(pali().args(["data", "validate"]).arg(&out));

    let e = run_err(
        pali()
            .args(["data", "dedup"])
            .arg(&train)
            .arg("--against")
            .arg(d.path().join("missing.jsonl"))
            .arg("--out")
            .arg(&out),
    );
    assert!(e.contains("missing.jsonl"), "{e}");
}

/// `pali data pack` → `pali data validate DIR` → training from the shards gives the same weights
/// as training from the JSONL it was packed from (same seed), and a run stopped mid-epoch
/// resumes from the shards to the same weights; a corrupt shard is named by validate.
#[test]
fn packed_shards_train_like_their_jsonl_and_resume() {
    use crate::train::{config, final_model, max_diff, train_s1};
    let d = tempfile::tempdir().unwrap();
    let data = synth_data(d.path(), 30, 32);
    let shards = d.path().join("shards");
    let s = pack(
        &data.join("caption.jsonl"),
        &shards,
        &["--shard-size", "4K"],
    );
    assert!(s.contains("30 rows, 30 images"), "{s}");
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json");
    let s = run_ok(
        pali()
            .args(["data", "validate"])
            .arg(&shards)
            .arg("--tokenizer")
            .arg(&tok),
    );
    assert!(
        s.contains("30 rows in") && s.contains("0 bad rows, 0 corrupt shards"),
        "{s}"
    );
    assert!(s.contains("task caption: 30"), "{s}");

    let cfg = config(d.path(), "");
    let source = |kind: &str, path: &Path| {
        format!(
            "stage.s1.source=[{{ kind = \"{kind}\", path = \"{}\" }}]",
            path.display()
        )
    };
    let (jsonl, packed) = (
        source("jsonl", &data.join("caption.jsonl")),
        source("shards", &shards),
    );
    train_s1(&cfg, "j", &[&jsonl]);
    train_s1(&cfg, "s", &[&packed]);
    let (a, b) = (
        final_model(&d.path().join("j")),
        final_model(&d.path().join("s")),
    );
    assert_eq!(max_diff(&a, &b), 0.0, "shards and JSONL train alike");
    let resolved = std::fs::read_to_string(d.path().join("s/out/config.resolved.toml")).unwrap();
    assert!(resolved.contains(r#"kind = "shards""#), "{resolved}");
    let synth = final_model(&{
        train_s1(&cfg, "x", &[]);
        d.path().join("x")
    });
    assert!(max_diff(&a, &synth) > 0.0, "the data is what differs");
    // Stopped after 6 of 12 steps (24 of 30 rows drawn: mid-epoch), then resumed.
    let run = |extra: &[&str]| {
        let mut c = pali();
        c.args(["train", "--quiet"]).arg(&cfg).args(extra);
        c.args([
            "--set",
            "run.out_dir=\"r/out\"",
            "--set",
            r#"run.stages=["s1"]"#,
        ]);
        run_ok(c.args(["--set", &packed]));
    };
    run(&["--max-steps", "6"]);
    run(&["--resume"]);
    let r = final_model(&d.path().join("r"));
    assert_eq!(max_diff(&b, &r), 0.0, "resumed from the shards exactly");

    // A flipped byte: validate names the shard and fails.
    let shard = shards.join("shard-00001.db");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x55;
    std::fs::write(&shard, bytes).unwrap();
    let out = pali()
        .args(["data", "validate"])
        .arg(&shards)
        .arg("--tokenizer")
        .arg(&tok)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("shard-00001.db: corrupt"), "{stdout}");
}

/// Two images per example (a pair, as NLVR2) from packed shards: `images = 2` trains on them;
/// the same data under `images = 1` is refused naming the row.
#[test]
fn two_image_rows_train_with_images_2() {
    use crate::train::{config, train_s1};
    let d = tempfile::tempdir().unwrap();
    let data = synth_data(d.path(), 8, 32);
    let pairs: String = (0..8)
        .map(|i| {
            format!(
                "{{\"image\": [\"images/{i:06}.png\", \"images/{:06}.png\"], \"prefix\": \"answer en same?\", \"suffix\": \"{}\"}}\n",
                (i * 3) % 8,
                if i == (i * 3) % 8 { "yes" } else { "no" }
            )
        })
        .collect();
    std::fs::write(data.join("pairs.jsonl"), pairs).unwrap();
    let shards = d.path().join("pairs");
    pack(&data.join("pairs.jsonl"), &shards, &[]);
    let cfg = config(d.path(), "");
    let source = format!(
        "stage.s1.source=[{{ kind = \"shards\", path = \"{}\" }}]",
        shards.display()
    );
    train_s1(
        &cfg,
        "two",
        &[&source, "stage.s1.images=2", "stage.s1.steps=2"],
    );
    assert!(!crate::train::entries(&d.path().join("two/out/checkpoints"), "step-").is_empty());
    let mut c = pali();
    c.args(["train", "--quiet"]).arg(&cfg);
    c.args([
        "--set",
        "run.out_dir=\"one/out\"",
        "--set",
        r#"run.stages=["s1"]"#,
    ]);
    let e = run_err(c.args(["--set", &source]));
    assert!(
        e.contains("2 images, but the stage expects 1 per example"),
        "{e}"
    );
}
