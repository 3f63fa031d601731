//! Bad input, in one table: each case is a command line and a piece of the one-line error it
//! must give (a non-zero exit, no panic, nothing trained). Cases that need files of their own
//! live next to the feature they break (`train::bad_configs_fail_before_training_with_the_reason`,
//! `cli_data`, `cli_eval`, `cli_model::bad_inputs_fail_with_named_errors`, `vqvae`).

use std::path::Path;
use std::process::Command;

use crate::common::{pali, run_err};

/// Runs `cmd`, which must fail with one line holding `want` and no panic; else what went wrong,
/// labelled.
fn one_line_error(label: &str, cmd: &mut Command, want: &str) -> Option<String> {
    let e = run_err(cmd);
    let ok = e.contains(want) && e.trim().lines().count() == 1 && !e.contains("panicked");
    (!ok).then(|| format!("{label}: want `{want}`, got: {e}"))
}

/// A one-stage run on synthetic captions (tiny model, patch size 8).
fn write_config(dir: &Path) -> std::path::PathBuf {
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json");
    let text = format!(
        r#"
[run]
name = "bad"
out_dir = "out"
[model]
preset = "tiny"
[tokenizer]
path = "{}"

[[stage]]
name = "s1"
resolution = 32
text_len = 24
steps = 2
batch_size = 2
optim = {{ lr = 1e-3 }}
source = [{{ kind = "synth", task = "caption", size = 20 }}]

[[stage]]
name = "s2"
resolution = 32
text_len = 24
steps = 2
batch_size = 2
optim = {{ lr = 1e-3 }}
source = [{{ kind = "synth", task = "caption", size = 20 }}]
"#,
        tok.display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_run_settings_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path());
    let cases: &[(&str, &str)] = &[
        (
            "stage.s1.checkpoint_every=0",
            "log_every and checkpoint_every must be > 0",
        ),
        (
            "stage.s1.log_every=0",
            "log_every and checkpoint_every must be > 0",
        ),
        (
            "stage.s1.batch_size=0",
            "batch_size and text_len must be > 0",
        ),
        (
            "stage.s1.grad_accum=3",
            "grad_accum 3 must be > 0 and divide batch_size 2",
        ),
        (
            r#"stage.s1.loss.on="prefix_and_suffix""#,
            r#"loss.on = "prefix_and_suffix" needs a causal prefix"#,
        ),
        (
            "stage.s1.resolution=33",
            "resolution 33 is not a multiple of the patch size 8",
        ),
        (
            "stage.s1.resolution=4",
            "resolution 4 is not a multiple of the patch size 8",
        ),
        (
            "stage.s1.optim.lr=-1",
            "optim.lr -1: must be a finite number ≥ 0",
        ),
        ("stage.s1.optim.b1=1.5", "optim.b1 1.5: must be in [0, 1)"),
        ("stage.s1.optim.b2=1.0", "optim.b2 1: must be in [0, 1)"),
        ("stage.s1.optim.eps=0", "optim.eps 0: must be > 0"),
        (
            "stage.s1.optim.grad_clip=-1",
            "optim.grad_clip -1: must be ≥ 0",
        ),
        (
            "stage.s1.optim.weight_decay=-0.1",
            "optim.weight_decay -0.1: must be ≥ 0",
        ),
        ("stage.s1.llm_dropout=1.0", "llm_dropout 1 is not in [0, 1)"),
        (
            r#"stage.s2.name="s1""#,
            "stage name `s1` is already used by an earlier stage",
        ),
        (
            r#"stage.s1.group=[{ params = ".*", warmup_fraction = 2.0 }]"#,
            "group 1 (`.*`): warmup_fraction 2 must be in [0, 1]",
        ),
        (
            r#"stage.s1.group=[{ params = ".*", decay = "rsqrt", timescale = 0.0 }]"#,
            "group 1 (`.*`): timescale 0 must be > 0",
        ),
        (
            r#"run.stages=["s1", "s3"]"#,
            "run.stages: no stage `s3` (stages: s1, s2)",
        ),
        (
            "stage.s1.window=0",
            "window, images and downscale must be > 0",
        ),
        (
            "stage.s1.images=0",
            "window, images and downscale must be > 0",
        ),
        (
            r#"stage.s1.source=[{ kind = "shards", path = "nowhere" }]"#,
            "/nowhere/index.json: No such file",
        ),
        (
            r#"stage.s1.source=[{ kind = "shards", task = "caption", path = "x" }]"#,
            "kind = \"shards\" needs `path` (and no `task`/`size`)",
        ),
        (
            "stage.s1.augment.jpeg_quality=[90, 10]",
            "augment.jpeg_quality: [90, 10]",
        ),
        (
            "stage.s1.augment.crop_min_area=1.5",
            "crop_min_area: 1.5 is not in (0, 1]",
        ),
        (
            r#"run.device="tpu:0""#,
            "run.device = \"tpu:0\": unknown device `tpu:0`",
        ),
        (r#"run.dtype="f16""#, "unknown variant `f16`"),
        ("stage.s2.steps=many", "steps"),
    ];
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|(set, want)| {
            let mut c = pali();
            c.args(["train", "--quiet"]).arg(&cfg).args(["--set", set]);
            one_line_error(&format!("--set {set}"), &mut c, want)
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(
        !d.path().join("out/metrics.jsonl").exists(),
        "nothing may be trained"
    );
}

#[test]
fn bad_config_files_are_one_line_errors_with_their_line() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("[run\n", "run.toml:1:5: invalid table header"),
        (
            "[run]\nname = \"t\"\nout_dir = \"o\"\nseed = \"x\"\n",
            "run.toml:4:8: invalid type: string \"x\", expected u64 in `run.seed`",
        ),
        (
            "[run]\nname = \"t\"\nout_dir = \"o\"\nsede = 1\n",
            "run.toml:4:1: unknown field `sede`",
        ),
    ];
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|(text, want)| {
            let cfg = d.path().join("run.toml");
            std::fs::write(&cfg, text).unwrap();
            let mut c = pali();
            c.args(["train", "--quiet"]).arg(&cfg);
            one_line_error(&format!("{text:?}"), &mut c, want)
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Bad dataset lines: `pali data validate` names file and line of each; the good line is kept.
#[test]
fn bad_dataset_lines_are_named_with_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.png");
    image::RgbImage::from_pixel(16, 16, image::Rgb([90, 120, 200]))
        .save(&img)
        .unwrap();
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json");
    let good: &[u8] = br#"{"image": "x.png", "prefix": "caption en", "suffix": "a"}"#;
    // (line 2 of the file, environment, expected message)
    type Case<'a> = (&'a [u8], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            b"{\"image\": \"x.png\", \"prefix\": \"caption \xff\", \"suffix\": \"a\"}",
            &[],
            "data.jsonl:2: not UTF-8 (byte 39 of the line)",
        ),
        (
            br#"{"image": "x.png", "prefix": "caption <image> en", "suffix": "a"}"#,
            &[],
            "data.jsonl:2: field `prefix`: contains `<image>`",
        ),
        (
            br#"{"image": "x.png", "prefix": "caption en", "suffix": "a <eos> b"}"#,
            &[],
            "data.jsonl:2: field `suffix`: contains `<eos>`",
        ),
        (
            br#"{"image": "x.png", "prefix": "caption en"}"#,
            &[],
            "data.jsonl:2: missing field `suffix`",
        ),
        (
            br#"{"image": "x.png", "prefix": "caption en", "suffix": "a"}"#,
            &[("PALI_MAX_MEGAPIXELS", "0.0001")],
            "data.jsonl:1: field `image`: ",
        ),
    ];
    let mut failed = Vec::new();
    for (line, env, want) in cases {
        // A byte-order mark before the first line is accepted.
        let mut text = b"\xEF\xBB\xBF".to_vec();
        text.extend_from_slice(good);
        text.push(b'\n');
        text.extend_from_slice(line);
        text.push(b'\n');
        let data = d.path().join("data.jsonl");
        std::fs::write(&data, &text).unwrap();
        let mut c = pali();
        c.args(["data", "validate", "--tokenizer"])
            .arg(&tok)
            .arg(&data);
        for (k, v) in *env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let e =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        if o.status.success() || !e.contains(want) || e.contains("panicked") {
            failed.push(format!(
                "{}: want `{want}`, got: {e}",
                String::from_utf8_lossy(line)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Bad `pali forward` / `pali generate` inputs: named, before the model runs.
#[test]
fn bad_model_inputs_are_named() {
    let d = tempfile::tempdir().unwrap();
    let ckpt = crate::common::fixture("tiny-gemma1");
    let px = |b: usize, s: usize| {
        (
            "pixel_values".to_string(),
            vec![b, 3, s, s],
            vec![0.0; b * 3 * s * s],
        )
    };
    let ids = |v: Vec<i64>| ("input_ids".to_string(), vec![1, v.len()], v);
    type F32s = (String, Vec<usize>, Vec<f32>);
    type I64s = (String, Vec<usize>, Vec<i64>);
    let cases: Vec<(Vec<F32s>, Vec<I64s>, &str)> = vec![
        (
            vec![px(1, 56)],
            vec![ids(vec![2, 99_999, 5, 6])],
            "`input_ids`[0, 1] = 99999 is outside the vocabulary",
        ),
        (
            vec![px(1, 32)],
            vec![ids(vec![2, 4, 5, 6])],
            "`pixel_values` images are 3×32×32; the checkpoint takes 3×56×56",
        ),
        (
            vec![px(2, 56)],
            vec![ids(vec![2, 4, 5, 6])],
            "`pixel_values` has 2 images but `input_ids` 1 rows",
        ),
        (
            vec![px(1, 56)],
            vec![
                ids(vec![2, 4, 5, 6]),
                ("attention_mask".into(), vec![1, 3], vec![1, 1, 1]),
            ],
            "`attention_mask` has shape [1, 3] but `input_ids` has [1, 4]",
        ),
        (
            vec![px(1, 56)],
            vec![
                ids(vec![2, 4, 5, 6]),
                ("labels".into(), vec![1, 4], vec![-100, 4, -7, 6]),
            ],
            "`labels`[0, 2] = -7 is outside the vocabulary",
        ),
    ];
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|(f, i, want)| {
            let inputs = d.path().join("in.safetensors");
            crate::common::write_mixed(&inputs, f, i);
            let mut c = pali();
            c.args(["forward", "--checkpoint"]).arg(&ckpt);
            c.arg("--inputs").arg(&inputs);
            c.arg("--out").arg(d.path().join("o.safetensors"));
            one_line_error("pali forward", &mut c, want)
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// A group whose regex matches no parameter is not an error (a base config may name a tower
/// some variants lack) but is not silent either: the stage header says so.
#[test]
fn a_group_matching_nothing_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path());
    let o = pali()
        .args(["train"])
        .arg(&cfg)
        .args([
            "--set",
            r#"stage.s1.group=[{ params = ".*" }, { params = "nothing" }]"#,
        ])
        .args(["--set", r#"run.stages=["s1"]"#])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning: group 2 (`nothing`) matches no parameter of this model"),
        "{err}"
    );
}

/// A JSONL source that shrank between a checkpoint and `--resume` is named (the saved stream
/// pointed past its new end: an index out of bounds).
#[test]
fn a_source_that_changed_before_resume_is_named() {
    let d = tempfile::tempdir().unwrap();
    let data = crate::common::synth_data(d.path(), 12, 32);
    let cfg = write_config(d.path());
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        r#"source = [{ kind = "synth", task = "caption", size = 20 }]"#,
        r#"source = [{ kind = "jsonl", path = "data/caption.jsonl" }]"#,
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let train = |extra: &[&str]| {
        let mut c = pali();
        c.args(["train", "--quiet"]).arg(&cfg);
        c.args(["--set", r#"run.stages=["s1"]"#, "--set", "stage.s1.steps=8"]);
        c.args(extra);
        c
    };
    crate::common::run_ok(&mut train(&["--max-steps", "5"]));
    let jsonl = data.join("caption.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .take(3)
        .map(String::from)
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let e = run_err(&mut train(&["--resume"]));
    assert!(
        e.contains("caption.jsonl has 3 examples but had 12 when the checkpoint was written"),
        "{e}"
    );
}

/// Scoring nothing is an error, not metrics of 0/0 (printed as -0.0, or COCO's -1.0).
#[test]
fn scoring_no_examples_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let failed: Vec<String> = ["caption", "vqa", "detect", "refcoco"]
        .iter()
        .filter_map(|task| {
            let mut c = pali();
            c.args(["score", "--task", task, "--predictions"])
                .arg(&empty);
            c.arg("--references").arg(&empty);
            one_line_error(task, &mut c, "empty.jsonl: no predictions to score")
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// `pali finetune` flags are checked like the config keys they become.
#[test]
fn bad_finetune_flags_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let ckpt = crate::common::fixture("tiny-gemma1");
    image::RgbImage::from_pixel(56, 56, image::Rgb([90, 120, 200]))
        .save(d.path().join("x.png"))
        .unwrap();
    let train = d.path().join("t.jsonl");
    let line = r#"{"image": "x.png", "prefix": "caption en", "suffix": "a"}"#;
    std::fs::write(&train, format!("{line}\n")).unwrap();
    let failed: Vec<String> = [
        ("--batch-size", "0", "batch_size and text_len must be > 0"),
        ("--lr", "-1", "optim.lr -1: must be a finite number ≥ 0"),
        ("--text-len", "0", "batch_size and text_len must be > 0"),
    ]
    .iter()
    .filter_map(|(flag, value, want)| {
        let mut c = pali();
        c.args(["finetune", "--quiet", "--checkpoint"]).arg(&ckpt);
        c.arg("--train").arg(&train);
        c.arg("--out").arg(d.path().join(format!("ft{flag}")));
        c.arg(format!("{flag}={value}"));
        one_line_error(&format!("{flag}={value}"), &mut c, want)
    })
    .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
