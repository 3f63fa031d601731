//! The VQ-VAE mask tokenizer: a checkpoint in big_vision's `vae-oid.npz` layout (written by
//! numpy, `scripts/vqvae_reference.py`) loads and computes what the plain-numpy reference
//! computes; bad checkpoints and tokens give clear errors; `pali vqvae` trains, encodes, decodes.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use pali_eval::segmentation::parse_seg_tokens;
use pali_model::vqvae::{self, from_tensors};
use pali_model::{npz, Error};
use serde_json::Value;

use crate::common::*;

type B = Flex;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vqvae")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn numpy_npz_loads_and_matches_the_reference() {
    let dev = Default::default();
    let (cfg, model) = vqvae::load::<B>(&fixture().join("tiny.npz"), &dev).unwrap();
    assert_eq!(
        (cfg.codebook_size, cfg.embed_dim, cfg.enc_kernel),
        (16, 8, 4)
    );
    assert_eq!(cfg.enc_channels, [4, 8, 8, 8]);
    let r = reference();
    let mask = Tensor::<B, 4>::from_data(TensorData::new(floats(&r["mask"]), [1, 1, 64, 64]), &dev);
    let (codes, _) = model.quantize(model.encode(mask));
    let codes: Vec<i64> = codes.into_data().iter::<i64>().collect();
    let want: Vec<i64> = r["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(codes, want, "encoder + nearest code, row-major");

    let dc: Vec<i64> = r["decode_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let out: Vec<f32> = model
        .decode(Tensor::<B, 2, Int>::from_data(
            TensorData::new(dc, [1, 16]),
            &dev,
        ))
        .into_data()
        .iter::<f32>()
        .collect();
    let want = floats(&r["decoded"]);
    let max = out
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(
        max <= 1e-4 * scale.max(1.0),
        "decoder: max |Δ| {max} (values up to {scale})"
    );
    eprintln!("vqvae fixture: codes exact, decoder max |Δ| {max:.2e}");

    // What pali writes loads back identically (npz and safetensors).
    let d = tempfile::tempdir().unwrap();
    let t = npz::read(&fixture().join("tiny.npz")).unwrap();
    npz::write(&d.path().join("copy.npz"), &t).unwrap();
    assert_eq!(npz::read(&d.path().join("copy.npz")).unwrap(), t);
    vqvae::save(&model, &d.path().join("w.safetensors")).unwrap();
    let (_, back) = vqvae::load::<B>(&d.path().join("w.safetensors"), &dev).unwrap();
    assert_eq!(back.named_tensors(), model.named_tensors());
}

#[test]
fn bad_checkpoints_and_tokens_are_named() {
    let dev = Default::default();
    let t = npz::read(&fixture().join("tiny.npz")).unwrap();
    let mut missing = t.clone();
    missing.remove("decoder.6.weight");
    let e = from_tensors::<B>(&missing, "x.npz", &dev).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(
        e.to_string().contains("`decoder.6.weight`") && e.to_string().contains("x.npz"),
        "{e}"
    );
    let mut wrong = t.clone();
    wrong.get_mut("encoder.8.net.2.weight").unwrap().0 = vec![4, 4, 1, 1];
    let e = from_tensors::<B>(&wrong, "x.npz", &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`encoder.8.net.2.weight`: expected shape [4, 4, 3, 3], found [4, 4, 1, 1]"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("junk.npz");
    std::fs::write(&junk, b"not a zip").unwrap();
    let e = vqvae::load::<B>(&junk, &dev).unwrap_err().to_string();
    assert!(e.contains("junk.npz: not a usable .npz file"), "{e}");

    let seg = |c: &[u32]| c.iter().map(|v| format!("<seg{v:03}>")).collect::<String>();
    let e = parse_seg_tokens(&seg(&[200; 16]), 128)
        .unwrap_err()
        .to_string();
    assert!(e.contains("code 200 outside 0..127"), "{e}");
    let e = parse_seg_tokens(&seg(&[1; 15]), 128)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected 16 <segNNN> tokens, found 15"), "{e}");
    let (loc, codes) = parse_seg_tokens(
        &format!("<loc0001><loc0002><loc0003><loc0004>{}", seg(&[7; 16])),
        128,
    )
    .unwrap();
    assert_eq!((loc, codes), (Some([1, 2, 3, 4]), [7; 16]));
}

#[test]
fn cli_trains_encodes_and_decodes() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("vq");
    let s = run_ok(
        pali()
            .args([
                "vqvae",
                "train",
                "--synthetic",
                "--quiet",
                "--steps",
                "60",
                "--batch-size",
                "8",
                "--eval-masks",
                "16",
                "--embed-dim",
                "16",
                "--out",
            ])
            .arg(&out),
    );
    let summary: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"));
    assert_eq!(summary["steps"], 60);
    // Reconstruction error falls (it jumps back a little when dead codes are re-seeded).
    let recon: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["recon"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(recon.len(), 6);
    let best = recon[1..].iter().cloned().fold(f64::MAX, f64::min);
    assert!(best < recon[0] - 0.05, "{recon:?}");
    let iou = summary["heldout_miou"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&iou), "{summary}");
    let ckpt = out.join("vqvae.safetensors");
    assert!(ckpt.is_file() && out.join("metrics.jsonl").is_file());

    // A mask PNG → tokens → a mask PNG of another size.
    let m = pali_data::masks::synthetic_mask(9, 1);
    let png = d.path().join("m.png");
    m.save_png(&png).unwrap();
    let tokens = run_ok(
        pali()
            .args(["vqvae", "encode", "--checkpoint"])
            .arg(&ckpt)
            .arg("--mask")
            .arg(&png),
    );
    let tokens = tokens.trim();
    assert_eq!(tokens.matches("<loc").count(), 4, "{tokens}");
    assert_eq!(tokens.matches("<seg").count(), 16, "{tokens}");
    let back = d.path().join("back.png");
    run_ok(
        pali()
            .args([
                "vqvae",
                "decode",
                "--size",
                "100x80",
                "--tokens",
                tokens,
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--out")
            .arg(&back),
    );
    let img = image::open(&back).unwrap();
    assert_eq!((img.width(), img.height()), (100, 80));
    let e = run_err(
        pali()
            .args([
                "vqvae",
                "decode",
                "--tokens",
                "<seg001><seg999>",
                "--checkpoint",
            ])
            .arg(&ckpt)
            .arg("--out")
            .arg(&back),
    );
    assert!(e.contains("expected 16 <segNNN> tokens"), "{e}");
    // The fixture in big_vision's npz layout works through the CLI too.
    let t = run_ok(
        pali()
            .args(["vqvae", "encode", "--checkpoint"])
            .arg(fixture().join("tiny.npz"))
            .arg("--mask")
            .arg(&png),
    );
    assert_eq!(t.matches("<seg").count(), 16, "{t}");
    // A second training run on the same directory is refused; --overwrite moves it aside.
    let again = |extra: &[&str]| {
        let mut c = pali();
        c.args(["vqvae", "train", "--synthetic", "--quiet", "--steps", "2"])
            .args([
                "--batch-size",
                "8",
                "--eval-masks",
                "4",
                "--embed-dim",
                "16",
            ])
            .arg("--out")
            .arg(&out)
            .args(extra);
        c
    };
    let e = run_err(&mut again(&[]));
    assert!(
        e.contains("already holds a run") && e.contains("--overwrite"),
        "{e}"
    );
    run_ok(&mut again(&["--overwrite"]));
    assert!(d.path().join("vq.old-1/metrics.jsonl").is_file());
}

#[test]
fn segment_task_trains_and_refcoco_scores_through_the_vqvae() {
    let d = tempfile::tempdir().unwrap();
    let vae = fixture().join("tiny.npz");
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json");
    let cfg = d.path().join("run.toml");
    let config = |vqvae: &str| {
        format!(
            r#"
[run]
name = "seg"
out_dir = "{out}"

[model]
preset = "tiny"

[tokenizer]
path = "{tok}"

[[stage]]
name = "s"
resolution = 32
text_len = 32
steps = 2
batch_size = 2
lr = 1e-3
eval_examples = 3
source = [{{ kind = "synth", task = "segment", size = 20{vqvae} }}]
"#,
            out = d.path().join("out").display(),
            tok = tok.display()
        )
    };
    // Without a VQ-VAE the config is refused before training, naming the fix.
    std::fs::write(&cfg, config("")).unwrap();
    let e = run_err(pali().args(["train", "--quiet"]).arg(&cfg));
    assert!(e.contains("task `segment` needs `vqvae = \"PATH\"`"), "{e}");
    std::fs::write(&cfg, config(&format!(", vqvae = \"{}\"", vae.display()))).unwrap();
    let s = run_ok(pali().args(["data", "inspect", "--config"]).arg(&cfg));
    assert!(s.contains("segment") && s.contains("<seg"), "{s}");
    run_ok(pali().args(["train", "--quiet"]).arg(&cfg));
    let metrics = std::fs::read_to_string(d.path().join("out/metrics.jsonl")).unwrap();
    let eval: Value = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v.get("eval").is_some())
        .expect("an evaluation");
    assert!(eval["eval"]["miou"].is_number(), "{eval}");
    // `pali predict --vqvae … --draw` on that checkpoint (masks are drawn when the output has
    // `<seg>` codes; a 2-step model rarely writes them, so only the path is exercised).
    let img = d.path().join("img.png");
    pali_data::masks::synthetic_mask(1, 2)
        .save_png(&img)
        .unwrap();
    let drawn = d.path().join("drawn.png");
    let err = run_ok(
        pali()
            .args([
                "predict",
                "--max-new-tokens",
                "24",
                "--prompt",
                "segment circle",
                "--checkpoint",
            ])
            .arg(d.path().join("out/checkpoints/step-00000002"))
            .arg("--image")
            .arg(&img)
            .arg("--vqvae")
            .arg(&vae)
            .arg("--draw")
            .arg(&drawn),
    );
    assert!(drawn.is_file(), "{err}");

    // Offline RefCOCO scoring decodes `<seg>` tokens through the VQ-VAE when given one.
    let (p, r) = (d.path().join("p.jsonl"), d.path().join("r.jsonl"));
    let seg: String = (0..16).map(|i| format!("<seg{:03}>", i % 16)).collect();
    std::fs::write(
        &p,
        format!(
            "{{\"id\": \"a\", \"prediction\": \"<loc0100><loc0100><loc0900><loc0900>{seg}\"}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &r,
        "{\"id\": \"a\", \"width\": 40, \"height\": 30, \"box\": [4, 3, 36, 27]}\n",
    )
    .unwrap();
    let score = |extra: &[&std::ffi::OsStr]| -> Value {
        let out = run_ok(
            pali()
                .args(["score", "--task", "refcoco", "--predictions"])
                .arg(&p)
                .arg("--references")
                .arg(&r)
                .args(extra),
        );
        serde_json::from_str(&out).unwrap()
    };
    let plain = score(&[]);
    assert_eq!(plain["box_only"], 1, "{plain}");
    let with = score(&["--vqvae".as_ref(), vae.as_os_str()]);
    assert_eq!(with["box_only"], 0, "{with}");
    assert_eq!(with["box_acc50"], 1.0, "{with}");
}
