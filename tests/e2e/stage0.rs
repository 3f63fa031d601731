//! Stage 0 in the same config as the PaliGemma stages: SigLIP two towers and a Gemma LM
//! trained first, written as HF checkpoints, and the PaliGemma stage starting from them;
//! exact resume inside stage 0; misplaced stage-0 stages refused.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::train::max_diff;

fn tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json")
}

/// siglip (8 steps) → lm (6 steps) → a PaliGemma stage (4 steps, lr `vlm_lr`).
fn config(dir: &Path, vlm_lr: f64) -> PathBuf {
    let text = format!(
        r#"
[run]
name = "s0"
out_dir = "out"
seed = 5

[model]
preset = "tiny"

[tokenizer]
path = "{tok}"

[[stage]]
name = "siglip"
kind = "siglip"
resolution = 32
text_len = 12
steps = 8
batch_size = 8
optim = {{ lr = 1e-3 }}
log_every = 1
checkpoint_every = 3
eval = {{ examples = 24 }}
source = [{{ kind = "synth", task = "caption", size = 200 }}]

[[stage]]
name = "lm"
kind = "lm"
resolution = 32
text_len = 16
steps = 6
batch_size = 4
optim = {{ lr = 3e-3 }}
log_every = 1
checkpoint_every = 2
eval = {{ examples = 8 }}
source = [{{ kind = "synth", task = "caption", size = 200 }}, {{ kind = "synth", task = "vqa", size = 200 }}]

[[stage]]
name = "s1"
resolution = 32
text_len = 32
steps = 4
batch_size = 4
optim = {{ lr = {vlm_lr} }}
log_every = 1
source = [{{ kind = "synth", task = "caption", size = 100 }}]
"#,
        tok = tokenizer().display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn newest(dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("step-")
        })
        .collect();
    v.sort();
    v.pop().unwrap()
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    all_f32(&open(path))
}

/// Both stage-0 towers of runs `a` and `b` are the same tensors, bit for bit.
fn assert_same_towers(a: &Path, b: &Path, when: &str) {
    for file in [
        "out/siglip/final/model.safetensors",
        "out/lm/final/model.safetensors",
    ] {
        let (x, y) = (tensors(&a.join(file)), tensors(&b.join(file)));
        assert!(!x.is_empty() && x == y, "{file} differs {when}");
    }
}

/// The towers land in HF layouts, and the PaliGemma stage starts from exactly them: with
/// lr 0 its weights are the towers' (vocabulary rows past the LM's are `token_init`'s).
#[test]
fn paligemma_starts_from_the_stage_zero_towers() {
    let d = tempfile::tempdir().unwrap();
    let out = pali()
        .arg("train")
        .arg(config(d.path(), 0.0))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let o = d.path().join("out");
    assert!(
        said.contains("image encoder from")
            && said.contains("not used: logit scale and bias, text tower, pooling head"),
        "{said}"
    );
    let siglip = tensors(&o.join("siglip/final/model.safetensors"));
    let lm = tensors(&o.join("lm/final/model.safetensors"));
    let names = |t: &[(String, Vec<usize>, Vec<f32>)]| -> Vec<String> {
        t.iter().map(|x| x.0.clone()).collect()
    };
    for key in [
        "vision_model.head.probe",
        "vision_model.head.attention.in_proj_weight",
        "text_model.head.weight",
        "logit_scale",
        "logit_bias",
    ] {
        assert!(names(&siglip).iter().any(|n| n == key), "{key} missing");
    }
    let tok = pali_data::PaliTokenizer::from_file(&tokenizer()).unwrap();
    let embed = lm
        .iter()
        .find(|t| t.0 == "model.embed_tokens.weight")
        .unwrap();
    assert_eq!(
        embed.1[0], tok.loc[0] as usize,
        "the LM's vocabulary stops before <loc0000>"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("siglip/final/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "SiglipModel");
    assert_eq!(cfg["text_config"]["max_position_embeddings"], 12);

    let card = std::fs::read_to_string(newest(&o).join("README.md")).unwrap();
    assert!(
        card.contains(
            "SigLIP from this run's stage 0 `siglip`, Gemma from this run's stage 0 `lm`"
        ),
        "{card}"
    );
    let vlm = tensors(&newest(&o).join("model.safetensors"));
    let find = |t: &[(String, Vec<usize>, Vec<f32>)], n: &str| {
        t.iter().find(|x| x.0 == n).map(|x| x.2.clone())
    };
    let mut vision = 0;
    for (n, _, v) in &siglip {
        let Some(rest) = n.strip_prefix("vision_model.") else {
            continue;
        };
        if rest.starts_with("head.") {
            continue;
        }
        let there = find(&vlm, &format!("vision_tower.vision_model.{rest}"))
            .unwrap_or_else(|| panic!("{n} not in the PaliGemma checkpoint"));
        assert!(
            &there == v,
            "{n}: PaliGemma's encoder is not the stage-0 tower's"
        );
        vision += 1;
    }
    assert!(vision > 10);
    for (n, s, v) in &lm {
        let rest = n.strip_prefix("model.").unwrap();
        let there = find(&vlm, &format!("language_model.model.{rest}")).unwrap();
        assert!(
            there[..v.len()] == v[..] && (s.len() == 1 || there.len() >= v.len()),
            "{n}: PaliGemma's decoder is not the stage-0 LM"
        );
    }

    // Evaluations: recall@1 for the towers, perplexity for the LM, both in the summary.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("summary.json")).unwrap()).unwrap();
    let stages: Vec<&str> = summary
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["siglip", "lm", "s1"]);
    let r = summary[0]["eval_metrics"]["image_to_text_recall@1"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&r));
    assert_eq!(summary[0]["eval_metrics"]["candidates"], 24);
    let ppl = summary[1]["val_perplexity"][0][1].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < tok.vocab_size() as f64, "{ppl}");
    let metrics = std::fs::read_to_string(o.join("siglip/metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"loss\"")).count(),
        8
    );
}

