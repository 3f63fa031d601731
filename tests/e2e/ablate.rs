//! `pali ablate`: a grid of variants × seeds, results table and plots, and a re-run that skips
//! finished runs and resumes an interrupted one.

use std::path::Path;

use crate::common::*;

fn write_grid(dir: &Path) -> std::path::PathBuf {
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer/tokenizer.json");
    std::fs::write(
        dir.join("base.toml"),
        format!(
            r#"
[run]
name = "b"
out_dir = "out"

[model]
preset = "tiny"

[tokenizer]
path = "{}"

[[stage]]
name = "s"
resolution = 32
text_len = 24
steps = 6
batch_size = 4
lr = 3e-3
log_every = 2
checkpoint_every = 3
eval_examples = 4
source = [{{ kind = "synth", task = "vqa", size = 40 }}]
"#,
            tok.display()
        ),
    )
    .unwrap();
    let p = dir.join("grid.toml");
    std::fs::write(
        &p,
        r#"
[ablation]
name = "toy"
base = "base.toml"
out_dir = "grid"
seeds = [0, 1]
metrics = ["eval/accuracy", "val_perplexity/vqa", "final_loss"]
paper = "a finding"

[[variant]]
name = "prefix_lm"
set = ['stage.s.attention="prefix_lm"']
paper = "best"

[[variant]]
name = "causal"
set = ['stage.s.attention="causal_all"']
"#,
    )
    .unwrap();
    p
}

#[test]
fn grid_runs_reports_and_resumes_without_redoing_finished_runs() {
    let d = tempfile::tempdir().unwrap();
    let grid = write_grid(d.path());
    let out = run_ok(pali().args(["ablate", "--dry-run"]).arg(&grid));
    assert!(
        out.contains("4 runs") && out.contains("attention = \"causal_all\""),
        "{out}"
    );

    // A relative path to the grid file (from its directory) must put runs under its out_dir.
    assert!(grid.ends_with("grid.toml"));
    let out = run_ok(
        pali()
            .current_dir(d.path())
            .args(["ablate", "--quiet", "grid.toml"]),
    );
    let g = d.path().join("grid");
    let md = std::fs::read_to_string(g.join("results.md")).unwrap();
    assert!(
        md.contains("| prefix_lm |") && md.contains("| causal |") && md.contains("**"),
        "{md}"
    );
    assert!(md.contains("Mean ± std over 2 seeds"), "{md}");
    assert!(out.contains("results in"), "{out}");
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(g.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["runs"].as_array().unwrap().len(), 4);
    assert!(
        res["table"]["causal"]["val_perplexity/vqa"][0]
            .as_f64()
            .unwrap()
            > 1.0,
        "{res}"
    );
    for f in ["loss.svg", "bar-eval_accuracy.svg", "bar-final_loss.svg"] {
        assert!(g.join(f).is_file(), "{f}");
    }

    // Interrupt one run after its mid-stage checkpoint: drop its summary and last checkpoint.
    let done = g.join("prefix_lm/seed-0/summary.json");
    let stamp = std::fs::metadata(&done).unwrap().modified().unwrap();
    let cut = g.join("causal/seed-1");
    std::fs::remove_file(cut.join("summary.json")).unwrap();
    std::fs::remove_dir_all(cut.join("checkpoints/step-00000006")).unwrap();
    let out = pali()
        .args(["ablate", "--quiet"])
        .arg(&grid)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("finished, skipped").count(), 3, "{err}");
    assert!(err.contains("causal seed 1 (resuming)"), "{err}");
    assert!(cut.join("summary.json").is_file());
    assert_eq!(
        std::fs::metadata(&done).unwrap().modified().unwrap(),
        stamp,
        "finished run redone"
    );

    // --only runs one variant; the report still covers every finished run.
    let out = pali()
        .args(["ablate", "--quiet", "--only", "causal"])
        .arg(&grid)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[1/2] causal seed 0") && !err.contains("prefix_lm"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("| prefix_lm |"));
    let e = run_err(pali().args(["ablate", "--only", "nope"]).arg(&grid));
    assert!(e.contains("no variant named `nope`"), "{e}");

    // An edited variant is not answered with its old results.
    let text = std::fs::read_to_string(&grid).unwrap();
    std::fs::write(&grid, text.replace("causal_all", "causal_text")).unwrap();
    let e = run_err(pali().args(["ablate", "--quiet"]).arg(&grid));
    assert!(
        e.contains("causal/seed-0 holds a run made with another config")
            && e.contains("causal_text"),
        "{e}"
    );
}

