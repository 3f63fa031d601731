//! Shared helpers of the end-to-end tests: fixture paths, tensor comparison, the `pali` binary.
#![allow(dead_code)]

pub mod parity;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use pali_model::checkpoint::TensorFile;

pub fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(variant)
}

pub fn open(path: &Path) -> TensorFile {
    TensorFile::open(path).unwrap_or_else(|e| panic!("{e}"))
}

pub fn f32s(f: &TensorFile, name: &str) -> (Vec<f32>, Vec<usize>) {
    f.f32(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn i64s(f: &TensorFile, name: &str) -> (Vec<i64>, Vec<usize>) {
    f.i64(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn int2<B: Backend>(f: &TensorFile, name: &str, dev: &B::Device) -> Tensor<B, 2, Int> {
    let (v, s) = i64s(f, name);
    Tensor::from_data(TensorData::new(v, [s[0], s[1]]), dev)
}

pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<f32>, Vec<usize>) {
    let s = t.dims().to_vec();
    (t.into_data().convert::<f32>().to_vec().unwrap(), s)
}

/// Max |a − b| and the worst excess over `atol + rtol·|b|` (≤ 0 means within tolerance).
pub fn compare(
    what: &str,
    got: &[f32],
    got_shape: &[usize],
    want: &[f32],
    want_shape: &[usize],
    atol: f32,
    rtol: f32,
) -> f32 {
    assert_eq!(got_shape, want_shape, "{what}: shape");
    let mut max = 0f32;
    let mut worst = (f32::NEG_INFINITY, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d.is_finite(),
            "{what}: non-finite at {i}: got {g}, want {w}"
        );
        max = max.max(d);
        let excess = d - (atol + rtol * w.abs());
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= 0.0,
        "{what}: max abs diff {max:.3e}; at flat index {i}: got {}, want {} (atol {atol:.0e}, rtol {rtol:.0e})",
        got[i],
        want[i]
    );
    max
}

pub fn pali() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pali"))
}

/// Runs `pali` and returns stdout; panics with stderr on failure.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn pali");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pali failed ({}):\n{stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `pali`, expects failure, returns stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn pali");
    assert!(!out.status.success(), "pali unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes f32 tensors to a safetensors file.
pub fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    write_mixed(path, tensors, &[]);
}

/// Writes i64 and f32 tensors to a safetensors file.
pub fn write_mixed(
    path: &Path,
    f: &[(String, Vec<usize>, Vec<f32>)],
    i: &[(String, Vec<usize>, Vec<i64>)],
) {
    let mut items: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, s, v) in f {
        items.push((
            n.clone(),
            safetensors::Dtype::F32,
            s.clone(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    for (n, s, v) in i {
        items.push((
            n.clone(),
            safetensors::Dtype::I64,
            s.clone(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = items
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// All tensors of a checkpoint as f32.
pub fn all_f32(f: &TensorFile) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let names: Vec<String> = f.names().map(String::from).collect();
    names
        .into_iter()
        .map(|n| {
            let (v, s) = f32s(f, &n);
            (n, s, v)
        })
        .collect()
}

/// Copies a fixture checkpoint's config.json into `dir`.
pub fn copy_config(variant: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        fixture(variant).join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
}

/// Each value rounded to bf16 (nearest even) and back: what a bf16 save must store.
pub fn bf16_rounded(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| burn::tensor::bf16::from_f32(*x).to_f32())
        .collect()
}

/// `pali data synth --n N --resolution R --out DIR/data`: the synthetic world as JSONL + PNG
/// (one file per task); returns `DIR/data`.
pub fn synth_data(dir: &Path, n: usize, resolution: usize) -> PathBuf {
    let data = dir.join("data");
    run_ok(
        pali()
            .args(["data", "synth", "--n", &n.to_string()])
            .args(["--resolution", &resolution.to_string(), "--out"])
            .arg(&data),
    );
    data
}

/// `pali data pack JSONL --out OUT ARGS…`: its output.
pub fn pack(jsonl: &Path, out: &Path, args: &[&str]) -> String {
    run_ok(
        pali()
            .args(["data", "pack"])
            .args(args)
            .arg("--out")
            .arg(out)
            .arg(jsonl),
    )
}
