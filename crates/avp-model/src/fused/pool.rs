//! The stem's max pool on NHWC maps.

use burn::nn::pool::MaxPool2d;
use rayon::prelude::*;

use super::buffers::{Buffers, Map};
use super::conv::out_size;
use super::explicit;

pub(super) struct Pool {
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
}

impl Pool {
    pub(super) fn from_burn(pool: &MaxPool2d) -> Option<Self> {
        if pool.dilation != [1, 1] || pool.ceil_mode {
            return None;
        }
        Some(Self {
            k: pool.kernel_size,
            stride: pool.stride,
            pad: explicit(&pool.padding)?,
        })
    }

    pub(super) fn run(&self, x: &Map, buffers: &Buffers) -> Option<Map> {
        let (oh, ow) = out_size(x.h, x.w, self.k, self.stride, self.pad)?;
        let c = x.c;
        let mut out = buffers.take(x.n * oh * ow * c);
        // The in-bounds window taps along one axis: `lo .. hi` of `0 .. k`.
        let taps = |o: usize, axis: usize, len: usize| {
            let start = (o * self.stride[axis]) as isize - self.pad[axis] as isize;
            let lo = (-start).clamp(0, self.k[axis] as isize);
            let hi = (len as isize - start).clamp(lo, self.k[axis] as isize);
            (start, lo as usize, hi as usize)
        };
        out.par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, oy) = (row / oh, row % oh);
                let (y0, ky_lo, ky_hi) = taps(oy, 0, x.h);
                // At the processor's vector width (`simd.rs`): the loops
                // over channels are the lanes.
                crate::simd::widest(
                    #[inline(always)]
                    || {
                        for (ox, d) in dst.chunks_exact_mut(c).enumerate() {
                            let (x0, kx_lo, kx_hi) = taps(ox, 1, x.w);
                            let mut first = true;
                            for ky in ky_lo..ky_hi {
                                let iy = (y0 + ky as isize) as usize;
                                for kx in kx_lo..kx_hi {
                                    let ix = (x0 + kx as isize) as usize;
                                    let s = &x.data[((b * x.h + iy) * x.w + ix) * c..][..c];
                                    if first {
                                        d.copy_from_slice(s);
                                        first = false;
                                        continue;
                                    }
                                    for (d, &s) in d.iter_mut().zip(s) {
                                        // A select, not a conditional store, so
                                        // that it vectorizes; NaN propagates.
                                        *d = if s > *d || s.is_nan() { s } else { *d };
                                    }
                                }
                            }
                            if first {
                                // A window wholly in the padding.
                                d.fill(f32::NEG_INFINITY);
                            }
                        }
                    },
                );
            });
        Some(Map {
            n: x.n,
            h: oh,
            w: ow,
            c,
            data: out,
        })
    }
}
