//! Our transforms against torchvision's, on the reference images that
//! `tests/fixtures/data/make_fixtures.py` writes with PIL and torchvision.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use avp_data::{
    AffineParams, CenterCrop, CropBox, RandomResizedCrop, Resize, ResizeShorter, affine,
    decode_rgb8,
};
use image::RgbImage;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn png(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// (fraction of values within 1 level, largest difference)
fn closeness(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut within = 0usize;
    let mut max = 0u8;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        within += (d <= 1) as usize;
        max = max.max(d);
    }
    (within as f64 / a.as_raw().len() as f64, max)
}

fn equal_pixels(a: &RgbImage, b: &RgbImage) -> f64 {
    let same = a.pixels().zip(b.pixels()).filter(|(p, q)| p == q).count();
    same as f64 / (a.width() * a.height()) as f64
}

fn meta(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("fixtures.json")).unwrap()).unwrap()
}

/// Resize bar: ≤ 1/255 for at least 99.9% of values, ≤ 2/255 for all.
fn check_resize(dir: &Path, root: &Path) -> usize {
    let m = meta(dir);
    let images = m["images"].as_object().unwrap();
    let resize = Resize::new(224, 224);
    for (name, info) in images {
        let reference = png(&dir.join(format!("{name}.resized.png")));
        // The transform alone, on PIL's decoded pixels.
        let ours = resize.apply(&png(&dir.join(format!("{name}.decoded.png"))));
        let (frac, max) = closeness(&ours, &reference);
        assert!(
            frac >= 0.999 && max <= 2,
            "{name}: resize within 1 level {frac}, max diff {max}"
        );
        // End to end, from the file, with our decoder: JPEG decoders differ
        // (ours is zune-jpeg, PIL's libjpeg-turbo) by a few levels on some
        // pixels, so this bar is looser and reported.
        let src = root.join(info["source"].as_str().unwrap());
        let decoded = decode_rgb8(&src).unwrap();
        let (dfrac, dmax) = closeness(&decoded, &png(&dir.join(format!("{name}.decoded.png"))));
        let ours = resize.apply(&decoded);
        let (frac, max) = closeness(&ours, &reference);
        eprintln!(
            "{name}: decode within 1 level {dfrac:.5} (max {dmax}); decode+resize within 1 level {frac:.5} (max {max})"
        );
        assert!(
            frac >= 0.95 && max <= 8,
            "{name}: decode+resize within 1 level {frac}, max diff {max}"
        );
    }
    images.len()
}

#[test]
fn resize_matches_torchvision_on_the_lessons_photos() {
    assert!(check_resize(&fixtures(), &repo()) >= 5);
}

#[test]
fn affine_matches_torchvision_given_the_same_parameters() {
    let dir = fixtures();
    let m = meta(&dir);
    let affines = m["affines"].as_array().unwrap();
    for name in m["images"].as_object().unwrap().keys() {
        let resized = png(&dir.join(format!("{name}.resized.png")));
        for (k, a) in affines.iter().enumerate() {
            let f = |v: &serde_json::Value| v.as_f64().unwrap();
            let p = AffineParams {
                angle: f(&a["angle"]),
                translate: (f(&a["translate"][0]), f(&a["translate"][1])),
                scale: f(&a["scale"]),
                shear: (f(&a["shear"][0]), f(&a["shear"][1])),
            };
            let ours = affine(&resized, &p, [0, 0, 0]);
            let reference = png(&dir.join(format!("{name}.affine{k}.png")));
            let eq = equal_pixels(&ours, &reference);
            assert!(eq >= 0.999, "{name} affine{k}: {eq} of pixels equal");
        }
    }
}

#[test]
#[ignore = "needs the reference set that .ci/run writes from ../shared (AVP_DATA_REFERENCE)"]
fn resize_matches_torchvision_on_shared_photos() {
    let dir = PathBuf::from(
        std::env::var("AVP_DATA_REFERENCE").expect("set AVP_DATA_REFERENCE (see .ci/run)"),
    );
    assert!(dir.is_dir(), "{} does not exist", dir.display());
    assert!(check_resize(&dir, Path::new("/")) >= 20);
}

