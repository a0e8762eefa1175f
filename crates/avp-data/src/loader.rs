//! A data loader whose batches do not depend on the number of threads:
//! the order of items is fixed by `(seed, epoch)`, the items of a batch are
//! decoded and transformed in parallel (rayon) and collected in order, and
//! the next batches are prepared on a background thread while the current
//! one is being used. Burn's multi-worker loader partitions the dataset per
//! worker, so its batch composition changes with the worker count; this
//! one's never does.
//!
//! Several devices (burn-train's `MultiDevice` strategy) get one shard each
//! through [`DataLoader::slice`]: a shard is a range of *positions in each
//! epoch's shuffled order*, not of dataset indices, so every item is seen
//! exactly once per epoch across the shards, every shard sees a mix of
//! classes (a class-sorted folder cut into contiguous index ranges would
//! give each device one class), and all shards agree on the epoch. Each
//! shard counts its own epochs from the parent's epoch at the time of the
//! cut ([`EpochPlan`]), so N shards advance one epoch per epoch, not N.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::Device;
use rayon::prelude::*;

use crate::dataset::{ImageBatch, ImageBatcher, ImageItem};
use crate::transform::Rng;

/// Which items a loader yields in each epoch, in which order, and which
/// epoch comes next: the order of all `len` items is drawn from
/// `(seed, epoch)` ([`epoch_order`]) and the plan yields the positions
/// `start..end` of it.
///
/// Clones share the epoch counter (the same loader on another device);
/// [`EpochPlan::shard`] starts a counter of its own at the current epoch
/// (one shard per device, each iterated once per epoch).
#[derive(Debug, Clone)]
pub struct EpochPlan {
    len: usize,
    shuffle: Option<u64>,
    positions: (usize, usize),
    epoch: Arc<AtomicU64>,
}

impl EpochPlan {
    /// All `len` items, shuffled every epoch from `shuffle: Some(seed)`,
    /// in index order without one; the first epoch is 0.
    pub fn new(len: usize, shuffle: Option<u64>) -> Self {
        Self {
            len,
            shuffle,
            positions: (0, len),
            epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sets the epoch of the next [`EpochPlan::next_epoch`] (resumed runs).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// The epoch the next [`EpochPlan::next_epoch`] yields.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Items per epoch.
    pub fn len(&self) -> usize {
        self.positions.1 - self.positions.0
    }

    /// Whether the plan yields no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items of `epoch`, in order.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let order = epoch_order((0, self.len), self.shuffle, epoch);
        order[self.positions.0..self.positions.1].to_vec()
    }

    /// The current epoch and its items; the counter moves to the next.
    pub fn next_epoch(&self) -> (u64, Vec<usize>) {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst);
        (epoch, self.indices(epoch))
    }

    /// Positions `start..end` (relative to this plan's, clamped) of every
    /// epoch's order, with an epoch counter of its own that starts at this
    /// plan's current epoch.
    pub fn shard(&self, start: usize, end: usize) -> Self {
        let (s0, e0) = self.positions;
        let s = (s0 + start).min(e0);
        let e = (s0 + end).min(e0).max(s);
        Self {
            len: self.len,
            shuffle: self.shuffle,
            positions: (s, e),
            epoch: Arc::new(AtomicU64::new(self.epoch())),
        }
    }
}

/// Ordered, parallel, prefetching loader over any `Dataset<ImageItem>`.
pub struct OrderedLoader<D> {
    dataset: Arc<D>,
    batch_size: usize,
    device: Device,
    plan: EpochPlan,
    prefetch: usize,
}

