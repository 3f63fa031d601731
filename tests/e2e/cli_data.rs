//! `pali data synth|validate|inspect` and `pali tokenizer train`, as a user runs them.

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
            .args(["data", "inspect", "--config"])
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