#[test]
fn other_modes_convert_to_rgb_like_pil() {
    let dir = fixtures().join("modes");
    let modes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("modes.json")).unwrap()).unwrap();
    let modes = modes.as_object().unwrap();
    assert!(modes.len() >= 5);
    for (name, mode) in modes {
        let ours = decode_rgb8(&dir.join(name)).unwrap();
        let pil = png(&dir.join(format!("{name}.rgb.png")));
        let (within, max) = closeness(&ours, &pil);
        eprintln!("{name} ({mode}): {within:.4} of values within one level of PIL, max {max}");
        if name.ends_with(".png") {
            // Lossless formats: exactly PIL's pixels.
            assert_eq!(max, 0, "{name} ({mode}) differs from PIL's convert('RGB')");
        } else {
            // JPEG: the decoders differ by a few levels (see above).
            assert!(
                within >= 0.9 && max <= 8,
                "{name} ({mode}): within {within}, max {max}"
            );
        }
    }
}

/// torchvision's evaluation crop (`Resize(256)` + `CenterCrop(224)`) and
/// `RandomResizedCrop`'s crop-and-resize for given boxes, on PIL's decoded
/// pixels (`make_crop_fixtures.py`): at least 99.9% of values within one
/// level, none more than two apart.
#[test]
fn imagenet_crops_match_torchvision() {
    let dir = fixtures();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("crops.json")).unwrap()).unwrap();
    let images = meta["images"].as_object().unwrap();
    assert!(images.len() >= 5, "{}", images.len());
    let mut checked = 0;
    for (name, info) in images {
        let decoded = png(&dir.join(format!("{name}.decoded.png")));
        let resized = ResizeShorter { size: 256 }.apply(&decoded);
        let want: Vec<u32> = info["resized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            [resized.width(), resized.height()],
            want[..],
            "{name}: Resize(256) size"
        );
        let ours = CenterCrop {
            height: 224,
            width: 224,
        }
        .apply(&resized);
        let reference = png(&dir.join(format!("{name}.center_crop.png")));
        let (frac, max) = closeness(&ours, &reference);
        assert!(
            frac >= 0.999 && max <= 2,
            "{name}: center crop within 1 level {frac}, max diff {max}"
        );
        checked += 1;
        let rrc = RandomResizedCrop::new(224);
        for (k, b) in info["boxes"].as_array().unwrap().iter().enumerate() {
            let b: Vec<u32> = b
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let cb = CropBox {
                top: b[0],
                left: b[1],
                height: b[2],
                width: b[3],
            };
            let ours = rrc.apply_box(&decoded, cb);
            let reference = png(&dir.join(format!("{name}.rrc{k}.png")));
            let (frac, max) = closeness(&ours, &reference);
            assert!(
                frac >= 0.999 && max <= 2,
                "{name} box {k} {cb:?}: resized crop within 1 level {frac}, max diff {max}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, images.len() * 4);
}

/// `RandomResizedCrop`'s boxes are drawn as torchvision draws them (ten
/// tries of a random area and log-uniform aspect ratio, then a centred
/// fallback): over 20000 draws, the mean and spread of the area and of the
/// aspect ratio agree with torchvision's own `get_params` (crops.json)
/// within four standard errors.
#[test]
fn random_resized_crop_draws_like_torchvision() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("crops.json")).unwrap())
            .unwrap();
    let rrc = RandomResizedCrop::new(224);
    for (key, (w, h)) in [("400x400", (400u32, 400u32)), ("400x200", (400, 200))] {
        let want = &meta["rrc_draws"][key];
        let n = 20000;
        let mut rng = avp_data::Rng::for_item(11, 0, 0);
        let (mut areas, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let b = rrc.sample((w, h), &mut rng);
            areas.push((b.width * b.height) as f64 / (w * h) as f64);
            ratios.push(b.width as f64 / b.height as f64);
        }
        let stats = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            (m, sd)
        };
        for (name, v) in [("area", &areas), ("ratio", &ratios)] {
            let (m, sd) = stats(v);
            let (tm, tsd) = (
                want[format!("{name}_mean")].as_f64().unwrap(),
                want[format!("{name}_std")].as_f64().unwrap(),
            );
            let se = tsd * (2.0 / n as f64).sqrt();
            eprintln!("{key} {name}: ours {m:.4} (sd {sd:.4}), torchvision {tm:.4} (sd {tsd:.4})");
            assert!((m - tm).abs() < 4.0 * se, "{key} {name} mean {m} vs {tm}");
            assert!(
                (sd - tsd).abs() < 0.05 * tsd,
                "{key} {name} sd {sd} vs {tsd}"
            );
        }
    }
}
