//! The trainer end to end, through the `pali` binary: exact resume after SIGKILL, freezing,
//! per-group schedules read back from metrics.jsonl, and configs that must fail before training.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json")
}

/// A tiny two-stage run (32 px → 64 px).
pub(crate) fn config(dir: &Path, extra_stage1: &str) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "t"
out_dir = "out"
seed = 3
keep_checkpoints = 100

[model]
preset = "tiny"

[tokenizer]
path = "{tok}"

[[stage]]
name = "s1"
resolution = 32
text_len = 40
steps = 12
batch_size = 4
lr = 3e-3
log_every = 1
checkpoint_every = 4
source = [{{ kind = "synth", task = "caption", size = 100 }}, {{ kind = "synth", task = "ocr", size = 100, weight = 0.5 }}]
{extra_stage1}

[[stage]]
name = "s2"
resolution = 64
text_len = 40
steps = 6
batch_size = 4
lr = 1e-3
log_every = 1
checkpoint_every = 3
source = [{{ kind = "synth", task = "count", size = 100 }}]
"#,
        tok = tokenizer().display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The entries of `dir` whose name starts with `prefix`.
pub(crate) fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect()
}

pub(crate) fn final_model(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut v = entries(&dir.join("out/checkpoints"), "step-");
    v.sort();
    all_f32(&open(&v.last().unwrap().join("model.safetensors")))
}

/// Trains only stage `s1` of `cfg` (see [`config`]) into `DIR/OUT/out` with `--set` overrides.
pub(crate) fn train_s1(cfg: &Path, out: &str, sets: &[&str]) {
    let mut c = pali();
    c.args(["train", "--quiet"]).arg(cfg);
    c.args([
        "--set",
        &format!("run.out_dir=\"{out}/out\""),
        "--set",
        r#"run.stages=["s1"]"#,
    ]);
    for e in sets {
        c.args(["--set", e]);
    }
    run_ok(&mut c);
}

/// Largest |a − b| over all weights of two [`final_model`]s.
pub(crate) fn max_diff(
    a: &[(String, Vec<usize>, Vec<f32>)],
    b: &[(String, Vec<usize>, Vec<f32>)],
) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.2.iter().zip(&y.2).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

/// `pali train CFG ARGS…`, expected to fail: its error output.
fn train_err(cfg: &Path, args: &[&str]) -> String {
    run_err(pali().arg("train").arg(cfg).args(args))
}

pub(crate) fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Overrides that make every applied update readable from the weights: with `b1 = b2 = 0` and
/// no clip, Adam's update is g / (|g| + ε) = ±1 per element (for |g| ≫ ε), so each element with
/// a gradient moves by exactly the learning rate the optimizer applied; with a checkpoint after
/// every step, [`applied_lrs`] reads it back.
fn sign_updates(stage: &str) -> Vec<String> {
    [
        "optim.b1=0",
        "optim.b2=0",
        "optim.eps=1e-30",
        "optim.grad_clip=0",
        "checkpoint_every=1",
    ]
    .iter()
    .map(|k| format!("stage.{stage}.{k}"))
    .collect()
}

/// The learning rate each update applied to the tensor whose name ends with `suffix`, from the
/// checkpoints of a run under [`sign_updates`]: global step n → the median |Δ| of its nonzero
/// changes between checkpoints n − 1 and n (0 when nothing moved).
fn applied_lrs(dir: &Path, suffix: &str) -> std::collections::BTreeMap<u64, f64> {
    let ck = dir.join("out/checkpoints");
    let mut steps: Vec<u64> = std::fs::read_dir(&ck)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort();
    let tensor = |n: u64| -> Vec<f32> {
        let f = open(&ck.join(format!("step-{n:08}/model.safetensors")));
        let name = f
            .names()
            .find(|x| x.ends_with(suffix))
            .unwrap_or_else(|| panic!("no tensor *{suffix}"))
            .to_string();
        f32s(&f, &name).0
    };
    let mut out = std::collections::BTreeMap::new();
    for w in steps.windows(2) {
        if w[1] != w[0] + 1 {
            continue;
        }
        let (a, b) = (tensor(w[0]), tensor(w[1]));
        let mut moved: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from((y - x).abs()))
            .filter(|d| *d > 0.0)
            .collect();
        moved.sort_by(f64::total_cmp);
        out.insert(w[1], moved.get(moved.len() / 2).copied().unwrap_or(0.0));
    }
    out
}

/// A run's TensorBoard event files, in the order TensorBoard reads them (by name).
fn event_files(dir: &Path) -> Vec<PathBuf> {
    pali_trainer::tensorboard::event_files(&dir.join("out")).unwrap()
}

/// `got` (read from the weights) is `want` up to float32 rounding of the weights.
fn assert_lr(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-3 * want + 1e-9,
        "{what}: applied lr {got}, want {want}"
    );
}

#[test]
fn killed_run_resumes_bit_exactly() {
    let a = tempfile::tempdir().unwrap();
    let cfg = config(a.path(), "");
    run_ok(pali().arg("train").arg(&cfg).arg("--quiet"));
    let reference = final_model(a.path());
    let first: Vec<f64> = metrics(a.path())
        .iter()
        .filter_map(|m| m["loss"].as_f64())
        .collect();
    assert!(first.len() >= 18);

    // Same run, SIGKILLed as soon as its first checkpoint exists, then resumed. The kill must
    // land: a run that finished first, or exited by itself, fails the test.
    let b = tempfile::tempdir().unwrap();
    let cfg = config(b.path(), "");
    let mut child = pali()
        .arg("train")
        .arg(&cfg)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let target = b.path().join("out/checkpoints/step-00000004");
    while !target.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run exited ({status}) before its first checkpoint");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "not killed: {status}");
    }
    let summary = b.path().join("out/summary.json");
    assert!(!summary.exists(), "the killed run had finished");
    // The step the resume starts from: on a busy machine the run may have passed step 4.
    let resumed_from: i64 = entries(&b.path().join("out/checkpoints"), "step-")
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
        .unwrap();
    run_ok(pali().arg("train").arg(&cfg).arg("--quiet").arg("--resume"));
    let resumed = final_model(b.path());
    // TensorBoard: the uninterrupted run's event file holds metrics.jsonl's losses; the resumed
    // run added a file, read after the first, that starts with a restart at the checkpoint's
    // step. Read as TensorBoard does: a restart at s drops earlier events from step s on.
    let series = |files: &[PathBuf]| -> Vec<(i64, f32)> {
        use pali_trainer::tensorboard::{read, Event};
        let mut out: Vec<(i64, f32)> = Vec::new();
        for f in files {
            for (_, step, e) in read(f).unwrap() {
                match e {
                    Event::Restart => out.retain(|(s, _)| *s < step),
                    Event::Scalars(v) => out.extend(
                        v.iter()
                            .filter(|(t, _)| t == "loss")
                            .map(|(_, x)| (step, *x)),
                    ),
                    Event::FileVersion(_) => {}
                }
            }
        }
        out
    };
    let jsonl = |dir: &Path| -> Vec<(i64, f32)> {
        metrics(dir)
            .iter()
            .filter_map(|m| Some((m["step"].as_i64()?, m["loss"].as_f64()? as f32)))
            .collect()
    };
    let (ea, eb) = (event_files(a.path()), event_files(b.path()));
    assert_eq!(ea.len(), 1);
    assert_eq!(series(&ea), jsonl(a.path()));
    assert_eq!(eb.len(), 2, "one event file per process: {eb:?}");
    let second = pali_trainer::tensorboard::read(&eb[1]).unwrap();
    assert_eq!(
        (second[1].1, &second[1].2),
        (resumed_from, &pali_trainer::tensorboard::Event::Restart)
    );
    assert_eq!(series(&eb), jsonl(b.path()));
    assert_eq!(series(&eb), series(&ea));
    assert_eq!(reference.len(), resumed.len());
    for ((n1, s1, v1), (n2, s2, v2)) in reference.iter().zip(&resumed) {
        assert_eq!((n1, s1), (n2, s2));
        assert!(
            v1 == v2,
            "{n1}: resumed weights differ from the uninterrupted run"
        );
    }
}