/// Every shipped ablation config runs end to end at smoke size (one seed, 2 steps per stage),
/// preparatory runs and exports included.
#[test]
fn every_shipped_ablation_runs_as_a_smoke_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/ablations");
    let d = tempfile::tempdir().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            (n.ends_with(".toml") && !n.starts_with("base")).then(|| n.replace(".toml", ""))
        })
        .collect();
    names.sort();
    assert!(names.len() >= 13, "{names:?}");
    for name in &names {
        let cfg = root.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&cfg).unwrap();
        let variants = text.matches("[[variant]]").count();
        let out_dir = d.path().join(name);
        let md = run_ok(
            pali()
                .args(["ablate", "--quiet", "--smoke"])
                .arg(&out_dir)
                .arg(&cfg),
        );
        let rows = md
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| variant"))
            .count();
        assert_eq!(rows, variants, "{name}: {md}");
        assert!(out_dir.join("results.json").is_file(), "{name}");
        // The same grid resolves on the paper-scale base (GPU), whose stages and groups match
        // base-cpu.toml's; stage2_mixture has its own three-stage base, stage0 the whole
        // curriculum of the quickstart.
        if name != "stage2_mixture" && name != "stage0" {
            let plan = run_ok(
                pali()
                    .args(["ablate", "--dry-run", "--base"])
                    .arg(root.join("base-paper.toml"))
                    .arg(&cfg),
            );
            assert!(
                plan.contains("preset = \"paligemma-3b-224\"") && plan.contains("-base-paper/"),
                "{name}: {plan}"
            );
        }
    }

    // The image-side grids start from one stage-0 run: its towers, named by directory.
    let towers = d.path().join("freezing/_prepare/towers");
    assert!(towers.join("siglip/final/model.safetensors").is_file());
    assert!(towers.join("lm/final/model.safetensors").is_file());
    let resolved = std::fs::read_to_string(
        d.path()
            .join("freezing/image_frozen/seed-0/config.resolved.toml"),
    )
    .unwrap();
    assert!(
        resolved.contains("_prepare/towers/siglip/final")
            && resolved.contains("_prepare/towers/lm/final"),
        "{resolved}"
    );
    let resolved = std::fs::read_to_string(
        d.path()
            .join("encoder/raw_patches/seed-0/config.resolved.toml"),
    )
    .unwrap();
    assert!(!resolved.contains("init_siglip"), "{resolved}");

    // token_init: the preparatory decoder was exported without the 1153 new rows, and every
    // variant started from it; the tracked curve starts at step 0.
    let ti = d.path().join("token_init");
    let g = open(&ti.join("_prepare/lm/gemma.safetensors"));
    let (_, shape) = f32s(&g, "model.embed_tokens.weight");
    assert_eq!(shape[0], 600);
    assert!(g.names().all(|n| n.starts_with("model.")));
    let resolved = std::fs::read_to_string(ti.join("avg_emb/seed-0/config.resolved.toml")).unwrap();
    assert!(
        resolved.contains("_prepare/lm/gemma.safetensors"),
        "{resolved}"
    );
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ti.join("results.json")).unwrap()).unwrap();
    let run = &res["runs"][0];
    assert!(
        run["metrics"]["val_perplexity/detect@start"]
            .as_f64()
            .unwrap()
            > 1.0,
        "{run}"
    );
    assert!(ti.join("curve-val_perplexity_detect.svg").is_file());
    // few_shot: transfers start from the prepared checkpoint and run only the transfer stage.
    let fs = d.path().join("few_shot/k64/seed-0");
    let resolved = std::fs::read_to_string(fs.join("config.resolved.toml")).unwrap();
    assert!(
        resolved.contains("_prepare/pretrain/checkpoints/step-00000002"),
        "{resolved}"
    );
    let summary = std::fs::read_to_string(fs.join("summary.json")).unwrap();
    assert!(
        summary.contains("\"transfer\"") && !summary.contains("\"pretrain\""),
        "{summary}"
    );
}

