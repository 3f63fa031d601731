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
