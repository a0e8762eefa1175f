//! Weights from the Hugging Face hub: `hf:REPO[/FILE]` (for example
//! `hf:timm/resnet50.a1_in1k`, whose `model.safetensors` holds a ResNet
//! with torchvision's key names), fetched over the hub's HTTP protocol
//! into the hub's own cache layout, so that files `huggingface_hub` (or
//! candle's `hf-hub`) already fetched are found and the ones fetched here
//! are found by them:
//!
//! ```text
//! $HF_HOME/hub/models--timm--resnet50.a1_in1k/
//!     refs/main                   the commit `main` pointed to
//!     blobs/<sha256>              the file's bytes, named by their hash
//!     snapshots/<commit>/model.safetensors -> ../../blobs/<sha256>
//! ```
//!
//! `HF_HOME` (default `~/.cache/huggingface`), `HF_HUB_CACHE`, `HF_ENDPOINT`
//! (default `https://huggingface.co`) and `HF_HUB_OFFLINE` are honoured. A
//! file in the cache is used without asking the hub again. A
//! file whose bytes do not hash to the ETag the hub announced is refused and
//! not kept. The repository's `config.json` (timm's `pretrained_cfg`) gives
//! the input normalization and the evaluation crop; without one, ImageNet's
//! statistics and torchvision's `Resize(256)` + `CenterCrop(224)` are
//! assumed, as timm's ResNets use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ModelError;
use crate::normalization::{EvalCrop, Normalization, NormalizationSource};
use crate::weights::sha256_hex;

/// The file a repository is asked for when `hf:REPO` names none.
pub const DEFAULT_FILE: &str = "model.safetensors";

/// Where the hub is and where its files are kept.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub's address (`$HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The cache folder (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// Never use the network (`$HF_HUB_OFFLINE=1`): only cached files.
    pub offline: bool,
    /// Give up when no byte arrives for this long.
    pub read_timeout: Duration,
    /// Report progress and notes (through `crate::report`, which prints
    /// nothing unless the application installed a listener).
    pub progress: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            std::env::home_dir()
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache")
                .join("huggingface")
        });
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            cache: var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("hub")),
            offline: var("HF_HUB_OFFLINE")
                .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
            read_timeout: Duration::from_secs(30),
            progress: true,
        }
    }
}

/// A parsed `hf:` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `owner/name`.
    pub repo: String,
    /// The file inside the repository.
    pub file: String,
}

impl HubRef {
    /// Parses `hf:OWNER/NAME[/FILE]`; `None` when `spec` does not start
    /// with `hf:`.
    pub fn parse(spec: &str) -> Option<Result<Self, ModelError>> {
        let rest = spec.strip_prefix("hf:")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let bad = |why: &str| {
            Err(ModelError::Hub {
                spec: spec.to_string(),
                why: why.to_string(),
            })
        };
        if parts.len() < 2 || parts[..2].iter().any(|p| p.is_empty()) {
            return Some(bad(
                "expected hf:OWNER/NAME or hf:OWNER/NAME/FILE (e.g. hf:timm/resnet50.a1_in1k)",
            ));
        }
        if parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\\'))
        {
            return Some(bad("a path part is empty, `.` or `..`"));
        }
        let file = if parts.len() > 2 {
            parts[2..].join("/")
        } else {
            DEFAULT_FILE.to_string()
        };
        Some(Ok(Self {
            repo: format!("{}/{}", parts[0], parts[1]),
            file,
        }))
    }

    /// The repository's folder in the hub cache: `models--OWNER--NAME`.
    pub fn cache_dir(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }

    /// The cached file for the commit `refs/main` names, if there is one.
    pub fn cached(&self, cache: &Path, file: &str) -> Option<PathBuf> {
        let dir = self.cache_dir(cache);
        let commit = std::fs::read_to_string(dir.join("refs").join("main")).ok()?;
        let p = dir.join("snapshots").join(commit.trim()).join(file);
        p.is_file().then_some(p)
    }
}

