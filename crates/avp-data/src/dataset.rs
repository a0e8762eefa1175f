//! Burn integration: an [`ImageDataset`] (Burn's `Dataset`) that decodes
//! and transforms one image per `get`, and an [`ImageBatcher`] that stacks
//! items into an [`ImageBatch`] on the requested device.
//!
//! Augmentation randomness is drawn from `(seed, epoch, index)`. The epoch
//! of an item is the number of times that index has been fetched before
//! (each index is fetched once per epoch), plus a settable base for
//! resumed runs, so the batches do not depend on how many workers load
//! them or in which order.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::decode::decode_rgb8;
use crate::error::DataError;
use crate::folder::ImageFolder;
use crate::transform::{Pipeline, Rng};

/// One transformed image.
#[derive(Debug, Clone)]
pub struct ImageItem {
    /// CHW float values.
    pub pixels: Vec<f32>,
    /// `[3, H, W]`.
    pub shape: [usize; 3],
    /// Class index.
    pub target: usize,
    /// Index in the dataset.
    pub index: usize,
}

/// A batch on a device.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `[N, 3, H, W]`.
    pub images: Tensor<4>,
    /// `[N]` class indices.
    pub targets: Tensor<1, Int>,
    /// Dataset index of each image, in batch order.
    pub indices: Vec<usize>,
}

/// An image folder seen through a transform pipeline.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    folder: Arc<ImageFolder>,
    pipeline: Pipeline,
    seed: u64,
    fetches: Arc<Vec<AtomicU64>>,
    epoch_base: Arc<AtomicU64>,
}

impl ImageDataset {
    /// Wraps `folder` with `pipeline`; `seed` drives the augmentation.
    pub fn new(folder: ImageFolder, pipeline: Pipeline, seed: u64) -> Self {
        let n = folder.len();
        Self {
            folder: Arc::new(folder),
            pipeline,
            seed,
            fetches: Arc::new((0..n).map(|_| AtomicU64::new(0)).collect()),
            epoch_base: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The underlying folder.
    pub fn folder(&self) -> &ImageFolder {
        &self.folder
    }

    /// The transform pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Class names.
    pub fn classes(&self) -> &[String] {
        &self.folder.classes
    }

    /// Starts the epoch count at `epoch` (for resumed runs) and forgets
    /// earlier fetches.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch_base.store(epoch, Ordering::SeqCst);
        for f in self.fetches.iter() {
            f.store(0, Ordering::SeqCst);
        }
    }

    /// The item for `index` in a given `epoch`, without touching the fetch
    /// counters (what `get` computes for that epoch).
    pub fn item_at(&self, index: usize, epoch: u64) -> Result<ImageItem, DatasetError> {
        let sample = self.folder.samples.get(index).ok_or_else(|| {
            DatasetError::new(DataError::Index {
                index,
                len: self.folder.len(),
            })
        })?;
        let img = decode_rgb8(&sample.path).map_err(DatasetError::new)?;
        let mut rng = Rng::for_item(self.seed, epoch, index as u64);
        Ok(ImageItem {
            pixels: self.pipeline.apply(&img, &mut rng),
            shape: self.pipeline.output_shape(),
            target: sample.class,
            index,
        })
    }

    /// Path of image `index`.
    pub fn path(&self, index: usize) -> Option<&PathBuf> {
        self.folder.samples.get(index).map(|s| &s.path)
    }
}

impl Dataset<ImageItem> for ImageDataset {
    fn get(&self, index: usize) -> Result<ImageItem, DatasetError> {
        let counter = self.fetches.get(index).ok_or_else(|| {
            DatasetError::new(DataError::Index {
                index,
                len: self.folder.len(),
            })
        })?;
        let epoch = if self.pipeline.is_random() {
            self.epoch_base.load(Ordering::SeqCst) + counter.fetch_add(1, Ordering::SeqCst)
        } else {
            0
        };
        self.item_at(index, epoch)
    }

    fn len(&self) -> usize {
        self.folder.len()
    }
}

/// Stacks [`ImageItem`]s into an [`ImageBatch`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageBatcher;

impl ImageBatcher {
    /// Stacks items (all of one shape) on `device`.
    pub fn stack(items: &[ImageItem], device: &Device) -> ImageBatch {
        let shape = items.first().map(|i| i.shape).unwrap_or([3, 0, 0]);
        let mut pixels = Vec::with_capacity(items.len() * shape.iter().product::<usize>());
        let mut targets = Vec::with_capacity(items.len());
        let indices = items.iter().map(|i| i.index).collect();
        for it in items {
            pixels.extend_from_slice(&it.pixels);
            targets.push(it.target as i64);
        }
        let n = items.len();
        ImageBatch {
            images: Tensor::from_data(
                TensorData::new(pixels, [n, shape[0], shape[1], shape[2]]),
                device,
            ),
            targets: Tensor::from_data(TensorData::new(targets, [n]), device),
            indices,
        }
    }
}

impl Batcher<ImageItem, ImageBatch> for ImageBatcher {
    fn batch(&self, items: Vec<ImageItem>, device: &Device) -> ImageBatch {
        Self::stack(&items, device)
    }
}
