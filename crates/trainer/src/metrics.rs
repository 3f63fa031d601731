//! `metrics.jsonl` and the TensorBoard event file beside it: what a run logs, cut back to a
//! checkpoint's length when the run resumes.

use std::path::Path;

use crate::error::{io, Result};

/// Cuts `path` back to its first `n` bytes (a resumed run logs again what came after).
fn truncate(path: &Path, n: u64) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > n => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            f.set_len(n).map_err(io(path))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// `metrics.jsonl` of the run: one JSON object per logged step and per evaluation; the same
/// numbers go to a TensorBoard event file beside it.
pub(crate) struct Metrics {
    pub path: std::path::PathBuf,
    /// `None` on the ranks that do not write.
    events: Option<std::sync::Mutex<crate::tensorboard::EventWriter>>,
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    /// The run's metrics in `out_dir`: metrics.jsonl cut back to its first `kept` bytes (all of
    /// it when `None`), and a new event file (TensorBoard reads every file of a directory). When
    /// earlier files exist, the new one starts with a restart at `step` — TensorBoard then drops
    /// their events from `step` on — followed by metrics.jsonl's kept lines of that step, which
    /// the run does not log again.
    /// What the other ranks of a data-parallel run hold: they write nothing.
    pub fn none() -> Self {
        Self {
            path: Default::default(),
            events: None,
        }
    }

    pub fn open(out_dir: &Path, kept: Option<u64>, step: u64) -> Result<Self> {
        let path = out_dir.join("metrics.jsonl");
        let t = wall_time();
        let earlier = crate::tensorboard::event_files(out_dir).map_err(io(out_dir))?;
        let mut events =
            crate::tensorboard::EventWriter::create(out_dir, t, &earlier).map_err(io(out_dir))?;
        if let Some(n) = kept {
            truncate(&path, n)?;
        }
        if !earlier.is_empty() {
            events.restart(t, step as i64).map_err(io(events.path()))?;
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if v["step"].as_u64() == Some(step) {
                    let scalars = crate::tensorboard::scalars_of(&v);
                    events
                        .scalars(t, step as i64, &scalars)
                        .map_err(io(events.path()))?;
                }
            }
        }
        Ok(Self {
            path,
            events: Some(std::sync::Mutex::new(events)),
        })
    }

    /// Bytes written so far (0 before the first line).
    pub fn len(&self) -> Result<u64> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    /// Cuts the file back to its first `n` bytes (a resumed run logs again what came after).
    pub fn append(&self, v: &serde_json::Value) -> Result<()> {
        use std::io::Write;
        let path: &Path = &self.path;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        writeln!(f, "{v}").map_err(io(path))?;
        let step = v["step"].as_i64().unwrap_or(0);
        let Some(events) = &self.events else {
            return Ok(());
        };
        let mut events = events.lock().unwrap_or_else(|e| e.into_inner());
        let scalars = crate::tensorboard::scalars_of(v);
        events
            .scalars(wall_time(), step, &scalars)
            .map_err(io(events.path()))
    }
}
