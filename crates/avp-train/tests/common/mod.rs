//! Helpers shared by the training tests: scratch folders, generated
//! datasets, the tiny backbone, and the lock that keeps trainings apart.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use avp_model::{LoadOptions, LoadedModel, load_weights};

/// Burn's device RNG is process-wide: trainings running at the same time in
/// other test threads would draw from it between seeding and the head's
/// (lazy) initialisation.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Scratch(pub PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch(tag: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("avp-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

/// Reddish versus bluish noisy squares.
pub fn make_dataset(root: &Path, per_class: (usize, usize)) {
    let mut state = 12345u32;
    let mut rnd = move || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 24) as u8
    };
    for (split, n) in [("train", per_class.0), ("val", per_class.1)] {
        for (class, base) in [("red", [200u8, 40, 40]), ("blue", [40u8, 40, 200])] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(48, 40, |_, _| {
                    let mut p = base;
                    for c in &mut p {
                        *c = c.saturating_add(rnd() / 4).saturating_sub(rnd() / 4);
                    }
                    image::Rgb(p)
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

/// A small headless ResNet with fixed weights: one of the model crate's
/// committed ONNX fixtures (random, but the same every run, so that the
/// features are never degenerate by chance).
pub fn tiny_backbone(device: &burn::tensor::Device) -> LoadedModel {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx/bottleneck_folded_op17_headless.onnx");
    load_weights(&path, device, &LoadOptions::default()).unwrap()
}

/// A tensor's values as `f32`.
pub fn values<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// The largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}
