//! Opening a large folder: 10,000 and 100,000 generated images (made here,
//! in a temporary folder, never committed). Each open runs in a child
//! process so that its peak resident memory is its own; the test prints
//! open time and peak RSS, and checks that memory grows with the image
//! count by no more than the file list does (a few hundred bytes per
//! image), not by what decoding keeps (3 KB per 32x32 image).
//!
//! ```text
//! cargo test --features ndarray,wgpu --test scale -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::time::Instant;

use avp_data::{ImageFolder, OpenOptions, Verify};

const CHILD_DIR: &str = "AVP_SCALE_CHILD_DIR";
const CHILD_VERIFY: &str = "AVP_SCALE_CHILD_VERIFY";

/// `n` 32x32 PNGs in 4 classes under `dir/<class>/`.
fn make_folder(dir: &Path, n: usize) {
    if dir.join(".complete").exists() {
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    for c in 0..4 {
        std::fs::create_dir_all(dir.join(format!("class_{c}"))).unwrap();
    }
    // One encoded image per class, written n/4 times: the folder's
    // content is not what is measured, its size is.
    let bytes: Vec<Vec<u8>> = (0..4u8)
        .map(|c| {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([c * 60, (x * 8) as u8, (y * 8) as u8])
            });
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        })
        .collect();
    for i in 0..n {
        let c = i % 4;
        std::fs::write(dir.join(format!("class_{c}/img_{i:07}.png")), &bytes[c]).unwrap();
    }
    std::fs::write(dir.join(".complete"), b"").unwrap();
}

/// Peak resident set of this process, in bytes (Linux: `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The child: opens the folder, prints `images seconds peak_rss
/// list_bytes`.
#[test]
#[ignore = "started as a child process by a_large_folder_opens_without_holding_more_than_its_file_list"]
fn scale_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let verify: Verify = std::env::var(CHILD_VERIFY).unwrap().parse().unwrap();
    let options = OpenOptions {
        verify,
        ..OpenOptions::default()
    };
    let t = Instant::now();
    let folder = ImageFolder::open_dir(Path::new(&dir), options).unwrap();
    let secs = t.elapsed().as_secs_f64();
    // What the file list itself takes: each sample and its path.
    let list: usize = folder
        .samples
        .iter()
        .map(|s| std::mem::size_of_val(s) + s.path.as_os_str().len())
        .sum();
    println!(
        "SCALE {} {secs:.3} {} {list} {:?}",
        folder.len(),
        peak_rss().unwrap(),
        folder.verified
    );
}

struct Measure {
    images: usize,
    secs: f64,
    rss: u64,
    list: u64,
    verified: String,
}

fn measure(dir: &Path, verify: &str) -> Measure {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "scale_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_VERIFY, verify)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find_map(|l| l.find("SCALE ").map(|at| &l[at + 6..]))
        .unwrap_or_else(|| panic!("no measurement in {text}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    Measure {
        images: f[0].parse().unwrap(),
        secs: f[1].parse().unwrap(),
        rss: f[2].parse().unwrap(),
        list: f[3].parse().unwrap(),
        verified: f[4].to_string(),
    }
}

#[test]
#[ignore = "writes 110,000 files (about 1 minute); run in CI's suite of ignored tests"]
fn a_large_folder_opens_without_holding_more_than_its_file_list() {
    if peak_rss().is_none() {
        eprintln!("no /proc/self/status here: peak RSS cannot be measured");
        return;
    }
    let root: PathBuf = std::env::var_os("AVP_SCALE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("avp-scale"));
    let (small, large) = (root.join("10000"), root.join("100000"));
    let t = Instant::now();
    make_folder(&small, 10_000);
    make_folder(&large, 100_000);
    println!(
        "generated 110,000 images in {:.1} s under {}",
        t.elapsed().as_secs_f64(),
        root.display()
    );
    let mb = |b: u64| b as f64 / 1e6;
    let mut rows = Vec::new();
    for (dir, verify) in [(&small, "full"), (&small, "auto"), (&large, "auto")] {
        let m = measure(dir, verify);
        println!(
            "open {:>7} images (--verify {verify:<4} -> {:<6}): {:6.2} s, peak RSS {:6.1} MB, file list {:5.1} MB",
            m.images,
            m.verified,
            m.secs,
            mb(m.rss),
            mb(m.list)
        );
        rows.push(m);
    }
    let (a, b) = (&rows[1], &rows[2]);
    assert_eq!((a.images, b.images), (10_000, 100_000));
    assert_eq!(rows[0].verified, "Full");
    assert_eq!(a.verified, "Full", "auto decodes a folder of 10,000");
    assert_eq!(
        b.verified, "Header",
        "auto reads headers only above the limit"
    );
    // Memory added by 90,000 more images, per image, against what their
    // file list takes.
    let header_small = measure(&small, "header");
    println!(
        "open {:>7} images (--verify header -> {}): {:6.2} s, peak RSS {:6.1} MB",
        header_small.images,
        header_small.verified,
        header_small.secs,
        mb(header_small.rss)
    );
    let per_image = (b.rss as f64 - header_small.rss as f64) / 90_000.0;
    let list_per_image = (b.list - header_small.list) as f64 / 90_000.0;
    println!(
        "peak RSS grows {per_image:.0} bytes per image from 10k to 100k (header check); the file list takes {list_per_image:.0}"
    );
    assert!(
        per_image < 4.0 * list_per_image + 256.0,
        "memory grows {per_image:.0} bytes per image, the file list only {list_per_image:.0}"
    );
    // A decoded 32x32 image is 3,072 bytes: none of them is kept.
    assert!(per_image < 3072.0);
}
