//! Downloads against an HTTP server on 127.0.0.1 started by the test:
//! success, wrong checksum, 404, refused connection, a body cut short,
//! and the whole fetch-verify-convert path of a manifest entry.
#![cfg(feature = "download")]
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use avp_model::download::{
    Checksum, DownloadOptions, download, fetch_hub, fetch_known, resolve_weights,
};
use avp_model::hub::{HubOptions, HubRef};
use avp_model::{KnownWeights, LoadOptions, load_weights, manifest, parse_device, sha256_hex};

#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
    /// A body with extra response headers (the hub's commit and ETag).
    WithHeaders(Vec<u8>, Vec<(&'static str, String)>),
    /// Announces the whole length, sends half, closes.
    Short(Vec<u8>),
}

/// A one-thread HTTP/1.1 server on loopback; stops when dropped (and after
/// 60 s in any case).
struct Server {
    base: String,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(routes: HashMap<&'static str, Reply>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (h, s) = (Arc::clone(&hits), Arc::clone(&stop));
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            h.fetch_add(1, Ordering::SeqCst);
            let text = String::from_utf8_lossy(&req);
            let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
            let _ = match routes.get(path.as_str()) {
                Some(Reply::Body(b)) => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| stream.write_all(b)),
                Some(Reply::WithHeaders(b, headers)) => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
                            b.len(),
                            headers
                                .iter()
                                .map(|(k, v)| format!("{k}: {v}\r\n"))
                                .collect::<String>()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| stream.write_all(b)),
                Some(Reply::Short(b)) => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| stream.write_all(&b[..b.len() / 2])),
                None => stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
                ),
            };
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Both);
        }
    });
    Server { base, hits, stop }
}

/// A fresh folder under the temporary directory, removed again when the
/// test that made it ends (passing or not).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("avp-dl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn quiet(dir: &Path) -> DownloadOptions {
    DownloadOptions {
        dir: dir.to_path_buf(),
        mirror: None,
        read_timeout: Duration::from_secs(10),
        progress: false,
        torch_hub: Vec::new(),
    }
}

/// A manifest entry like torchvision's ResNet50's, for the fixture state
/// dict `body` served at `/models/basic-abc.pth`.
fn basic_entry(body: &[u8]) -> KnownWeights {
    let torchvision = manifest()
        .into_iter()
        .find(|k| k.name == "torchvision-resnet50")
        .unwrap();
    KnownWeights {
        name: "test-basic".into(),
        location: "https://weights.invalid/models/basic-abc.pth".into(),
        sha256: None,
        sha256_prefix: Some(sha256_hex(body)[..8].into()),
        ..torchvision
    }
}

