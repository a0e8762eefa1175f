//! One convolution, tile by tile: im2col (none for a stride-1 1x1
//! convolution), one single-threaded product over the packed weights
//! (`panels.rs`) writing the output tile, and the epilogue (bias,
//! BatchNorm, shortcut, ReLU) while the tile is in cache.

use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::buffers::Map;
use super::norm::{BatchStats, Pass, bias_residual_relu, bias_scale_shift, scale_shift};
use super::panels::Panels;
use super::winograd::{Tiles, Variant, Winograd, transform_weights};
use super::{explicit, floats};
use crate::batchnorm::BatchNormUse;

/// Rows (output pixels) per tile. In a standalone measurement of `gemm` on
/// ResNet50's layer shapes at batch 8 (2 cores), 256-row tiles with a
/// single-threaded product each ran at 300–470 GFLOP/s, and one two-thread
/// product over the whole layer at 80–460 (worst on the wide 1x1 layers).
const MAX_TILE_ROWS: usize = 256;

/// Below this many rows per thread, a convolution splits its output
/// channels over the threads instead ([`Conv::split_columns`]).
const SPLIT_COLUMNS_BELOW_ROWS: usize = 64;

/// An F(4x4, 3x3) layer with more (input, output) channel pairs than this
/// also keeps its weights as F(2x2, 3x3) ([`Conv::winograd_few`]).
const F2_COPY_ABOVE_PAIRS: usize = 128 * 128;

