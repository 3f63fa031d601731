//! Run checkpoints: one directory per checkpoint holding the model (`model.safetensors`, HF
//! names), the Adam moments (`optim.safetensors`) and `state.json` (step, stage, data-stream
//! state, resolution, config). Written into a temporary directory and renamed, so a killed run
//! never leaves a half-written checkpoint; the newest `keep` are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use pali_data::mixture::MixtureState;
use pali_model::checkpoint::TensorFile;
use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result};
use crate::events::StageSummary;
use crate::optim::AdamState;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunState {
    /// Optimizer steps done over the whole run.
    pub global_step: u64,
    /// Index of the stage being trained and steps done in it.
    pub stage: usize,
    pub stage_step: u64,
    /// Image resolution of the stored position embedding.
    pub resolution: usize,
    /// Data-stream state inside `stage`; `None` at a stage boundary (the next stage starts its
    /// own stream).
    pub mixture: Option<MixtureState>,
    pub adam_t: HashMap<String, u64>,
    /// Length of metrics.jsonl when this checkpoint was written (a resumed run cuts it back).
    #[serde(default)]
    pub metrics_bytes: Option<u64>,
    /// Summaries of the stages finished before this checkpoint (summary.json gets them all).
    #[serde(default)]
    pub stages_done: Vec<StageSummary>,
    /// CRC-32 of every other file of the checkpoint (empty in checkpoints written before
    /// checksums existed: those are not verified).
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, u32>,
}

pub fn checkpoints(out_dir: &Path) -> Vec<PathBuf> {
    let dir = out_dir.join("checkpoints");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-"))
                        && p.join("state.json").is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    // By step number: names stop sorting as text once steps outgrow their 8 digits.
    v.sort_by_key(|p| step_of(p));
    v
}

/// The step of a `step-N` checkpoint directory.
fn step_of(dir: &Path) -> u64 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Extra files that make a checkpoint directory a self-contained HF checkpoint
/// (`config.json`, `tokenizer.json`) when the architecture has an HF equivalent.
pub struct HfExtras<'a> {
    pub config: &'a pali_model::PaliGemmaConfig,
    pub tokenizer: &'a Path,
    /// The model card (`README.md`).
    pub card: Option<&'a str>,
}

/// How many values of the model and the Adam moments are not finite (one read from the device).
fn non_finite<B: Backend, M: Module<B>>(model: &M, adam: &AdamState<B>) -> i64 {
    struct Count<B: Backend>(Option<Tensor<B, 1, Int>>);
    impl<B: Backend> Count<B> {
        fn add<const D: usize>(&mut self, t: Tensor<B, D>) {
            let n = t.is_finite().bool_not().int().sum();
            self.0 = Some(match self.0.take() {
                Some(a) => a + n,
                None => n,
            });
        }
    }
    impl<B: Backend> ModuleVisitor<B> for Count<B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.add(p.val());
        }
    }
    let mut c = Count::<B>(None);
    model.visit(&mut c);
    for t in adam.m.values().chain(adam.v.values()) {
        c.add(t.clone());
    }
    c.0.map_or(0, |n| n.into_scalar().elem::<i64>())
}

