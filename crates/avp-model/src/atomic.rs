//! Writing a file whole or not at all: the bytes go to a `.partial` file
//! beside it, are flushed to disk, and the file is renamed into place. A
//! crash or a full disk leaves the old file (or none) and at most a
//! `.partial-<pid>` file, never a half-written file under the real name.

use std::io::Write;
use std::path::Path;

use crate::error::ModelError;

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    write_with(path, |tmp| {
        std::fs::File::create(tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
    })
}

/// Has `fill` write the file at the temporary path it is given, then
/// renames it to `path`; on any error the temporary file is removed and
/// `path` is untouched. The one `.partial`-then-rename in avp (downloads,
/// converted weights, feature caches, `model.bpk` go through it).
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let tmp = path.with_extension(format!(
        "{}partial-{}",
        path.extension()
            .map(|e| format!("{}.", e.to_string_lossy()))
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = fill(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_leaves_no_partial() {
        let dir = std::env::temp_dir().join(format!("avp-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let f = dir.join("a.bin");
        write(&f, b"first").ok();
        write(&f, b"second").ok();
        assert_eq!(std::fs::read(&f).ok().as_deref(), Some(&b"second"[..]));
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(left.len(), 1, "{left:?}");
        // A folder that does not exist: an error, nothing written.
        assert!(write(&dir.join("no/such/b.bin"), b"x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