impl<D: Dataset<ImageItem> + 'static> OrderedLoader<D> {
    /// Batches of `batch_size` (the last one may be smaller) on `device`;
    /// `shuffle: Some(seed)` draws a new order every epoch from the seed.
    pub fn new(dataset: D, batch_size: usize, shuffle: Option<u64>, device: &Device) -> Self {
        let plan = EpochPlan::new(dataset.len(), shuffle);
        Self {
            dataset: Arc::new(dataset),
            batch_size: batch_size.max(1),
            device: device.clone(),
            plan,
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
        self.plan.set_epoch(epoch);
    }

    /// The items this loader yields in `epoch`, in order.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        self.plan.indices(epoch)
    }

    /// Which items come in which epoch.
    pub fn plan(&self) -> &EpochPlan {
        &self.plan
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
        let (_, order) = self.plan.next_epoch();
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
        self.plan.len()
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<ImageBatch>> {
        Arc::new(self.with(device, self.plan.clone()))
    }

    /// Positions `start..end` of every epoch's order (see [`EpochPlan::shard`]).
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<ImageBatch>> {
        Arc::new(self.with(&self.device, self.plan.shard(start, end)))
    }
}

impl<D> OrderedLoader<D> {
    fn with(&self, device: &Device, plan: EpochPlan) -> Self {
        Self {
            dataset: Arc::clone(&self.dataset),
            batch_size: self.batch_size,
            device: device.clone(),
            plan,
            prefetch: self.prefetch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::data::dataloader::split::split_dataloader;

    /// Items that are their own index, one pixel each.
    struct Indices(usize);

    impl Dataset<ImageItem> for Indices {
        fn get(&self, index: usize) -> Result<ImageItem, DatasetError> {
            Ok(ImageItem {
                pixels: vec![index as f32; 3],
                shape: [3, 1, 1],
                target: index % 2,
                index,
            })
        }

        fn len(&self) -> usize {
            self.0
        }
    }

    fn epoch_items(loader: &dyn DataLoader<ImageBatch>) -> Vec<usize> {
        loader
            .iter()
            .flat_map(|b| b.map(|b| b.indices).unwrap_or_default())
            .collect()
    }

    /// Burn's `split_dataloader` (what `MultiDevice` calls) over a
    /// shuffled loader: per epoch the shards together yield every item
    /// exactly once, in the parent's order for that epoch, each shard
    /// holds both classes, and the shards agree on the epoch (the counter
    /// used to move once per shard).
    #[test]
    fn shards_cut_each_epochs_order_and_share_its_epoch() {
        let device = Device::default();
        let parent = OrderedLoader::new(Indices(23), 4, Some(5), &device).with_prefetch(0);
        parent.set_epoch(3);
        let shards = split_dataloader(
            Arc::new(parent) as Arc<dyn DataLoader<ImageBatch>>,
            &[device.clone(), device.clone()],
        );
        let reference = OrderedLoader::new(Indices(23), 4, Some(5), &device);
        for epoch in 3..6 {
            let parts: Vec<Vec<usize>> = shards.iter().map(|s| epoch_items(s.as_ref())).collect();
            assert_eq!(parts[0].len(), 11);
            assert_eq!(parts[1].len(), 12);
            let joined: Vec<usize> = parts.concat();
            assert_eq!(joined, reference.order(epoch), "epoch {epoch}");
            let mut sorted = joined.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..23).collect::<Vec<_>>(), "epoch {epoch}");
            for p in &parts {
                assert!(p.iter().any(|i| i % 2 == 0) && p.iter().any(|i| i % 2 == 1));
            }
        }
        assert_ne!(reference.order(3), reference.order(4));
    }

    /// Without a shuffle a shard is a fixed range, the same every epoch.
    #[test]
    fn unshuffled_shards_are_fixed_ranges() {
        let device = Device::default();
        let parent = OrderedLoader::new(Indices(10), 3, None, &device).with_prefetch(0);
        let shard = parent.slice(4, 8);
        assert_eq!(shard.num_items(), 4);
        for _ in 0..2 {
            assert_eq!(epoch_items(shard.as_ref()), vec![4, 5, 6, 7]);
        }
        assert_eq!(parent.slice(8, 20).num_items(), 2);
    }
}