/// timm's `config.json`: the parts that say how images are prepared.
#[derive(Debug, Deserialize, Default)]
struct TimmConfig {
    #[serde(default)]
    pretrained_cfg: Option<TimmPretrained>,
    #[serde(default)]
    mean: Option<[f32; 3]>,
    #[serde(default)]
    std: Option<[f32; 3]>,
    #[serde(default)]
    crop_pct: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
struct TimmPretrained {
    #[serde(default)]
    mean: Option<[f32; 3]>,
    #[serde(default)]
    std: Option<[f32; 3]>,
    #[serde(default)]
    crop_pct: Option<f64>,
    #[serde(default)]
    input_size: Option<[u32; 3]>,
}

/// The normalization and evaluation crop a hub repository's `config.json`
/// describes (timm's layout), else ImageNet's with torchvision's crop.
pub fn normalization_from_config(config: Option<&[u8]>, repo: &str) -> Normalization {
    let cfg: TimmConfig = config
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let pre = cfg.pretrained_cfg.unwrap_or_default();
    let mut n = Normalization::imagenet().with_source(NormalizationSource::Manifest(format!(
        "hf:{repo}{}",
        if config.is_some() {
            " config.json"
        } else {
            " (no config.json: ImageNet's statistics)"
        }
    )));
    if let (Some(mean), Some(std)) = (pre.mean.or(cfg.mean), pre.std.or(cfg.std)) {
        n.mean = mean;
        n.std = std;
    }
    let crop = pre.input_size.map_or(224, |s| s[1]).max(1);
    let crop_pct = pre.crop_pct.or(cfg.crop_pct).unwrap_or(0.875);
    let resize = if crop_pct > 0.0 && crop_pct <= 1.0 {
        (crop as f64 / crop_pct).floor() as u32
    } else {
        EvalCrop::torchvision().resize
    };
    n.with_eval_crop(Some(EvalCrop { resize, crop }))
}

/// A file fetched (or found) in the hub cache.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// The file in the snapshot folder.
    pub path: PathBuf,
    /// The commit it belongs to.
    pub commit: String,
}

fn hub_err(spec: &HubRef, why: impl Into<String>) -> ModelError {
    ModelError::Hub {
        spec: format!("hf:{}/{}", spec.repo, spec.file),
        why: why.into(),
    }
}

/// Fetches `file` of `r` into the hub cache (or finds it there); `Ok(None)`
/// when the repository has no such file (a 404), for optional files.
pub fn fetch(r: &HubRef, file: &str, options: &HubOptions) -> Result<Option<HubFile>, ModelError> {
    // A file fetched once is used from the cache (as `huggingface_hub`
    // does offline); delete the repository's cache folder to fetch anew.
    if let Some(path) = r.cached(&options.cache, file) {
        return Ok(Some(HubFile {
            commit: snapshot_commit(&path),
            path,
        }));
    }
    if options.offline {
        if file != r.file {
            return Ok(None);
        }
        return Err(hub_err(
            r,
            format!(
                "HF_HUB_OFFLINE is set and {} holds no {file} for it: fetch it once with network, or unset HF_HUB_OFFLINE",
                r.cache_dir(&options.cache).display()
            ),
        ));
    }
    let url = format!(
        "{}/{}/resolve/main/{file}",
        options.endpoint.trim_end_matches('/'),
        r.repo
    );
    let reply = net::get(&url, options).map_err(|why| {
        hub_err(
            r,
            format!(
                "cannot reach {url}: {why}. Without network, copy the repository's {file} into {} \
                 (the Hugging Face cache layout) or pass the file itself as --weights",
                r.cache_dir(&options.cache).display()
            ),
        )
    })?;
    match reply.status {
        200 => {}
        404 if file != r.file => return Ok(None),
        404 => {
            return Err(hub_err(
                r,
                format!(
                    "{url} answered 404: no such repository or file (check the name; private repositories are not supported)"
                ),
            ));
        }
        s => return Err(hub_err(r, format!("{url} answered HTTP {s}"))),
    }
    let hash = sha256_hex(&reply.body);
    // For files stored with LFS (weights), the hub's ETag is the SHA-256 of
    // the content: a mismatch is a broken or foreign file.
    if let Some(etag) = reply.etag.as_deref()
        && etag.len() == 64
        && etag.bytes().all(|b| b.is_ascii_hexdigit())
        && !etag.eq_ignore_ascii_case(&hash)
    {
        return Err(hub_err(
            r,
            format!(
                "{url}: the content's SHA-256 {hash} is not the {etag} the hub announced; nothing was kept"
            ),
        ));
    }
    let commit = reply.commit.unwrap_or_else(|| "main".into());
    let dir = r.cache_dir(&options.cache);
    let io = |path: &Path, e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let blobs = dir.join("blobs");
    let snapshot = dir.join("snapshots").join(&commit);
    let target = snapshot.join(file);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs, e))?;
    let blob = blobs.join(&hash);
    if !blob.is_file() {
        crate::atomic::write(&blob, &reply.body)?;
    }
    let _ = std::fs::remove_file(&target);
    link_or_copy(&blob, &target, file).map_err(|e| io(&target, e))?;
    let refs = dir.join("refs");
    std::fs::create_dir_all(&refs).map_err(|e| io(&refs, e))?;
    crate::atomic::write(&refs.join("main"), commit.as_bytes())?;
    Ok(Some(HubFile {
        path: target,
        commit,
    }))
}

