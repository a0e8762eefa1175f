//! Errors of the model crate: every message names the file, the layer or
//! the node, and what was expected against what was found.

use std::path::PathBuf;

/// Everything that can go wrong while building, importing or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A Hugging Face hub reference that cannot be served.
    #[error("{spec}: {why}")]
    Hub {
        /// The `hf:` reference.
        spec: String,
        /// What went wrong, and what to do.
        why: String,
    },
    /// A file could not be read at all.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not an ONNX model (protobuf decoding failed).
    #[error("{path} is not a valid ONNX file ({why}); is it truncated or another format?")]
    NotOnnx {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        why: String,
    },
    /// The ONNX graph is a valid model but not a ResNet this importer knows.
    #[error("{path} is not a ResNet the importer understands: {why}")]
    NotResNet {
        /// The file.
        path: PathBuf,
        /// Which node broke the pattern, and how.
        why: String,
    },
    /// A tensor does not have the shape the inferred architecture needs.
    #[error("{path}: shape mismatch at {layer}: expected {expected:?}, found {found:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The layer (torchvision-style path) and, for ONNX, the initializer.
        layer: String,
        /// What the architecture needs.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
    /// A tensor uses a data type the importer cannot convert to f32.
    #[error(
        "{path}: tensor {tensor} has data type {dtype}, which is not supported (only float32, float64 and float16 weights are)"
    )]
    DataType {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The ONNX data type name.
        dtype: String,
    },
    /// A tensor's declared size and its stored data disagree.
    #[error("{path}: tensor {tensor} is corrupt: {why}")]
    CorruptTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What disagrees.
        why: String,
    },
    /// A tensor stored as external data whose file is missing or short.
    #[error("{path}: tensor {tensor} is stored in external file {external}, which {why}")]
    ExternalData {
        /// The model file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The external data file.
        external: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A PyTorch, safetensors or Burn file could not be loaded.
    #[error("{path}: {why}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What burn-store or the key inference said.
        why: String,
    },
    /// The file extension names no format we read.
    #[error("{path}: unknown weights format (expected .onnx, .pth/.pt, .safetensors or .bpk)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A request this backbone or build cannot serve (kernels, device).
    #[error("{0}")]
    Unsupported(String),
    /// A configuration that does not describe a network.
    #[error("invalid ResNet configuration: {0}")]
    InvalidConfig(String),
    /// An input size the model cannot process faithfully.
    #[error("input size {height}x{width} refused: {why}")]
    InputSize {
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
        /// Why.
        why: String,
    },
    /// A preprocessing ONNX file that is not a channel reorder and mean subtraction.
    #[error("{path} is not a preprocessing graph the importer understands: {why}")]
    Preprocess {
        /// The file.
        path: PathBuf,
        /// What broke the pattern.
        why: String,
    },
    /// A device name that is unknown, or whose backend was not compiled in.
    #[error("{0}")]
    Device(String),
    /// A download failed; nothing was left in the cache.
    #[error("cannot download {url}: {why}. {hint}")]
    Download {
        /// What was fetched.
        url: String,
        /// What went wrong.
        why: String,
        /// What to do instead.
        hint: String,
    },
    /// Reading or writing an `.npy` array failed.
    #[error("{path}: {why}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}
