//! # avp-data
//!
//! An image-folder pipeline with torchvision's semantics, for Burn:
//! [`ImageFolder`] (torchvision's `ImageFolder`, checked once at open),
//! decoding by content to RGB8 as PIL's `convert('RGB')` does, the lesson's
//! transforms ([`Resize`], [`RandomAffine`], [`RandomHorizontalFlip`],
//! [`Normalize`]) with randomness drawn from `(seed, epoch, index)`, and
//! Burn's `Dataset` / `Batcher` implementations.
#![warn(missing_docs)]

pub mod dataset;
pub mod decode;
mod error;
pub mod folder;
pub mod loader;
pub mod transform;

pub use dataset::{ImageBatch, ImageBatcher, ImageDataset, ImageItem};
pub use decode::{decode_rgb8, decode_rgb8_bytes, probe_size};
pub use error::DataError;
pub use folder::{
    FULL_VERIFY_LIMIT, IMG_EXTENSIONS, ImageFolder, OpenOptions, Sample, Skipped, Split, Verify,
};
pub use loader::{EpochPlan, OrderedLoader, epoch_order};
pub use transform::{
    AffineParams, CenterCrop, Channels, CropBox, Geometry, Normalize, Pipeline, RandomAffine,
    RandomHorizontalFlip, RandomResizedCrop, Resize, ResizeShorter, Rng, affine, crop,
    inverse_affine_matrix,
};
