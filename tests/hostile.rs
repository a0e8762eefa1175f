//! The programs used as a careless or hostile user would: each case runs
//! the real example binary in a scratch folder and checks that it either
//! does the right thing or stops with one sentence that names the problem
//! and the way out, and that it never deletes a file it did not write nor
//! leaves one that a later run would trust.
//!
//! The binaries are the ones `cargo test` builds next to this test
//! (`target/debug/examples/`), with the same features.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The small, fast backbone of the fixtures (a headless bottleneck ResNet).
const TINY: &str = "tests/fixtures/onnx/bottleneck_folded_op17_headless.onnx";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} is not built: run the whole `cargo test` (it builds the examples) or `cargo build --examples` first",
        p.display()
    );
    p
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("avp-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

/// `n_train` training and `n_val` validation photos per class from the
/// committed set.
fn dataset(root: &Path, n_train: usize, n_val: usize) -> PathBuf {
    let src = repo().join("data/alien_vs_predator_thumbnails/data");
    let data = root.join("data");
    for class in ["alien", "predator"] {
        for (split, to, n) in [("train", "train", n_train), ("validation", "val", n_val)] {
            let mut files: Vec<_> = std::fs::read_dir(src.join(split).join(class))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            let dir = data.join(to).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for f in files.iter().take(n) {
                std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    data
}

/// 4 training and 2 validation photos per class.
fn small_dataset(root: &Path) -> PathBuf {
    dataset(root, 4, 2)
}

fn command(name: &str) -> Command {
    let mut c = Command::new(example(name));
    c.current_dir(repo());
    for v in ["AVP_DATA", "AVP_WEIGHTS", "AVP_PREP"] {
        c.env_remove(v);
    }
    c
}

/// The lesson program on the small set with the tiny backbone, one
/// epoch, with the lesson's augmentation.
fn lesson_augmented(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = command("alien_vs_predator");
    c.arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--weights", TINY, "--epochs", "1", "--batch-size", "4"])
        .args(extra);
    c
}

/// [`lesson_augmented`] without augmentation (quicker, and exact).
fn lesson(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = lesson_augmented(data, out, &["--no-augment"]);
    c.args(extra);
    c
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn succeeds(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "failed:\n{out}\n{err}");
    out
}

/// Runs `c`, which must fail with an error (exit 1, not a panic's 101 or
/// an abort) whose message contains `says`; returns stdout and stderr.
fn fails(c: &mut Command, says: &str) -> (String, String) {
    let o = c.output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean failure:\n{out}\n{err}"
    );
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    assert!(err.contains(says), "no `{says}` in:\n{err}");
    (out, err)
}

fn final_accuracy(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("final validation accuracy: "))
        .unwrap_or_else(|| panic!("no final accuracy in:\n{stdout}"))
        .to_string()
}

/// Finding 1: Links to folders inside a class folder are not followed (they used
/// to loop, repeat a class's photos, or label the other class's photos);
/// with --follow-links a cycle is walked once and a link out of the class
/// folder is refused.
#[cfg(unix)]
#[test]
fn links_to_folders_neither_loop_nor_mislabel() {
    use std::os::unix::fs::symlink;
    let s = scratch("links");
    let data = small_dataset(&s.0);
    let alien = data.join("train/alien");
    symlink(".", alien.join("a")).unwrap();
    symlink(".", alien.join("b")).unwrap();
    symlink("..", alien.join("up")).unwrap();
    let out = succeeds(&mut lesson(&data, &s.0.join("run"), &[]));
    assert!(out.contains("8 images (alien 4, predator 4)"), "{out}");
    assert!(out.contains("3 link(s) to folders not followed"), "{out}");
    fails(
        &mut lesson(&data, &s.0.join("run2"), &["--follow-links"]),
        "outside its class folder",
    );
    assert!(!s.0.join("run2").exists(), "a refused run wrote its folder");
    std::fs::remove_file(alien.join("up")).unwrap();
    let out = succeeds(&mut lesson(&data, &s.0.join("run3"), &["--follow-links"]));
    assert!(out.contains("8 images (alien 4, predator 4)"), "{out}");
}

/// Finding 2: A checkpoint that cannot be written (a file named `checkpoint` in
/// --out) fails the run: it used to print "training done" and a final
/// accuracy after one epoch and exit 0.
#[test]
fn a_failed_checkpoint_write_fails_the_run() {
    let s = scratch("ckpt");
    let data = small_dataset(&s.0);
    let out = s.0.join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("checkpoint"), b"a user's file").unwrap();
    let (stdout, _) = fails(
        &mut lesson(&data, &out, &["--epochs", "2"]),
        "training stopped by an error",
    );
    assert!(!stdout.contains("final validation accuracy"), "{stdout}");
    assert!(!out.join("model.bpk").exists());
    assert_eq!(
        std::fs::read(out.join("checkpoint")).unwrap(),
        b"a user's file"
    );
}

/// Finding 3: A damaged feature cache file (a flipped byte) is computed again, and
/// the run is the run on intact features.
#[test]
fn a_damaged_feature_cache_is_recomputed_not_used() {
    let s = scratch("cache");
    let data = small_dataset(&s.0);
    let cache = s.0.join("cache");
    let flags = ["--feature-cache", "--cache-dir", cache.to_str().unwrap()];
    let first = succeeds(&mut lesson(&data, &s.0.join("a"), &flags));
    let mut files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".features.safetensors"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;
        std::fs::write(f, bytes).unwrap();
    }
    let second = succeeds(&mut lesson(&data, &s.0.join("b"), &flags));
    assert_eq!(
        second.matches("is damaged or stale (").count(),
        2,
        "{second}"
    );
    assert_eq!(final_accuracy(&first), final_accuracy(&second));
}