/// One convolution with its bias, weights packed as a `[kh·kw·cin, cout]`
/// matrix (the im2col row order is `ky, kx, cin`) in panels for `gemm`'s
/// kernels (`panels.rs`).
pub(super) struct Conv {
    pub(super) cin: usize,
    pub(super) cout: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: [usize; 2],
    /// top, left, bottom, right
    pub(super) pad: [usize; 4],
    /// Empty when the convolution runs as Winograd ([`Conv::winograd`]).
    pub(super) weight: Panels,
    /// A stride-1 3x3 convolution's weights transformed for Winograd
    /// F(2x2, 3x3) or F(4x4, 3x3) (`winograd.rs`).
    pub(super) winograd: Option<Winograd>,
    /// The same weights as F(2x2, 3x3), beside an F(4x4) [`Conv::winograd`]
    /// of a wide layer, for batches whose tiles are too few to share by
    /// rows ([`Conv::winograd_for`]).
    pub(super) winograd_few: Option<Winograd>,
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
        if Self::winograd_shape(kh, kw, conv.stride) {
            let (wino, few) = Self::winograd_weights(&w, cin, cout);
            return Some(Self {
                cin,
                cout,
                kh,
                kw,
                stride: conv.stride,
                pad,
                weight: Panels::empty(),
                winograd: Some(wino),
                winograd_few: few,
                bias,
                bn,
            });
        }
        let mut rows = vec![0.0; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let src = ((co * cin + ci) * kh + ky) * kw + kx;
                        let dst = ((ky * kw + kx) * cin + ci) * cout + co;
                        rows[dst] = w[src];
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
            weight: Panels::new(&rows, kh * kw * cin, cout),
            winograd: None,
            winograd_few: None,
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
        let threads = rayon::current_num_threads().max(1);
        let tile = tile_rows(rows, threads);
        let mut out = pass.buffers.take(rows * cout);
        let res_rows = |r0: usize, n: usize| residual.map(|r| &r.data[r0 * cout..(r0 + n) * cout]);
        // The epilogue over a finished product, row tile by row tile.
        let epilogue_in_tiles = |out: &mut [f32]| -> Vec<Vec<f64>> {
            out.par_chunks_mut(tile * cout)
                .enumerate()
                .map(|(t, dst)| {
                    let n_rows = dst.len() / cout;
                    self.epilogue(dst, res_rows(t * tile, n_rows), relu, bn, pass)
                })
                .collect()
        };
        let partial_sums: Vec<Vec<f64>> =
            if let Some(wino) = self.winograd_for(x.n, oh, ow, threads) {
                let (u, tiles) = (&wino.u, Tiles::new(oh, ow, wino.variant));
                let count = x.n * tiles.th * tiles.tw;
                if self.split_columns(count, threads) {
                    // Too few tiles for every thread: the threads share the
                    // output channels, each over all the tiles.
                    let all = (0, x.n * tiles.th);
                    self.by_columns(threads, &mut out, |(lo, hi), block| {
                        self.winograd_product(u, x, tiles, all, (lo, hi), block, hi - lo);
                    });
                    epilogue_in_tiles(&mut out)
                } else {
                    // Units of whole tile rows: each one's output rows are one
                    // contiguous run of `out`.
                    let mut rest = &mut out[..];
                    let mut work = Vec::new();
                    for (g0, g1) in tiles.units(x.n, threads) {
                        let (r0, r1) = (tiles.row_start(g0), tiles.row_start(g1));
                        let (here, tail) = rest.split_at_mut((r1 - r0) * cout);
                        rest = tail;
                        work.push(((g0, g1), r0, here));
                    }
                    work.into_par_iter()
                        .map(|(unit, r0, dst)| {
                            self.winograd_product(u, x, tiles, unit, (0, cout), dst, cout);
                            let n_rows = dst.len() / cout;
                            self.epilogue(dst, res_rows(r0, n_rows), relu, bn, pass)
                        })
                        .collect()
                }
            } else if self.split_columns(rows, threads) {
                // Too few pixel rows to share (batch 1 in layer4: 49 rows):
                // the threads share the output channels instead, each over all
                // the rows, so that each reads only its part of the weights.
                self.product_by_columns(x, (oh, ow), threads, &mut out);
                epilogue_in_tiles(&mut out)
            } else {
                out.par_chunks_mut(tile * cout)
                    .enumerate()
                    .map(|(t, dst)| {
                        let r0 = t * tile;
                        let n_rows = dst.len() / cout;
                        self.product_tile(x, (oh, ow), r0, dst);
                        self.epilogue(dst, res_rows(r0, n_rows), relu, bn, pass)
                    })
                    .collect()
            };
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

    /// Burn's `[cout, cin, 3, 3]` weights `w` transformed for Winograd in
    /// the layer's variant ([`Variant::chosen`]), and the F(2x2) copy of
    /// an F(4x4) layer with more than [`F2_COPY_ABOVE_PAIRS`] channel pairs.
    fn winograd_weights(w: &[f32], cin: usize, cout: usize) -> (Winograd, Option<Winograd>) {
        let variant = Variant::chosen(cin, cout);
        let few = (variant == Variant::F4 && cin.saturating_mul(cout) > F2_COPY_ABOVE_PAIRS)
            .then(|| transform_weights(w, cin, cout, Variant::F2));
        (transform_weights(w, cin, cout, variant), few)
    }

    /// The Winograd weights [`Conv::run`] uses for `n` images giving `oh` x
    /// `ow` outputs: the F(2x2) copy where there is one and the F(4x4)
    /// tiles are too few to share by rows (`None` for a convolution that
    /// does not run as Winograd).
    pub(super) fn winograd_for(
        &self,
        n: usize,
        oh: usize,
        ow: usize,
        threads: usize,
    ) -> Option<&Winograd> {
        let wino = self.winograd.as_ref()?;
        let tiles = Tiles::new(oh, ow, wino.variant);
        match &self.winograd_few {
            Some(few) if self.split_columns(n * tiles.th * tiles.tw, threads) => Some(few),
            _ => Some(wino),
        }
    }

    /// Whether [`Conv::run`] splits the product over output channels
    /// rather than pixel rows: when a row split would leave each thread
    /// fewer than 64 rows, each thread would read the whole weight matrix
    /// for those few rows, where a column split has each read its block of
    /// the weights once for all the rows (the channels run along the
    /// micro-kernel's height, the rows along its 6-wide side, so short row
    /// counts waste little there: `panels.rs`); and when there are channels enough to give every
    /// thread a block of 16 or more.
    fn split_columns(&self, rows: usize, threads: usize) -> bool {
        threads > 1
            && rows.div_ceil(threads) < SPLIT_COLUMNS_BELOW_ROWS
            && self.cout >= 16 * threads
    }

    /// The whole product by column blocks: the im2col of every row once,
    /// then one product per thread over its block of output channels,
    /// copied into `out` (the bias comes in the epilogue).
    fn product_by_columns(
        &self,
        x: &Map,
        (oh, ow): (usize, usize),
        threads: usize,
        out: &mut [f32],
    ) {
        let cout = self.cout;
        let rows = out.len() / cout;
        let k = self.kh * self.kw * self.cin;
        if self.is_pointwise() {
            self.products_by_columns(&x.data[..rows * k], threads, out);
        } else {
            // The calling thread's im2col buffer; the products below do not
            // touch theirs.
            COLUMNS.with_borrow_mut(|col| {
                self.im2col(x, (oh, ow), 0, rows, col);
                self.products_by_columns(&col[..rows * k], threads, out);
            });
        }
    }

    /// `out = lhs · weight`, one block of output channels per thread.
    fn products_by_columns(&self, lhs: &[f32], threads: usize, out: &mut [f32]) {
        let rows = out.len() / self.cout;
        let k = self.kh * self.kw * self.cin;
        self.by_columns(threads, out, |(lo, hi), block| {
            (self.weight).product(rows, (lhs, k), (lo, hi), (block, hi - lo));
        });
    }

    /// `out` computed in blocks of output channels, one per thread:
    /// `product((lo, hi), block)` writes channels `lo .. hi` of every row
    /// into `block` (rows `hi - lo` apart), copied into `out` after.
    fn by_columns(
        &self,
        threads: usize,
        out: &mut [f32],
        product: impl Fn((usize, usize), &mut [f32]) + Sync,
    ) {
        let cout = self.cout;
        let rows = out.len() / cout;
        // Blocks of whole 16-channel groups, as even as they come.
        let groups = cout.div_ceil(16);
        let bounds: Vec<(usize, usize)> = (0..threads)
            .map(|t| {
                let lo = (groups * t / threads * 16).min(cout);
                let hi = (groups * (t + 1) / threads * 16).min(cout);
                (lo, hi)
            })
            .filter(|(lo, hi)| hi > lo)
            .collect();
        let blocks: Vec<Vec<f32>> = bounds
            .par_iter()
            .map(|&(lo, hi)| {
                let mut block = vec![0f32; rows * (hi - lo)];
                product((lo, hi), &mut block);
                block
            })
            .collect();
        for (&(lo, hi), block) in bounds.iter().zip(&blocks) {
            for (row, src) in out.chunks_exact_mut(cout).zip(block.chunks_exact(hi - lo)) {
                row[lo..hi].copy_from_slice(src);
            }
        }
    }

    /// One output tile's product, written over `dst` (which is not read:
    /// the bias and the shortcut come in the epilogue, in the same pass as
    /// the BatchNorm and the ReLU; writing them first and accumulating the
    /// product onto them cost one more pass over the tile, 3% of ResNet50's
    /// inference time in a `perf` profile).
    fn product_tile(&self, x: &Map, (oh, ow): (usize, usize), r0: usize, dst: &mut [f32]) {
        let cout = self.cout;
        let n_rows = dst.len() / cout;
        let k = self.kh * self.kw * self.cin;
        if self.is_pointwise() {
            let lhs = &x.data[r0 * k..(r0 + n_rows) * k];
            (self.weight).product(n_rows, (lhs, k), (0, cout), (dst, cout));
        } else {
            // One im2col buffer per worker thread, kept across tiles and
            // layers: a fresh allocation per tile costs more in page faults
            // than the copy itself.
            COLUMNS.with_borrow_mut(|col| {
                self.im2col(x, (oh, ow), r0, n_rows, col);
                (self.weight).product(n_rows, (col, k), (0, cout), (dst, cout));
            });
        }
    }

    /// The tile's epilogue while it is in cache: the bias, then
    /// running-statistics BatchNorm, shortcut and ReLU; or, for batch
    /// statistics, the bias and the tile's per-channel sums and sums of
    /// squares (returned), the rest waiting for the whole batch.
    fn epilogue(
        &self,
        dst: &mut [f32],
        residual: Option<&[f32]>,
        relu: bool,
        bn: Option<usize>,
        pass: &Pass,
    ) -> Vec<f64> {
        let cout = self.cout;
        // At the processor's vector width (`simd.rs`).
        crate::simd::widest(
            #[inline(always)]
            || match (bn, pass.norm) {
                (Some(i), BatchNormUse::Running) => {
                    let (scale, shift) = &pass.affine[i];
                    bias_scale_shift(dst, &self.bias, residual, (scale, shift), relu);
                    Vec::new()
                }
                (Some(_), _) => {
                    let mut sums = vec![0f64; 2 * cout];
                    for row in dst.chunks_exact_mut(cout) {
                        for (v, b) in row.iter_mut().zip(&self.bias) {
                            *v += b;
                        }
                        for (c, &v) in row.iter().enumerate() {
                            sums[c] += v as f64;
                            sums[cout + c] += (v as f64) * (v as f64);
                        }
                    }
                    sums
                }
                (None, _) => {
                    bias_residual_relu(dst, &self.bias, residual, relu);
                    Vec::new()
                }
            },
        )
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
                let res = res_rows(t * tile, rows_here);
                crate::simd::widest(
                    #[inline(always)]
                    || scale_shift(dst, res, (&scale, &shift), relu),
                );
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
                        copy(&mut dst[kx_lo * cin..kx_hi * cin], &x.data[src..src + len]);
                        dst[kx_hi * cin..].fill(0.0);
                    }
                    _ => dst.fill(0.0),
                }
            }
        }
    }
}

