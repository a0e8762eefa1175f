//! The output folder of a run (`--out`): what avp writes there, what it
//! may delete, and how a new run replaces a finished one.
//!
//! - **Only its own files.** avp deletes nothing but the files it (or
//!   burn-train, for it) writes, each by its exact name or pattern:
//!   [`ARTIFACT_FILES`], `checkpoint/{model,optim,scheduler}-N.bpk`,
//!   `train/epoch-N/*.log` and `valid/epoch-N/*.log`, and the scratch files
//!   of interrupted writes (`*.bpk.<pid>-N.tmp`). A folder is removed only
//!   when that leaves it empty, so a user's `checkpoint/thesis.txt` stays.
//! - **A finished run is kept until the new one has finished.** When the
//!   folder holds a `model.bpk`, a new run trains in [`STAGING`] inside it
//!   and only then swaps its files in; a run killed on the way leaves the
//!   finished run untouched (and resumes in the staging folder). With
//!   `overwrite` the finished run is removed first and the new run trains in
//!   place.
//! - **One run at a time.** A lock ([`LOCK_FILE`], an advisory file lock that
//!   the operating system drops when the process ends, however it ends)
//!   stops a second run into the same folder.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::TrainError;

/// Files a run writes at the top of its folder.
pub const ARTIFACT_FILES: &[&str] = &[
    "metrics.csv",
    "config.json",
    "run.json",
    "curves.png",
    "predictions.png",
    "experiment.log",
    "model.bpk",
];

/// The folder, inside the output folder, where a run that replaces a
/// finished one trains until it has finished.
pub const STAGING: &str = ".avp-next";

/// The lock file inside the output folder.
pub const LOCK_FILE: &str = ".avp-lock";

/// The exclusive right to write into an output folder, held until dropped.
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Creates `out_dir` if needed and locks it; refuses when `out_dir` is
    /// a file or another run holds the lock.
    pub fn acquire(out_dir: &Path) -> Result<Self, TrainError> {
        if out_dir.exists() && !out_dir.is_dir() {
            return Err(TrainError::Config(format!(
                "the output folder {} is a file, not a folder: pass --out with a folder (it is created if missing)",
                out_dir.display()
            )));
        }
        let write_err = |e: std::io::Error| TrainError::Write {
            path: out_dir.to_path_buf(),
            why: format!("{e}; pass --out with a writable folder"),
        };
        std::fs::create_dir_all(out_dir).map_err(write_err)?;
        let path = out_dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(write_err)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(std::fs::TryLockError::WouldBlock) => Err(TrainError::Config(format!(
                "another run is writing into {} right now: wait for it to finish, or pass another --out",
                out_dir.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(write_err(e)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn is_numbered(name: &str, prefix: &str, suffix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|r| r.strip_suffix(suffix))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A checkpoint file burn-train writes: `{model,optim,scheduler}-N.bpk`.
fn is_checkpoint(name: &str) -> bool {
    ["model-", "optim-", "scheduler-"]
        .iter()
        .any(|p| is_numbered(name, p, ".bpk"))
}

/// The scratch file of an interrupted burnpack write:
/// `<name>.bpk.<pid>-<n>.tmp`.
fn is_scratch(name: &str) -> bool {
    name.split_once(".bpk.").is_some_and(|(_, rest)| {
        rest.strip_suffix(".tmp").is_some_and(|mid| {
            mid.split_once('-').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit())
            })
        })
    })
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_file(path: &Path) -> Result<(), TrainError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TrainError::Write {
            path: path.to_path_buf(),
            why: format!("cannot remove it: {e}"),
        }),
    }
}

/// Removes `dir` if it is empty; a folder that still holds something
/// (a user's file) stays.
fn remove_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

/// Removes the scratch files that interrupted writes left in `dir` and its
/// `checkpoint/` folder.
pub fn remove_scratch(dir: &Path) -> Result<(), TrainError> {
    for d in [dir.to_path_buf(), dir.join("checkpoint")] {
        for n in names(&d) {
            if is_scratch(&n) {
                remove_file(&d.join(n))?;
            }
        }
    }
    Ok(())
}

/// Removes what a run wrote into `dir` (see the module docs), and nothing
/// else.
pub fn remove_run(dir: &Path) -> Result<(), TrainError> {
    remove_scratch(dir)?;
    for f in ARTIFACT_FILES {
        remove_file(&dir.join(f))?;
    }
    let checkpoint = dir.join("checkpoint");
    for n in names(&checkpoint) {
        if is_checkpoint(&n) {
            remove_file(&checkpoint.join(n))?;
        }
    }
    remove_if_empty(&checkpoint);
    for split in ["train", "valid"] {
        let split = dir.join(split);
        for epoch in names(&split) {
            if !is_numbered(&epoch, "epoch-", "") {
                continue;
            }
            let epoch = split.join(epoch);
            for n in names(&epoch) {
                if n.ends_with(".log") {
                    remove_file(&epoch.join(n))?;
                }
            }
            remove_if_empty(&epoch);
        }
        remove_if_empty(&split);
    }
    Ok(())
}

/// Replaces the finished run in `out_dir` by the one finished in
/// `staging`: the old run's files go, the new ones move in (`model.bpk`
/// last, so that the folder never shows a finished run with another run's
/// metrics), and the staging folder is removed when empty.
pub fn swap_in(staging: &Path, out_dir: &Path) -> Result<(), TrainError> {
    remove_run(out_dir)?;
    let mv = |name: &str| -> Result<(), TrainError> {
        let (from, to) = (staging.join(name), out_dir.join(name));
        if !from.exists() {
            return Ok(());
        }
        if to.is_dir() {
            // A folder of the same name that held user files: merge into it.
            for n in names(&from) {
                let (f, t) = (from.join(&n), to.join(&n));
                if f.is_dir() {
                    if t.exists() {
                        continue;
                    }
                } else if t.exists() {
                    remove_file(&t)?;
                }
                std::fs::rename(&f, &t).map_err(|e| TrainError::Write {
                    path: t.clone(),
                    why: e.to_string(),
                })?;
            }
            return Ok(());
        }
        std::fs::rename(&from, &to).map_err(|e| TrainError::Write {
            path: to,
            why: e.to_string(),
        })
    };
    for name in ["checkpoint", "train", "valid"] {
        mv(name)?;
    }
    for name in ARTIFACT_FILES {
        mv(name)?;
    }
    remove_run(staging)?;
    remove_if_empty(staging);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_avp_writes_and_names_it_does_not() {
        assert!(is_checkpoint("model-12.bpk") && is_checkpoint("optim-1.bpk"));
        assert!(!is_checkpoint("model-.bpk") && !is_checkpoint("thesis.txt"));
        assert!(!is_checkpoint("model-1.bpk.bak"));
        assert!(is_scratch("model.bpk.1234-0.tmp") && is_scratch("optim-3.bpk.77-12.tmp"));
        assert!(!is_scratch("model.bpk") && !is_scratch("notes.bpk.tmp"));
        assert!(!is_scratch("model.bpk.x-1.tmp"));
    }
}