/// Finding 4: --out: files avp did not write stay; a finished run stays until the
/// new one has finished (a rerun killed on the way loses nothing); a
/// second run into a locked folder is refused; a damaged checkpoint says
/// to use --restart; --overwrite replaces a finished run.
#[test]
fn the_output_folder_keeps_what_avp_did_not_write_and_finished_runs() {
    let s = scratch("out");
    let data = small_dataset(&s.0);
    let out = s.0.join("run");
    std::fs::create_dir_all(out.join("checkpoint")).unwrap();
    std::fs::write(out.join("checkpoint/thesis.txt"), b"my thesis").unwrap();
    std::fs::write(out.join("notes.txt"), b"notes").unwrap();
    succeeds(&mut lesson(&data, &out, &["--epochs", "2"]));
    let model = std::fs::read(out.join("model.bpk")).unwrap();
    let metrics = std::fs::read(out.join("metrics.csv")).unwrap();

    // Another run, killed as soon as it has started training beside the
    // finished run (many epochs, so that it cannot finish first): the
    // finished run is intact.
    let mut child = lesson(&data, &out, &["--epochs", "500"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let staging = out.join(".avp-next");
    let started = std::time::Instant::now();
    while !staging.join("config.json").exists() && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        staging.join("config.json").exists(),
        "the run never started"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(out.join("model.bpk")).unwrap(), model);
    assert_eq!(std::fs::read(out.join("metrics.csv")).unwrap(), metrics);

    // A rerun finishes and replaces the finished run; user files stay.
    succeeds(&mut lesson(&data, &out, &["--epochs", "2", "--seed", "1"]));
    assert!(!staging.exists(), "the staging folder was left behind");
    assert_eq!(
        std::fs::read(out.join("checkpoint/thesis.txt")).unwrap(),
        b"my thesis"
    );
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"notes");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["seed"], 1, "{config}");
    assert_eq!(
        avp::train::read_metrics_csv(&out.join("metrics.csv")).len(),
        2,
        "each epoch once"
    );

    // A second run while one holds the folder is refused.
    let lock = std::fs::File::options()
        .write(true)
        .open(out.join(".avp-lock"))
        .unwrap();
    lock.try_lock().unwrap();
    fails(&mut lesson(&data, &out, &[]), "another run is writing into");
    drop(lock);

    // An interrupted run whose checkpoint is damaged: refused with what to
    // do, then started afresh with --restart.
    let interrupted = s.0.join("interrupted");
    succeeds(&mut lesson(&data, &interrupted, &["--epochs", "2"]));
    std::fs::remove_file(interrupted.join("model.bpk")).unwrap();
    let ckpt = interrupted.join("checkpoint/model-1.bpk");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &mut lesson(&data, &interrupted, &["--epochs", "2"]),
        "--restart",
    );
    succeeds(&mut lesson(
        &data,
        &interrupted,
        &["--epochs", "2", "--restart"],
    ));
    assert!(interrupted.join("model.bpk").is_file());

    // --overwrite trains in place.
    let out2 = succeeds(&mut lesson(&data, &out, &["--epochs", "2", "--overwrite"]));
    assert!(
        out2.contains("--overwrite: removing the finished run"),
        "{out2}"
    );
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"notes");
}