/// `dst.copy_from_slice(src)`, with runs shorter than 64 floats copied in
/// fixed-size blocks: a copy of run-time length is a call to `memcpy`, and
/// the stem's im2col rows are seven runs of 21 floats (7 pixels of 3
/// channels) a pixel, whose `memcpy` calls took 1.8% of the samples at
/// batch 32.
fn copy(dst: &mut [f32], src: &[f32]) {
    let n = src.len();
    if !(8..64).contains(&n) || dst.len() != n {
        dst.copy_from_slice(src);
        return;
    }
    // Blocks of 8 from the start, then the last 8 (overlapping the one
    // before): no run-time length is left.
    let block = |at: usize, dst: &mut [f32]| {
        if let (Some(d), Some(s)) = (
            dst[at..].first_chunk_mut::<8>(),
            src[at..].first_chunk::<8>(),
        ) {
            *d = *s;
        }
    };
    for at in (0..n - 8).step_by(8) {
        block(at, dst);
    }
    block(n - 8, dst);
}

/// Rows per tile for `rows` output pixels on `threads` threads: at most
/// [`MAX_TILE_ROWS`], in a number of tiles that is a multiple of the thread
/// count, so that every thread gets the same number of rows (within one
/// tile's rounding). Tiles of `MAX_TILE_ROWS` each and a short last one
/// left threads idle: 784 rows (ResNet50's `layer2` at batch 1) made
/// tiles of 256, 256, 256 and 16 rows, 512 rows for one thread and 272 for
/// the other; now four of 196.
pub(super) fn tile_rows(rows: usize, threads: usize) -> usize {
    let tiles = rows
        .div_ceil(MAX_TILE_ROWS)
        .next_multiple_of(threads.max(1))
        .max(1);
    rows.div_ceil(tiles).max(1)
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

/// `c = a · b` (`c` is written, not read) for row-major matrices with row
/// strides: `a: [m, k]` (rows
/// `a_rs` apart), `b: [k, n]` (rows `b_rs` apart: a block of columns of a
/// wider matrix), `c: [m, n]` (rows `c_rs` apart).
#[allow(unsafe_code)]
pub(super) fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    (a, a_rs): (&[f32], usize),
    (b, b_rs): (&[f32], usize),
    (c, c_rs): (&mut [f32], usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(a_rs >= k && b_rs >= n && c_rs >= n);
    assert!(a.len() >= (m - 1) * a_rs + k && b.len() >= (k - 1) * b_rs + n);
    assert!(c.len() >= (m - 1) * c_rs + n);
    // SAFETY: the assertions above keep every element `gemm` touches inside
    // the three slices: rows `a_rs`, `b_rs`, `c_rs` apart, each at least as
    // long as the columns read or written, unit column stride; `c` is
    // borrowed mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            false,
            a.as_ptr(),
            1,
            a_rs as isize,
            b.as_ptr(),
            1,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A deterministic pseudo-random fill in -1..1.
    pub(in crate::fused) fn fill(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A stride-1 3x3 convolution without bias or BatchNorm, with the
    /// Winograd weights given (none: the test passes its own).
    pub(in crate::fused) fn winograd_conv(
        cin: usize,
        cout: usize,
        pad: [usize; 4],
        winograd: Option<Winograd>,
        winograd_few: Option<Winograd>,
    ) -> Conv {
        Conv {
            cin,
            cout,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pad,
            weight: Panels::empty(),
            winograd,
            winograd_few,
            bias: vec![0.0; cout],
            bn: None,
        }
    }

    fn conv(cin: usize, cout: usize, k: usize, stride: usize) -> Conv {
        let pad = k / 2;
        Conv {
            cin,
            cout,
            kh: k,
            kw: k,
            stride: [stride, stride],
            pad: [pad; 4],
            weight: Panels::new(&fill(k * k * cin * cout, 7), k * k * cin, cout),
            winograd: None,
            winograd_few: None,
            bias: fill(cout, 11),
            bn: None,
        }
    }

    /// Row tiles come in a multiple of the thread count (or in so many that
    /// one tile more is 3% of a thread's share), none longer than
    /// `MAX_TILE_ROWS`, and the last one is not left short by more than one
    /// row per tile (ResNet50's row counts at batch 1, 8 and 32, and a few
    /// small ones).
    #[test]
    fn row_tiles_are_even_across_threads() {
        for threads in [1, 2, 3, 4] {
            for rows in [
                1, 5, 49, 196, 392, 784, 1568, 3136, 6272, 12544, 25088, 50176, 100352,
            ] {
                let tile = tile_rows(rows, threads);
                let tiles = rows.div_ceil(tile);
                let last = rows - (tiles - 1) * tile;
                assert!(tile <= MAX_TILE_ROWS, "{rows} rows: tiles of {tile}");
                if rows >= threads * threads {
                    assert!(
                        tiles % threads == 0 || tiles >= 32 * threads,
                        "{rows} rows, {threads} threads: {tiles} tiles"
                    );
                }
                assert!(
                    tile - last < tiles,
                    "{rows} rows: tiles of {tile}, the last {last}"
                );
            }
        }
        assert_eq!(tile_rows(784, 2), 196);
    }

    /// The column split (batch 1 in layer4) and the row tiles both give the
    /// product (summed here in f64), for 3x3 and 1x1 convolutions and
    /// channel counts that are not a multiple of the thread count's
    /// 16-channel blocks, overwriting what the buffer held.
    #[test]
    fn column_split_equals_row_tiles() {
        for (c, threads) in [
            (conv(8, 48, 3, 1), 2),
            (conv(8, 80, 1, 1), 3),
            (conv(6, 40, 3, 2), 2),
        ] {
            let x = Map {
                n: 1,
                h: 7,
                w: 7,
                c: c.cin,
                data: fill(49 * c.cin, 3),
            };
            let (oh, ow) = c.out_size(7, 7).unwrap_or_default();
            let rows = oh * ow;
            // Whatever the buffers held before is overwritten, not added to.
            let mut by_rows = vec![f32::NAN; rows * c.cout];
            c.product_tile(&x, (oh, ow), 0, &mut by_rows);
            let mut by_columns = vec![f32::NAN; rows * c.cout];
            c.product_by_columns(&x, (oh, ow), threads, &mut by_columns);
            // The product itself, summed here in f64 from the im2col rows.
            let mut col = Vec::new();
            if c.is_pointwise() {
                col.extend_from_slice(&x.data);
            } else {
                c.im2col(&x, (oh, ow), 0, rows, &mut col);
            }
            let k = c.kh * c.kw * c.cin;
            let exact: Vec<f32> = (0..rows * c.cout)
                .map(|i| {
                    let (r, o) = (i / c.cout, i % c.cout);
                    (0..k)
                        .map(|j| col[r * k + j] as f64 * c.weight.get(j, o) as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            for (name, got) in [("row tiles", &by_rows), ("column split", &by_columns)] {
                let worst = exact
                    .iter()
                    .zip(got.iter())
                    .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                    .fold(
                        0f32,
                        |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                    );
                assert!(worst < 1e-5, "{name} differ from the product by {worst}");
            }
            assert!(c.split_columns(rows, threads), "a shape the split serves");
        }
    }

    /// A wide F(4x4) layer keeps an F(2x2) copy of the same weights and
    /// runs it where its F(4x4) tiles would be split over output channels
    /// (batch 1 at 14x14), F(4x4) where they are shared by rows (batch 8)
    /// or on one thread; a narrower layer keeps no copy.
    #[test]
    fn the_f2_copy_serves_batches_too_small_for_f4() {
        if Variant::chosen(160, 160) != Variant::F4 {
            return; // `AVP_WINOGRAD=f2`: every layer is F(2x2) already.
        }
        let (cin, cout) = (160, 160);
        let raw = fill(cout * cin * 9, 13);
        let (wino, few) = Conv::winograd_weights(&raw, cin, cout);
        assert!(
            Conv::winograd_weights(&raw[..128 * 128 * 9], 128, 128)
                .1
                .is_none()
        );
        let c = winograd_conv(cin, cout, [1; 4], Some(wino), few);
        let variant = |n, threads| c.winograd_for(n, 14, 14, threads).map(|w| w.variant);
        assert_eq!(variant(1, 2), Some(Variant::F2));
        assert_eq!(variant(8, 2), Some(Variant::F4));
        assert_eq!(variant(1, 1), Some(Variant::F4));
        // The copy computes what the F(4x4) weights compute.
        let x = Map {
            n: 1,
            h: 14,
            w: 14,
            c: cin,
            data: fill(196 * cin, 17),
        };
        let product = |wino: &Winograd| {
            let tiles = Tiles::new(14, 14, wino.variant);
            let mut out = vec![f32::NAN; 196 * cout];
            c.winograd_product(&wino.u, &x, tiles, (0, tiles.th), (0, cout), &mut out, cout);
            out
        };
        let (f4, f2) = (
            product(c.winograd.as_ref().unwrap()),
            product(c.winograd_few.as_ref().unwrap()),
        );
        let scale = f4.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = f4
            .iter()
            .zip(&f2)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            scale > 0.0 && worst < 1e-4 * scale,
            "F(2x2) copy differs by {worst} of {scale}"
        );
    }
}
