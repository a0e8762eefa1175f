//! One convolution, tile by tile: im2col (none for a stride-1 1x1
//! convolution), one single-threaded `gemm` accumulating into the output
//! tile, and the epilogue (bias, BatchNorm, shortcut, ReLU) while the tile
//! is in cache.

use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::buffers::Map;
use super::norm::{BatchStats, Pass, clamp_negative, scale_shift};
use super::{explicit, floats};
use crate::batchnorm::BatchNormUse;

/// Rows (output pixels) per tile. In a standalone measurement of `gemm` on
/// ResNet50's layer shapes at batch 8 (2 cores), 256-row tiles with a
/// single-threaded product each ran at 300–470 GFLOP/s, and one two-thread
/// product over the whole layer at 80–460 (worst on the wide 1x1 layers).
const MAX_TILE_ROWS: usize = 256;

/// One convolution with its bias, weights packed as a `[kh·kw·cin, cout]`
/// row-major matrix (the im2col row order is `ky, kx, cin`).
pub(super) struct Conv {
    pub(super) cin: usize,
    pub(super) cout: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: [usize; 2],
    /// top, left, bottom, right
    pub(super) pad: [usize; 4],
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
    /// Index of the BatchNorm after this convolution in [`batchnorms`]
    /// order, for a network that is not folded.
    pub(super) bn: Option<usize>,
}