/// Finding 5: Numbers that used to panic or abort: a view count that overflows,
/// one that needs terabytes, and a JSON file name that is not UTF-8.
#[test]
fn user_numbers_and_names_never_panic() {
    let s = scratch("numbers");
    let data = small_dataset(&s.0);
    let cache = s.0.join("cache");
    for views in ["18446744073709551615", "100000000"] {
        let (stdout, err) = fails(
            &mut lesson_augmented(
                &data,
                &s.0.join("run"),
                &[
                    "--cache-views",
                    views,
                    "--cache-dir",
                    cache.to_str().unwrap(),
                ],
            ),
            "--cache-views",
        );
        assert!(err.contains("over the limit"), "{err}");
        assert!(!stdout.contains("through the backbone"), "{stdout}");
        assert!(!s.0.join("run").exists(), "a refused run wrote its folder");
    }
}

/// Finding 6: Nonsense that used to be accepted: an infinite learning rate, and a
/// run whose loss becomes NaN or infinite.
#[test]
fn nonsense_learning_rates_and_diverging_runs_fail() {
    let s = scratch("lr");
    let data = small_dataset(&s.0);
    for lr in ["inf", "-1", "0", "NaN"] {
        fails(
            &mut lesson(&data, &s.0.join("run"), &[&format!("--lr={lr}")]),
            "not a usable learning rate",
        );
    }
    let out = s.0.join("diverged");
    let (stdout, _) = fails(
        &mut lesson(&data, &out, &["--lr", "1e38", "--epochs", "3"]),
        "Lower the learning rate",
    );
    assert!(!stdout.contains("final validation accuracy"), "{stdout}");
    assert!(!out.join("model.bpk").exists());
}

