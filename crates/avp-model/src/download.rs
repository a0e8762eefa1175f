//! Weights by name: `torchvision-resnet50` and the other downloadable
//! entries of `crates/avp-model/manifest.json` are fetched once into the cache
//! (the `download` feature), checked against their SHA-256 (torchvision's
//! file names carry its first 8 hex digits, which is what `torch.hub`
//! checks; a full hash is checked when the manifest has one), converted to
//! the native burnpack format, and loaded from there afterwards.
//!
//! A PyTorch user usually has torchvision's files already: before
//! downloading, the folders where `torch.hub` keeps them
//! (`$TORCH_HOME/hub/checkpoints`, else `$XDG_CACHE_HOME/torch/hub/checkpoints`,
//! else `~/.cache/torch/hub/checkpoints`) are searched for the same file
//! name; a file there whose SHA-256 matches is converted in place (it is not
//! copied), one that does not match is left alone and the download goes on.
//!
//! A download goes to a `.partial` file that is renamed into place only
//! once it is complete and verified: an interrupted, short, failed or
//! wrong download leaves nothing in the cache, and a finished one is never
//! fetched again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::Device;

use crate::error::ModelError;
use crate::weights::{KnownWeights, LoadOptions, load_weights, manifest, save_native};

/// Where and how downloads happen.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Folder for downloaded and converted files
    /// (default: `weights/` under [`crate::cache_root`]).
    pub dir: PathBuf,
    /// Replaces the scheme and host of every URL (for mirrors and tests),
    /// e.g. `http://127.0.0.1:8000`; default: `$AVP_WEIGHTS_MIRROR`.
    pub mirror: Option<String>,
    /// Give up when no byte arrives for this long.
    pub read_timeout: Duration,
    /// Report progress and notes (through `crate::report`, which prints
    /// nothing unless the application installed a listener).
    pub progress: bool,
    /// Folders searched for an already downloaded file of the same name
    /// before downloading (default: [`torch_hub_dirs`]).
    pub torch_hub: Vec<PathBuf>,
}

/// Where `torch.hub` keeps downloaded weights: `$TORCH_HOME/hub/checkpoints`
/// when `TORCH_HOME` is set, else `$XDG_CACHE_HOME/torch/hub/checkpoints`,
/// else `.cache/torch/hub/checkpoints` in the home folder (torch's own
/// order).
pub fn torch_hub_dirs() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let torch_home = var("TORCH_HOME")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("torch")))
        .or_else(|| std::env::home_dir().map(|h| h.join(".cache").join("torch")));
    torch_home
        .map(|t| vec![t.join("hub").join("checkpoints")])
        .unwrap_or_default()
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            dir: crate::cache_root().join("weights"),
            mirror: std::env::var("AVP_WEIGHTS_MIRROR")
                .ok()
                .filter(|m| !m.is_empty()),
            read_timeout: Duration::from_secs(30),
            progress: true,
            torch_hub: torch_hub_dirs(),
        }
    }
}

/// The expected content of a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// The full SHA-256, hex.
    Sha256(String),
    /// The first hex digits of the SHA-256 (torchvision's file names).
    Sha256Prefix(String),
}

