//! Writing a file whole or not at all: the bytes go to a `.partial` file
//! beside it, are flushed to disk, and the file is renamed into place. A
//! crash or a full disk leaves the old file (or none) and at most a
//! `.partial-<pid>` file, never a half-written file under the real name.

use std::io::Write;
use std::path::Path;

use crate::error::ModelError;

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!(
        "{}partial-{}",
        path.extension()
            .map(|e| format!("{}.", e.to_string_lossy()))
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
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
