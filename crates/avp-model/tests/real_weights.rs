//! The one real ImageNet ResNet we have (ML.NET's CNTK ResNet18, committed
//! in `weights/mlnet-resnet18/`), and the full-size ResNet50 that `.ci/run`
//! generates with torchvision and runs in onnxruntime.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use avp_model::{
    Backbone, BatchNormUse, BlockKind, ChannelOrder, LoadOptions, NormalizationSource,
    PaddingStyle, ValueRange, load_weights, npy, parse_device,
};
use burn::tensor::{Tensor, TensorData};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mlnet() -> (PathBuf, PathBuf) {
    let dir = repo().join("weights/mlnet-resnet18");
    (dir.join("ResNet18.onnx"), dir.join("ResNetPreprocess.onnx"))
}

fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// A directory named by an environment variable that `.ci/run` sets; when
/// set, the data must be there (fail, never skip).
fn required_dir(var: &str) -> PathBuf {
    let dir =
        std::env::var(var).unwrap_or_else(|_| panic!("set {var} (see .ci/run) to run this suite"));
    let dir = PathBuf::from(dir);
    assert!(dir.is_dir(), "{var}={} does not exist", dir.display());
    dir
}

/// Runs `model` on `dir/INPUT.npy` and returns the largest relative error
/// against `dir/OUTPUT.npy`, checking the input's batch size first.
fn error_against(
    model: impl Fn(Tensor<4>) -> Tensor<2>,
    dir: &Path,
    input: &str,
    output: &str,
    min_batch: usize,
) -> f32 {
    let device = parse_device("flex").unwrap();
    let (shape, values) = npy::read_f32(&dir.join(input)).unwrap();
    assert!(
        shape[0] >= min_batch,
        "{input}: batch of at least {min_batch}"
    );
    let x = Tensor::<4>::from_data(TensorData::new(values, shape), &device);
    let ours = model(x).into_data().try_to_vec::<f32>().unwrap();
    let (_, reference) = npy::read_f32(&dir.join(output)).unwrap();
    let err = rel_err(&ours, &reference);
    eprintln!("{output}: largest relative error {err:.2e}");
    err
}

#[test]
fn real_resnet18_imports_with_its_own_architecture_and_normalization() {
    let device = parse_device("flex").unwrap();
    let (net, prep) = mlnet();
    let loaded = load_weights(
        &net,
        &device,
        &LoadOptions {
            prep: Some(prep.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let c = &loaded.config;
    assert_eq!(c.block, BlockKind::Basic);
    assert_eq!(c.layers, [2, 2, 2, 3]);
    assert_eq!(c.num_classes, None);
    assert_eq!(c.num_features(), 512);
    assert_eq!(c.padding, PaddingStyle::BeginHeavy);
    assert_eq!(c.final_pool_window, Some(7));
    assert_eq!(loaded.provenance.stored_values, 15_908_800);
    assert!(!loaded.provenance.folded_batchnorm);
    assert_eq!(
        loaded.provenance.known.as_ref().map(|k| k.name.as_str()),
        Some("mlnet-resnet18")
    );
    let n = &loaded.normalization;
    assert_eq!(n.channel_order, ChannelOrder::Bgr);
    assert_eq!(n.range, ValueRange::Byte);
    assert_eq!(n.std, [1.0; 3]);
    // Per-channel averages of the mean image, BGR: 103.06, 115.90, 123.15.
    for (m, e) in n.mean.iter().zip([103.06, 115.90, 123.15]) {
        assert!((m - e).abs() < 0.01, "{:?}", n.mean);
    }
    assert_eq!(n.source, NormalizationSource::PrepFile(prep));
    // Without the prep file, the manifest (by SHA-256) says the same.
    let plain = load_weights(&net, &device, &LoadOptions::default()).unwrap();
    assert_eq!(plain.normalization.channel_order, ChannelOrder::Bgr);
    assert!(matches!(
        plain.normalization.source,
        NormalizationSource::Manifest(_)
    ));
    // Sizes where its fixed 7x7 average pool is not global are refused.
    assert!(loaded.model.check_input_size(224, 224).is_ok());
    assert!(loaded.model.check_input_size(256, 256).is_err());
}

#[test]
#[ignore = "needs the onnxruntime reference that .ci/run generates (AVP_RESNET50_DIR)"]
fn real_resnet18_matches_onnxruntime_on_eight_photos_at_once() {
    let dir = required_dir("AVP_RESNET50_DIR");
    let device = parse_device("flex").unwrap();
    let (net, _) = mlnet();
    let loaded = load_weights(&net, &device, &LoadOptions::default()).unwrap();
    // At least 8 photos in one batch; the reference ran them one at a time.
    let err = error_against(
        |x| loaded.model.forward(x),
        &dir,
        "mlnet_photos.input.npy",
        "mlnet_photos.output.npy",
        8,
    );
    assert!(err <= 1e-4, "relative error {err}");
    // With its 22 BatchNorm layers folded into the convolutions.
    let backbone = Backbone::from(loaded);
    let err = error_against(
        |x| backbone.forward(x, BatchNormUse::Folded),
        &dir,
        "mlnet_photos.input.npy",
        "mlnet_photos.output.npy",
        8,
    );
    assert!(err <= 1e-4, "folded: relative error {err}");
}

#[test]
#[ignore = "needs the full-size ResNet50 that .ci/run generates (AVP_RESNET50_DIR)"]
fn full_size_resnet50_matches_onnxruntime_folded_and_unfolded_and_from_pth() {
    let dir = required_dir("AVP_RESNET50_DIR");
    let device = parse_device("flex").unwrap();
    for name in ["resnet50_folded", "resnet50_unfolded"] {
        let loaded = load_weights(
            &dir.join(format!("{name}.onnx")),
            &device,
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(loaded.config.block, BlockKind::Bottleneck);
        assert_eq!(loaded.config.layers, [3, 4, 6, 3]);
        assert_eq!(loaded.config.num_classes, Some(1000));
        let err = error_against(
            |x| loaded.model.forward(x),
            &dir,
            &format!("{name}.input.npy"),
            &format!("{name}.output.npy"),
            1,
        );
        assert!(err <= 1e-4, "{name}: relative error {err}");
        // The fused CPU path, BatchNorm folded and applied in-tile.
        let backbone = Backbone::from(loaded);
        for (how, bn) in [
            ("folded", BatchNormUse::Folded),
            ("fused", BatchNormUse::Running),
        ] {
            assert_eq!(backbone.kernels_for(&device, bn), "fused", "{name} {how}");
            let err = error_against(
                |x| backbone.forward(x, bn),
                &dir,
                &format!("{name}.input.npy"),
                &format!("{name}.output.npy"),
                1,
            );
            assert!(err <= 1e-4, "{name} {how}: relative error {err}");
        }
    }
    // The same network from its torchvision state dict.
    let loaded = load_weights(&dir.join("resnet50.pth"), &device, &LoadOptions::default()).unwrap();
    let err = error_against(
        |x| loaded.model.forward(x),
        &dir,
        "resnet50_unfolded.input.npy",
        "resnet50_unfolded.output.npy",
        1,
    );
    assert!(err <= 1e-4, "resnet50.pth: relative error {err}");
}