thread_local! {
    static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Conv {
    pub(super) fn from_burn(conv: &Conv2d, bn: Option<usize>) -> Option<Self> {
        if conv.groups != 1 || conv.dilation != [1, 1] {
            return None;
        }
        let pad = explicit(&conv.padding)?;
        let [cout, cin, kh, kw] = conv.weight.lazy_shape().dims::<4>();
        let w = floats(conv.weight.val())?;
        let bias = match &conv.bias {
            Some(b) => floats(b.val())?,
            None => vec![0.0; cout],
        };
        if w.len() != cout * cin * kh * kw || bias.len() != cout {
            return None;
        }
        let mut weight = vec![0.0; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let src = ((co * cin + ci) * kh + ky) * kw + kx;
                        let dst = ((ky * kw + kx) * cin + ci) * cout + co;
                        weight[dst] = w[src];
                    }
                }
            }
        }
        Some(Self {
            cin,
            cout,
            kh,
            kw,
            stride: conv.stride,
            pad,
            weight,
            bias,
            bn,
        })
    }

    fn out_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        out_size(h, w, [self.kh, self.kw], self.stride, self.pad)
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0; 4]
    }

    /// `relu?(bn?(conv(x) + bias) + residual?)`. Without a BatchNorm to
    /// apply (folded) or with running statistics it is one pass per tile;
    /// batch statistics need the whole output first, then a second pass
    /// ([`Conv::batch_norm_pass`]).
    pub(super) fn run(
        &self,
        x: &Map,
        residual: Option<&Map>,
        relu: bool,
        pass: &Pass,
    ) -> Option<Map> {
        if x.c != self.cin {
            return None;
        }
        let (oh, ow) = self.out_size(x.h, x.w)?;
        let rows = x.n * oh * ow;
        let cout = self.cout;
        if let Some(r) = residual
            && r.data.len() != rows * cout
        {
            return None;
        }
        let bn = match pass.norm {
            BatchNormUse::Folded => None,
            _ => Some(self.bn?),
        };
        if bn.is_some_and(|i| i >= pass.bns.len() || pass.bns[i].gamma.len() != cout) {
            return None;
        }
        let tile = rows
            .div_ceil(rayon::current_num_threads().max(1))
            .clamp(1, MAX_TILE_ROWS);
        let mut out = pass.buffers.take(rows * cout);
        let res_rows = |r0: usize, n: usize| residual.map(|r| &r.data[r0 * cout..(r0 + n) * cout]);
        let partial_sums: Vec<Vec<f64>> = out
            .par_chunks_mut(tile * cout)
            .enumerate()
            .map(|(t, dst)| {
                let r0 = t * tile;
                let n_rows = dst.len() / cout;
                // Without a BatchNorm between them, the shortcut goes in
                // with the bias, before the product accumulates.
                let early = res_rows(r0, n_rows).filter(|_| bn.is_none());
                self.product_tile(x, (oh, ow), r0, early, dst);
                self.epilogue(dst, res_rows(r0, n_rows), relu, bn, pass)
            })
            .collect();
        if let (Some(i), BatchNormUse::Batch) = (bn, pass.norm) {
            let sums = partial_sums
                .iter()
                .fold(vec![0f64; 2 * cout], |mut acc, p| {
                    acc.iter_mut().zip(p).for_each(|(s, v)| *s += v);
                    acc
                });
            let stats = self.batch_norm_pass(&mut out, &sums, (tile, i), &res_rows, relu, pass);
            pass.batch_stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(stats);
        }
        Some(Map {
            n: x.n,
            h: oh,
            w: ow,
            c: cout,
            data: out,
        })
    }

    /// One output tile: the bias (plus the shortcut when it goes in before
    /// the product), then the product accumulated into it.
    fn product_tile(
        &self,
        x: &Map,
        (oh, ow): (usize, usize),
        r0: usize,
        early_residual: Option<&[f32]>,
        dst: &mut [f32],
    ) {
        let cout = self.cout;
        let n_rows = dst.len() / cout;
        let k = self.kh * self.kw * self.cin;
        match early_residual {
            Some(src) => {
                for (d, s) in dst.chunks_exact_mut(cout).zip(src.chunks_exact(cout)) {
                    for ((d, s), b) in d.iter_mut().zip(s).zip(&self.bias) {
                        *d = s + b;
                    }
                }
            }
            None => {
                for d in dst.chunks_exact_mut(cout) {
                    d.copy_from_slice(&self.bias);
                }
            }
        }
        if self.is_pointwise() {
            let lhs = &x.data[r0 * k..(r0 + n_rows) * k];
            gemm_accumulate(n_rows, cout, k, lhs, &self.weight, dst);
        } else {
            // One im2col buffer per worker thread, kept across tiles and
            // layers: a fresh allocation per tile costs more in page faults
            // than the copy itself.
            COLUMNS.with_borrow_mut(|col| {
                self.im2col(x, (oh, ow), r0, n_rows, col);
                gemm_accumulate(n_rows, cout, k, col, &self.weight, dst);
            });
        }
    }

    /// The tile's epilogue while it is in cache: running-statistics
    /// BatchNorm, shortcut and ReLU; or, for batch statistics, the tile's
    /// per-channel sums and sums of squares (returned), the rest waiting
    /// for the whole batch.
    fn epilogue(
        &self,
        dst: &mut [f32],
        residual: Option<&[f32]>,
        relu: bool,
        bn: Option<usize>,
        pass: &Pass,
    ) -> Vec<f64> {
        let cout = self.cout;
        match (bn, pass.norm) {
            (Some(i), BatchNormUse::Running) => {
                let (scale, shift) = &pass.affine[i];
                scale_shift(dst, residual, (scale, shift), relu);
                Vec::new()
            }
            (Some(_), _) => {
                let mut sums = vec![0f64; 2 * cout];
                for row in dst.chunks_exact(cout) {
                    for (c, &v) in row.iter().enumerate() {
                        sums[c] += v as f64;
                        sums[cout + c] += (v as f64) * (v as f64);
                    }
                }
                sums
            }
            (None, _) => {
                if relu {
                    clamp_negative(dst);
                }
                Vec::new()
            }
        }
    }

    /// Batch statistics from the summed tiles, then the scale, shift,
    /// shortcut and ReLU over the whole output.
    fn batch_norm_pass<'r>(
        &self,
        out: &mut [f32],
        sums: &[f64],
        (tile, layer): (usize, usize),
        res_rows: &(dyn Fn(usize, usize) -> Option<&'r [f32]> + Sync),
        relu: bool,
        pass: &Pass,
    ) -> BatchStats {
        let cout = self.cout;
        let rows = out.len() / cout;
        let count = rows as f64;
        let mean: Vec<f32> = sums[..cout].iter().map(|s| (s / count) as f32).collect();
        let var: Vec<f32> = sums[..cout]
            .iter()
            .zip(&sums[cout..])
            .map(|(s, q)| (q / count - (s / count).powi(2)).max(0.0) as f32)
            .collect();
        let (scale, shift) = pass.bns[layer].affine(&mean, &var);
        out.par_chunks_mut(tile * cout)
            .enumerate()
            .for_each(|(t, dst)| {
                let rows_here = dst.len() / cout;
                scale_shift(dst, res_rows(t * tile, rows_here), (&scale, &shift), relu);
            });
        BatchStats {
            layer,
            mean,
            var,
            count: rows,
        }
    }

    /// im2col rows `r0 .. r0 + n_rows` (output pixels) into `col`,
    /// `[n_rows, kh·kw·cin]`, zeros where the window leaves the image.
    fn im2col(
        &self,
        x: &Map,
        (oh, ow): (usize, usize),
        r0: usize,
        n_rows: usize,
        col: &mut Vec<f32>,
    ) {
        let cin = self.cin;
        let k = self.kh * self.kw * cin;
        if col.len() < n_rows * k {
            col.resize(n_rows * k, 0.0);
        }
        for (r, row) in col[..n_rows * k].chunks_exact_mut(k).enumerate() {
            let p = r0 + r;
            let b = p / (oh * ow);
            let oy = (p / ow) % oh;
            let ox = p % ow;
            // Window columns `ix0 + kx` for kx in 0..kw: the in-bounds ones
            // form one run, contiguous in both the NHWC input row and the
            // (ky, kx, cin) im2col row, so each window row is one copy.
            let ix0 = (ox * self.stride[1]) as isize - self.pad[1] as isize;
            let kx_lo = (-ix0).clamp(0, self.kw as isize) as usize;
            let kx_hi = (x.w as isize - ix0).clamp(kx_lo as isize, self.kw as isize) as usize;
            for ky in 0..self.kh {
                let dst = &mut row[ky * self.kw * cin..(ky + 1) * self.kw * cin];
                let iy = (oy * self.stride[0] + ky)
                    .checked_sub(self.pad[0])
                    .filter(|&iy| iy < x.h);
                match iy {
                    Some(iy) if kx_hi > kx_lo => {
                        let ix = (ix0 + kx_lo as isize) as usize;
                        let src = ((b * x.h + iy) * x.w + ix) * cin;
                        let len = (kx_hi - kx_lo) * cin;
                        dst[..kx_lo * cin].fill(0.0);
                        dst[kx_lo * cin..kx_hi * cin].copy_from_slice(&x.data[src..src + len]);
                        dst[kx_hi * cin..].fill(0.0);
                    }
                    _ => dst.fill(0.0),
                }
            }
        }
    }
}

pub(super) fn out_size(
    h: usize,
    w: usize,
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
) -> Option<(usize, usize)> {
    let ph = h + pad[0] + pad[2];
    let pw = w + pad[1] + pad[3];
    if ph < k[0] || pw < k[1] || stride.contains(&0) {
        return None;
    }
    Some(((ph - k[0]) / stride[0] + 1, (pw - k[1]) / stride[1] + 1))
}

/// `c += a · b` for row-major `a: [m, k]`, `b: [k, n]`, `c: [m, n]`.
#[allow(unsafe_code)]
fn gemm_accumulate(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: the assertion above keeps every element `gemm` touches inside
    // the three slices: row-major strides (`k`, `n`, `n`) with unit column
    // stride over `m` rows; `c` is borrowed mutably and does not alias `a`
    // or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