impl Checksum {
    fn matches(&self, hex: &str) -> bool {
        match self {
            Checksum::Sha256(h) => hex.eq_ignore_ascii_case(h),
            Checksum::Sha256Prefix(p) => !p.is_empty() && hex.starts_with(&p.to_ascii_lowercase()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Checksum::Sha256(h) => format!("SHA-256 {h}"),
            Checksum::Sha256Prefix(p) => format!("SHA-256 starting with {p}"),
        }
    }
}

fn download_err(url: &str, why: impl Into<String>) -> ModelError {
    ModelError::Download {
        url: url.to_string(),
        why: why.into(),
        hint: format!(
            "Without network, fetch {url} on a machine that has one and pass the file itself as the weights \
             (--weights FILE in the examples), or keep the committed ResNet18 (the default)"
        ),
    }
}

/// The manifest entries that can be fetched by name.
pub fn downloadable() -> Vec<KnownWeights> {
    manifest()
        .into_iter()
        .filter(|k| k.location.starts_with("https://") || k.location.starts_with("http://"))
        .collect()
}

/// `url` with its scheme and host replaced by `mirror`.
fn mirrored(url: &str, mirror: Option<&str>) -> String {
    let Some(m) = mirror else {
        return url.to_string();
    };
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or("/");
    format!("{}{path}", m.trim_end_matches('/'))
}

/// Downloads `url` to `dest` unless `dest` already exists (a file is only
/// ever put there complete and verified). Returns `dest`.
pub fn download(
    url: &str,
    dest: &Path,
    checksum: &Checksum,
    options: &DownloadOptions,
) -> Result<PathBuf, ModelError> {
    if dest.is_file() {
        return Ok(dest.to_path_buf());
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    crate::atomic::write_with(dest, |partial| fetch_to(url, partial, checksum, options))?;
    Ok(dest.to_path_buf())
}

#[cfg(not(feature = "download"))]
fn fetch_to(
    url: &str,
    _partial: &Path,
    _checksum: &Checksum,
    _options: &DownloadOptions,
) -> Result<(), ModelError> {
    Err(download_err(
        url,
        "this build has no `download` feature (it is on by default; enable it with --features download)",
    ))
}

#[cfg(feature = "download")]
use net::fetch_to;

#[cfg(feature = "download")]
pub(crate) mod net {
    use std::io::{Read, Write};
    use std::path::Path;

    use sha2::{Digest, Sha256};

    use super::{Checksum, DownloadOptions, download_err};
    use crate::error::ModelError;

    pub(super) fn fetch_to(
        url: &str,
        partial: &Path,
        checksum: &Checksum,
        options: &DownloadOptions,
    ) -> Result<(), ModelError> {
        let mut response = crate::http::agent(options.read_timeout)
            .get(url)
            .call()
            .map_err(|e| download_err(url, format!("cannot connect: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(download_err(
                url,
                format!("the server answered {status} (is the file name right?)"),
            ));
        }
        let expected_len: Option<u64> = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut reader = response.body_mut().as_reader();
        let mut file = std::fs::File::create(partial).map_err(|e| ModelError::Io {
            path: partial.to_path_buf(),
            source: e,
        })?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut received = 0u64;
        let name = url.rsplit('/').next().unwrap_or(url).to_string();
        let mut progress = options.progress.then(|| {
            crate::report::Progress::new(
                format!("downloading {name}"),
                crate::report::Unit::Bytes,
                expected_len,
            )
        });
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(download_err(
                        url,
                        format!("the download broke off after {received} bytes: {e}"),
                    ));
                }
            };
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(|e| ModelError::Io {
                path: partial.to_path_buf(),
                source: e,
            })?;
            received += n as u64;
            if let Some(p) = &mut progress {
                p.advance(n as u64);
            }
        }
        if let Some(p) = progress {
            p.finish();
        }
        if let Some(len) = expected_len
            && received != len
        {
            return Err(download_err(
                url,
                format!("the download was cut short: {received} of {len} bytes"),
            ));
        }
        file.sync_all().map_err(|e| ModelError::Io {
            path: partial.to_path_buf(),
            source: e,
        })?;
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !checksum.matches(&hex) {
            return Err(download_err(
                url,
                format!(
                    "checksum mismatch: expected {}, got {hex}; the file was not kept",
                    checksum.describe()
                ),
            ));
        }
        Ok(())
    }
}

/// Fetches (once) the weights of a manifest entry and converts them
/// (once) to the native format; returns the native file, which
/// [`load_weights`] reads in well under a second.
pub fn fetch_known(
    entry: &KnownWeights,
    device: &Device,
    options: &DownloadOptions,
) -> Result<PathBuf, ModelError> {
    let url = mirrored(&entry.location, options.mirror.as_deref());
    let checksum = match (&entry.sha256, &entry.sha256_prefix) {
        (Some(h), _) => Checksum::Sha256(h.clone()),
        (None, Some(p)) => Checksum::Sha256Prefix(p.clone()),
        (None, None) => {
            return Err(download_err(
                &url,
                format!("the manifest has no checksum for {}", entry.name),
            ));
        }
    };
    let file_name = entry
        .location
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(&entry.name)
        .to_string();
    let raw = options.dir.join(&file_name);
    let native = raw.with_extension("bpk");
    if native.is_file() {
        // The converted file is avp's own: a damaged one (a disk that
        // filled, a copy cut short) is converted again instead of failing
        // every later run.
        match native_readable(&native) {
            Ok(()) => return Ok(native),
            Err(e) => {
                if options.progress {
                    crate::report::warn(format!(
                        "the converted file {} is damaged ({e}); converting {} again",
                        native.display(),
                        raw.display()
                    ));
                }
                std::fs::remove_file(&native).map_err(|source| ModelError::Io {
                    path: native.clone(),
                    source: std::io::Error::new(
                        source.kind(),
                        format!(
                            "it is damaged ({e}) and cannot be removed ({source}): delete it by hand and run again"
                        ),
                    ),
                })?;
            }
        }
    }
    let in_torch = if raw.is_file() {
        None
    } else {
        in_torch_hub(&file_name, &checksum, options)?
    };
    let source = match in_torch {
        Some(found) => found,
        None => download(&url, &raw, &checksum, options)?,
    };
    let loaded = load_weights(
        &source,
        device,
        &LoadOptions {
            normalization: Some(entry.normalization.clone()),
            ..Default::default()
        },
    )?;
    save_native_whole(&loaded, &native)?;
    if options.progress {
        crate::report::info(format!(
            "converted {} to {} (later runs load this file)",
            raw.display(),
            native.display()
        ));
    }
    Ok(native)
}

