//! ONNX import at run time: decode the protobuf, recognise a ResNet by the
//! structure of its graph (never by tensor names, which differ by
//! exporter), infer its architecture and fill the Burn modules.
//!
//! Handled: torchvision exports (TorchScript exporter with BatchNorm folded
//! into the convolutions or kept, the dynamo exporter), with fixed or
//! dynamic batch; CNTK exports (unfolded BatchNorm, begin-heavy padding,
//! a final 7x7 `AveragePool`, headless). A folded convolution `y = W x + b`
//! is loaded as a bias-free convolution followed by a BatchNorm that adds
//! `b` exactly (`mean 0`, `var 1 - eps`, `gamma 1`, `beta b`), so every
//! import has torchvision's module layout.

mod graph;
mod prep;
pub mod proto;
mod resnet_graph;

use std::path::Path;

use prost::Message;

pub use prep::read_prep_onnx;
pub use resnet_graph::{ImportedResNet, NamedWeights, WeightEntry};

use crate::error::ModelError;
use proto::ModelProto;

/// What an ONNX file says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxInfo {
    /// Producer name and version (`pytorch 2.15.0`, `CNTK 2.6`).
    pub producer: String,
    /// Default-domain opset.
    pub opset: i64,
    /// IR version.
    pub ir_version: i64,
    /// Name of the graph input.
    pub input_name: String,
    /// Declared input shape; `None` marks a symbolic (dynamic) axis.
    pub input_shape: Vec<Option<usize>>,
}

/// Decodes ONNX bytes. `path` is used in messages and to find external data.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<ModelProto, ModelError> {
    let model = ModelProto::decode(bytes).map_err(|e| ModelError::NotOnnx {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if model.graph.is_none() || model.opset_import.is_empty() {
        return Err(ModelError::NotOnnx {
            path: path.to_path_buf(),
            why: "it holds no graph or no opset (an empty or foreign protobuf)".into(),
        });
    }
    Ok(model)
}

/// Imports a ResNet from ONNX bytes (the `resnet_graph` module holds the pattern).
pub fn import_resnet_bytes(path: &Path, bytes: &[u8]) -> Result<ImportedResNet, ModelError> {
    let model = decode(path, bytes)?;
    resnet_graph::import(path, &model)
}

/// Reads an ONNX file and imports the ResNet it holds.
pub fn import_resnet_file(path: &Path) -> Result<ImportedResNet, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    import_resnet_bytes(path, &bytes)
}
