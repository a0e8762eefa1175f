//! Activation maps (NHWC) and the pool of buffers they live in.

use std::sync::Mutex;

/// Activation buffers handed back after use and taken again by the next
/// layer or the next batch. Fresh allocations of these sizes come from
/// `mmap`, and first-touch page faults cost as much as the arithmetic of a
/// small layer (measured: a 1568x256x1024 product ran at 210 instead of 460
/// GFLOP/s into a new buffer). Holds at most [`KEPT_BUFFERS`] buffers.
#[derive(Default)]
pub(super) struct Buffers(Mutex<Vec<Vec<f32>>>);

/// Buffers kept between batches: a bottleneck block has five maps alive.
const KEPT_BUFFERS: usize = 8;

impl Buffers {
    /// A buffer of `len` floats; its contents are unspecified (every caller
    /// writes all of it).
    pub(super) fn take(&self, len: usize) -> Vec<f32> {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A buffer already `len` long or longer is handed out as it is or
        // truncated; a shorter one is lengthened with zeros, a `memset`
        // pass. Taking the former first took `memset` from 3.6% to 2.4%
        // of a `perf` profile of ResNet50's inference at batch 32; the
        // rest is buffers truncated for a small map and taken again for a
        // large one while the pool holds nothing longer.
        let long_enough = (0..free.len())
            .filter(|&i| free[i].len() >= len)
            .min_by_key(|&i| free[i].len());
        let fits = (0..free.len())
            .filter(|&i| free[i].capacity() >= len)
            .min_by_key(|&i| free[i].capacity());
        let pick = long_enough
            .or(fits)
            .or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
        let mut buf = pick.map(|i| free.swap_remove(i)).unwrap_or_default();
        drop(free);
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0.0);
        }
        buf
    }

    pub(super) fn give(&self, map: Map) {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEPT_BUFFERS {
            free.push(map.data);
        }
    }
}

/// An activation map in NHWC order.
pub(super) struct Map {
    pub(super) n: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c: usize,
    pub(super) data: Vec<f32>,
}