/// A file named `file_name` in one of `options.torch_hub` whose SHA-256
/// matches `checksum` (a mismatching one is reported and skipped).
fn in_torch_hub(
    file_name: &str,
    checksum: &Checksum,
    options: &DownloadOptions,
) -> Result<Option<PathBuf>, ModelError> {
    for dir in &options.torch_hub {
        let candidate = dir.join(file_name);
        if !candidate.is_file() {
            continue;
        }
        let hex = sha256_file(&candidate)?;
        if checksum.matches(&hex) {
            if options.progress {
                crate::report::info(format!(
                    "using {} from torch's cache (checksum ok); not downloading",
                    candidate.display()
                ));
            }
            return Ok(Some(candidate));
        }
        if options.progress {
            crate::report::warn(format!(
                "ignoring {} in torch's cache: its SHA-256 {} is not the expected {}",
                candidate.display(),
                &hex[..16.min(hex.len())],
                checksum.describe()
            ));
        }
    }
    Ok(None)
}

/// The SHA-256 of a file, streamed.
fn sha256_file(path: &Path) -> Result<String, ModelError> {
    use sha2::Digest;
    use std::io::Read;
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Fetches (once) a Hugging Face hub file into the hub's cache, with the
/// repository's `config.json`, and converts it (once per commit) to a
/// burnpack file in `options.dir` that carries the normalization and the
/// evaluation crop; returns that file.
pub fn fetch_hub(
    r: &crate::hub::HubRef,
    device: &Device,
    options: &DownloadOptions,
    hub: &crate::hub::HubOptions,
) -> Result<PathBuf, ModelError> {
    let Some(weights) = crate::hub::fetch(r, &r.file, hub)? else {
        return Err(ModelError::Hub {
            spec: format!("hf:{}", r.repo),
            why: format!("the repository has no {}", r.file),
        });
    };
    let native = options
        .dir
        .join("hf")
        .join(r.repo.replace('/', "--"))
        .join(&weights.commit)
        .join(Path::new(&r.file).with_extension("bpk"));
    if native.is_file() && native_readable(&native).is_ok() {
        return Ok(native);
    }
    let config = crate::hub::fetch(r, "config.json", hub)?.and_then(|c| std::fs::read(c.path).ok());
    let normalization = crate::hub::normalization_from_config(config.as_deref(), &r.repo);
    let loaded = load_weights(
        &weights.path,
        device,
        &LoadOptions {
            normalization: Some(normalization),
            ..Default::default()
        },
    )
    .map_err(|e| ModelError::Hub {
        spec: format!("hf:{}/{}", r.repo, r.file),
        why: format!("the fetched file is not a ResNet avp can read: {e}"),
    })?;
    if let Some(parent) = native.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ModelError::Io {
            path: parent.to_path_buf(),
            source: e,
        })?;
    }
    save_native_whole(&loaded, &native)?;
    Ok(native)
}

/// Whether a converted file is whole: burn-pack's reader checks the
/// header, the metadata and that every tensor's bytes are in the file,
/// without loading the tensors (the caller loads the file next).
fn native_readable(native: &Path) -> Result<(), String> {
    burn_pack::Reader::from_file(native)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes `loaded` to `native` in the native format ([`save_native`]
/// writes whole files or none).
fn save_native_whole(loaded: &crate::LoadedModel, native: &Path) -> Result<(), ModelError> {
    save_native(
        &loaded.model,
        &loaded.config,
        &loaded.normalization,
        &loaded.provenance,
        native,
    )
}

/// Resolves a weights argument: an existing file is itself; `hf:REPO[/FILE]`
/// is fetched from the Hugging Face hub and converted once (see
/// [`fetch_hub`]); a name from the manifest with a download location
/// (`torchvision-resnet50`) is fetched and converted once (see
/// [`fetch_known`]); anything else is an error that lists the names.
pub fn resolve_weights(
    spec: &str,
    device: &Device,
    options: &DownloadOptions,
) -> Result<PathBuf, ModelError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if let Some(r) = crate::hub::HubRef::parse(spec) {
        return fetch_hub(&r?, device, options, &crate::hub::HubOptions::default());
    }
    let known = downloadable();
    match known.iter().find(|k| k.name == spec) {
        Some(entry) => fetch_known(entry, device, options),
        None => Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no such file, not hf:OWNER/NAME[/FILE] (the Hugging Face hub), and not a known weights name ({})",
                    known
                        .iter()
                        .map(|k| k.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_keep_the_path() {
        assert_eq!(
            mirrored(
                "https://example.org/models/r.pth",
                Some("http://127.0.0.1:9/")
            ),
            "http://127.0.0.1:9/models/r.pth"
        );
        assert_eq!(
            mirrored("https://example.org/a", None),
            "https://example.org/a"
        );
    }

    #[test]
    fn checksums_compare_in_full_or_by_prefix() {
        let h = "0676ba61aaaa";
        assert!(Checksum::Sha256Prefix("0676ba61".into()).matches(h));
        assert!(!Checksum::Sha256Prefix("0676ba62".into()).matches(h));
        assert!(!Checksum::Sha256Prefix(String::new()).matches(h));
        assert!(Checksum::Sha256(h.to_uppercase()).matches(h));
    }

    #[test]
    fn the_lessons_network_is_downloadable() {
        let names: Vec<String> = downloadable().into_iter().map(|k| k.name).collect();
        assert!(
            names.iter().any(|n| n == "torchvision-resnet50"),
            "{names:?}"
        );
    }
}