#[test]
fn frozen_tower_stays_bit_identical_and_schedules_follow_groups() {
    let d = tempfile::tempdir().unwrap();
    let groups = r#"
[[stage.group]]
params = 'vision_tower\..*'
frozen = true
[[stage.group]]
params = 'multi_modal_projector\..*'
decay = "constant"
warmup_steps = 8
[[stage.group]]
params = 'language_model\..*'
decay = "constant"
"#;
    let cfg = config(d.path(), groups);
    let mut c = pali();
    c.arg("train")
        .arg(&cfg)
        .args(["--quiet", "--max-steps", "12"]);
    for s in sign_updates("s1") {
        c.args(["--set", &s]);
    }
    run_ok(&mut c);
    let ck = d.path().join("out/checkpoints");
    let m4 = all_f32(&open(&ck.join("step-00000004/model.safetensors")));
    let m12 = all_f32(&open(&ck.join("step-00000012/model.safetensors")));
    let mut changed = 0;
    for ((n, _, a), (_, _, b)) in m4.iter().zip(&m12) {
        if n.starts_with("vision_tower.") {
            assert!(a == b, "{n} changed although frozen");
        } else if a != b {
            changed += 1;
        }
    }
    assert!(
        changed > 5,
        "trainable parameters must change ({changed} did)"
    );
    // The projector's lr rises linearly over its 8 warm-up steps; the LLM runs at full lr.
    for m in metrics(d.path())
        .iter()
        .filter(|m| m["stage"] == "s1" && m.get("lr").is_some())
    {
        let step = m["stage_step"].as_f64().unwrap() - 1.0; // lr of the update that made this step
        let proj = m["lr"][r"multi_modal_projector\..*"].as_f64().unwrap();
        let llm = m["lr"][r"language_model\..*"].as_f64().unwrap();
        let vit = m["lr"][r"vision_tower\..*"].as_f64().unwrap();
        assert!((llm - 3e-3).abs() < 1e-12, "step {step}: llm lr {llm}");
        assert!(
            (proj - 3e-3 * (step / 8.0).min(1.0)).abs() < 1e-12,
            "step {step}: projector lr {proj}"
        );
        assert_eq!(vit, 0.0);
    }
    // The same schedules in the updates the optimizer applied (the logged lr is computed
    // apart from them): update n used the schedule at step n − 1.
    let proj = applied_lrs(d.path(), "multi_modal_projector.linear.weight");
    let llm = applied_lrs(d.path(), "layers.0.mlp.down_proj.weight");
    assert_eq!(proj.len(), 11, "updates 2..=12");
    for (&n, &got) in &proj {
        let s = (n - 1) as f64;
        assert_lr(
            &format!("projector, update {n}"),
            got,
            3e-3 * (s / 8.0).min(1.0),
        );
        assert_lr(&format!("llm, update {n}"), llm[&n], 3e-3);
    }
}

#[test]
fn bad_configs_fail_before_training_with_the_reason() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap();

    std::fs::write(
        &cfg,
        text.replace(
            "batch_size = 4\nlr = 3e-3",
            "batch_size = 4\nlearning_rate = 3e-3\nlr = 3e-3",
        ),
    )
    .unwrap();
    let e = train_err(&cfg, &[]);
    assert!(e.contains("unknown field `learning_rate`"), "{e}");

    let uncovered = "[[stage.group]]\nparams = 'language_model\\..*'\n";
    let cfg = config(d.path(), uncovered);
    let e = train_err(&cfg, &[]);
    assert!(
        e.contains("vision_tower.") && e.contains("not covered"),
        "{e}"
    );

    let twice = "[[stage.group]]\nparams = '.*'\n[[stage.group]]\nparams = 'vision_tower\\..*'\n";
    let cfg = config(d.path(), twice);
    let e = train_err(&cfg, &[]);
    assert!(e.contains("covered by 2 groups"), "{e}");

    let cfg = config(d.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            r#"{ kind = "synth", task = "count", size = 100 }"#,
            r#"{ kind = "jsonl", path = "missing.jsonl" }"#,
        ),
    )
    .unwrap();
    let e = train_err(&cfg, &[]);
    assert!(
        e.contains("missing.jsonl") && e.contains("not found"),
        "{e}"
    );
    assert!(
        !d.path().join("out/metrics.jsonl").exists(),
        "nothing may be trained"
    );

    let cfg = config(d.path(), "");
    // A checkpoint made for another tokenizer is refused: the fixture checkpoint with its
    // `<image>` moved to 401, against its own tokenizer (400).
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gemma1");
    let hf = d.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fx.join(f), hf.join(f)).unwrap();
    }
    let conf = std::fs::read_to_string(fx.join("config.json")).unwrap();
    let moved = conf.replace("\"image_token_index\": 400", "\"image_token_index\": 401");
    assert_ne!(conf, moved);
    std::fs::write(hf.join("config.json"), moved).unwrap();
    let e = train_err(
        &cfg,
        &[
            "--set",
            &format!("model.init_hf=\"{}\"", hf.display()),
            "--set",
            &format!("tokenizer.path=\"{}\"", hf.join("tokenizer.json").display()),
        ],
    );
    assert!(
        e.contains("has `<image>` = 400 but") && e.contains("hf/config.json expects 401"),
        "{e}"
    );

    // Tower changes are checked by field name, value and shape before anything trains.
    let cfg = config(d.path(), "");
    for (set, want) in [
        (
            "model.text.num_kv_head=4",
            "model.text.num_kv_head: no such field (fields: ",
        ),
        (
            "model.vision.num_layers=\"two\"",
            "model.vision.num_layers = \"two\": invalid type",
        ),
        (
            "model.vision.posemb_init=\"polar\"",
            "model.vision.posemb_init = \"polar\": unknown variant `polar`, expected `normal` or `sincos2d`",
        ),
        (
            "model.vision.image_size=64",
            "model.vision.image_size: the resolution is each stage's `resolution`",
        ),
        (
            "model.text.num_kv_heads=3",
            "num_heads (4) a multiple of num_kv_heads (3)",
        ),
    ] {
        let e = train_err(&cfg, &["--set", set]);
        assert!(e.contains(want), "{set}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    let e = train_err(
        &cfg,
        &[
            "--set",
            "model.vision={ hidden_size = 50, num_heads = 2, posemb_init = \"sincos2d\" }",
        ],
    );
    assert!(
        e.contains("posemb_init = \"sincos2d\" needs hidden_size (50) a multiple of 4"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let siglip = d.path().join("siglip.safetensors");
    std::fs::write(&siglip, b"").unwrap();
    let e = train_err(
        &cfg,
        &[
            "--set",
            "model.encoder=\"none\"",
            "--set",
            &format!("model.init_siglip=\"{}\"", siglip.display()),
        ],
    );
    assert!(
        e.contains("model.encoder = \"none\" has no image encoder to load it into"),
        "{e}"
    );

    // Settings that are wrong on their own: tests/e2e/bad_input.rs.
    let detect = config(d.path(), "");
    let text = std::fs::read_to_string(&detect).unwrap();
    std::fs::write(
        &detect,
        text.replace(r#"task = "ocr""#, r#"task = "detect""#),
    )
    .unwrap();
    let e = train_err(
        &detect,
        &["--set", "stage.s1.augment={ crop_min_area = 0.8 }"],
    );
    assert!(
        e.contains("crop_min_area moves objects") && e.contains("`detect`"),
        "{e}"
    );
}

/// Windowing and downscaling train and evaluate; augmentations keep a run reproducible.
#[test]
fn image_transforms_train_and_stay_deterministic() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let run = |out: &str, extra: &[&str]| {
        let sets = [&["stage.s1.steps=3", "stage.s1.eval_examples=4"][..], extra].concat();
        train_s1(&cfg, out, &sets);
        metrics(&d.path().join(out))
    };
    let loss = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|v| v["loss"].as_f64()).collect()
    };
    let plain = run("plain", &[]);
    let win = run("win", &["stage.s1.window=2", "stage.s1.resolution=16"]);
    let down = run("down", &["stage.s1.downscale=8"]);
    assert!(
        win.iter().any(|v| v.get("eval").is_some()),
        "windowed run evaluated"
    );
    assert_ne!(loss(&plain), loss(&win));
    assert_ne!(loss(&plain), loss(&down));
    let aug = [
        "stage.s1.augment={ crop_min_area = 0.7, jpeg_quality = [40, 90], random_resize = true }",
    ];
    let a1 = run("aug1", &aug);
    let a2 = run("aug2", &aug);
    assert_eq!(loss(&a1), loss(&a2), "augmentations are seeded");
    assert_ne!(loss(&a1), loss(&plain));
}

