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
        out.fill(f32::NEG_INFINITY);
        out.par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let b = row / oh;
                let oy = row % oh;
                for ox in 0..ow {
                    let d = &mut dst[ox * c..(ox + 1) * c];
                    for ky in 0..self.k[0] {
                        let Some(iy) = (oy * self.stride[0] + ky)
                            .checked_sub(self.pad[0])
                            .filter(|&iy| iy < x.h)
                        else {
                            continue;
                        };
                        for kx in 0..self.k[1] {
                            let Some(ix) = (ox * self.stride[1] + kx)
                                .checked_sub(self.pad[1])
                                .filter(|&ix| ix < x.w)
                            else {
                                continue;
                            };
                            let s = ((b * x.h + iy) * x.w + ix) * c;
                            for (d, &s) in d.iter_mut().zip(&x.data[s..s + c]) {
                                // A select, not a conditional store, so that
                                // it vectorizes; NaN propagates.
                                *d = if s > *d || s.is_nan() { s } else { *d };
                            }
                        }
                    }
                }
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
