//! Activation maps (NHWC) and the pool of buffers they live in.

use std::sync::Mutex;

/// Activation buffers handed back after use and taken again by the next
/// layer or the next batch. Fresh allocations of these sizes come from
/// `mmap`, and first-touch page faults cost as much as the arithmetic of a
/// small layer (measured: a 1568x256x1024 product ran at 210 instead of 460
/// GFLOP/s into a new buffer). Holds at most [`KEPT_BUFFERS`] buffers.
#[derive(Default)]
pub(super) struct Buffers(Mutex<Pool>);

#[derive(Default)]
struct Pool {
    /// Buffers not in use, each at the length of its written values.
    free: Vec<Vec<f32>>,
    /// Buffers handed out shorter than their written values.
    lent: Vec<Lent>,
}

/// A buffer handed out by [`Buffers::take`] truncated to `len` of its
/// `written` values: when it comes back (same allocation, capacity and
/// length), [`Buffers::give`] gives it its full length again, so a later
/// `take` of a longer map does not zero what is already written.
struct Lent {
    ptr: usize,
    capacity: usize,
    len: usize,
    written: usize,
}

/// Buffers kept between batches: a bottleneck block has five maps alive.
const KEPT_BUFFERS: usize = 8;

/// Truncated buffers remembered at once (those never given back are
/// forgotten oldest first).
const KEPT_LENT: usize = 4 * KEPT_BUFFERS;

impl Buffers {
    /// A buffer of `len` floats; its contents are unspecified (every caller
    /// writes all of it).
    pub(super) fn take(&self, len: usize) -> Vec<f32> {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let free = &mut pool.free;
        // A buffer already `len` long or longer is handed out truncated; a
        // shorter one is lengthened with zeros, a `memset` pass. Taking the
        // former first took `memset` from 3.6% to 2.4% of a `perf` profile
        // of ResNet50's inference at batch 32, and giving truncated buffers
        // back at their full length ([`Lent`]) took it from 2.7% to 1.7%
        // there, and from 6.1% to 4.3% of the prefix cache's pass through
        // ResNet18 (README, "Performance", lever 9).
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
        let written = buf.len();
        if written < len {
            drop(pool);
            buf.resize(len, 0.0);
            pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        }
        buf.truncate(len);
        // Any record of this address is of an allocation dropped without
        // being given back: only the buffer handed out now lives there.
        let ptr = buf.as_ptr() as usize;
        pool.lent.retain(|l| l.ptr != ptr);
        if written > len {
            if pool.lent.len() == KEPT_LENT {
                pool.lent.remove(0);
            }
            pool.lent.push(Lent {
                ptr,
                capacity: buf.capacity(),
                len,
                written,
            });
        }
        buf
    }

    #[allow(unsafe_code)] // one `set_len`, argued below
    pub(super) fn give(&self, map: Map) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut data = map.data;
        let (ptr, capacity, len) = (data.as_ptr() as usize, data.capacity(), data.len());
        if let Some(i) = pool
            .lent
            .iter()
            .rposition(|l| l.ptr == ptr && l.capacity == capacity && l.len == len)
        {
            let written = pool.lent.swap_remove(i).written;
            // SAFETY: every map's buffer comes from `take`, which drops any
            // older record of its address, so this is the allocation `take`
            // truncated from `written` initialized values (same address,
            // capacity and length: maps are written in place, never grown
            // or replaced). `written` fits its capacity, and truncating an
            // `f32` vector leaves the values past its length initialized.
            unsafe { data.set_len(written) };
        }
        if pool.free.len() < KEPT_BUFFERS {
            pool.free.push(data);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn map(data: Vec<f32>) -> Map {
        Map {
            n: 1,
            h: 1,
            w: data.len(),
            c: 1,
            data,
        }
    }

    /// A buffer handed out shorter than its written values comes back at
    /// its full length, so taking the long size again is neither a new
    /// allocation nor a zeroing pass: the values past the short length are
    /// the ones written before.
    #[test]
    fn a_truncated_buffer_comes_back_whole() {
        let buffers = Buffers::default();
        let mut long = buffers.take(1000);
        long.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 + 1.0);
        let start = long.as_ptr();
        buffers.give(map(long));
        let short = buffers.take(300);
        assert_eq!((short.len(), short.as_ptr()), (300, start));
        buffers.give(map(short));
        let again = buffers.take(1000);
        assert_eq!(again.as_ptr(), start);
        assert!(again.iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0));
    }

    /// A truncated buffer dropped instead of given back, and a buffer that
    /// comes back longer than it was handed out, leave the lengths handed
    /// out later as asked.
    #[test]
    fn only_the_lent_buffer_is_lengthened() {
        let buffers = Buffers::default();
        buffers.give(map(vec![1.0; 1000]));
        drop(buffers.take(300));
        let fresh = buffers.take(300);
        assert_eq!(fresh.len(), 300);
        buffers.give(map(fresh));
        assert_eq!(buffers.take(300).len(), 300);
        let mut grown = buffers.take(10);
        grown.resize(2000, 2.0);
        buffers.give(map(grown));
        assert_eq!(buffers.take(2000).len(), 2000);
    }
}
