//! The model-level commands, run as a user would: `pali forward`, `pali generate`, `pali model`.

use crate::common::*;

#[test]
fn forward_command_reproduces_hf_outputs() {
    for variant in ["tiny-gemma1", "tiny-gemma2"] {
        let dir = fixture(variant);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out.safetensors");
        let stdout = run_ok(
            pali()
                .args(["forward", "--checkpoint"])
                .arg(&dir)
                .arg("--inputs")
                .arg(dir.join("inputs.safetensors"))
                .arg("--out")
                .arg(&out)
                .arg("--hidden-states"),
        );
        assert!(stdout.contains("loss "), "{stdout}");
        let got = open(&out);
        let want = open(&dir.join("outputs.safetensors"));
        for (name, atol, rtol) in [
            ("logits", 1e-4, 1e-4),
            ("image_features", 3e-5, 1e-5),
            ("loss", 1e-5, 0.0),
            ("lm_hidden_states.1", 1e-4, 1e-4),
            ("vision_hidden_states.2", 3e-5, 1e-5),
        ] {
            let (g, gs) = f32s(&got, name);
            let (w, ws) = f32s(&want, name);
            compare(&format!("{variant} {name}"), &g, &gs, &w, &ws, atol, rtol);
        }
    }
}

#[test]
fn generate_command_reproduces_hf_greedy_tokens() {
    let dir = fixture("tiny-gemma2");
    let inp = open(&dir.join("inputs.safetensors"));
    let (px, ps) = f32s(&inp, "pixel_values");
    let per = ps[1] * ps[2] * ps[3];
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tmp.path().join("prompt.safetensors");
    let ints: Vec<_> = ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|n| {
            let (v, s) = i64s(&inp, &format!("gen.{n}"));
            (n.to_string(), s, v)
        })
        .collect();
    write_mixed(
        &prompt,
        &[(
            "pixel_values".into(),
            vec![1, ps[1], ps[2], ps[3]],
            px[..per].to_vec(),
        )],
        &ints,
    );
    let out = tmp.path().join("gen.safetensors");
    let stdout = run_ok(
        pali()
            .args(["generate", "--max-new-tokens", "8", "--checkpoint"])
            .arg(&dir)
            .arg("--inputs")
            .arg(&prompt)
            .arg("--out")
            .arg(&out),
    );
    let (want, _) = i64s(&open(&dir.join("outputs.safetensors")), "gen.new_tokens");
    let (got, shape) = i64s(&open(&out), "new_tokens");
    assert_eq!(shape, vec![1, 8]);
    assert_eq!(got, want);
    let printed: Vec<i64> = stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(printed, want);
}

#[test]
fn model_info_prints_real_parameter_counts() {
    let s = run_ok(pali().args(["model", "info", "paligemma-3b-224"]));
    assert!(s.contains("total 2923466480 (2.92 B)"), "{s}");
    assert!(s.contains("256 tokens"), "{s}");
    let s = run_ok(pali().args(["model", "info", "paligemma2-3b-448"]));
    assert!(s.contains("Gemma 2") && s.contains("1024 tokens"), "{s}");
    // An HF config.json works the same as a preset.
    let s = run_ok(
        pali()
            .args(["model", "info"])
            .arg(fixture("tiny-gemma1").join("config.json")),
    );
    assert!(s.contains("4/1 kv") && s.contains("16 tokens"), "{s}");
}

#[test]
fn bad_inputs_fail_with_named_errors() {
    let dir = fixture("tiny-gemma1");
    let tmp = tempfile::tempdir().unwrap();
    // inputs file lacking input_ids
    let bad = tmp.path().join("bad.safetensors");
    write_f32(
        &bad,
        &[(
            "pixel_values".into(),
            vec![1, 3, 56, 56],
            vec![0.0; 3 * 56 * 56],
        )],
    );
    let e = run_err(
        pali()
            .args(["forward", "--checkpoint"])
            .arg(&dir)
            .arg("--inputs")
            .arg(&bad)
            .arg("--out")
            .arg(tmp.path().join("o.safetensors")),
    );
    assert!(e.contains("input_ids"), "{e}");
    // image-token count that does not match the image
    let ids = tmp.path().join("ids.safetensors");
    write_mixed(
        &ids,
        &[(
            "pixel_values".into(),
            vec![1, 3, 56, 56],
            vec![0.0; 3 * 56 * 56],
        )],
        &[("input_ids".into(), vec![1, 4], vec![400, 2, 5, 6])],
    );
    let e = run_err(
        pali()
            .args(["forward", "--checkpoint"])
            .arg(&dir)
            .arg("--inputs")
            .arg(&ids)
            .arg("--out")
            .arg(tmp.path().join("o.safetensors")),
    );
    assert!(
        e.contains("image features and image tokens do not match")
            && e.contains("has 1 image tokens"),
        "{e}"
    );
    // unknown device and unknown preset
    let e = run_err(pali().args(["model", "info", "paligemma-7b"]));
    assert!(e.contains("unknown preset `paligemma-7b`"), "{e}");
    let e = run_err(pali().args([
        "forward",
        "--device",
        "tpu",
        "--checkpoint",
        "x",
        "--inputs",
        "y",
        "--out",
        "z",
    ]));
    assert!(e.contains("unknown device `tpu`"), "{e}");
}