#[test]
fn model_export_writes_one_tower_and_checks_the_vocabulary() {
    let d = tempfile::tempdir().unwrap();
    let ck = fixture("tiny-gemma1");
    // `pali model export --tower T [extra] --checkpoint CK --out d/FILE`
    let export = |tower: &str, extra: &[&str], file: &str| {
        let mut c = pali();
        c.args(["model", "export", "--tower", tower])
            .args(extra)
            .arg("--checkpoint")
            .arg(&ck)
            .arg("--out")
            .arg(d.path().join(file));
        c
    };
    let msg = run_ok(&mut export(
        "gemma",
        &["--vocab", "1000"],
        "gemma.safetensors",
    ));
    assert!(msg.contains("tensors →"), "{msg}");
    let g = open(&d.path().join("gemma.safetensors"));
    let (emb, shape) = f32s(&g, "model.embed_tokens.weight");
    let full = open(&ck.join("model.safetensors"));
    let key = full
        .names()
        .find(|n| n.ends_with("embed_tokens.weight"))
        .unwrap()
        .to_string();
    let (want, wshape) = f32s(&full, &key);
    assert_eq!(shape, vec![1000, wshape[1]]);
    assert_eq!(emb[..], want[..1000 * wshape[1]]);
    run_ok(&mut export("siglip", &[], "siglip.safetensors"));
    let s = open(&d.path().join("siglip.safetensors"));
    assert!(s.names().all(|n| n.starts_with("vision_model.")));
    // bf16: the same tensors rounded, in half the bytes.
    run_ok(&mut export(
        "siglip",
        &["--save-dtype", "bf16"],
        "siglip16.safetensors",
    ));
    let h = open(&d.path().join("siglip16.safetensors"));
    let size = |f: &str| std::fs::metadata(d.path().join(f)).unwrap().len();
    assert!(size("siglip16.safetensors") * 10 < size("siglip.safetensors") * 6);
    for n in s.names() {
        assert!(f32s(&h, n).0 == bf16_rounded(&f32s(&s, n).0), "{n}");
    }
    let e = run_err(&mut export(
        "gemma",
        &["--vocab", "999999"],
        "x.safetensors",
    ));
    assert!(e.contains("larger than the") && e.contains("rows"), "{e}");
    let e = run_err(&mut export("clip", &[], "x.safetensors"));
    assert!(e.contains("unknown tower `clip`"), "{e}");
}

#[test]
fn bad_ablation_files_name_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let grid = write_grid(d.path());
    let text = std::fs::read_to_string(&grid).unwrap();
    let cases = [
        (
            text.replace("name = \"causal\"", "name = \"prefix_lm\""),
            "variant name `prefix_lm` is empty, repeated",
        ),
        (
            format!("{text}\n[[prepare]]\nname = \"p\"\nexport = {{ tower = \"clip\" }}\n"),
            "prepare `p`: export: unknown tower `clip`",
        ),
        (
            format!(
                "{text}\n[[prepare]]\nname = \"p\"\nbase = \"{}\"\nexport = {{ tower = \"gemma\" }}\n",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("configs/ablations/base-cpu-stage0.toml")
                    .display()
            ),
            "prepare `p`: `export` needs a PaliGemma stage; a stage-0 run's towers are \
             `{prepare.p}/STAGE/final`",
        ),
        (
            text.replace(
                "set = ['stage.s.attention=\"causal_all\"']",
                "set = ['model.init_hf=\"{prepare.nope}\"']",
            ),
            "variant `causal`: `model.init_hf=\"{prepare.nope}\"`: no [[prepare]] named `nope`",
        ),
    ];
    for (body, want) in cases {
        assert_ne!(body, text);
        std::fs::write(&grid, body).unwrap();
        let e = run_err(pali().args(["ablate", "--dry-run"]).arg(&grid));
        assert!(e.contains("grid.toml") && e.contains(want), "{e}");
    }
}