/// Writes a checkpoint directory atomically (a temporary directory renamed into place), then
/// drops the oldest beyond `keep`. Refuses a model or optimizer state with a non-finite value.
pub fn save<B: Backend, M: Module<B>>(
    out_dir: &Path,
    model: &M,
    adam: &AdamState<B>,
    state: &RunState,
    keep: usize,
    extras: Option<HfExtras>,
) -> Result<PathBuf> {
    let bad = non_finite(model, adam);
    if bad > 0 {
        return Err(Error::Train(format!(
            "step {}: {bad} weights or optimizer moments are not finite (NaN or infinite); no \
             checkpoint is written, the last good one is kept",
            state.global_step
        )));
    }
    let root = out_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let final_dir = root.join(format!("step-{:08}", state.global_step));
    let tmp = root.join(format!(".tmp-step-{:08}", state.global_step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if let Err(e) = write_files(&tmp, model, adam, state, extras) {
        // A failed save leaves nothing behind; the previous checkpoints are untouched.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    sync_dir(&root)?;
    let all = checkpoints(out_dir);
    if all.len() > keep.max(1) {
        for old in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(final_dir)
}

/// Flushes a directory's entries to disk (a rename is durable once its directory is).
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// CRC-32 of a file, read in 1 MiB pieces (a shard may be 5 GB).
fn crc_of(path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// The newest checkpoint under `out_dir` whose files match their checksums; `skipped` hears
/// of each damaged one passed over. An error when checkpoints exist but every one is damaged.
pub fn newest_intact(
    out_dir: &Path,
    skipped: &mut dyn FnMut(&Error),
) -> Result<Option<(PathBuf, RunState)>> {
    let all = checkpoints(out_dir);
    for dir in all.iter().rev() {
        match verify(dir) {
            Ok(st) => return Ok(Some((dir.clone(), st))),
            Err(e) => skipped(&e),
        }
    }
    if all.is_empty() {
        return Ok(None);
    }
    Err(Error::Train(format!(
        "every checkpoint in {} is damaged; nothing to resume from",
        out_dir.join("checkpoints").display()
    )))
}

/// Checks every file of a checkpoint against the checksums in its `state.json`.
pub fn verify(dir: &Path) -> Result<RunState> {
    let st = load_state(dir)?;
    for (name, want) in &st.files {
        let p = dir.join(name);
        if crc_of(&p)? != *want {
            return Err(Error::Train(format!(
                "{}: checksum mismatch (the file was changed or damaged after it was written)",
                p.display()
            )));
        }
    }
    Ok(st)
}

/// Writes the files of a checkpoint into `tmp`, each flushed to disk, `state.json` (with the
/// others' checksums) last.
fn write_files<B: Backend, M: Module<B>>(
    tmp: &Path,
    model: &M,
    adam: &AdamState<B>,
    state: &RunState,
    extras: Option<HfExtras>,
) -> Result<()> {
    // Streamed and sharded as HF does (one tensor in memory at a time): a 3B model's weights
    // and moments are ~35 GB.
    use pali_model::checkpoint::{save_sharded, SaveDtype};
    use pali_model::shards::{Entry, Writer, SHARD_BYTES};
    save_sharded(model, tmp, "model", SHARD_BYTES, SaveDtype::F32)?;
    // In name order, so that the same state always writes the same bytes.
    let mut moments: Vec<(String, &Tensor<B, 1>)> = [("m", &adam.m), ("v", &adam.v)]
        .into_iter()
        .flat_map(|(prefix, map)| map.iter().map(move |(k, t)| (format!("{prefix}/{k}"), t)))
        .collect();
    moments.sort_by(|a, b| a.0.cmp(&b.0));
    let entries = moments
        .iter()
        .map(|(name, t)| Entry {
            name: name.clone(),
            dtype: safetensors::Dtype::F32,
            shape: vec![t.shape().num_elements()],
        })
        .collect();
    let mut w = Writer::create(tmp, "optim", entries, SHARD_BYTES, &[])?;
    for (_, t) in moments {
        pali_model::checkpoint::put_in_pieces(&mut w, t, SaveDtype::F32)?;
    }
    w.finish()?;
    if let Some(x) = extras {
        // An MLP connector or a missing encoder has no HF form: such checkpoints stay pali-only.
        if let Ok(json) = pali_model::hf::to_hf_config(x.config) {
            let cp = tmp.join("config.json");
            std::fs::write(&cp, serde_json::to_string_pretty(&json).expect("json"))
                .map_err(io(&cp))?;
        }
        let tp = tmp.join("tokenizer.json");
        std::fs::copy(x.tokenizer, &tp).map_err(io(&tp))?;
        // The processor and generation files, so HF's AutoProcessor and generate open it.
        let tok: serde_json::Value = std::fs::read_to_string(&tp)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let ids = pali_model::hf::special_ids(&tok);
        if let Some(card) = x.card {
            let p = tmp.join("README.md");
            std::fs::write(&p, card).map_err(io(&p))?;
        }
        for (name, json) in pali_model::hf::processor_files(x.config, ids).unwrap_or_default() {
            let p = tmp.join(name);
            std::fs::write(&p, serde_json::to_string_pretty(&json).expect("json"))
                .map_err(io(&p))?;
        }
    }
    let mut state = state.clone();
    state.files.clear();
    for e in std::fs::read_dir(tmp).map_err(io(tmp))? {
        let p = e.map_err(io(tmp))?.path();
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io(&p))?;
        let name = p.file_name().expect("file").to_string_lossy().into_owned();
        state.files.insert(name, crc_of(&p)?);
    }
    let sp = tmp.join("state.json");
    let mut f = std::fs::File::create(&sp).map_err(io(&sp))?;
    std::io::Write::write_all(
        &mut f,
        serde_json::to_string_pretty(&state)
            .expect("json")
            .as_bytes(),
    )
    .and_then(|()| f.sync_all())
    .map_err(io(&sp))?;
    sync_dir(tmp)
}

pub fn load_state(dir: &Path) -> Result<RunState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text).map_err(|e| Error::Train(format!("{}: {e}", p.display())))
}

pub fn load_adam<B: Backend>(
    dir: &Path,
    t: HashMap<String, u64>,
    device: &B::Device,
) -> Result<AdamState<B>> {
    let f = TensorFile::open_stem(dir, "optim")?;
    let mut st = AdamState::<B> {
        t,
        ..Default::default()
    };
    let names: Vec<String> = f.names().map(String::from).collect();
    for name in names {
        let (vals, _) = f.f32(&name)?;
        let n = vals.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(vals, [n]), device);
        match name.split_once('/') {
            Some(("m", k)) => st.m.insert(k.to_string(), t),
            Some(("v", k)) => st.v.insert(k.to_string(), t),
            _ => {
                return Err(Error::Train(format!(
                    "{}: unexpected tensor `{name}`",
                    dir.display()
                )))
            }
        };
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    fn state(step: u64) -> RunState {
        RunState {
            global_step: step,
            stage: 0,
            stage_step: step,
            resolution: 16,
            mixture: None,
            adam_t: HashMap::new(),
            metrics_bytes: None,
            stages_done: Vec::new(),
            files: Default::default(),
        }
    }

    /// Retention and resume order by step number, also past 8 digits; a damaged file fails
    /// its checksum; a failed save leaves no temporary directory.
    #[test]
    fn checkpoints_sort_by_step_verify_and_fail_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let dev = Default::default();
        let model = pali_model::presets::tiny(300, 299, 16).init::<Flex>(&dev);
        let adam = AdamState::<Flex>::default();
        for step in [99_999_999, 100_000_000] {
            save(d.path(), &model, &adam, &state(step), 1, None).unwrap();
        }
        let all = checkpoints(d.path());
        assert_eq!(all.len(), 1);
        assert!(all[0].ends_with("step-100000000"), "{all:?}");
        let st = verify(&all[0]).unwrap();
        assert!(st.files.contains_key("model.safetensors"), "{:?}", st.files);

        let p = all[0].join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&p, bytes).unwrap();
        let e = verify(&all[0]).unwrap_err().to_string();
        assert!(e.contains("model.safetensors: checksum mismatch"), "{e}");

        let cfg = pali_model::presets::tiny(300, 299, 16);
        let missing = d.path().join("no-tokenizer.json");
        let extras = HfExtras {
            config: &cfg,
            tokenizer: &missing,
            card: None,
        };
        assert!(save(d.path(), &model, &adam, &state(7), 3, Some(extras)).is_err());
        let left: Vec<_> = std::fs::read_dir(d.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["step-100000000"]);
    }
}
