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

use avp_model::download::{Checksum, DownloadOptions, download, fetch_known, resolve_weights};
use avp_model::{KnownWeights, LoadOptions, load_weights, manifest, parse_device, sha256_hex};

#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
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

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("avp-dl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
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
    let torchvision = manifest()
        .into_iter()
        .find(|k| k.name == "torchvision-resnet50")
        .unwrap();
    let entry = KnownWeights {
        name: "test-basic".into(),
        location: "https://weights.invalid/models/basic-abc.pth".into(),
        sha256: None,
        sha256_prefix: Some(sha256_hex(&body)[..8].into()),
        ..torchvision
    };
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
    assert_eq!(server.hits.load(Ordering::SeqCst), hits, "the download was kept");
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