/// Finding 7: Messages that name the problem and the way out.
#[test]
fn unclear_situations_get_clear_messages() {
    let s = scratch("messages");
    let data = small_dataset(&s.0);
    // A folder as --weights.
    fails(
        &mut lesson(&data, &s.0.join("r"), &["--weights", s.0.to_str().unwrap()]),
        "is a folder, not a weights file",
    );
    // A missing AVP_WEIGHTS names the variable.
    let mut c = command("alien_vs_predator");
    c.env("AVP_WEIGHTS", s.0.join("missing.onnx"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(s.0.join("r"));
    fails(&mut c, "AVP_WEIGHTS=");
    // --out that is a file.
    std::fs::write(s.0.join("file"), b"x").unwrap();
    fails(
        &mut lesson(&data, &s.0.join("file"), &[]),
        "is a file, not a folder",
    );
    // A cache folder that cannot be created, before the backbone pass.
    let (stdout, _) = fails(
        &mut lesson(
            &data,
            &s.0.join("r"),
            &[
                "--feature-cache",
                "--cache-dir",
                s.0.join("file/cache").to_str().unwrap(),
            ],
        ),
        "is not writable",
    );
    assert!(!stdout.contains("through the backbone"), "{stdout}");
    assert!(!s.0.join("r").exists());

    // classify: a run folder stands for its model.bpk; a bad image is
    // reported and the others are classified, with a failing exit.
    let run = s.0.join("trained");
    succeeds(&mut lesson(&data, &run, &[]));
    std::fs::write(s.0.join("broken.jpg"), b"not an image").unwrap();
    let good = data
        .join("val/alien")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let o = command("classify")
        .arg("--model")
        .arg(&run)
        .arg(&good)
        .arg(s.0.join("broken.jpg"))
        .arg(&good)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("% alien")).count(),
        2,
        "{out}"
    );
    assert!(
        err.contains("broken.jpg") && err.contains("1 of 3 image(s) could not be read"),
        "{err}"
    );

    // preprocess refuses a view count before writing anything.
    let o = command("preprocess")
        .arg(&good)
        .arg("--out")
        .arg(s.0.join("pre"))
        .args(["--augment", "100000"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!s.0.join("pre/batch.npy").exists());
}

/// Finding 5 (names): `classify --json` on a file name that is not UTF-8.
#[cfg(unix)]
#[test]
fn classify_json_takes_any_file_name() {
    use std::os::unix::ffi::OsStrExt;
    let s = scratch("json");
    let data = small_dataset(&s.0);
    let run = s.0.join("trained");
    succeeds(&mut lesson(&data, &run, &[]));
    let good = data
        .join("val/alien")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let odd = s.0.join(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg"));
    std::fs::copy(&good, &odd).unwrap();
    let o = command("classify")
        .arg("--model")
        .arg(run.join("model.bpk"))
        .arg("--json")
        .arg(&odd)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v["results"][0];
    assert!(
        r["image"].as_str().unwrap().ends_with("caf\u{fffd}.jpg"),
        "{r}"
    );
    assert!(
        r["image_raw"].as_str().unwrap().ends_with("caf\\xe9.jpg"),
        "{r}"
    );
}

/// Finding 8: A scratch file left by a write that was killed
/// (`model.bpk.<pid>-N.tmp`) is removed by the next run.
#[test]
fn scratch_files_of_killed_writes_are_removed() {
    let s = scratch("tmp");
    let data = small_dataset(&s.0);
    let out = s.0.join("run");
    std::fs::create_dir_all(out.join("checkpoint")).unwrap();
    std::fs::write(out.join("model.bpk.4242-0.tmp"), b"half a model").unwrap();
    std::fs::write(out.join("checkpoint/optim-1.bpk.4242-3.tmp"), b"half").unwrap();
    std::fs::write(out.join("model.bpk.keep"), b"a user's file").unwrap();
    succeeds(&mut lesson(&data, &out, &[]));
    assert!(!out.join("model.bpk.4242-0.tmp").exists());
    assert!(!out.join("checkpoint/optim-1.bpk.4242-3.tmp").exists());
    assert!(out.join("model.bpk.keep").exists());
}

fn features(data: &Path, out: &Path, shard: &str, extra: &[&str]) -> Command {
    let mut c = command("features");
    c.arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--weights", TINY, "--shard", shard])
        .args(extra);
    c
}

fn merge(out: &Path) -> Command {
    let mut c = command("features");
    c.arg("merge").arg("--out").arg(out);
    c
}

/// The feature files (whole tables, not shards) of a folder, by name.
fn feature_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".features.safetensors") && !n.contains(".shard-")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Sharded extraction: three shards computed apart and merged give the
/// bytes one process writes (plain and with augmented views); a finished
/// shard is not computed again; training on the shard folder merges it;
/// a missing or damaged shard is named, and a rerun of that shard repairs
/// it. The files are safetensors (tensors `features` and `targets`).
#[test]
fn sharded_features_merge_into_the_single_process_cache() {
    let s = scratch("shards");
    let data = dataset(&s.0, 20, 6);
    for recipe in [&["--no-augment"][..], &["--cache-views", "2"][..]] {
        let tag = recipe.len().to_string() + recipe[0];
        let single = s.0.join(format!("single{tag}"));
        let sharded = s.0.join(format!("sharded{tag}"));
        let mut flags = vec!["--feature-cache", "--cache-dir", single.to_str().unwrap()];
        flags.extend_from_slice(recipe);
        let alone = succeeds(&mut lesson_augmented(
            &data,
            &s.0.join(format!("run{tag}")),
            &flags,
        ));
        for i in 0..3 {
            let out = succeeds(&mut features(&data, &sharded, &format!("{i}/3"), recipe));
            assert!(out.contains("written:"), "{out}");
        }
        // Shards of 8, 16 and 16 training images (whole batches of 8).
        let shard_files: Vec<String> = names(&sharded)
            .into_iter()
            .filter(|n| n.contains(".shard-"))
            .collect();
        assert_eq!(shard_files.len(), 6, "{shard_files:?}");
        let before = std::fs::metadata(sharded.join(&shard_files[1]))
            .unwrap()
            .modified()
            .unwrap();
        let again = succeeds(&mut features(&data, &sharded, "1/3", recipe));
        assert!(again.contains("complete already"), "{again}");
        assert_eq!(
            std::fs::metadata(sharded.join(&shard_files[1]))
                .unwrap()
                .modified()
                .unwrap(),
            before
        );
        let out = succeeds(&mut merge(&sharded));
        assert_eq!(out.matches("merged 3 shards").count(), 2, "{out}");
        let (a, b) = (feature_files(&single), feature_files(&sharded));
        assert_eq!(a.len(), 2);
        assert!(
            a == b,
            "merged features differ from the single-process cache"
        );
        // Other tools read them: a safetensors header naming both tensors.
        let bytes = &b[0].1;
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(
            header.contains("\"features\"")
                && header.contains("\"targets\"")
                && header.contains("F32"),
            "{header}"
        );
        // Training pointed at the shard folder (without the merged files)
        // merges them on the way and trains as the single-process run did.
        for (name, _) in &b {
            std::fs::remove_file(sharded.join(name)).unwrap();
        }
        let mut flags = vec!["--feature-cache", "--cache-dir", sharded.to_str().unwrap()];
        flags.extend_from_slice(recipe);
        let from_shards = succeeds(&mut lesson_augmented(
            &data,
            &s.0.join(format!("run2{tag}")),
            &flags,
        ));
        assert_eq!(
            from_shards.matches("merged from 3 shards").count(),
            2,
            "{from_shards}"
        );
        assert!(
            !from_shards.contains("through the backbone"),
            "{from_shards}"
        );
        assert_eq!(final_accuracy(&alone), final_accuracy(&from_shards));
        assert!(feature_files(&sharded) == a);
    }
    let sharded = s.0.join("sharded1--no-augment");
    let shard_files: Vec<String> = names(&sharded)
        .into_iter()
        .filter(|n| n.contains(".shard-"))
        .collect();
    // A missing shard: merge names it and fails.
    let moved = s.0.join("moved");
    std::fs::rename(sharded.join(&shard_files[2]), &moved).unwrap();
    let (_, err) = fails(&mut merge(&sharded), "incomplete");
    assert!(err.contains("2/3 of 3 are missing"), "{err}");
    std::fs::rename(&moved, sharded.join(&shard_files[2])).unwrap();
    // A damaged shard: merge names it; rerunning that shard repairs it.
    let victim = sharded.join(&shard_files[4]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();
    let (_, err) = fails(&mut merge(&sharded), "is damaged");
    assert!(err.contains(&shard_files[4]), "{err}");
    let out = succeeds(&mut features(&data, &sharded, "1/3", &["--no-augment"]));
    assert!(
        out.contains("damaged or stale") && out.contains("written:"),
        "{out}"
    );
    succeeds(&mut merge(&sharded));
    // Nothing half-written is left.
    assert!(
        names(&sharded).iter().all(|n| !n.contains("partial")),
        "{:?}",
        names(&sharded)
    );
    // Bad requests: each a sentence, nothing written.
    let empty = s.0.join("empty");
    for (shard, says) in [
        ("3/3", "is not I/N"),
        ("x", "is not I/N"),
        ("1/0", "is not I/N"),
    ] {
        fails(&mut features(&data, &empty, shard, &["--no-augment"]), says);
    }
    fails(&mut features(&data, &empty, "0/2", &[]), "--cache-views");
    fails(
        &mut features(&s.0.join("nope"), &empty, "0/2", &["--no-augment"]),
        "no dataset at",
    );
    let mut c = command("features");
    c.arg("--out").arg(&empty);
    fails(&mut c, "pass --shard I/N");
    std::fs::create_dir_all(&empty).unwrap();
    fails(&mut merge(&empty), "no feature shards");
    fails(&mut merge(&s.0.join("nope")), "is not a folder");
}

/// Two devices in one process: the lesson program with --devices
/// flex,flex trains (gradients summed, one shard of each epoch per
/// device); DDP on CPU devices and several devices with trained BatchNorm
/// are refused with a sentence before any work.
#[test]
fn several_devices_train_or_are_refused_before_work() {
    let s = scratch("devices");
    let data = small_dataset(&s.0);
    let out = succeeds(&mut lesson(
        &data,
        &s.0.join("two"),
        &["--devices", "flex,flex", "--feature-cache"],
    ));
    assert!(out.contains("training on 2 devices"), "{out}");
    let acc: f64 = final_accuracy(&out).parse().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let out = succeeds(&mut lesson(
        &data,
        &s.0.join("two-images"),
        &["--devices", "flex,flex"],
    ));
    assert!(out.contains("training on 2 devices"), "{out}");
    for (flags, says) in [
        (
            &["--devices", "flex,flex", "--parallel", "ddp"][..],
            "needs CUDA devices",
        ),
        (
            &["--devices", "flex,flex", "--bn-mode", "lesson"][..],
            "--bn-mode lesson with 2 devices",
        ),
        (
            &["--devices", "flex,flex", "--finetune", "layer4"][..],
            "--finetune with 2 devices",
        ),
        (&["--devices", "flex,,flex"][..], "separated by commas"),
        (&["--parallel", "mpi"][..], "unknown parallel strategy"),
    ] {
        fails(&mut lesson(&data, &s.0.join("none"), flags), says);
        assert!(!s.0.join("none").exists(), "{flags:?} wrote its folder");
    }
}
