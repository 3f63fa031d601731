//! The run directory (`run.out_dir`): one `pali train` at a time (an exclusive lock), never
//! replaced or mixed by accident (a directory that holds a run is continued with `resume`,
//! moved aside with `overwrite`, or refused), and continued only under the config it started
//! with, apart from the keys listed in [`check_resume_config`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use crate::error::{io, Error, Result};

/// What to do with a run directory that already holds a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Existing {
    /// Stop with an error naming the directory.
    #[default]
    Refuse,
    /// Continue it from its newest checkpoint (the config must match).
    Resume,
    /// Rename it to `DIR.old-N` and start afresh in an empty `DIR`; nothing is deleted.
    Overwrite,
}

/// A run directory held by this process. The lock is a `flock` on `DIR/.lock`: the OS releases
/// it when the process exits, so a crashed or killed run leaves no stale lock behind.
pub struct RunDir {
    /// Where the earlier run went, with [`Existing::Overwrite`].
    pub moved_aside: Option<PathBuf>,
    _lock: File,
}

const LOCK: &str = ".lock";

impl RunDir {
    pub fn open(dir: &Path, existing: Existing) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut lock = lock(dir)?;
        let mut moved_aside = None;
        if holds_run(dir) {
            match existing {
                Existing::Resume => {}
                Existing::Refuse => {
                    return Err(Error::Config(format!(
                        "{} already holds a run; pass --resume to continue it, or --overwrite \
                         to move it aside (nothing is deleted)",
                        dir.display()
                    )))
                }
                Existing::Overwrite => {
                    let aside = free_name(dir);
                    std::fs::rename(dir, &aside).map_err(io(dir))?;
                    std::fs::create_dir_all(dir).map_err(io(dir))?;
                    // The old lock (now inside `aside`) is released when it is replaced.
                    lock = self::lock(dir)?;
                    moved_aside = Some(aside);
                }
            }
        }
        let lp = dir.join(LOCK);
        lock.set_len(0).map_err(io(&lp))?;
        lock.rewind().map_err(io(&lp))?;
        writeln!(lock, "{}", std::process::id()).map_err(io(&lp))?;
        Ok(Self {
            moved_aside,
            _lock: lock,
        })
    }
}

/// Takes the lock of `dir`, or says who holds it.
fn lock(dir: &Path) -> Result<File> {
    let p = dir.join(LOCK);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(io(&p))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            let holder = if pid.is_empty() {
                "another process".to_string()
            } else {
                format!("another process (pid {pid})")
            };
            Err(Error::Config(format!(
                "{} is in use by {holder}; wait for it to finish or choose another run.out_dir",
                dir.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(&p)(e)),
    }
}

/// Whether `dir` holds (part of) a run: something trained or logged. A run that stopped before
/// its first logged step (bad data, say) left only its resolved config: nothing to lose, so the
/// same command may simply be run again.
pub fn holds_run(dir: &Path) -> bool {
    let non_empty = |f: &str| std::fs::metadata(dir.join(f)).is_ok_and(|m| m.len() > 0);
    non_empty("metrics.jsonl")
        || dir.join("summary.json").exists()
        || !crate::ckpt::checkpoints(dir).is_empty()
        || stage0_dirs(dir).any(|d| holds_run(&d))
}

/// The stage-0 directories a run may hold (`out_dir/NAME/` with a `metrics.jsonl`,
/// checkpoints or a `final/`).
fn stage0_dirs(dir: &Path) -> impl Iterator<Item = std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "checkpoints"))
        .filter(|p| p.join("metrics.jsonl").is_file() || p.join("final").is_dir())
}

/// `DIR.old-1`, `DIR.old-2`, …: the first that does not exist.
fn free_name(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    (1..)
        .map(|n| dir.with_file_name(format!("{name}.old-{n}")))
        .find(|p| !p.exists())
        .expect("a free name")
}

/// A resumed run must continue under the config it started with (`config.resolved.toml` in its
/// directory). Allowed to differ, because they do not change what was trained: `run.device`,
/// `run.out_dir`, `run.keep_checkpoints`, every stage's `log_every` and `checkpoint_every`,
/// and the `steps` of stage `current` (the one the checkpoint is in) and later ones.
pub fn check_resume_config(dir: &Path, config: &RunConfig, current: usize) -> Result<()> {
    let Some(mut stored) = stored_config(dir)? else {
        return Ok(());
    };
    stored.run.device = config.run.device.clone();
    stored.run.out_dir = config.run.out_dir.clone();
    stored.run.keep_checkpoints = config.run.keep_checkpoints;
    if stored.stages.len() == config.stages.len() {
        for (i, (s, c)) in stored.stages.iter_mut().zip(&config.stages).enumerate() {
            s.log_every = c.log_every;
            s.checkpoint_every = c.checkpoint_every;
            if i >= current {
                s.steps = c.steps;
            }
        }
    }
    if &stored == config {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{} holds a run made with another config ({}); resume it with that config, or start \
         a new run with --overwrite or another run.out_dir",
        dir.display(),
        first_difference(&stored, config)
    )))
}

/// The config the run in `dir` was made with (its `config.resolved.toml`), if it has one.
pub fn stored_config(dir: &Path) -> Result<Option<RunConfig>> {
    let p = dir.join("config.resolved.toml");
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(None);
    };
    RunConfig::from_resolved(&text)
        .map(Some)
        .map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// The first line where two configs differ as TOML, with its table: "`[run] seed = 3` there,
/// `seed = 4` now".
pub fn first_difference(there: &RunConfig, now: &RunConfig) -> String {
    let (a, b) = (
        toml::to_string_pretty(there).expect("toml"),
        toml::to_string_pretty(now).expect("toml"),
    );
    let mut table = String::new();
    for (x, y) in a.lines().zip(b.lines()) {
        if x != y {
            let at = if table.is_empty() {
                String::new()
            } else {
                format!("{table} ")
            };
            return format!("`{at}{}` there, `{}` now", x.trim(), y.trim());
        }
        if x.trim_start().starts_with('[') {
            table = x.trim().to_string();
        }
    }
    "a different number of keys".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        let held = RunDir::open(&dir, Existing::Refuse).unwrap();
        let e = RunDir::open(&dir, Existing::Resume)
            .err()
            .unwrap()
            .to_string();
        let pid = std::process::id().to_string();
        assert!(e.contains("is in use by") && e.contains(&pid), "{e}");
        drop(held);
        RunDir::open(&dir, Existing::Resume).unwrap();
    }

    #[test]
    fn a_held_run_is_refused_or_moved_aside_never_deleted() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        let e = RunDir::open(&dir, Existing::Refuse)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already holds a run"), "{e}");
        let r = RunDir::open(&dir, Existing::Overwrite).unwrap();
        let aside = r.moved_aside.clone().unwrap();
        assert_eq!(aside, d.path().join("run.old-1"));
        assert!(aside.join("metrics.jsonl").is_file());
        assert!(!dir.join("metrics.jsonl").exists());
        drop(r);
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        let r = RunDir::open(&dir, Existing::Overwrite).unwrap();
        assert_eq!(r.moved_aside.unwrap(), d.path().join("run.old-2"));
    }
}
