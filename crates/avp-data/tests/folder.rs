#![cfg(feature = "flex")]
//! The image folder: torchvision's class order and extension list, clear
//! errors for bad layouts, corrupt files reported and skipped, and batches
//! that do not depend on the number of loader workers.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use avp_data::{
    DataError, ImageBatcher, ImageDataset, ImageFolder, Normalize, OpenOptions, OrderedLoader,
    Pipeline, Split,
};
use burn::data::dataloader::DataLoader;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::Dataset;
use burn::tensor::Device;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn lesson_root() -> PathBuf {
    repo().join("data/alien_vs_predator_thumbnails/data")
}

/// A scratch folder removed at drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("avp-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn file(&self, rel: &str, bytes: &[u8]) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn real_jpeg() -> Vec<u8> {
    std::fs::read(lesson_root().join("validation/alien/11.jpg")).unwrap()
}

fn real_png() -> Vec<u8> {
    // One of the five PNGs named .jpg in the lesson's set.
    std::fs::read(lesson_root().join("train/alien/192.jpg")).unwrap()
}

#[test]
fn the_lessons_set_opens_like_torchvision_sees_it() {
    let train = ImageFolder::open(&lesson_root(), Split::Train, OpenOptions::default()).unwrap();
    assert_eq!(train.classes, ["alien", "predator"]);
    assert_eq!(train.counts(), [347, 347]);
    assert!(train.skipped.is_empty(), "{train}");
    let val = ImageFolder::open(
        &lesson_root(),
        Split::Validation,
        OpenOptions {
            strict: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(val.counts(), [100, 100]);
    // The five PNGs named .jpg are decoded by content and kept.
    assert!(
        val.samples
            .iter()
            .any(|s| s.path.ends_with("validation/alien/18.jpg"))
    );
    let summary = train.to_string();
    assert!(
        summary.contains("694 images (alien 347, predator 347)"),
        "{summary}"
    );
}

#[test]
fn spanish_split_names_and_sorted_classes() {
    let s = Scratch::new("spanish");
    s.file("entrenamiento/zebra/a.jpg", &real_jpeg());
    s.file("entrenamiento/Apple/b.JPG", &real_jpeg());
    s.file("entrenamiento/mango/c.png", &real_png());
    s.file("validacion/zebra/a.jpg", &real_jpeg());
    let train = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    // Python sorts by code point: uppercase first.
    assert_eq!(train.classes, ["Apple", "mango", "zebra"]);
    assert_eq!(train.counts(), [1, 1, 1]);
    assert!(ImageFolder::open(&s.0, Split::Validation, OpenOptions::default()).is_ok());
}

#[test]
fn extensions_follow_torchvision() {
    let s = Scratch::new("ext");
    s.file("train/ants/a.jpg", &real_jpeg());
    // A valid image with an extension torchvision leaves out is ignored,
    // like hymenoptera's imageNotFound.gif.
    let mut gif = Vec::new();
    image::DynamicImage::new_rgb8(4, 4)
        .write_to(&mut std::io::Cursor::new(&mut gif), image::ImageFormat::Gif)
        .unwrap();
    s.file("train/ants/imageNotFound.gif", &gif);
    s.file("train/ants/notes.txt", b"hello");
    let f = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f.ignored.len(), 2);
}

#[test]
fn layout_errors_are_clear() {
    let e = ImageFolder::open(
        Path::new("/no/such/dataset"),
        Split::Train,
        OpenOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, DataError::MissingRoot { .. }));
    assert!(
        e.to_string().contains("/no/such/dataset") && e.to_string().contains("entrenamiento"),
        "{e}"
    );

    let s = Scratch::new("layout");
    s.file("train/cats/a.jpg", &real_jpeg());
    let e = ImageFolder::open(&s.0, Split::Validation, OpenOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("no validation split") && e.to_string().contains("validacion"),
        "{e}"
    );

    std::fs::create_dir_all(s.0.join("train/dogs")).unwrap();
    let e = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, DataError::EmptyClass { .. }), "{e}");
    assert!(e.to_string().contains("dogs"), "{e}");

    let s2 = Scratch::new("noclass");
    s2.file("train/loose.jpg", &real_jpeg());
    let e = ImageFolder::open(&s2.0, Split::Train, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, DataError::NoClasses { .. }), "{e}");
}

