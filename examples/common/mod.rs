//! What the training examples share: the committed defaults and how a
//! weights argument becomes a loaded backbone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use avp::model::{DownloadOptions, LoadOptions, LoadedModel, load_weights, resolve_weights};
use burn::tensor::Device;

/// The real ImageNet ResNet18, committed.
pub const DEFAULT_WEIGHTS: &str = "weights/mlnet-resnet18/ResNet18.onnx";
/// Its preprocessing graph (the normalization it expects).
pub const DEFAULT_PREP: &str = "weights/mlnet-resnet18/ResNetPreprocess.onnx";

/// Loads `weights` (a file or a known name, downloaded once), with `prep`
/// or, for the committed ResNet18, its committed preprocessing file.
pub fn load_backbone(weights: &Path, prep: Option<&Path>, device: &Device) -> Result<LoadedModel> {
    let prep = prep.map(Path::to_path_buf).or_else(|| {
        (weights == Path::new(DEFAULT_WEIGHTS) && Path::new(DEFAULT_PREP).exists())
            .then(|| PathBuf::from(DEFAULT_PREP))
    });
    let file = resolve_weights(
        &weights.to_string_lossy(),
        device,
        &DownloadOptions::default(),
    )?;
    let options = LoadOptions {
        prep,
        ..Default::default()
    };
    load_weights(&file, device, &options)
        .with_context(|| format!("loading the backbone {}", weights.display()))
}