/// `pali bench train-step` reports what it measured, with and without gradient checkpointing
/// and in bf16 (a long text once drew the `<image>` id among its random tokens and failed).
#[test]
fn bench_train_step_reports_json() {
    for (extra, gc, dtype) in [
        (&[][..], false, "f32"),
        (&["--grad-checkpointing"][..], true, "f32"),
        (&["--dtype", "bf16"][..], false, "bf16"),
    ] {
        let out = run_ok(
            pali()
                .args(["bench", "train-step", "--preset", "tiny", "--batch", "2"])
                .args(["--text-len", "420", "--steps", "1", "--warmup", "0"])
                .args(extra),
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v["step_seconds_median"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["grad_checkpointing"], gc);
        assert_eq!(v["dtype"], dtype);
        assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
        for phase in [
            "inputs_s",
            "forward_s",
            "backward_s",
            "optimizer_s",
            "host_sync_s",
        ] {
            assert!(
                v["breakdown"][phase].as_f64().unwrap() > 0.0,
                "{phase}: {v}"
            );
        }
    }
}

/// A device that is not there is one line on stderr and a non-zero exit, never a panic or a
/// backtrace (this machine has no GPU; CI has lavapipe's software Vulkan adapter, which is not a
/// discrete GPU).
#[test]
fn missing_devices_are_one_line_errors() {
    let doctor = run_ok(pali().arg("doctor"));
    assert!(doctor.contains("backends compiled in: cpu"), "{doctor}");
    let no_driver = doctor.contains("cuda: no CUDA driver");
    let bench = |device: &str| {
        let mut c = pali();
        c.args(["bench", "train-step", "--preset", "tiny", "--batch", "2"])
            .args([
                "--text-len",
                "8",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--device",
                device,
            ]);
        c
    };
    let one_line = |e: &str, want: &str| {
        // Mesa's Vulkan loader complains about the sandbox's environment on its own.
        let ours: Vec<&str> = e
            .trim()
            .lines()
            .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
            .collect();
        assert_eq!(ours.len(), 1, "{e}");
        assert!(e.contains(want), "{e}");
        assert!(!e.contains("panicked") && !e.contains("backtrace"), "{e}");
    };
    let cuda = cfg!(feature = "cuda");
    if cuda && no_driver {
        let e = run_err(&mut bench("cuda"));
        one_line(&e, "device cuda:0: no CUDA driver: libcuda.so.1 not found");
    }
    if cuda {
        // With a driver: "this machine has N CUDA devices"; without: the driver is missing.
        one_line(&run_err(&mut bench("cuda:7")), "device cuda:7: ");
    } else {
        one_line(
            &run_err(&mut bench("cuda:7")),
            "rebuild with `--features cuda`",
        );
    }
    if cfg!(feature = "wgpu") {
        one_line(&run_err(&mut bench("wgpu:5")), "device wgpu:5: ");
        let quickstart =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
        let e = run_err(
            pali()
                .arg("train")
                .arg(&quickstart)
                .args(["--device", "wgpu:0,wgpu:1"]),
        );
        one_line(&e, "data parallelism on wgpu is not supported");
    }
}

/// The tensors of a checkpoint under one naming (hub files name the image encoder
/// `vision_tower.vision_model.*`, the fixtures `vision_tower.*`), sorted.
fn weights(path: &std::path::Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut v: Vec<_> = all_f32(&open(path))
        .into_iter()
        .map(|(n, s, d)| {
            (
                n.replace("vision_tower.vision_model.", "vision_tower."),
                s,
                d,
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A big_vision `.npz` in the released layout (scripts/big_vision_reference.py writes the
/// fixtures' weights that way, checked against HF's own converter) converts to the fixture's
/// exact weights, and `pali forward` on the result gives HF's logits; bf16 arrays stay bf16;
/// bad files and wrong configs are one-line errors that leave nothing behind.
#[test]
fn big_vision_npz_converts_to_the_hf_checkpoint() {
    let bv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision");
    let tmp = tempfile::tempdir().unwrap();
    for (variant, by_shape) in [("tiny-gemma1", true), ("tiny-gemma2", false)] {
        let fx = fixture(variant);
        let out = tmp.path().join(variant);
        let mut cmd = pali();
        cmd.args(["model", "convert", "--from"])
            .arg(bv.join(format!("{variant}.npz")))
            .arg("--tokenizer")
            .arg(fx.join("tokenizer.json"))
            .arg("--out")
            .arg(&out);
        if !by_shape {
            cmd.arg("--config").arg(fx.join("config.json"));
        }
        let stdout = run_ok(&mut cmd);
        if by_shape {
            assert!(
                stdout.contains("model tiny-gemma1 (matched by shapes)"),
                "{stdout}"
            );
        }
        let got = weights(&out.join("model.safetensors"));
        let want = weights(&fx.join("model.safetensors"));
        assert_eq!(got.len(), want.len(), "{variant}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.0, &g.1), (&w.0, &w.1), "{variant}");
            assert!(g.2 == w.2, "{variant}: {} differs", g.0);
        }
        for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
            assert!(out.join(f).is_file(), "{variant}: no {f}");
        }
        // The written config has HF's own values and types (transformers 5 refuses a float
        // `query_pre_attn_scalar`: scripts/hf_roundtrip.py found it).
        let json = |p: std::path::PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (ours, theirs) = (json(out.join("config.json")), json(fx.join("config.json")));
        for key in [
            "query_pre_attn_scalar",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
        ] {
            assert_eq!(
                ours["text_config"][key], theirs["text_config"][key],
                "{variant}: text_config.{key}"
            );
        }
        // Logits: the same as from the fixture's own checkpoint, bit for bit, so as close to
        // HF's as the parity tests measure (max |Δ| 1.2e-5 here).
        let logits = |ckpt: &std::path::Path, name: &str| {
            let path = tmp.path().join(format!("{variant}-{name}.safetensors"));
            run_ok(
                pali()
                    .args(["forward", "--checkpoint"])
                    .arg(ckpt)
                    .arg("--inputs")
                    .arg(fx.join("inputs.safetensors"))
                    .arg("--out")
                    .arg(&path),
            );
            f32s(&open(&path), "logits")
        };
        let (g, gs) = logits(&out, "converted");
        assert!(
            (g.clone(), gs.clone()) == logits(&fx, "fixture"),
            "{variant}"
        );
        let (w, ws) = f32s(&open(&fx.join("outputs.safetensors")), "logits");
        compare(&format!("{variant} logits"), &g, &gs, &w, &ws, 2e-5, 1e-5);
    }

    // Every array bf16 (`|V2`): the weights are the fixture's rounded to bf16, stored as bf16.
    let out = tmp.path().join("b16");
    run_ok(
        pali()
            .args(["model", "convert", "--from"])
            .arg(bv.join("tiny-gemma1.b16.npz"))
            .arg("--out")
            .arg(&out),
    );
    let f32_bytes = std::fs::metadata(tmp.path().join("tiny-gemma1/model.safetensors"))
        .unwrap()
        .len();
    let bf16_bytes = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        bf16_bytes * 10 < f32_bytes * 6,
        "{bf16_bytes} vs {f32_bytes}"
    );
    let want = weights(&fixture("tiny-gemma1").join("model.safetensors"));
    let got = weights(&out.join("model.safetensors"));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0);
        assert!(
            g.2 == bf16_rounded(&w.2),
            "{} is not the bf16 rounding",
            g.0
        );
    }

    // Bad input.
    let truncated = tmp.path().join("truncated.npz");
    let bytes = std::fs::read(bv.join("tiny-gemma1.npz")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let cases = [
        (
            truncated.clone(),
            vec![],
            "truncated.npz: not a usable .npz file".to_string(),
        ),
        (
            bv.join("tiny-gemma1.npz"),
            vec![
                "--config".to_string(),
                fixture("tiny-gemma2")
                    .join("config.json")
                    .display()
                    .to_string(),
            ],
            "tiny-gemma1.npz: array `params/img/embedding/kernel`: expected shape [8, 8, 3, 48], \
             found [14, 14, 3, 32]"
                .to_string(),
        ),
        (
            bv.join("tiny-gemma1.npz"),
            vec!["--config".to_string(), "paligemma-3b-224".to_string()],
            "expected shape [14, 14, 3, 1152], found [14, 14, 3, 32]".to_string(),
        ),
    ];
    for (npz, args, want) in cases {
        let out = tmp.path().join("bad");
        let e = run_err(
            pali()
                .args(["model", "convert", "--from"])
                .arg(&npz)
                .args(&args)
                .arg("--out")
                .arg(&out),
        );
        assert!(e.contains(&want), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        assert!(!out.exists());
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("partial")
            })
            .collect();
        assert!(leftovers.is_empty());
    }
    let e = run_err(
        pali()
            .args(["model", "convert", "--from"])
            .arg(bv.join("tiny-gemma1.npz"))
            .arg("--out")
            .arg(tmp.path().join("b16")),
    );
    assert!(e.contains("already exists"), "{e}");
}