#[test]
fn corrupt_files_are_reported_and_skipped_or_refused_in_strict_mode() {
    let s = Scratch::new("corrupt");
    s.file("train/a/good.jpg", &real_jpeg());
    let jpeg = real_jpeg();
    s.file("train/a/truncated.jpg", &jpeg[..jpeg.len() / 3]);
    s.file("train/a/text.jpg", b"this is a text file named .jpg");
    s.file("train/b/good.png", &real_png());
    let f = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    assert_eq!(f.len(), 2);
    assert_eq!(f.skipped.len(), 2);
    let summary = f.to_string();
    assert!(
        summary.contains("text.jpg") && summary.contains("truncated.jpg"),
        "{summary}"
    );
    let e = ImageFolder::open(
        &s.0,
        Split::Train,
        OpenOptions {
            strict: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, DataError::Decode { .. }), "{e}");
    // A class whose every file is broken is an error, not an empty class.
    s.file("train/c/broken.jpg", b"nope");
    let e = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, DataError::NoReadableImage { .. }), "{e}");
}

#[test]
fn seeded_corruptions_never_panic_and_counts_add_up() {
    let s = Scratch::new("fuzz");
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut written = 0;
    for (kind, bytes) in [("jpg", real_jpeg()), ("png", real_png())] {
        // Truncations at many offsets.
        for k in 0..60 {
            let cut = bytes.len() * k / 60;
            s.file(&format!("train/x/{kind}_cut{k:02}.jpg"), &bytes[..cut]);
            written += 1;
        }
        // Random byte flips.
        for k in 0..60 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 16 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            s.file(&format!("train/x/{kind}_flip{k:02}.jpg"), &b);
            written += 1;
        }
    }
    s.file("train/y/ok.jpg", &real_jpeg());
    let f = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    assert_eq!(
        f.len() + f.skipped.len(),
        written + 1,
        "every file is either kept or reported"
    );
    assert!(
        f.skipped.len() > 30,
        "truncations must be caught: {}",
        f.skipped.len()
    );
    // Every kept file decodes again at training time.
    let ds = ImageDataset::new(f, Pipeline::eval(Normalize::imagenet()), 0);
    for i in 0..ds.len() {
        ds.get(i).unwrap();
    }
}

fn collect(loader: &OrderedLoader<ImageDataset>) -> Vec<(Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for _epoch in 0..2 {
        for batch in loader.iter() {
            let b = batch.expect("a batch");
            out.push((b.indices, b.images.into_data().try_to_vec::<f32>().unwrap()));
        }
    }
    out
}

#[test]
fn augmented_batches_do_not_depend_on_thread_count() {
    let device = Device::flex();
    let mut small =
        ImageFolder::open(&lesson_root(), Split::Validation, OpenOptions::default()).unwrap();
    small.samples.truncate(8);
    let make =
        |seed| ImageDataset::new(small.clone(), Pipeline::lesson(Normalize::imagenet()), seed);
    let run = |threads: usize, prefetch: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let loader = OrderedLoader::new(make(42), 4, Some(9), &device).with_prefetch(prefetch);
        pool.install(|| collect(&loader))
    };
    let one = run(1, 0);
    assert_eq!(one.len(), 4);
    assert_eq!(one, run(3, 0));
    assert_eq!(one, run(2, 2));
    // Each epoch draws a new order and new augmentations.
    assert_ne!(one[0].0, one[2].0);
    let other = collect(&OrderedLoader::new(make(7), 4, Some(9), &device));
    assert_eq!(
        other[0].0, one[0].0,
        "the order depends on the loader seed only"
    );
    assert_ne!(
        other[0].1, one[0].1,
        "the augmentation depends on the dataset seed"
    );
}