/// `model.text` / `model.vision` change the preset's towers: the trained checkpoint has their
/// shapes, and its config.json says so.
#[test]
fn tower_changes_shape_the_model() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    train_s1(
        &cfg,
        "mha",
        &[
            "stage.s1.steps=2",
            "model.text.num_kv_heads=4",
            "model.vision.num_layers=3",
        ],
    );
    let model = final_model(&d.path().join("mha"));
    let shape = |name: &str| {
        model
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1
            .clone()
    };
    // Tiny: width 64, 4 heads of 16: four key heads instead of one.
    assert_eq!(
        shape("language_model.model.layers.0.self_attn.k_proj.weight"),
        [64, 64]
    );
    assert!(model
        .iter()
        .any(|(n, _, _)| n.starts_with("vision_tower.vision_model.encoder.layers.2.")));
    let mut ck = entries(&d.path().join("mha/out/checkpoints"), "step-");
    ck.sort();
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck[0].join("config.json")).unwrap()).unwrap();
    assert_eq!(conf["text_config"]["num_key_value_heads"], 4, "{conf}");
    assert_eq!(conf["vision_config"]["num_hidden_layers"], 3, "{conf}");
}

/// `model.init_big_vision` starts from a big_vision `.npz`: the model is the preset its shapes
/// match, its weights the file's (one step at lr 0 keeps the HF fixture's weights exactly); a
/// preset that does not fit and a second whole-model start are refused before training.
#[test]
fn big_vision_start_loads_the_npz() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("tiny-gemma1");
    let npz =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision/tiny-gemma1.npz");
    let text = std::fs::read_to_string(config(d.path(), "")).unwrap();
    let text = text
        .replacen(
            "preset = \"tiny\"\n",
            &format!("init_big_vision = \"{}\"\n", npz.display()),
            1,
        )
        .replace(
            &format!("path = \"{}\"", tokenizer().display()),
            &format!("path = \"{}\"", fx.join("tokenizer.json").display()),
        )
        .replace("resolution = 32", "resolution = 56")
        .replace("resolution = 64", "resolution = 112");
    let cfg = d.path().join("bv.toml");
    std::fs::write(&cfg, text).unwrap();
    let stdout = run_ok(
        pali()
            .args([
                "train",
                "--max-steps",
                "1",
                "--set",
                "stage.1.lr=0.0",
                "--set",
                "stage.1.checkpoint_every=1",
            ])
            .arg(&cfg),
    );
    assert!(stdout.contains("outputs in"), "{stdout}");
    let mut ck = entries(&d.path().join("out/checkpoints"), "step-");
    ck.sort();
    let card = std::fs::read_to_string(ck[0].join("README.md")).unwrap();
    assert!(card.contains("from the big_vision checkpoint `"), "{card}");
    let norm = |v: Vec<(String, Vec<usize>, Vec<f32>)>| {
        let mut v: Vec<_> = v
            .into_iter()
            .map(|(n, s, x)| {
                (
                    n.replace("vision_tower.vision_model.", "vision_tower."),
                    s,
                    x,
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let got = norm(final_model(d.path()));
    let want = norm(all_f32(&open(&fx.join("model.safetensors"))));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!(g == w, "{} differs", g.0);
    }
    let scratch: Vec<_> = entries(&d.path().join("out"), ".big_vision")
        .into_iter()
        .collect();
    assert!(scratch.is_empty(), "{scratch:?}");

    let e = train_err(
        &cfg,
        &[
            "--set",
            "model.preset=\"tiny-gemma2\"",
            "--set",
            "run.out_dir=\"o2\"",
        ],
    );
    assert!(
        e.contains("tiny-gemma1.npz: array `params/img/embedding/kernel`: expected shape"),
        "{e}"
    );
    let e = train_err(
        &cfg,
        &[
            "--set",
            &format!("model.init_hf=\"{}\"", fx.display()),
            "--set",
            "run.out_dir=\"o3\"",
        ],
    );
    assert!(
        e.contains("model.init_big_vision: give either it or `init_hf`"),
        "{e}"
    );
}

/// The README's main job, shortened through `--set`: stage 0 and the three PaliGemma stages
/// run, the resolution changes, the transfer stage evaluates (blind control too), and the
/// curves are drawn.
#[test]
fn quickstart_config_runs_every_stage() {
    let d = tempfile::tempdir().unwrap();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    let out = d.path().join("qs");
    let s = run_ok(
        pali()
            .arg("train")
            .arg(&cfg)
            .arg("--quiet")
            .args([
                "--set",
                "stage.siglip.steps=2",
                "--set",
                "stage.siglip.eval.examples=8",
                "--set",
                "stage.lm.steps=2",
                "--set",
                "stage.lm.eval.examples=4",
                "--set",
                "stage.stage1.steps=3",
                "--set",
                "stage.stage2.steps=2",
                "--set",
                "stage.transfer.steps=2",
            ])
            .args([
                "--set",
                "stage.transfer.eval_examples=4",
                "--set",
                "stage.stage2.batch_size=2",
            ])
            .arg("--set")
            .arg(format!("run.out_dir=\"{}\"", out.display())),
    );
    for stage in ["stage1", "stage2", "transfer"] {
        assert!(s.contains(stage), "{s}");
        assert!(out.join(format!("curves-{stage}.svg")).is_file());
    }
    for stage in ["siglip", "lm"] {
        assert!(out.join(format!("{stage}/curves-{stage}.svg")).is_file());
        assert!(out
            .join(format!("{stage}/final/model.safetensors"))
            .is_file());
    }
    // The closing lines: stage 0's evaluations, and VQA by question type with the blind
    // control.
    assert!(s.contains("siglip: recall@1 image→text"), "{s}");
    assert!(s.contains("lm: validation perplexity"), "{s}");
    assert!(
        s.contains("blind (grey)") && s.contains("transfer: all questions"),
        "{s}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.as_array().unwrap().len(), 5);
    assert!(summary[4]["eval_accuracy"].as_f64().is_some());
    let blind = &summary[4]["eval_metrics"]["blind"];
    assert!(blind["exact_match"].as_f64().is_some(), "{blind}");
    // stage 2 resampled the 4×4 position grid to 8×8
    let ck = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let f = open(&ck.join("model.safetensors"));
    assert_eq!(
        f.shape("vision_tower.vision_model.embeddings.position_embedding.weight")
            .unwrap(),
        &[64, 48]
    );
}

/// Transfer a `pali train` checkpoint (self-contained: config.json + tokenizer.json) to a JSONL
/// dataset with `pali finetune` (with `--task` and `--set`); the written config is a valid run
/// config, and the result is again a loadable checkpoint.
#[test]
fn finetune_a_checkpoint_on_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    run_ok(pali().arg("train").arg(&cfg).arg("--quiet"));
    let ck = std::fs::read_dir(d.path().join("out/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    assert!(ck.join("config.json").is_file() && ck.join("tokenizer.json").is_file());
    // What HF's AutoProcessor and generate read (contents: checkpoint::processor_files_match_transformers).
    for f in [
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing from {}", ck.display());
    }
    let card = std::fs::read_to_string(ck.join("README.md")).unwrap();
    assert!(
        card.contains("# t, step 18")
            && card.contains("| s1 | 12 | 32 | 4 | synth caption (100) ×1")
            && card.contains("| s2 | 6 | 64 |"),
        "{card}"
    );
    let data = synth_data(d.path(), 8, 64);
    let out = d.path().join("ft");
    let s = run_ok(
        pali()
            .args([
                "finetune",
                "--quiet",
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--text-len",
                "40",
                "--checkpoint",
            ])
            .arg(&ck)
            .arg("--train")
            .arg(data.join("vqa.jsonl"))
            .arg("--val")
            .arg(data.join("vqa.jsonl"))
            .arg("--out")
            .arg(&out)
            .args(["--task", "vqav2", "--set", "stage.transfer.grad_clip=0.5"]),
    );
    assert!(
        s.lines().any(|l| l.starts_with("transfer")
            && l.split_whitespace().nth(1) == Some("4")
            && l.contains('%')),
        "{s}"
    );
    let written = std::fs::read_to_string(out.join("finetune.toml")).unwrap();
    assert!(
        written.contains("8 examples × 2 epochs / batch 4 = 4 steps")
            && written.contains(r#"task = "vqav2""#)
            && written.contains("--set 'stage.transfer.grad_clip=0.5'"),
        "{written}"
    );
    let resolved = std::fs::read_to_string(out.join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("grad_clip = 0.5"), "{resolved}");
    // the fine-tuned checkpoint loads as an HF checkpoint
    let ft = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let (c, _) = pali_model::load_hf::<burn::backend::Flex>(&ft, &Default::default()).unwrap();
    assert_eq!(c.vision.image_size(), 64);
    // The same data packed into shards: finetune reads the directory as a shards source.
    let shards = d.path().join("vqa-shards");
    pack(&data.join("vqa.jsonl"), &shards, &[]);
    let out = d.path().join("ft-shards");
    run_ok(
        pali()
            .args(["finetune", "--quiet", "--epochs", "1", "--batch-size", "4"])
            .args(["--text-len", "40", "--checkpoint"])
            .arg(&ck)
            .arg("--train")
            .arg(&shards)
            .arg("--out")
            .arg(&out),
    );
    let written = std::fs::read_to_string(out.join("finetune.toml")).unwrap();
    assert!(
        written.contains("8 examples × 1 epochs / batch 4 = 2 steps"),
        "{written}"
    );
    let resolved = std::fs::read_to_string(out.join("config.resolved.toml")).unwrap();
    assert!(resolved.contains(r#"kind = "shards""#), "{resolved}");
}

/// Resuming exactly at a stage boundary (the checkpoint written when stage 1 ends) starts
/// stage 2's own data stream, as the uninterrupted run does.
#[test]
fn resume_at_a_stage_boundary_is_bit_exact() {
    let a = tempfile::tempdir().unwrap();
    run_ok(pali().arg("train").arg(config(a.path(), "")).arg("--quiet"));
    let reference = final_model(a.path());
    let b = tempfile::tempdir().unwrap();
    let cfg = config(b.path(), "");
    run_ok(
        pali()
            .arg("train")
            .arg(&cfg)
            .arg("--quiet")
            .args(["--max-steps", "12"]),
    );
    assert!(b.path().join("out/checkpoints/step-00000012").is_dir());
    run_ok(pali().arg("train").arg(&cfg).arg("--quiet").arg("--resume"));
    let resumed = final_model(b.path());
    for ((n, _, v1), (_, _, v2)) in reference.iter().zip(&resumed) {
        assert!(
            v1 == v2,
            "{n}: differs after resuming at the stage boundary"
        );
    }
}

/// The paper's default start: SigLIP and Gemma checkpoints, the Gemma vocabulary lacking the
/// 1152 `<loc>`/`<seg>` tokens, grown by `token_init`.
#[test]
fn unimodal_start_loads_both_towers_and_grows_the_vocabulary() {
    use burn::backend::Flex;
    use pali_data::PaliTokenizer;
    let d = tempfile::tempdir().unwrap();
    let tok = PaliTokenizer::from_file(&tokenizer()).unwrap();
    let (v, v0) = (tok.vocab_size(), tok.loc[0] as usize);
    assert_eq!(
        v - v0,
        1152,
        "loc/seg tokens are the last ids of the test tokenizer"
    );
    // Unimodal checkpoints cut out of a random tiny PaliGemma, with HF's unimodal names.
    let cfg = pali_model::presets::tiny(v, tok.image as usize, 32);
    let full = d.path().join("full.safetensors");
    pali_model::checkpoint::save_safetensors(&cfg.init::<Flex>(&Default::default()), &full)
        .unwrap();
    let all = all_f32(&open(&full));
    let siglip: Vec<_> = all
        .iter()
        .filter_map(|(n, s, x)| {
            n.strip_prefix("vision_tower.")
                .map(|k| (k.to_string(), s.clone(), x.clone()))
        })
        .collect();
    let gemma: Vec<_> = all
        .iter()
        .filter_map(|(n, s, x)| {
            let k = n.strip_prefix("language_model.")?.to_string();
            if k == "model.embed_tokens.weight" {
                let dim = s[1];
                return Some((k, vec![v0, dim], x[..v0 * dim].to_vec()));
            }
            Some((k, s.clone(), x.clone()))
        })
        .collect();
    assert!(siglip.iter().any(|t| t.0.starts_with("vision_model.")));
    write_f32(&d.path().join("siglip.safetensors"), &siglip);
    write_f32(&d.path().join("gemma.safetensors"), &gemma);

    let run = |token_init: &str| -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let dir = d.path().join(token_init);
        std::fs::create_dir_all(&dir).unwrap();
        let extra = format!(
            "init_siglip = \"{}\"\ninit_gemma = \"{}\"\ntoken_init = \"{token_init}\"\n",
            d.path().join("siglip.safetensors").display(),
            d.path().join("gemma.safetensors").display()
        );
        let text = std::fs::read_to_string(config(&dir, "")).unwrap();
        let text = text.replacen(
            "preset = \"tiny\"\n",
            &format!("preset = \"tiny\"\n{extra}"),
            1,
        );
        std::fs::write(dir.join("run.toml"), text).unwrap();
        // One step at lr 0 writes the initial weights to a checkpoint.
        run_ok(
            pali()
                .args([
                    "train",
                    "--quiet",
                    "--max-steps",
                    "1",
                    "--set",
                    "stage.1.lr=0.0",
                    "--set",
                    "stage.1.checkpoint_every=1",
                ])
                .arg(dir.join("run.toml")),
        );
        final_model(&dir)
    };
    for init in ["normal", "avg_emb"] {
        let got = run(init);
        let get = |name: &str| {
            got.iter()
                .find(|t| t.0 == name)
                .unwrap_or_else(|| panic!("{name}"))
        };
        // Every vision tensor is the SigLIP checkpoint's.
        for (n, _, x) in &siglip {
            assert_eq!(&get(&format!("vision_tower.{n}")).2, x, "{init}: {n}");
        }
        let emb = get("language_model.model.embed_tokens.weight");
        let dim = emb.1[1];
        assert_eq!(emb.1[0], v);
        let old = &gemma
            .iter()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap()
            .2;
        assert_eq!(
            &emb.2[..v0 * dim],
            &old[..],
            "{init}: the checkpoint's rows are kept"
        );
        let new = &emb.2[v0 * dim..];
        let mean: Vec<f32> = (0..dim)
            .map(|j| (0..v0).map(|r| old[r * dim + j]).sum::<f32>() / v0 as f32)
            .collect();
        let dev_from_mean = new
            .iter()
            .enumerate()
            .map(|(i, x)| (x - mean[i % dim]).abs())
            .fold(0f32, f32::max);
        let std = (new.iter().map(|x| x * x).sum::<f32>() / new.len() as f32).sqrt();
        match init {
            // N(0, 0.02): the sample standard deviation of ~74k values is within 2 %.
            "normal" => assert!((std - 0.02).abs() < 0.0005, "std {std}"),
            // The mean embedding plus N(0, 0.002) noise.
            _ => assert!(
                dev_from_mean < 0.012 && dev_from_mean > 0.0,
                "{dev_from_mean}"
            ),
        }
    }
}

/// `reset = ["vision_tower"]` re-initialises the image encoder at the stage start and nothing
/// else (stage 2 runs at lr 0, so any change is the reset).
#[test]
fn reset_reinitialises_only_the_named_tower() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "name = \"s2\"\n",
        "name = \"s2\"\nreset = [\"vision_tower\"]\n",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    run_ok(
        pali()
            .args(["train", "--quiet", "--set", "stage.2.lr=0.0"])
            .arg(&cfg),
    );
    let load = |step: &str| {
        all_f32(&open(
            &d.path()
                .join(format!("out/checkpoints/step-{step}/model.safetensors")),
        ))
    };
    let (before, after) = (load("00000012"), load("00000018"));
    let mut changed = (0, 0);
    for ((n, _, a), (_, _, b)) in before.iter().zip(&after) {
        if n.contains("position_embedding") {
            continue; // resampled 32 → 64 px anyway
        }
        if n.starts_with("vision_tower.") {
            changed.0 += usize::from(a != b);
        } else {
            assert_eq!(a, b, "{n} must not change");
            changed.1 += 1;
        }
    }
    assert!(
        changed.0 > 10,
        "vision tensors re-initialised: {}",
        changed.0
    );
    let e = train_err(&cfg, &["--set", "stage.2.reset=[\"vision\"]"]);
    assert!(e.contains("unknown variant `vision`"), "{e}");
}

/// PaliGemma 2 detection targets: noise boxes need `<noise>` (added with `pali tokenizer add`),
/// then train and evaluate (the evaluation forbids `<noise>`, as PaliGemma 2 decodes).
#[test]
fn noise_boxes_train_with_a_noise_token() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let det = r#"{ kind = "synth", task = "detect", size = 100, noise_boxes = 4 }"#;
    std::fs::write(
        &cfg,
        text.replace(r#"{ kind = "synth", task = "count", size = 100 }"#, det),
    )
    .unwrap();
    let e = train_err(&cfg, &[]);
    assert!(
        e.contains("noise_boxes needs a `<noise>` token") && e.contains("pali tokenizer add"),
        "{e}"
    );
    let tok = d.path().join("tok.json");
    let s = run_ok(
        pali()
            .args(["tokenizer", "add", "--tokens", "<noise>", "--out"])
            .arg(&tok)
            .arg(tokenizer()),
    );
    assert!(s.contains("<noise> = 1753"), "{s}");
    run_ok(
        pali()
            .args(["train", "--quiet"])
            .arg(&cfg)
            .args(["--set", &format!("tokenizer.path=\"{}\"", tok.display())])
            .args([
                "--set",
                "stage.s2.steps=2",
                "--set",
                "stage.s2.eval_examples=4",
            ])
            .args(["--set", "stage.s1.steps=1"]),
    );
    let m = metrics(d.path());
    let ev = m.iter().rev().find(|v| v.get("eval").is_some()).unwrap();
    assert!(ev["eval"]["map"].is_number(), "{ev}");

    let e = train_err(&cfg, &["--set", "stage.s1.source.0.noise_boxes=3"]);
    assert!(
        e.contains("noise_boxes applies to synthetic `detect`"),
        "{e}"
    );
}

/// `continues = true`: one rsqrt schedule over both stages (no second warm-up), the second
/// stage ending in a cooldown to zero, as big_vision's pretraining recipe.
#[test]
fn a_schedule_continues_across_stages() {
    let d = tempfile::tempdir().unwrap();
    let g = |extra: &str| {
        format!("[[stage.group]]\nparams = '.*'\ndecay = \"rsqrt\"\nwarmup_steps = 4\ntimescale = 4\ncontinues = true\n{extra}")
    };
    let cfg = config(d.path(), &g(""));
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&g("cooldown_steps = 6\n"));
    std::fs::write(&cfg, text).unwrap();
    let mut c = pali();
    c.arg("train").arg(&cfg).arg("--quiet");
    for s in [sign_updates("s1"), sign_updates("s2")].concat() {
        c.args(["--set", &s]);
    }
    run_ok(&mut c);
    // The schedule of run step s (0-based: the update that makes global step s + 1).
    let want = |s: f64| {
        let s2 = s >= 12.0;
        let base = if s2 { 1e-3 } else { 3e-3 };
        let mut want = base * (s / 4.0).min(1.0);
        if s > 4.0 {
            want = base / ((s + 4.0 - 4.0) / 4.0).sqrt();
        }
        if s2 {
            want *= ((18.0 - s) / 6.0).clamp(0.0, 1.0);
        }
        want
    };
    // Read from the applied updates (global steps 2..=18, stage 2's first one included).
    let applied = applied_lrs(d.path(), "layers.0.mlp.down_proj.weight");
    assert_eq!(applied.len(), 17, "{applied:?}");
    for (&n, &got) in &applied {
        assert_lr(&format!("update {n}"), got, want((n - 1) as f64));
    }
    let mut seen = 0;
    for m in metrics(d.path()).iter().filter(|m| m.get("lr").is_some()) {
        let lr = m["lr"][".*"].as_f64().unwrap();
        let s2 = m["stage"] == "s2";
        // The update that made this step: step of the run = 12 (stage 1) + stage step − 1.
        let step = m["stage_step"].as_f64().unwrap() - 1.0 + if s2 { 12.0 } else { 0.0 };
        let base = if s2 { 1e-3 } else { 3e-3 };
        let mut want = base * (step / 4.0).min(1.0);
        if step > 4.0 {
            want = base / ((step + 4.0 - 4.0) / 4.0).sqrt();
        }
        if s2 {
            want *= ((18.0 - step) / 6.0).clamp(0.0, 1.0);
            seen += 1;
        }
        assert!(
            (lr - want).abs() < 1e-12,
            "{} step {step}: lr {lr}, want {want}",
            m["stage"]
        );
    }
    assert_eq!(seen, 6);
}

/// A stage's length in epochs or examples becomes steps when the config is loaded.
#[test]
fn stage_length_in_epochs_or_examples() {
    use pali_trainer::config::RunConfig;
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::load(&cfg, &sets)
    };
    // s2: one synthetic source of 100 examples, batch 4.
    let c = load(&["stage.s2.steps=0", "stage.s2.epochs=0.5"]).unwrap();
    assert_eq!(c.stages[1].steps, 13); // ceil(50 / 4)
    let c = load(&["stage.s2.steps=0", "stage.s2.examples=9"]).unwrap();
    assert_eq!(c.stages[1].steps, 3);
    let c = load(&[
        "stage.s2.steps=0",
        "stage.s2.epochs=2",
        "stage.s2.source.0.few_shot=10",
    ])
    .unwrap();
    assert_eq!(c.stages[1].steps, 5);
    let e = load(&["stage.s2.steps=0"]).unwrap_err().to_string();
    assert!(e.contains("give `steps`, `epochs` or `examples`"), "{e}");
    let e = load(&["stage.s2.epochs=1", "stage.s2.examples=3"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not both"), "{e}");
}

/// The paper's recipes (configs/paligemma-3b, configs/transfer) parse, chain their steps, run
/// on a GPU, and fail only for want of the files a user supplies (tokenizer, checkpoints, data).
#[test]
fn paper_recipes_parse_and_chain() {
    use pali_trainer::config::RunConfig;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for dir in ["paligemma-3b", "transfer"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            let c = RunConfig::parse(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let err = RunConfig::load(&p, &[]).unwrap_err().to_string();
            assert!(
                err.contains("not found") || err.contains("no config.json"),
                "{}: {err}",
                p.display()
            );
            assert!(c
                .stages
                .iter()
                .all(|s| s.steps > 0 || s.epochs.is_some() || s.examples.is_some()));
            assert_eq!(c.run.device.as_deref(), Some("cuda"), "{}", p.display());
            n += 1;
        }
    }
    assert_eq!(n, 8);
    let steps = |examples: u64| examples.div_ceil(1024);
    let s1 = steps(1_000_000_000);
    let s448 = RunConfig::parse(&root.join("paligemma-3b/stage2-448.toml"), &[]).unwrap();
    assert_eq!(s448.run.start_step, s1);
    let init = s448.model.init_hf.unwrap().display().to_string();
    assert!(
        init.ends_with(&format!("stage1-224/checkpoints/step-{s1:08}")),
        "{init}"
    );
    let s896 = RunConfig::parse(&root.join("paligemma-3b/stage2-896.toml"), &[]).unwrap();
    assert_eq!(s896.run.start_step, s1 + steps(50_000_000));
    assert_eq!(s896.stages[0].resolution, 896);
}

/// `run.gradient_checkpointing` changes memory, not results: the same weights from the same run,
/// and a lower peak on a model whose activations outweigh its weights (bench/nano, 8 × 320
/// tokens: measured 720 → 470 MiB peak RSS), through `pali bench train-step`, which runs
/// `pali train`'s step with the same `Autodiff<_, BalancedCheckpointing>` backend. A flag that
/// did nothing would pass the first half and fail the second.
#[test]
fn gradient_checkpointing_gives_the_same_weights_in_less_memory() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let run = |out: &str, gc: bool| {
        let gc = format!("run.gradient_checkpointing={gc}");
        train_s1(&cfg, out, &["stage.s1.steps=4", &gc]);
        final_model(&d.path().join(out))
    };
    let plain = run("plain", false);
    let gc = run("gc", true);
    assert_eq!(plain.len(), gc.len());
    for ((n, _, a), (_, _, b)) in plain.iter().zip(&gc) {
        assert_eq!(a, b, "{n}");
    }
    let nano = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/nano/config.json");
    let peak = |gc: bool| -> f64 {
        let mut c = pali();
        c.args(["bench", "train-step", "--config"]).arg(&nano);
        c.args([
            "--batch",
            "8",
            "--text-len",
            "256",
            "--steps",
            "1",
            "--warmup",
            "0",
        ]);
        if gc {
            c.arg("--grad-checkpointing");
        }
        let v: serde_json::Value = serde_json::from_str(&run_ok(&mut c)).unwrap();
        assert_eq!(v["grad_checkpointing"], gc);
        v["peak_rss_mib"].as_f64().unwrap()
    };
    let (without, with) = (peak(false), peak(true));
    eprintln!("peak RSS: {without:.0} MiB without gradient checkpointing, {with:.0} MiB with");
    assert!(
        with < 0.85 * without,
        "gradient checkpointing saved too little: {without:.0} → {with:.0} MiB"
    );
}

/// `grad_accum` splits each batch into micro-batches with the same update (up to float
/// summation order), for both loss reductions; `llm_dropout` changes training and stays
/// reproducible.
#[test]
fn gradient_accumulation_and_dropout() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let run = |out: &str, extra: &[&str]| {
        train_s1(&cfg, out, &[&["stage.s1.steps=3"][..], extra].concat());
        final_model(&d.path().join(out))
    };
    for red in ["per_example", "per_token"] {
        let r = format!("stage.s1.loss.reduction=\"{red}\"");
        let one = run(&format!("{red}-1"), &[&r]);
        let two = run(&format!("{red}-2"), &[&r, "stage.s1.grad_accum=2"]);
        let four = run(&format!("{red}-4"), &[&r, "stage.s1.grad_accum=4"]);
        let (d2, d4) = (max_diff(&one, &two), max_diff(&one, &four));
        eprintln!("{red}: max weight difference {d2} (2 micro-batches), {d4} (4)");
        assert!(
            d2 < 1e-4 && d4 < 1e-4,
            "{red}: max weight difference {d2}, {d4}"
        );
    }
    let plain = run("nodrop", &[]);
    let a = run("drop-a", &["stage.s1.llm_dropout=0.3"]);
    let b = run("drop-b", &["stage.s1.llm_dropout=0.3"]);
    assert!(max_diff(&plain, &a) > 1e-5, "dropout had no effect");
    assert_eq!(max_diff(&a, &b), 0.0, "dropout is seeded");
    let e = train_err(&cfg, &["--set", "stage.s1.grad_accum=3"]);
    assert!(
        e.contains("grad_accum 3 must be > 0 and divide batch_size 4"),
        "{e}"
    );
}

/// `run.dtype = "bf16"` (mixed precision) trains with bf16 matmuls: the loss falls as in f32 and
/// the weights end near the f32 run's, but not equal to them (the bf16 path really ran).
#[test]
fn bf16_mixed_precision_trains_near_f32() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let run = |out: &str, extra: &[&str]| {
        train_s1(&cfg, out, &[&["stage.s1.steps=8"][..], extra].concat());
        let losses: Vec<f64> = metrics(&d.path().join(out))
            .iter()
            .filter_map(|v| v["loss"].as_f64())
            .collect();
        (losses, final_model(&d.path().join(out)))
    };
    let (l32, w32) = run("f32", &[]);
    let (l16, w16) = run("bf16", &[r#"run.dtype="bf16""#]);
    eprintln!("f32 losses {l32:?}\nbf16 losses {l16:?}");
    assert!(
        l16.last().unwrap() < &(l16[0] * 0.9),
        "bf16 loss did not fall: {l16:?}"
    );
    for (a, b) in l32.iter().zip(&l16) {
        assert!(
            (a - b).abs() < 0.05 * a,
            "losses part: {a} (f32) vs {b} (bf16)"
        );
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for ((n, _, a), (_, _, b)) in w32.iter().zip(&w16) {
        for (x, y) in a.iter().zip(b) {
            assert!(y.is_finite(), "{n}: non-finite bf16 weight");
            diff += ((x - y) as f64).powi(2);
            norm += (*x as f64).powi(2);
        }
    }
    let rel = (diff / norm).sqrt();
    eprintln!("relative weight difference bf16 vs f32: {rel:.2e}");
    assert!(rel > 0.0 && rel < 0.05, "relative weight difference {rel}");
}

/// wgpu (WGSL) has no bf16: a bf16 run there is refused before training, naming the key,
/// whether wgpu comes from `--device` or from the config's `run.device`.
#[cfg(feature = "wgpu")]
#[test]
fn bf16_is_refused_on_wgpu() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    for device in [
        &["--device", "wgpu"][..],
        &["--set", r#"run.device="wgpu""#],
    ] {
        let e = train_err(&cfg, &[device, &["--set", r#"run.dtype="bf16""#]].concat());
        assert!(
            e.contains("run.dtype = \"bf16\"") && e.contains("does not support bf16"),
            "{device:?}: {e}"
        );
    }
}

/// Data parallelism: on two devices (`run.device = "cpu,cpu"`: two replicas in two threads) a
/// step equals the one-device step with the batch in two micro-batches, bit for bit; with
/// `grad_accum = 2` on top, the one with four, up to summation order. It resumes bit-exactly.
/// A batch that does not split is refused.
///
/// There is one CPU device, so no bytes cross devices here; but "cpu,cpu" takes every step a
/// second device takes (crates/trainer/src/parallel.rs has no same-device shortcut): the model
/// forked onto device 1, its micro-batches and loss weights moved there, the backward pass in
/// the worker thread, its loss and gradients moved back and summed on device 0. A worker whose
/// gradients were lost or doubled would break the bit-for-bit equality with `grad_accum = 2`.
#[test]
fn data_parallel_matches_gradient_accumulation() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let run = |out: &str, extra: &[&str]| {
        train_s1(&cfg, out, &[&["stage.s1.steps=3"][..], extra].concat());
        final_model(&d.path().join(out))
    };
    let two = r#"run.device="cpu,cpu""#;
    let accum2 = run("accum2", &["stage.s1.grad_accum=2"]);
    let dp2 = run("dp2", &[two]);
    let accum4 = run("accum4", &["stage.s1.grad_accum=4"]);
    let dp2x2 = run("dp2x2", &[two, "stage.s1.grad_accum=2"]);
    let (a, b) = (max_diff(&accum2, &dp2), max_diff(&accum4, &dp2x2));
    eprintln!("max weight difference: 2 devices vs 2 micro-batches {a}, 2×2 vs 4 {b}");
    assert!(a == 0.0 && b < 1e-5, "{a}, {b}");
    let plain = run("plain", &[]);
    assert!(max_diff(&plain, &dp2) > 0.0, "two devices changed nothing?");
    // Stopped after its first checkpoint and resumed, a data-parallel run ends bit-exactly where
    // the uninterrupted one (dp2) does.
    let resume = |extra: &[&str]| {
        run_ok(
            pali()
                .arg("train")
                .arg(&cfg)
                .args(["--quiet", "--device", "cpu,cpu"])
                .args(["--set", r#"run.out_dir="dp-resumed/out""#])
                .args(["--set", r#"run.stages=["s1"]"#])
                .args([
                    "--set",
                    "stage.s1.steps=3",
                    "--set",
                    "stage.s1.checkpoint_every=2",
                ])
                .args(extra),
        )
    };
    resume(&["--max-steps", "2"]);
    let ck = d.path().join("dp-resumed/out/checkpoints");
    assert!(ck.join("step-00000002").is_dir() && !ck.join("step-00000003").exists());
    resume(&["--resume"]);
    let resumed = final_model(&d.path().join("dp-resumed"));
    assert_eq!(
        max_diff(&dp2, &resumed),
        0.0,
        "resumed data-parallel run differs"
    );
    let e = train_err(&cfg, &["--device", "cpu,cpu,cpu"]);
    assert!(
        e.contains("batch_size 4 does not split into grad_accum 1 × 3 ranks"),
        "{e}"
    );
}

/// Training runs on a GPU backend's kernels (forward, backward, optimizer): 3 steps on wgpu
/// (lavapipe in CI) and on the CPU from the same checkpoint give the same losses and nearly the
/// same weights.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_training_matches_cpu() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    // One start for both: random initialisation differs between backends' generators.
    train_s1(
        &cfg,
        "init",
        &["stage.s1.steps=1", "stage.s1.checkpoint_every=1"],
    );
    let ck = d.path().join("init/out/checkpoints/step-00000001");
    let init = format!("model.init_hf=\"{}\"", ck.display());
    train_s1(&cfg, "cpu", &["stage.s1.steps=3", &init]);
    train_s1(
        &cfg,
        "wgpu",
        &["stage.s1.steps=3", &init, r#"run.device="wgpu""#],
    );
    let losses = |run: &str| -> Vec<f64> {
        metrics(&d.path().join(run))
            .iter()
            .filter_map(|m| m["loss"].as_f64())
            .collect()
    };
    let (cpu, gpu) = (losses("cpu"), losses("wgpu"));
    assert_eq!((cpu.len(), gpu.len()), (3, 3));
    let rel = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| ((a - b) / a).abs())
        .fold(0f64, f64::max);
    let w = max_diff(
        &final_model(&d.path().join("cpu")),
        &final_model(&d.path().join("wgpu")),
    );
    eprintln!("wgpu vs cpu: losses {cpu:?} vs {gpu:?} (max relative {rel:.2e}), weights {w:.2e}");
    assert!(rel <= 1e-4, "{cpu:?} vs {gpu:?}");
    assert!(w <= 1e-4, "largest weight difference {w}");
}

/// A step whose loss or gradients are not finite leaves the weights as they were, on the
/// device (no read per step); the run stops at the next logging step or checkpoint, naming the
/// step, and no checkpoint ever holds a non-finite weight. With checkpoints every 4 steps the
/// bad update is step 3, which reads nothing from the device: a guard that only looked on
/// logging steps would apply it and name step 4 (or leave a NaN checkpoint).
#[test]
fn non_finite_steps_are_skipped_and_stop_the_run() {
    for every in [1u64, 4] {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), "");
        // An absurd learning rate: update 1 is the warm-up's (lr 0), update 2 is finite, and the
        // forward pass of step 3 overflows.
        let mut c = pali();
        c.args(["train", "--quiet"]).arg(&cfg).args([
            "--set",
            r#"run.stages=["s1"]"#,
            "--set",
            "stage.s1.optim.lr=1e30",
            "--set",
            "stage.s1.log_every=100",
            "--set",
            &format!("stage.s1.checkpoint_every={every}"),
        ]);
        let e = run_err(&mut c);
        assert!(
            e.contains("became non-finite") && e.contains("the last good checkpoint is kept"),
            "{e}"
        );
        let step: u64 = e
            .split("step ")
            .nth(1)
            .and_then(|s| s.split(':').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no step in {e}"));
        assert_eq!(step, 3, "checkpoint_every {every}: {e}");
        // Steps 1 and 4 are the logging steps (the first, and the checkpoint).
        let logged: Vec<u64> = metrics(d.path())
            .iter()
            .filter_map(|m| m["stage_step"].as_u64())
            .collect();
        if every == 4 {
            assert_eq!(logged, [1], "only step 1 is logged before the stop");
        }
        // Every checkpoint written holds finite weights only, and none comes after the bad step.
        let ck = d.path().join("out/checkpoints");
        let mut written = 0;
        for entry in std::fs::read_dir(&ck).into_iter().flatten() {
            let dir = entry.unwrap().path();
            let n: u64 = dir.file_name().unwrap().to_str().unwrap()[5..]
                .parse()
                .unwrap();
            assert!(n < step, "checkpoint {n} after the skipped step {step}");
            written += 1;
            for (name, _, v) in all_f32(&open(&dir.join("model.safetensors"))) {
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{name} in {}",
                    dir.display()
                );
            }
        }
        assert_eq!(written, if every == 1 { 2 } else { 0 }, "checkpoints");
    }
}

/// `pali bench train-step --run` times the steps `pali train` takes: from one config and seed,
/// its weights after 3 steps (dropout, two micro-batches, weight decay, cosine schedule) are
/// the training run's, bit for bit.
#[test]
fn bench_replays_the_training_steps_bit_exactly() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let sets = [
        "stage.s1.steps=3",
        "stage.s1.llm_dropout=0.1",
        "stage.s1.grad_accum=2",
        "stage.s1.optim.weight_decay=1e-3",
    ];
    train_s1(&cfg, "train", &sets);
    let trained = final_model(&d.path().join("train"));
    let w = d.path().join("bench.safetensors");
    let mut c = pali();
    c.args(["bench", "train-step", "--run"]).arg(&cfg);
    c.args(["--warmup", "1", "--steps", "2", "--save-weights"])
        .arg(&w);
    c.args(["--set", r#"run.stages=["s1"]"#]);
    for s in sets {
        c.args(["--set", s]);
    }
    let out: serde_json::Value = serde_json::from_str(&run_ok(&mut c)).unwrap();
    assert_eq!(out["steps"], 2, "{out}");
    assert!(out["tokens_per_second"].as_f64().unwrap() > 0.0, "{out}");
    let benched = all_f32(&open(&w));
    assert_eq!(trained.len(), benched.len());
    assert!(trained.iter().zip(&benched).all(|(a, b)| a.0 == b.0));
    assert_eq!(max_diff(&trained, &benched), 0.0);
}

/// A run directory is never replaced, mixed or rewritten: a stop at `--max-steps` off a
/// checkpoint boundary writes a checkpoint; a second run without `--resume` is refused; a
/// resume under another seed is refused naming the key, one with another checkpoint interval
/// is not; after resuming from a checkpoint older than the last logged step, metrics.jsonl
/// holds every step once and in order and summary.json
/// every stage, also after resuming a finished run; `--overwrite` moves the run aside.
#[test]
fn a_run_directory_is_never_replaced_mixed_or_rewritten() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let dir = d.path().join("out");
    let train = |args: &[&str]| {
        let mut c = pali();
        c.args(["train", "--quiet"]).arg(&cfg).args(args);
        c
    };
    run_ok(&mut train(&["--max-steps", "5"]));
    assert!(dir.join("checkpoints/step-00000005/state.json").is_file());
    let e = run_err(&mut train(&[]));
    assert!(
        e.contains("already holds a run") && e.contains("--overwrite"),
        "{e}"
    );
    let e = run_err(&mut train(&["--resume", "--set", "run.seed=4"]));
    assert!(e.contains("seed = 3") && e.contains("seed = 4"), "{e}");
    // As if killed after logging step 5 but before its checkpoint: step 5 is logged again.
    std::fs::remove_dir_all(dir.join("checkpoints/step-00000005")).unwrap();
    run_ok(&mut train(&[
        "--resume",
        "--set",
        "stage.s1.checkpoint_every=3",
    ]));
    let steps: Vec<u64> = metrics(d.path())
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=18).collect::<Vec<u64>>());
    let summary = || std::fs::read_to_string(dir.join("summary.json")).unwrap();
    let s1 = summary();
    let stages: serde_json::Value = serde_json::from_str(&s1).unwrap();
    assert_eq!(stages.as_array().unwrap().len(), 2, "{s1}");
    run_ok(&mut train(&["--resume"]));
    assert_eq!(summary(), s1, "resuming a finished run keeps its summary");
    run_ok(&mut train(&["--overwrite", "--max-steps", "1"]));
    assert_eq!(
        std::fs::read_to_string(d.path().join("out.old-1/summary.json")).unwrap(),
        s1
    );
    assert!(!dir.join("summary.json").exists());
}

/// A checkpoint whose file was damaged after it was written fails its checksum: `--resume`
/// names it and continues from the one before, to the same weights as an uninterrupted run.
#[test]
fn resume_skips_a_damaged_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    train_s1(&cfg, "whole", &[]);
    let whole = final_model(&d.path().join("whole"));
    let cut = |extra: &[&str]| {
        let mut c = pali();
        c.args(["train", "--quiet"]).arg(&cfg).args([
            "--set",
            r#"run.out_dir="cut/out""#,
            "--set",
            r#"run.stages=["s1"]"#,
        ]);
        c.args(extra);
        c.output().unwrap()
    };
    assert!(cut(&["--max-steps", "8"]).status.success());
    let newest = d
        .path()
        .join("cut/out/checkpoints/step-00000008/model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&newest, bytes).unwrap();
    let o = cut(&["--resume"]);
    let out = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("skipping a damaged checkpoint") && out.contains("checksum mismatch"),
        "{out}"
    );
    assert_eq!(max_diff(&whole, &final_model(&d.path().join("cut"))), 0.0);
}

/// Training that goes wrong without a NaN stops with the reason: a learning rate that kills
/// the model (gradient exactly zero, loss stuck at ln V), and a text length that leaves no
/// token to carry loss.
#[test]
fn a_dead_model_or_nothing_to_learn_stops_the_run() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    for (set, want) in [
        (
            "stage.s1.optim.lr=1e6",
            "the gradient is exactly zero with the loss at",
        ),
        ("stage.s1.text_len=1", "no token of the batch carries loss"),
    ] {
        let e = train_err(
            &cfg,
            &["--overwrite", "--set", set, "--set", r#"run.stages=["s1"]"#],
        );
        assert!(
            e.contains(want) && e.contains("stage `s1` step"),
            "{set}: {e}"
        );
    }
}

/// Checkpoint steps run the NaN and divergence checks even between logging steps: a model
/// killed at step 1 is caught at the step-2 checkpoint, so the later (dead) checkpoints never
/// rotate out the earlier ones.
#[test]
fn no_checkpoint_is_written_after_an_anomaly_shows() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let e = train_err(
        &cfg,
        &[
            "--set",
            r#"run.stages=["s1"]"#,
            "--set",
            "stage.s1.optim.lr=1e6",
            "--set",
            "stage.s1.log_every=50",
            "--set",
            "stage.s1.checkpoint_every=1",
            "--set",
            "run.keep_checkpoints=2",
        ],
    );
    assert!(e.contains("the gradient is exactly zero"), "{e}");
    let steps: Vec<String> = std::fs::read_dir(d.path().join("out/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        steps.iter().all(|s| s.as_str() <= "step-00000002"),
        "checkpoints after the anomaly: {steps:?}"
    );
}

/// `pali finetune --checkpoint FILE.npz`: transfer starts from a big_vision checkpoint as it is
/// (shapes inferred, `model.init_big_vision`); without `--tokenizer` it is refused by name.
#[test]
fn finetune_starts_from_a_big_vision_npz() {
    let d = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let npz = root.join("tests/fixtures/big_vision/tiny-gemma1.npz");
    let data = synth_data(d.path(), 8, 64);
    let finetune = |out: &str, tokenizer: bool| {
        let mut c = pali();
        c.args(["finetune", "--quiet", "--epochs", "1", "--batch-size", "4"])
            .args(["--text-len", "40", "--checkpoint"])
            .arg(&npz)
            .arg("--train")
            .arg(data.join("vqa.jsonl"))
            .arg("--out")
            .arg(d.path().join(out));
        if tokenizer {
            c.arg("--tokenizer")
                .arg(fixture("tiny-gemma1").join("tokenizer.json"));
        }
        c
    };
    let e = run_err(&mut finetune("none", false));
    assert!(
        e.contains("tiny-gemma1.npz: a big_vision checkpoint has no tokenizer"),
        "{e}"
    );
    run_ok(&mut finetune("ft", true));
    let resolved = std::fs::read_to_string(d.path().join("ft/config.resolved.toml")).unwrap();
    assert!(resolved.contains("init_big_vision = "), "{resolved}");
    assert!(d.path().join("ft/checkpoints").is_dir());
}
