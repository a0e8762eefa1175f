//! A data loader whose batches do not depend on the number of threads:
//! the order of items is fixed by `(seed, epoch)`, the items of a batch are
//! decoded and transformed in parallel (rayon) and collected in order, and
//! the next batches are prepared on a background thread while the current
//! one is being used. Burn's multi-worker loader partitions the dataset per
//! worker, so its batch composition changes with the worker count; this
//! one's never does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::Device;
use rayon::prelude::*;

use crate::dataset::{ImageBatch, ImageBatcher, ImageItem};
use crate::transform::Rng;

/// Ordered, parallel, prefetching loader over any `Dataset<ImageItem>`.
pub struct OrderedLoader<D> {
    dataset: Arc<D>,
    batch_size: usize,
    shuffle: Option<u64>,
    device: Device,
    range: (usize, usize),
    epoch: Arc<AtomicU64>,
    prefetch: usize,
}

impl<D: Dataset<ImageItem> + 'static> OrderedLoader<D> {
    /// Batches of `batch_size` (the last one may be smaller) on `device`;
    /// `shuffle: Some(seed)` draws a new order every epoch from the seed.
    pub fn new(dataset: D, batch_size: usize, shuffle: Option<u64>, device: &Device) -> Self {
        let len = dataset.len();
        Self {
            dataset: Arc::new(dataset),
            batch_size: batch_size.max(1),
            shuffle,
            device: device.clone(),
            range: (0, len),
            epoch: Arc::new(AtomicU64::new(0)),
            prefetch: 2,
        }
    }

    /// Number of batches prepared ahead (0 prepares on demand).
    pub fn with_prefetch(mut self, batches: usize) -> Self {
        self.prefetch = batches;
        self
    }

    /// Sets the epoch the next `iter()` starts (for resumed runs).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// The order of the items in `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        epoch_order(self.range, self.shuffle, epoch)
    }

    fn batch(dataset: &D, indices: &[usize], device: &Device) -> Result<ImageBatch, DatasetError> {
        let items: Result<Vec<ImageItem>, DatasetError> =
            indices.par_iter().map(|&i| dataset.get(i)).collect();
        Ok(ImageBatcher::stack(&items?, device))
    }
}

/// The indices `range.0..range.1` in the order of `epoch`: as they are
/// without a seed, shuffled (Fisher-Yates) from `(seed, epoch)` with one.
pub fn epoch_order(range: (usize, usize), shuffle: Option<u64>, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (range.0..range.1).collect();
    if let Some(seed) = shuffle {
        let mut rng = Rng::for_item(seed, epoch, u64::MAX);
        for i in (1..idx.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
    }
    idx
}

struct OrderedIter {
    rx: Option<Receiver<Result<ImageBatch, DatasetError>>>,
    eager: Option<Box<dyn Iterator<Item = Result<ImageBatch, DatasetError>> + Send>>,
    done: usize,
    total: usize,
    batch_size: usize,
}

impl Iterator for OrderedIter {
    type Item = Result<ImageBatch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = match (&self.rx, &mut self.eager) {
            (Some(rx), _) => rx.recv().ok(),
            (None, Some(it)) => it.next(),
            _ => None,
        };
        if next.is_some() {
            self.done = (self.done + self.batch_size).min(self.total);
        }
        next
    }
}

impl DataLoaderIterator<ImageBatch> for OrderedIter {
    fn progress(&self) -> Progress {
        Progress::new(self.done, self.total, None)
    }
}

impl<D: Dataset<ImageItem> + 'static> DataLoader<ImageBatch> for OrderedLoader<D> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<ImageBatch> + 'a> {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst);
        let order = self.order(epoch);
        let total = order.len();
        let chunks: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        let dataset = Arc::clone(&self.dataset);
        let device = self.device.clone();
        if self.prefetch == 0 {
            let it = chunks
                .into_iter()
                .map(move |c| Self::batch(&dataset, &c, &device));
            return Box::new(OrderedIter {
                rx: None,
                eager: Some(Box::new(it)),
                done: 0,
                total,
                batch_size: self.batch_size,
            });
        }
        let (tx, rx) = sync_channel(self.prefetch);
        std::thread::spawn(move || {
            for c in chunks {
                // A closed channel means the consumer stopped early.
                if tx.send(Self::batch(&dataset, &c, &device)).is_err() {
                    break;
                }
            }
        });
        Box::new(OrderedIter {
            rx: Some(rx),
            eager: None,
            done: 0,
            total,
            batch_size: self.batch_size,
        })
    }

    fn num_items(&self) -> usize {
        self.range.1 - self.range.0
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<ImageBatch>> {
        Arc::new(Self {
            dataset: Arc::clone(&self.dataset),
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            device: device.clone(),
            range: self.range,
            epoch: Arc::clone(&self.epoch),
            prefetch: self.prefetch,
        })
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<ImageBatch>> {
        let s = (self.range.0 + start).min(self.range.1);
        let e = (self.range.0 + end).min(self.range.1).max(s);
        Arc::new(Self {
            dataset: Arc::clone(&self.dataset),
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            device: self.device.clone(),
            range: (s, e),
            epoch: Arc::clone(&self.epoch),
            prefetch: self.prefetch,
        })
    }
}
