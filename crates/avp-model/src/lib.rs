//! # avp-model
//!
//! ResNet 18…152 (and any other four-stage block count) built from Burn
//! modules with torchvision's field names, and the importers that fill them:
//! ONNX files read at run time and recognised by graph structure, PyTorch
//! and safetensors state dicts through `burn-store`, and Burn's native
//! burnpack format for fast reloads. Every loaded model carries its
//! [`Provenance`] and the input [`Normalization`] it expects.
//!
//! Where things are:
//! - [`ResNet`] (`resnet.rs`) is a plain Burn module: `forward`,
//!   `forward_features`, Burn's modules on every device.
//! - [`Backbone`] (`backbone.rs`) is a network with its provenance and
//!   normalization, and the one place that decides how it runs: a
//!   [`BatchNormUse`] per pass and a [`Kernels`] choice. It keeps the folded
//!   network and the fused packs, built once per device on first use.
//! - BatchNorm is folded in one place, [`fold_batchnorm`] (`batchnorm.rs`).
//! - [`fused`] is the fused CPU path for flex, in small files.
//! - [`report`] carries the library's messages (it never prints) and the
//!   one progress facility.
//!
//! ```no_run
//! use avp_model::{load_weights, parse_device, Backbone, BatchNormUse, LoadOptions};
//! # fn main() -> Result<(), avp_model::ModelError> {
//! let device = parse_device("flex")?;
//! let loaded = load_weights(
//!     "weights/mlnet-resnet18/ResNet18.onnx".as_ref(),
//!     &device,
//!     &LoadOptions { prep: Some("weights/mlnet-resnet18/ResNetPreprocess.onnx".into()), ..Default::default() },
//! )?;
//! println!("{}", loaded.config.describe());
//! println!("{}", loaded.normalization.describe());
//! let backbone = Backbone::from(loaded);
//! let images = burn::tensor::Tensor::<4>::zeros([1, 3, 224, 224], &device);
//! let features = backbone.features(images, BatchNormUse::Folded); // [1, 512]
//! # let _ = features;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod atomic;
pub mod backbone;
pub mod batchnorm;
mod cache_dir;
mod device;
pub mod download;
mod error;
mod fill;
pub mod fused;
#[cfg(feature = "download")]
mod http;
pub mod hub;
pub mod normalization;
pub mod npy;
pub mod onnx;
pub mod pack;
pub mod report;
pub mod resnet;
mod simd;
pub mod train_adam;
#[cfg(feature = "flex")]
pub mod train_bn;
#[cfg(feature = "flex")]
pub mod train_conv;
#[cfg(feature = "flex")]
pub mod train_relu;
pub mod weights;
mod winograd_lanes;

pub use backbone::{Backbone, Kernels};
pub use batchnorm::{BatchNormUse, fold_batchnorm};
pub use cache_dir::cache_root;
pub use device::{DEVICE_NAMES, compiled_backends, device_report, is_flex, parse_device};
pub use download::{DownloadOptions, resolve_weights};
pub use error::ModelError;
pub use fill::fill;
pub use fused::FusedResNet;
pub use normalization::{ChannelOrder, EvalCrop, Normalization, NormalizationSource, ValueRange};
pub use resnet::{
    Block, BlockKind, ConvSite, Downsample, PaddingStyle, ResNet, ResNetConfig, ResNetStages,
    Stage, Stem, StridePlacement,
};
pub use weights::{
    KnownWeights, LoadOptions, LoadedModel, Provenance, WeightFormat, load_weights, manifest,
    save_native, sha256_hex,
};
