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
}