fn payload() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn a_verified_download_is_kept_and_never_fetched_again() {
    let body = payload();
    let sha = sha256_hex(&body);
    let server = serve(HashMap::from([(
        "/models/w.pth",
        Reply::Body(body.clone()),
    )]));
    let dir = scratch("ok");
    let dest = dir.join("w.pth");
    let url = format!("{}/models/w.pth", server.base);
    for checksum in [
        Checksum::Sha256Prefix(sha[..8].into()),
        Checksum::Sha256(sha),
    ] {
        let _ = std::fs::remove_file(&dest);
        let got = download(&url, &dest, &checksum, &quiet(&dir)).unwrap();
        assert_eq!(std::fs::read(&got).unwrap(), body);
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    // Already there: no request at all, even with the server gone.
    drop(server);
    let again = download(
        "http://127.0.0.1:9/unreachable",
        &dest,
        &Checksum::Sha256Prefix("00".into()),
        &quiet(&dir),
    )
    .unwrap();
    assert_eq!(again, dest);
    assert_eq!(files_in(&dir), ["w.pth"]);
}

#[test]
fn failures_are_explained_and_leave_nothing_behind() {
    let body = payload();
    let server = serve(HashMap::from([
        ("/wrong.pth", Reply::Body(body.clone())),
        ("/short.pth", Reply::Short(body.clone())),
    ]));
    let dir = scratch("fail");
    let check = Checksum::Sha256Prefix(sha256_hex(&body)[..8].into());
    let cases = [
        (
            "/wrong.pth",
            Checksum::Sha256Prefix("0676ba61".into()),
            "checksum mismatch: expected SHA-256 starting with 0676ba61",
        ),
        ("/missing.pth", check.clone(), "answered 404"),
        ("/short.pth", check.clone(), "bytes"),
    ];
    for (path, checksum, says) in cases {
        let url = format!("{}{path}", server.base);
        let e = download(&url, &dir.join("out.pth"), &checksum, &quiet(&dir)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(says), "{path}: {msg}");
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.contains("Without network"), "{msg}");
        assert!(
            files_in(&dir).is_empty(),
            "{path} left {:?}",
            files_in(&dir)
        );
    }
    // The short body is reported as such (not as a checksum problem).
    let e = download(
        &format!("{}/short.pth", server.base),
        &dir.join("out.pth"),
        &check,
        &quiet(&dir),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cut short") || e.contains("broke off"), "{e}");
    // A refused connection (a port nobody listens on any more).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/w.pth");
    let e = download(&url, &dir.join("out.pth"), &check, &quiet(&dir)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(
        msg.contains("--weights FILE") && msg.contains("committed ResNet18"),
        "{msg}"
    );
    assert!(files_in(&dir).is_empty());
}

#[test]
fn a_manifest_entry_is_fetched_verified_and_converted_once() {
    let pth = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx/basic_folded_op11.pth");
    let body = std::fs::read(&pth).unwrap();
    let server = serve(HashMap::from([(
        "/models/basic-abc.pth",
        Reply::Body(body.clone()),
    )]));
    let dir = scratch("entry");
    let entry = basic_entry(&body);
    let device = parse_device("flex").unwrap();
    let options = DownloadOptions {
        mirror: Some(server.base.clone()),
        ..quiet(&dir)
    };
    let native = fetch_known(&entry, &device, &options).unwrap();
    assert_eq!(native, dir.join("basic-abc.bpk"));
    assert_eq!(files_in(&dir), ["basic-abc.bpk", "basic-abc.pth"]);
    // The converted file is the same network as the state dict.
    let direct = load_weights(
        &pth,
        &device,
        &LoadOptions {
            normalization: Some(entry.normalization.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let converted = load_weights(&native, &device, &LoadOptions::default()).unwrap();
    assert_eq!(converted.config.describe(), direct.config.describe());
    assert_eq!(converted.normalization, entry.normalization);
    let x = burn::tensor::Tensor::<4>::ones([1, 3, 64, 64], &device);
    assert_eq!(
        direct
            .model
            .forward(x.clone())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap(),
        converted
            .model
            .forward(x)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    );
    // Second time: nothing fetched.
    let hits = server.hits.load(Ordering::SeqCst);
    assert_eq!(fetch_known(&entry, &device, &options).unwrap(), native);
    assert_eq!(server.hits.load(Ordering::SeqCst), hits);

    // A damaged converted file (cut short, as by a full disk) is converted
    // again from the kept download, instead of failing every later run.
    let good = std::fs::read(&native).unwrap();
    std::fs::write(&native, &good[..good.len() / 2]).unwrap();
    assert!(load_weights(&native, &device, &LoadOptions::default()).is_err());
    assert_eq!(fetch_known(&entry, &device, &options).unwrap(), native);
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        hits,
        "the download was kept"
    );
    let again = load_weights(&native, &device, &LoadOptions::default()).unwrap();
    assert_eq!(again.config.describe(), direct.config.describe());
}

/// A folder passed as weights says it is a folder (and points to the
/// trained model inside a run folder), not "unknown weights format".
#[test]
fn a_folder_as_weights_is_explained() {
    let device = parse_device("flex").unwrap();
    let dir = scratch("folder-weights");
    let e = load_weights(&dir, &device, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a folder, not a weights file"), "{e}");
    assert!(!e.contains("unknown weights format"), "{e}");
    std::fs::write(dir.join("model.bpk"), b"x").unwrap();
    let e = load_weights(&dir, &device, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("classify --model"), "{e}");
}

#[test]
fn unknown_names_list_the_known_ones() {
    let device = parse_device("flex").unwrap();
    let dir = scratch("names");
    let e = resolve_weights("resnet-9000", &device, &quiet(&dir))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a known weights name"), "{e}");
    assert!(e.contains("torchvision-resnet50"), "{e}");
    // An existing path is itself.
    let f = dir.join("w.onnx");
    std::fs::write(&f, b"x").unwrap();
    assert_eq!(
        resolve_weights(f.to_str().unwrap(), &device, &quiet(&dir)).unwrap(),
        f
    );
}

/// A torchvision file already in torch's cache (`$TORCH_HOME/hub/checkpoints`,
/// same name) is checked and converted in place: nothing is downloaded and
/// nothing copied. One whose hash does not match is ignored and the file is
/// downloaded.
#[test]
fn torch_s_own_cache_is_used_when_its_file_matches() {
    let pth = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx/basic_folded_op11.pth");
    let body = std::fs::read(&pth).unwrap();
    let server = serve(HashMap::from([(
        "/models/basic-abc.pth",
        Reply::Body(body.clone()),
    )]));
    let entry = basic_entry(&body);
    let device = parse_device("flex").unwrap();
    let torch_home = scratch("torch-home");
    let hub = torch_home.join("hub/checkpoints");
    std::fs::create_dir_all(&hub).unwrap();
    std::fs::write(hub.join("basic-abc.pth"), &body).unwrap();
    let dir = scratch("torch-cache");
    let options = DownloadOptions {
        mirror: Some(server.base.clone()),
        torch_hub: vec![hub.clone()],
        ..quiet(&dir)
    };
    let native = fetch_known(&entry, &device, &options).unwrap();
    assert_eq!(server.hits.load(Ordering::SeqCst), 0, "nothing downloaded");
    assert_eq!(files_in(&dir), ["basic-abc.bpk"], "converted, not copied");
    assert!(load_weights(&native, &device, &LoadOptions::default()).is_ok());

    // A file of the same name with other content is not trusted.
    std::fs::write(hub.join("basic-abc.pth"), b"not the weights").unwrap();
    let dir = scratch("torch-cache-bad");
    let options = DownloadOptions {
        dir: dir.clone(),
        ..options
    };
    fetch_known(&entry, &device, &options).unwrap();
    assert_eq!(server.hits.load(Ordering::SeqCst), 1, "downloaded instead");
    assert_eq!(files_in(&dir), ["basic-abc.bpk", "basic-abc.pth"]);
}

/// torch's cache folder follows torch's own rules.
#[test]
fn torch_hub_dirs_follow_torch_home() {
    let dirs = avp_model::download::torch_hub_dirs();
    if let Some(home) = std::env::var_os("TORCH_HOME").filter(|v| !v.is_empty()) {
        assert_eq!(dirs, [Path::new(&home).join("hub/checkpoints")]);
    } else {
        assert!(
            dirs.iter().all(|d| d.ends_with("torch/hub/checkpoints")),
            "{dirs:?}"
        );
    }
}

fn hub_options(cache: &Path, endpoint: &str, offline: bool) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        cache: cache.to_path_buf(),
        offline,
        read_timeout: Duration::from_secs(10),
        progress: false,
    }
}

/// `hf:OWNER/NAME` against a loopback hub: the file lands in the Hugging
/// Face cache layout with its config's normalization and crop; then a 404,
/// content that does not match the hub's ETag, and no network at all
/// (offline with and without the file cached).
#[test]
fn hugging_face_hub_files_are_fetched_into_the_hub_cache_layout() {
    let st = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx/basic_folded_op11.safetensors");
    let body = std::fs::read(&st).unwrap();
    let sha = sha256_hex(&body);
    let config = br#"{"architecture": "resnet18", "pretrained_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "crop_pct": 0.95, "input_size": [3, 224, 224]}}"#.to_vec();
    let server = serve(HashMap::from([
        (
            "/timm/tiny-resnet/resolve/main/model.safetensors",
            Reply::WithHeaders(
                body.clone(),
                vec![
                    ("X-Repo-Commit", "0123abc".into()),
                    ("X-Linked-Etag", format!("\"{sha}\"")),
                ],
            ),
        ),
        (
            "/timm/tiny-resnet/resolve/main/config.json",
            Reply::WithHeaders(config, vec![("X-Repo-Commit", "0123abc".into())]),
        ),
        (
            "/timm/broken/resolve/main/model.safetensors",
            Reply::WithHeaders(
                body[..body.len() - 10].to_vec(),
                vec![("X-Linked-Etag", format!("\"{sha}\""))],
            ),
        ),
    ]));
    let device = parse_device("flex").unwrap();
    let hf = scratch("hf-home");
    let dir = scratch("hf-avp");
    let hub = hub_options(&hf, &server.base, false);
    let r = HubRef::parse("hf:timm/tiny-resnet").unwrap().unwrap();
    let native = fetch_hub(&r, &device, &quiet(&dir), &hub).unwrap();
    let repo = hf.join("models--timm--tiny-resnet");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        "0123abc"
    );
    let snap = repo.join("snapshots/0123abc/model.safetensors");
    assert_eq!(std::fs::read(&snap).unwrap(), body);
    assert!(repo.join("blobs").join(&sha).is_file());
    #[cfg(unix)]
    assert!(
        std::fs::symlink_metadata(&snap)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let loaded = load_weights(&native, &device, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.normalization.mean, [0.5, 0.4, 0.3]);
    assert_eq!(
        loaded.normalization.eval_crop,
        Some(avp_model::EvalCrop {
            resize: 235,
            crop: 224
        })
    );
    // The same network as the safetensors file read directly.
    let direct = load_weights(&st, &device, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.config.describe(), direct.config.describe());

    // Cached: no request, even offline.
    let hits = server.hits.load(Ordering::SeqCst);
    let offline = hub_options(&hf, "http://127.0.0.1:9", true);
    assert_eq!(
        fetch_hub(&r, &device, &quiet(&dir), &offline).unwrap(),
        native
    );
    assert_eq!(server.hits.load(Ordering::SeqCst), hits);

    // A repository the hub does not have.
    let missing = HubRef::parse("hf:timm/nothing-here").unwrap().unwrap();
    let e = fetch_hub(&missing, &device, &quiet(&dir), &hub)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("404") && e.contains("hf:timm/nothing-here"),
        "{e}"
    );

    // Content that is not what the hub announced: refused, nothing kept.
    let broken = HubRef::parse("hf:timm/broken").unwrap().unwrap();
    let e = fetch_hub(&broken, &device, &quiet(&dir), &hub)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing was kept"), "{e}");
    assert!(!hf.join("models--timm--broken/refs/main").exists());
    assert!(
        std::fs::read_dir(hf.join("models--timm--broken/blobs"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );

    // Offline, not cached: says so. No network, not cached: says what to do.
    let e = fetch_hub(&missing, &device, &quiet(&dir), &offline)
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    let refused = hub_options(&hf, "http://127.0.0.1:9", false);
    let e = fetch_hub(&missing, &device, &quiet(&dir), &refused)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot reach") && e.contains("--weights"), "{e}");
}