#[test]
fn burns_multi_worker_loader_gives_each_image_the_same_augmentation() {
    // Burn's loader partitions the dataset per worker, so batch composition
    // varies with the worker count, but every image is transformed the same.
    let mut small =
        ImageFolder::open(&lesson_root(), Split::Validation, OpenOptions::default()).unwrap();
    small.samples.truncate(6);
    let per_item = |workers: usize| {
        let ds = ImageDataset::new(small.clone(), Pipeline::lesson(Normalize::imagenet()), 3);
        let loader = DataLoaderBuilder::new(ImageBatcher)
            .batch_size(2)
            .num_workers(workers)
            .set_device(Device::flex())
            .build(ds);
        let mut items = std::collections::BTreeMap::new();
        for b in loader.iter() {
            let b = b.expect("a batch");
            let v = b.images.into_data().try_to_vec::<f32>().unwrap();
            let per = v.len() / b.indices.len();
            for (k, i) in b.indices.iter().enumerate() {
                items.insert(*i, v[k * per..(k + 1) * per].to_vec());
            }
        }
        items
    };
    assert_eq!(per_item(1), per_item(3));
}

/// The shared data folder, named by `AVP_SHARED` (set by `.ci/run`); when
/// set, the data must be there.
fn shared() -> PathBuf {
    let dir = PathBuf::from(std::env::var("AVP_SHARED").expect("set AVP_SHARED (see .ci/run)"));
    assert!(
        dir.join("data").is_dir(),
        "AVP_SHARED={} has no data/",
        dir.display()
    );
    dir
}