/// The commit folder a snapshot file sits in.
fn snapshot_commit(path: &Path) -> String {
    path.ancestors()
        .find(|a| a.parent().is_some_and(|p| p.ends_with("snapshots")))
        .and_then(|a| a.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The snapshot entry: a relative link to the blob, as the hub's own
/// clients make it (a copy where links are not available).
fn link_or_copy(blob: &Path, target: &Path, file: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        // snapshots/<commit>/<file> -> ../../blobs/<hash>, one more `..`
        // per folder inside the file name.
        let depth = file.matches('/').count();
        let mut rel = PathBuf::new();
        for _ in 0..depth + 2 {
            rel.push("..");
        }
        rel.push("blobs");
        if let Some(n) = blob.file_name() {
            rel.push(n);
        }
        std::os::unix::fs::symlink(rel, target)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, target).map(|_| ())
    }
}

/// The hub's answer to one GET.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
struct Reply {
    status: u16,
    commit: Option<String>,
    etag: Option<String>,
    body: Vec<u8>,
}

#[cfg(feature = "download")]
mod net {
    use std::io::Read;

    use super::{HubOptions, Reply};

    pub(super) fn get(url: &str, options: &HubOptions) -> Result<Reply, String> {
        let mut response = crate::http::agent(options.read_timeout)
            .get(url)
            .call()
            .map_err(|e| e.to_string())?;
        let header = |k: &str| {
            response
                .headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.trim_matches('"')
                        .trim_start_matches("W/")
                        .trim_matches('"')
                        .to_string()
                })
        };
        let commit = header("x-repo-commit");
        let etag = header("x-linked-etag").or_else(|| header("etag"));
        let status = response.status().as_u16();
        let mut body = Vec::new();
        if status == 200 {
            if options.progress {
                crate::report::info(format!("fetching {url}"));
            }
            response
                .body_mut()
                .as_reader()
                .read_to_end(&mut body)
                .map_err(|e| format!("the download broke off after {} bytes: {e}", body.len()))?;
        }
        Ok(Reply {
            status,
            commit,
            etag,
            body,
        })
    }
}

#[cfg(not(feature = "download"))]
mod net {
    use super::{HubOptions, Reply};

    pub(super) fn get(_url: &str, _options: &HubOptions) -> Result<Reply, String> {
        Err("this build has no `download` feature".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_a_default_file_and_refuse_odd_paths() {
        let r = HubRef::parse("hf:timm/resnet50.a1_in1k").and_then(Result::ok);
        assert_eq!(
            r,
            Some(HubRef {
                repo: "timm/resnet50.a1_in1k".into(),
                file: "model.safetensors".into()
            })
        );
        let r = HubRef::parse("hf:a/b/sub/w.safetensors").and_then(Result::ok);
        assert_eq!(r.map(|r| r.file), Some("sub/w.safetensors".into()));
        assert!(HubRef::parse("timm/resnet50").is_none());
        for bad in [
            "hf:",
            "hf:timm",
            "hf:timm/",
            "hf:a/b/../../etc/passwd",
            "hf:a//b",
        ] {
            assert!(
                matches!(HubRef::parse(bad), Some(Err(_))),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn timm_configs_give_normalization_and_crop() {
        let cfg = br#"{"architecture": "resnet50", "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 0.95, "input_size": [3, 224, 224]}}"#;
        let n = normalization_from_config(Some(cfg), "timm/x");
        assert_eq!(n.mean, [0.5; 3]);
        assert_eq!(n.std, [0.25; 3]);
        assert_eq!(
            n.eval_crop,
            Some(EvalCrop {
                resize: 235,
                crop: 224
            })
        );
        let n = normalization_from_config(None, "timm/x");
        assert_eq!(n.mean, Normalization::imagenet().mean);
        assert_eq!(n.eval_crop, Some(EvalCrop::torchvision()));
    }
}