/// Stopped inside the siglip stage and inside the LM stage, then resumed: every tower and
/// the PaliGemma weights are bit for bit those of the uninterrupted run.
#[test]
fn stage_zero_resumes_exactly() {
    let a = tempfile::tempdir().unwrap();
    run_ok(
        pali()
            .arg("train")
            .arg(config(a.path(), 3e-3))
            .arg("--quiet"),
    );
    let b = tempfile::tempdir().unwrap();
    let cfg = config(b.path(), 3e-3);
    for stop in ["5", "11"] {
        run_ok(
            pali()
                .arg("train")
                .arg(&cfg)
                .args(["--quiet", "--resume", "--max-steps", stop]),
        );
    }
    assert!(!b.path().join("out/lm/final").exists());
    assert!(b.path().join("out/siglip/final").is_dir());
    // Stopped exactly at the end of stage 0: both towers done, the summary written.
    run_ok(
        pali()
            .arg("train")
            .arg(&cfg)
            .args(["--quiet", "--resume", "--max-steps", "14"]),
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.path().join("out/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary.as_array().unwrap().len(), 2, "{summary}");
    run_ok(pali().arg("train").arg(&cfg).args(["--quiet", "--resume"]));
    assert_same_towers(a.path(), b.path(), "after resuming");
    let (x, y) = (
        tensors(&newest(&a.path().join("out")).join("model.safetensors")),
        tensors(&newest(&b.path().join("out")).join("model.safetensors")),
    );
    assert!(x == y, "PaliGemma weights differ after resuming");
    // A second run into the same directory is refused: stage 0 counts as a run.
    let e = run_err(pali().arg("train").arg(&cfg));
    assert!(e.contains("already holds a run"), "{e}");
}

#[test]
fn misplaced_stage_zero_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 1e-3);
    std::fs::write(
        d.path().join("text.jsonl"),
        "{\"text\": \"a red circle\"}\n",
    )
    .unwrap();
    for (set, want) in [
        (
            "stage.2.source=[{ kind = \"jsonl\", path = \"text.jsonl\" }]",
            "eval.examples > 0 needs validation data",
        ),
        ("stage.3.kind=\"lm\"", "a second kind = \"lm\" stage"),
        (
            "stage.1.kind=\"vlm\"",
            "must come before every PaliGemma stage",
        ),
        ("model.init_siglip=\"run.toml\"", "give one or the other"),
        ("stage.1.batch_size=1", "needs negatives"),
    ] {
        let e = run_err(pali().arg("train").arg(&cfg).args(["--set", set]));
        assert!(e.contains(want) && e.lines().count() == 1, "{set}: {e}");
    }
}

/// In 2 processes rank 0 trains stage 0 alone and both ranks start the PaliGemma stage from
/// its towers: the towers are bit for bit the 1-process run's, and the PaliGemma weights those
/// of 1 process with `grad_accum = 2`.
#[test]
fn data_parallel_runs_train_stage_zero_on_rank_zero() {
    let a = tempfile::tempdir().unwrap();
    let cfg = config(a.path(), 3e-3);
    run_ok(
        pali()
            .arg("train")
            .arg(&cfg)
            .args(["--quiet", "--set", "stage.s1.grad_accum=2"]),
    );
    let b = tempfile::tempdir().unwrap();
    let cfg2 = config(b.path(), 3e-3);
    let port = crate::distributed::ports(2).to_string();
    run_ok(
        pali()
            .args([
                "launch", "--nproc", "2", "--port", &port, "--", "train", "--quiet",
            ])
            .arg(&cfg2),
    );
    assert_same_towers(a.path(), b.path(), "in 2 processes");
    let (x, y) = (
        tensors(&newest(&a.path().join("out")).join("model.safetensors")),
        tensors(&newest(&b.path().join("out")).join("model.safetensors")),
    );
    let worst = max_diff(&x, &y);
    assert!(worst <= 1e-6, "PaliGemma weights differ by {worst}");
}