#[test]
#[ignore = "needs ../shared (AVP_SHARED, set by .ci/run)"]
fn hymenoptera_opens_as_torchvision_sees_it() {
    let root = shared().join("data/hymenoptera_data");
    let train = ImageFolder::open(
        &root,
        Split::Train,
        OpenOptions {
            strict: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(train.classes, ["ants", "bees"]);
    assert_eq!(train.len(), 244, "{train}");
    assert!(
        train
            .ignored
            .iter()
            .any(|p| p.ends_with("imageNotFound.gif"))
    );
    let val = ImageFolder::open(
        &root,
        Split::Validation,
        OpenOptions {
            strict: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(val.len(), 153);
}

#[test]
#[ignore = "needs ../shared (AVP_SHARED, set by .ci/run)"]
fn the_shared_lesson_set_matches_the_committed_copy() {
    let root = shared().join("data/alien_vs_predator_thumbnails/data");
    for split in [Split::Train, Split::Validation] {
        let a = ImageFolder::open(
            &root,
            split,
            OpenOptions {
                strict: true,
                ..Default::default()
            },
        )
        .unwrap();
        let b = ImageFolder::open(
            &lesson_root(),
            split,
            OpenOptions {
                strict: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(a.counts(), b.counts());
        assert_eq!(a.samples.len(), b.samples.len());
    }
}

/// Links to folders inside a class folder: not followed by default (as
/// torchvision's `os.walk(followlinks=False)`), so `again -> .` and
/// `up -> ..` add nothing; with `follow_links` a cycle is walked once and a
/// link out of the class folder is refused. Two links back to the class
/// folder used to hang the walk with growing memory.
#[cfg(unix)]
#[test]
fn links_to_folders_are_not_followed_and_never_loop() {
    use std::os::unix::fs::symlink;
    let s = Scratch::new("links");
    s.file("train/alien/a.jpg", &real_jpeg());
    s.file("train/alien/sub/b.jpg", &real_jpeg());
    s.file("train/predator/c.jpg", &real_jpeg());
    s.file("train/predator/d.jpg", &real_jpeg());
    s.file("elsewhere/e.jpg", &real_jpeg());
    let alien = s.0.join("train/alien");
    symlink(".", alien.join("again")).unwrap();
    symlink(".", alien.join("loop2")).unwrap();
    symlink("sub", alien.join("sub-again")).unwrap();
    let plain = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    assert_eq!(plain.counts(), [2, 2], "{plain}");
    assert_eq!(plain.links_not_followed.len(), 3);
    assert!(
        plain
            .to_string()
            .contains("3 link(s) to folders not followed"),
        "{plain}"
    );

    // Following: each folder once, whatever the links.
    let follow = OpenOptions {
        follow_links: true,
        ..Default::default()
    };
    let f = ImageFolder::open(&s.0, Split::Train, follow).unwrap();
    assert_eq!(f.counts(), [2, 2], "{f}");

    // A link to the split (`up -> ..`) would label the predator photos
    // alien: ignored by default, refused when following.
    symlink("..", alien.join("up")).unwrap();
    let plain = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    assert_eq!(plain.counts(), [2, 2], "{plain}");
    let e = ImageFolder::open(&s.0, Split::Train, follow).unwrap_err();
    assert!(matches!(e, DataError::LinkOutsideClass { .. }), "{e}");
    assert!(e.to_string().contains("outside its class folder"), "{e}");
    std::fs::remove_file(alien.join("up")).unwrap();

    // A link inside the class folder to a folder that is not walked
    // otherwise adds its images when following.
    symlink(s.0.join("elsewhere"), s.0.join("train/predator/more")).unwrap();
    let e = ImageFolder::open(&s.0, Split::Train, follow).unwrap_err();
    assert!(matches!(e, DataError::LinkOutsideClass { .. }), "{e}");
    std::fs::remove_file(s.0.join("train/predator/more")).unwrap();
    std::fs::create_dir_all(s.0.join("train/predator/deep/er")).unwrap();
    std::fs::copy(
        s.0.join("elsewhere/e.jpg"),
        s.0.join("train/predator/deep/er/e.jpg"),
    )
    .unwrap();
    std::fs::rename(
        s.0.join("train/predator/deep"),
        s.0.join("train/predator/.deep"),
    )
    .unwrap();
    symlink(".deep/er", s.0.join("train/predator/linked")).unwrap();
    let f = ImageFolder::open(&s.0, Split::Train, follow).unwrap();
    // `.deep/er/e.jpg` directly and once more through the link: the folder
    // is walked once.
    assert_eq!(f.counts(), [2, 3], "{f}");
}

/// A 10:1 (or worse) class imbalance is named in the folder summary.
#[test]
fn a_strong_class_imbalance_is_warned_about() {
    let s = Scratch::new("imbalance");
    for i in 0..10 {
        s.file(&format!("train/many/{i}.jpg"), &real_jpeg());
    }
    s.file("train/few/0.jpg", &real_jpeg());
    let f = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    let summary = f.to_string();
    assert!(
        summary.contains("warning: the classes are unbalanced: `many` has 10 images, `few` only 1"),
        "{summary}"
    );
    std::fs::remove_file(s.0.join("train/many/9.jpg")).unwrap();
    let f = ImageFolder::open(&s.0, Split::Train, OpenOptions::default()).unwrap();
    assert!(
        f.imbalance().is_none() && !f.to_string().contains("warning"),
        "{f}"
    );
}

/// `--verify header`: a file whose header is fine but whose body is cut
/// stays in the list (only its header was read), and its error, naming
/// the file, comes when it is first read; a file that is not an image at
/// all is still left out at open. A full check leaves both out.
#[test]
fn the_header_check_defers_a_broken_body_to_the_first_read() {
    let s = Scratch::new("verify");
    let jpeg = real_jpeg();
    s.file("train/a/good.jpg", &jpeg);
    s.file("train/a/cut.jpg", &jpeg[..jpeg.len() / 2]);
    s.file("train/a/text.jpg", b"not an image at all");
    s.file("train/b/good.jpg", &jpeg);
    let open = |verify| {
        ImageFolder::open_dir(
            &s.0.join("train"),
            OpenOptions {
                verify,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let full = open(avp_data::Verify::Full);
    assert_eq!(full.len(), 2, "{full}");
    assert_eq!(full.skipped.len(), 2, "{full}");
    assert_eq!(full.verified, avp_data::Verify::Full);
    // Small folders are decoded by default.
    assert_eq!(
        open(avp_data::Verify::Auto).verified,
        avp_data::Verify::Full
    );
    let header = open(avp_data::Verify::Header);
    assert_eq!(header.verified, avp_data::Verify::Header);
    assert_eq!(header.len(), 3, "{header}");
    assert_eq!(header.skipped.len(), 1, "{header}");
    assert!(header.skipped[0].path.ends_with("text.jpg"));
    assert!(header.to_string().contains("headers checked"), "{header}");
    let cut = header
        .samples
        .iter()
        .position(|x| x.path.ends_with("cut.jpg"))
        .unwrap();
    assert_eq!(header.samples[cut].size, full.samples[0].size);
    let ds = ImageDataset::new(header.clone(), Pipeline::lesson(Normalize::imagenet()), 0);
    let err = ds.get(cut).unwrap_err().to_string();
    assert!(err.contains("cut.jpg"), "{err}");
    let good = 1 - cut.min(1);
    assert!(ds.get(good).is_ok());
    assert!("partial".parse::<avp_data::Verify>().is_err());
}
