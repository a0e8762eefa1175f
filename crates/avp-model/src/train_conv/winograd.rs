//! Winograd F(m x m, 3x3) for the trained stages' stride-1 3x3
//! convolutions: the forward, the weight gradient and the input gradient
//! each as α² matrix products (α = m + 2) instead of one product with 9
//! multiply-adds per output pixel and channel pair.
//!
//! With `V = Bᵀ d B` (an α x α input patch transformed), `U = G g Gᵀ` (the
//! 3x3 weights transformed) and `Y = Aᵀ (U ⊙ V) A` (an m x m output
//! tile), the element-wise products over all channels become, for each
//! position ξ of the patch, `M[ξ] [T, O] = V[ξ] [T, C] · U[ξ] [C, O]`
//! (`T` tiles of the whole batch). The backward follows from the same
//! identity by transposition, exactly (no approximation beyond float
//! rounding): with `dM = A dY Aᵀ` (the output gradient of each tile
//! mapped back through `Aᵀ · A`),
//!
//! - weight gradient: `dU[ξ] [C, O] = V[ξ]ᵀ · dM[ξ]`, then
//!   `dg = Gᵀ dU G` for every channel pair;
//! - input gradient: `dV[ξ] [T, C] = dM[ξ] · U[ξ]ᵀ`, then `dd = B dV Bᵀ`
//!   added into the input gradient at each patch (patches overlap by two
//!   pixels; padding positions are dropped).
//!
//! F(2x2) does 16 products per 2x2 tile (16/36 of the direct
//! convolution's multiplications); F(4x4) 36 per 4x4 tile (1/4), with the
//! fused inference path's matrices and transforms
//! (`crate::winograd_lanes`, points 0, 1, -1, ½, -2). Every transform runs
//! in f32: the fused path applies `G` in f64, once at load, but here the
//! weights change at every step, and f64 made a layer's forward and
//! backward a quarter slower with no gain the tests below could see.
//! Channels are the vector lanes (16 at a time) in every transform but the
//! forward's output transform, whose lanes are tiles (it reads `M` with
//! the tiles contiguous and writes NCHW); the maps move to NHWC for the
//! other transforms and back. A 7x7 map (`layer4` at 224x224) takes 2x2
//! tiles of F(4x4): 144 products per channel pair and image against
//! the direct convolution's 441.

use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::{Geometry, Strides, interleaved_products, rows};
use crate::winograd_lanes::{F2, F4, LANES, Lanes, Matrices, Weights, two_sided};

/// Which algorithm a trained stride-1 3x3 convolution runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Variant {
    /// F(2x2, 3x3): 4x4 patches, 16 products.
    F2,
    /// F(4x4, 3x3): 6x6 patches, 36 products.
    F4,
}

/// The tiles of one convolution: `th x tw` per image, `m x m` output
/// pixels each, read from `α x α` input patches.
#[derive(Clone, Copy)]
struct Tiles {
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(g: &Geometry, m: usize) -> Self {
        Self {
            th: g.oh.div_ceil(m),
            tw: g.ow.div_ceil(m),
        }
    }

    fn per_image(&self) -> usize {
        self.th * self.tw
    }
}

thread_local! {
    /// Scratch buffers kept between calls: the transformed operands are
    /// tens of MB, and fresh allocations that size come from `mmap` and
    /// fault in every page again (a `perf` profile showed it).
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers the pool keeps at most (per thread): the working buffers of one
/// call, and the transformed operands each trained convolution keeps from
/// its forward for its backward ([`Kept`]).
const POOL_MAX: usize = 16;

/// Frees the buffers the calling thread's [`POOL`] keeps.
pub(super) fn release_pool() {
    let _ = POOL.try_with(|p| p.borrow_mut().clear());
}

/// The bytes the calling thread's [`POOL`] keeps.
#[cfg(test)]
pub(super) fn pooled_bytes() -> usize {
    POOL.try_with(|p| {
        p.borrow()
            .iter()
            .map(|v| v.capacity() * std::mem::size_of::<f32>())
            .sum()
    })
    .unwrap_or(0)
}

/// A scratch buffer of `len` floats from [`POOL`], given back when
/// dropped, starting on a 64-byte boundary. Its contents are whatever the
/// last user left: every user writes all of it before reading.
struct Buf {
    v: Vec<f32>,
    start: usize,
    len: usize,
}

fn scratch(len: usize) -> Buf {
    let mut v = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            // The smallest buffer that holds `len`, else the largest.
            let fit = (0..p.len())
                .filter(|&i| p[i].len() >= len + 16)
                .min_by_key(|&i| p[i].len())
                .or_else(|| (0..p.len()).max_by_key(|&i| p[i].len()));
            fit.map(|i| p.swap_remove(i)).unwrap_or_default()
        })
        .unwrap_or_default();
    // Room to start on a 64-byte boundary (a cache line: see
    // `store_streaming`).
    if v.len() < len + 16 {
        v.resize(len + 16, 0.0);
    }
    let start = (v.as_ptr() as usize).next_multiple_of(64) - v.as_ptr() as usize;
    Buf {
        v,
        start: start / std::mem::size_of::<f32>(),
        len,
    }
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.start..][..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.start..][..self.len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(v);
            }
        });
    }
}

/// What a tracked forward keeps for its backward: the transformed input
/// `V` and weights `U`, which the backward would otherwise compute again
/// from the same input and weights (a `layer4` convolution's `U` is
/// 38 MB at F(4x4), its `V` 9 MB at batch 32).
pub(super) struct Kept {
    variant: Variant,
    v: Buf,
    u: Buf,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("variant", &self.variant)
            .field("v", &self.v.len)
            .field("u", &self.u.len)
            .finish()
    }
}

/// NCHW `[n, c, hw]` to NHWC `[n, hw, c]`.
fn to_nhwc(x: &[f32], n: usize, c: usize, hw: usize) -> Buf {
    let mut out = scratch(n * c * hw);
    out.par_chunks_mut(hw * c).enumerate().for_each(|(b, img)| {
        let src = &x[b * c * hw..][..c * hw];
        for (p, px) in img.chunks_mut(c).enumerate() {
            for (ci, v) in px.iter_mut().enumerate() {
                *v = src[ci * hw + p];
            }
        }
    });
    out
}

/// NHWC `[n, hw, c]` to NCHW `[n, c, hw]`.
#[allow(unsafe_code)]
fn to_nchw(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    let write = |out: &mut [MaybeUninit<f32>]| {
        if hw == 0 {
            return;
        }
        out.par_chunks_mut(c * hw).enumerate().for_each(|(b, img)| {
            let src = &x[b * hw * c..][..hw * c];
            for (ci, plane) in img.chunks_mut(hw).enumerate() {
                for (p, v) in plane.iter_mut().enumerate() {
                    v.write(src[p * c + ci]);
                }
            }
        });
    };
    // SAFETY: the images' planes tile `out`, each element written.
    unsafe { super::written(n * c * hw, write) }
}

/// `f(i, chunk)` for the `i`-th `len`-long piece of `dst`, over rayon's
/// threads. (Compiled for the baseline x86-64, the transforms run as SSE;
/// running them inside a function compiled for AVX2 and FMA changed
/// nothing measurable in a fine-tuning epoch, 26-27 s either way, before
/// they were written out term by term; written out, and run at AVX-512
/// width through [`crate::simd::widest`] as the fused path's are, two
/// cached `layer4` epochs on a 2-core AVX-512 Xeon took 25.3 and 25.2 s
/// against 25.5 and 24.9 s: these passes are bound by memory, not
/// arithmetic. The weight transform and its adjoint were not: at batch 32
/// on a 512-channel `layer4` convolution they took 7.8 and 3.5 ms of the
/// 55 ms forward and backward, where writing their 38 MB takes 1 ms. Run
/// inside `widest` with `G` as trait methods they took the same; with
/// `two_sided` written as loops instead of `std::array::from_fn`, whose
/// closures did not inline, 5.1 and 2.3 ms. The weight transform then
/// spent its time on the stores of `U`, each line read in before being
/// written: with the taps transposed first and `U` written by
/// non-temporal stores into a 64-byte-aligned buffer, 2.8 ms.)
fn par_chunks<T: Send, F: Fn(usize, &mut [T]) + Sync>(dst: &mut [T], len: usize, f: F) {
    dst.par_chunks_mut(len)
        .enumerate()
        .for_each(|(i, out)| f(i, out));
}

/// The lanes `lo .. lo + LANES` of a row (zero past its end). A whole
/// lane group is one fixed-size copy: a copy of run-time length is a call
/// to `memcpy`, which cost the weight transform a third of its time.
#[inline(always)]
fn load(row: &[f32], lo: usize) -> Lanes {
    if let Some(Ok(v)) = row.get(lo..lo + LANES).map(<&Lanes>::try_from) {
        return *v;
    }
    let mut v = [0f32; LANES];
    let k = row.len().saturating_sub(lo).min(LANES);
    v[..k].copy_from_slice(&row[lo..lo + k]);
    v
}

#[inline(always)]
fn store(row: &mut [f32], lo: usize, v: &Lanes) {
    if let Some(Ok(d)) = row.get_mut(lo..lo + LANES).map(<&mut Lanes>::try_from) {
        *d = *v;
        return;
    }
    let k = row.len().saturating_sub(lo).min(LANES);
    row[lo..lo + k].copy_from_slice(&v[..k]);
}

/// [`store`] with non-temporal stores where the lanes are one whole cache
/// line (64-byte aligned, on x86-64): written past the caches, without
/// reading each line in first. For the weight transform's 38 MB `U` at `layer4`, which nothing
/// reads before it is all written and which outgrows the caches anyway.
/// The writer calls [`streamed`] when done.
#[inline(always)]
fn store_streaming(row: &mut [f32], lo: usize, v: &Lanes) {
    #[cfg(target_arch = "x86_64")]
    if let Some(d) = row.get_mut(lo..lo + LANES) {
        let p = d.as_mut_ptr();
        if (p as usize).is_multiple_of(64) {
            #[allow(unsafe_code)]
            // SAFETY: `d` is `LANES` floats from `p` (a multiple of four),
            // each 4-float store stays inside it, and `p` is 64-byte (so
            // 16-byte) aligned as `_mm_stream_ps` needs; `v` holds `LANES`
            // floats.
            unsafe {
                use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
                for i in (0..LANES).step_by(4) {
                    _mm_stream_ps(p.add(i), _mm_loadu_ps(v.as_ptr().add(i)));
                }
            }
            return;
        }
    }
    store(row, lo, v);
}

/// Orders a thread's non-temporal stores before what it does next (the end
/// of its task, after which other threads read them).
#[inline(always)]
fn streamed() {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a store fence has no operands and no other effect.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

/// Adds `v` into the lanes `lo .. lo + LANES` of a row (those inside it).
#[inline(always)]
fn add_into(row: &mut [f32], lo: usize, v: &Lanes) {
    if let Some(Ok(d)) = row.get_mut(lo..lo + LANES).map(<&mut Lanes>::try_from) {
        for (d, s) in d.iter_mut().zip(v) {
            *d += s;
        }
        return;
    }
    let k = row.len().saturating_sub(lo).min(LANES);
    for (d, s) in row[lo..lo + k].iter_mut().zip(v) {
        *d += s;
    }
}

/// The algorithm of one convolution, for one variant.
struct Plan<'g, const A: usize, const M: usize, W: Matrices<A, M> + Weights<A>> {
    g: &'g Geometry,
    tiles: Tiles,
    _w: std::marker::PhantomData<fn() -> W>,
}

impl<'g, const A: usize, const M: usize, W: Matrices<A, M> + Weights<A>> Plan<'g, A, M, W> {
    fn new(g: &'g Geometry) -> Self {
        Self {
            g,
            tiles: Tiles::new(g, M),
            _w: std::marker::PhantomData,
        }
    }

    fn t(&self) -> usize {
        self.g.n * self.tiles.per_image()
    }

    /// Image, tile row and tile column of tile `t`.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let per = self.tiles.per_image();
        let (b, r) = (t / per, t % per);
        (b, r / self.tiles.tw, r % self.tiles.tw)
    }

    /// The input pixel (row or column) of patch offset `k` in tile `t0`,
    /// if inside the image.
    fn input_at(t0: usize, k: usize, pad: usize, len: usize) -> Option<usize> {
        (t0 * M + k).checked_sub(pad).filter(|&i| i < len)
    }

    /// `V [T, α², C]` of NHWC `x`: each tile's patch transformed.
    fn input_transform(&self, x: &[f32]) -> Buf {
        let g = self.g;
        let c = g.c;
        let mut v = scratch(self.t() * A * A * c);
        par_chunks(&mut v, A * A * c, |t, out| {
            let (b, ty, tx) = self.tile(t);
            let img = &x[b * g.h * g.w * c..][..g.h * g.w * c];
            for lo in (0..c).step_by(LANES) {
                let mut d = [[[0f32; LANES]; A]; A];
                for (i, drow) in d.iter_mut().enumerate() {
                    let Some(iy) = Self::input_at(ty, i, g.pad[0], g.h) else {
                        continue;
                    };
                    for (j, dv) in drow.iter_mut().enumerate() {
                        if let Some(ix) = Self::input_at(tx, j, g.pad[1], g.w) {
                            *dv = load(&img[(iy * g.w + ix) * c..][..c], lo);
                        }
                    }
                }
                let tv = two_sided(W::BT_X, &d, W::BT_X);
                for (xi, lanes) in tv.iter().flatten().enumerate() {
                    store(&mut out[xi * c..][..c], lo, lanes);
                }
            }
        });
        v
    }

    /// `U [O, α², C]` of Burn's `[O, C, 3, 3]` weights, the
    /// input channels as the lanes.
    fn weight_transform(&self, w: &[f32]) -> Buf {
        let (c, o) = (self.g.c, self.g.o);
        let mut u = scratch(o * A * A * c);
        u.par_chunks_mut(A * A * c).enumerate().for_each_init(
            || vec![0f32; 9 * c],
            |taps, (oi, out)| {
                crate::simd::widest(
                    #[inline(always)]
                    || {
                        // This output channel's `[C][3][3]` as `[3·3][C]`
                        // first, so that a tap's lane group is one load
                        // below (gathered into the lanes one float at a
                        // time, each group was read back right after
                        // sixteen stores to it, a store-forwarding stall).
                        for (ci, k) in w[oi * c * 9..][..c * 9].chunks_exact(9).enumerate() {
                            for (tap, &v) in k.iter().enumerate() {
                                taps[tap * c + ci] = v;
                            }
                        }
                        for lo in (0..c).step_by(LANES) {
                            let mut k = [[[0f32; LANES]; 3]; 3];
                            for (tap, lanes) in k.iter_mut().flatten().enumerate() {
                                *lanes = load(&taps[tap * c..][..c], lo);
                            }
                            let tu = two_sided(W::g, &k, W::g);
                            for (xi, lanes) in tu.iter().flatten().enumerate() {
                                store_streaming(&mut out[xi * c..][..c], lo, lanes);
                            }
                        }
                    },
                );
                streamed();
            },
        );
        u
    }

    /// `Y = Aᵀ M A` of each tile of `M [α², O, T]`, as NCHW `[N, O, OH·OW]`.
    /// The tiles are the lanes (16 consecutive tiles: for a 7x7 map, four
    /// images), each lane's pixels stored into its own image.
    #[allow(unsafe_code)]
    fn output_transform(&self, m: &[f32]) -> Vec<f32> {
        let g = self.g;
        let (o, t_all, p) = (g.o, self.t(), g.p());
        let per = self.tiles.per_image();
        // Images a task: enough for a whole lane group of tiles when an
        // image has fewer (and a task writes a block of whole images).
        let images = (LANES / per.max(1)).max(1);
        let write = |y: &mut [MaybeUninit<f32>]| {
            if o * p == 0 {
                return;
            }
            par_chunks(y, images * o * p, |chunk, out| {
                crate::simd::widest(
                    #[inline(always)]
                    || {
                        let b0 = chunk * images;
                        let (t_lo, t_hi) = (b0 * per, ((b0 + images) * per).min(t_all));
                        for oi in 0..o {
                            for t0 in (t_lo..t_hi).step_by(LANES) {
                                let mut mm = [[[0f32; LANES]; A]; A];
                                for (xi, lanes) in mm.iter_mut().flatten().enumerate() {
                                    let row = &m[(xi * o + oi) * t_all..][t_lo..t_hi];
                                    *lanes = load(row, t0 - t_lo);
                                }
                                let ty_ = two_sided(W::AT_X, &mm, W::AT_X);
                                for l in 0..(t_hi - t0).min(LANES) {
                                    let (b, ty, tx) = self.tile(t0 + l);
                                    let plane = &mut out[((b - b0) * o + oi) * p..][..p];
                                    for (i, yrow) in ty_.iter().enumerate() {
                                        let oy = ty * M + i;
                                        if oy >= g.oh {
                                            break;
                                        }
                                        for (j, lanes) in yrow.iter().enumerate() {
                                            let ox = tx * M + j;
                                            if ox >= g.ow {
                                                break;
                                            }
                                            plane[oy * g.ow + ox].write(lanes[l]);
                                        }
                                    }
                                }
                            }
                        }
                    },
                )
            });
        };
        // SAFETY: each task's chunk is whole images, and each pixel of an
        // image is in one of its tiles (`th·M ≥ OH`, `tw·M ≥ OW`), whose
        // lane writes it for every output channel.
        unsafe { super::written(g.n * o * p, write) }
    }

    /// `dM = A dY Aᵀ` of each tile from the NHWC output gradient, as
    /// `[T, α², O]`.
    fn output_adjoint(&self, gy: &[f32]) -> Buf {
        let g = self.g;
        let o = g.o;
        let mut dm = scratch(self.t() * A * A * o);
        par_chunks(&mut dm, A * A * o, |t, out| {
            let (b, ty, tx) = self.tile(t);
            let img = &gy[b * g.p() * o..][..g.p() * o];
            for lo in (0..o).step_by(LANES) {
                let mut dy = [[[0f32; LANES]; M]; M];
                for (i, row) in dy.iter_mut().enumerate() {
                    let oy = ty * M + i;
                    if oy >= g.oh {
                        break;
                    }
                    for (j, lanes) in row.iter_mut().enumerate() {
                        let ox = tx * M + j;
                        if ox >= g.ow {
                            break;
                        }
                        *lanes = load(&img[(oy * g.ow + ox) * o..][..o], lo);
                    }
                }
                let d = two_sided(W::A_X, &dy, W::A_X);
                for (xi, lanes) in d.iter().flatten().enumerate() {
                    store(&mut out[xi * o..][..o], lo, lanes);
                }
            }
        });
        dm
    }

    /// `dg = Gᵀ dU G` for every channel pair of `dU [O, α², C]`, as
    /// Burn's `[O, C, 3, 3]`.
    #[allow(unsafe_code)]
    fn weight_adjoint(&self, du: &[f32]) -> Vec<f32> {
        let (c, o) = (self.g.c, self.g.o);
        let write = |gw: &mut [MaybeUninit<f32>]| {
            if c == 0 {
                return;
            }
            par_chunks(gw, c * 9, |oi, out| {
                crate::simd::widest(
                    #[inline(always)]
                    || {
                        let src = &du[oi * A * A * c..][..A * A * c];
                        for lo in (0..c).step_by(LANES) {
                            let mut u = [[[0f32; LANES]; A]; A];
                            for (xi, lanes) in u.iter_mut().flatten().enumerate() {
                                *lanes = load(&src[xi * c..][..c], lo);
                            }
                            let k = two_sided(W::gt, &u, W::gt);
                            // Burn's `[C][3][3]`: a lane's nine taps together.
                            let n = (c - lo).min(LANES);
                            for (l, taps) in out[lo * 9..][..n * 9].chunks_exact_mut(9).enumerate()
                            {
                                for (tap, d) in taps.iter_mut().enumerate() {
                                    d.write(k[tap / 3][tap % 3][l]);
                                }
                            }
                        }
                    },
                )
            });
        };
        // SAFETY: the output channels' chunks tile `gw`, and each chunk's
        // lane groups cover its `C` input channels, nine taps each.
        unsafe { super::written(o * c * 9, write) }
    }

    /// `dd = B dV Bᵀ` of each tile added into the NHWC input gradient.
    fn input_adjoint(&self, dv: &[f32]) -> Buf {
        let g = self.g;
        let (c, per) = (g.c, self.tiles.per_image());
        // Patches overlap: the sums start from zero.
        let mut gx = scratch(g.n * g.h * g.w * c);
        gx.par_chunks_mut(1 << 16).for_each(|z| z.fill(0.0));
        par_chunks(&mut gx, g.h * g.w * c, |b, img| {
            for r in 0..per {
                let t = b * per + r;
                let (_, ty, tx) = self.tile(t);
                let src = &dv[t * A * A * c..][..A * A * c];
                for lo in (0..c).step_by(LANES) {
                    let mut v = [[[0f32; LANES]; A]; A];
                    for (xi, lanes) in v.iter_mut().flatten().enumerate() {
                        *lanes = load(&src[xi * c..][..c], lo);
                    }
                    let dd = two_sided(W::B_X, &v, W::B_X);
                    for (i, row) in dd.iter().enumerate() {
                        let Some(iy) = Self::input_at(ty, i, g.pad[0], g.h) else {
                            continue;
                        };
                        for (j, lanes) in row.iter().enumerate() {
                            let Some(ix) = Self::input_at(tx, j, g.pad[1], g.w) else {
                                continue;
                            };
                            add_into(&mut img[(iy * g.w + ix) * c..][..c], lo, lanes);
                        }
                    }
                }
            }
        });
        gx
    }

    /// α² products `dst[ξ] = lhs[ξ] · rhs[ξ]`, each operand interleaved
    /// with the others (`dst`: row stride, then the offset from one ξ to
    /// the next; operands: strides, then that offset), a product a thread
    /// at a time ([`interleaved_products`]).
    fn products(
        (m, n, k): (usize, usize, usize),
        dst: (&mut [f32], usize, usize),
        lhs: (&[f32], Strides, usize),
        rhs: (&[f32], Strides, usize),
    ) {
        interleaved_products(A * A, (m, n, k), dst, lhs, rhs);
    }

    /// The NCHW output, and `V` and `U` when `keep`.
    fn forward(&self, x: &[f32], w: &[f32], keep: bool) -> (Vec<f32>, Option<(Buf, Buf)>) {
        let u = self.weight_transform(w);
        let (y, v) = self.forward_with(x, &u);
        (y, keep.then_some((v, u)))
    }

    /// The NCHW output from the transformed weights `U`, and `V`.
    fn forward_with(&self, x: &[f32], u: &[f32]) -> (Vec<f32>, Buf) {
        let g = self.g;
        let (t, c, o) = (self.t(), g.c, g.o);
        let v = self.input_transform(&to_nhwc(x, g.n, c, g.h * g.w));
        let mut m = scratch(t * A * A * o);
        // M[ξ]ᵀ [O, T] = U[ξ]ᵀ [O, C] · V[ξ]ᵀ [C, T], each ξ a block of
        // `M [α², O, T]`. (`gemm` computes it as `M[ξ] = V[ξ] · U[ξ]` with
        // the tiles as its vector dimension: it gathers `V[ξ]`'s 128x512
        // at `layer4`, and reads `U[ξ]` in place. Written `[T, α², O]`,
        // the product had the output channels as that dimension, and
        // `gemm` gathered `U[ξ]`, four times larger: 12.5–14.7 ms against
        // 8.8–11.0 ms for the product in a timing probe.)
        Self::products(
            (o, t, c),
            (&mut m, t, o * t),
            (u, rows(A * A * c), c),
            (
                &v,
                Strides {
                    rs: 1,
                    cs: A * A * c,
                },
                c,
            ),
        );
        (self.output_transform(&m), v)
    }

    /// The weight gradient and, when asked, the input gradient; `V` and
    /// `U` from `kept` when the forward kept them (and their sizes fit
    /// this geometry), else computed again.
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        gy: &[f32],
        input_grad: bool,
        kept: Option<(Buf, Buf)>,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let g = self.g;
        let (t, c, o) = (self.t(), g.c, g.o);
        let dm = self.output_adjoint(&to_nhwc(gy, g.n, o, g.p()));
        let (kept_v, kept_u) = match kept {
            Some((v, u)) if v.len == t * A * A * c && u.len == o * A * A * c => (Some(v), Some(u)),
            _ => (None, None),
        };
        let v = kept_v.unwrap_or_else(|| self.input_transform(&to_nhwc(x, g.n, c, g.h * g.w)));
        let mut du = scratch(o * A * A * c);
        // dU[ξ] [O, C] = dM[ξ]ᵀ [O, T] · V[ξ] [T, C]
        Self::products(
            (o, c, t),
            (&mut du, A * A * c, c),
            (
                &dm,
                Strides {
                    rs: 1,
                    cs: A * A * o,
                },
                o,
            ),
            (&v, rows(A * A * c), c),
        );
        let gw = self.weight_adjoint(&du);
        let gx = input_grad.then(|| {
            let u = kept_u.unwrap_or_else(|| self.weight_transform(w));
            let mut dv = scratch(t * A * A * c);
            // dV[ξ] [T, C] = dM[ξ] [T, O] · U[ξ]ᵀ [O, C]
            Self::products(
                (t, c, o),
                (&mut dv, A * A * c, c),
                (&dm, rows(A * A * o), o),
                (&u, rows(A * A * c), c),
            );
            to_nchw(&self.input_adjoint(&dv), g.n, c, g.h * g.w)
        });
        (gw, gx)
    }
}

/// Whether a convolution of this geometry runs as Winograd, and which:
/// stride-1 3x3 convolutions whose output map holds at least one whole
/// F(4x4) tile. Smaller maps gain little, and there a corner tap of the
/// kernel reads one pixel an image, often zero after a ReLU in every image
/// of the batch: the direct product then gives that weight an exact zero
/// gradient (as PyTorch does), Winograd a rounding residue from the
/// patch's other pixels, which Adam's first step, `g/(|g|+ε)`, turns into
/// a full step (`avp-train`'s fine-tuning parity test at 64x64 input,
/// `layer4` at 2x2, saw 4% of a layer's steps differ from PyTorch's).
pub(super) fn variant(g: &Geometry) -> Option<Variant> {
    let m = 4;
    if g.kh != 3 || g.kw != 3 || g.stride != [1, 1] || g.oh < m || g.ow < m {
        return None;
    }
    Some(Variant::F4)
}

/// The forward of a stride-1 3x3 convolution, NCHW, and with `keep` the
/// transformed operands for [`backward`].
pub(super) fn forward(
    x: &[f32],
    w: &[f32],
    g: &Geometry,
    variant: Variant,
    keep: bool,
) -> (Vec<f32>, Option<Kept>) {
    let (y, kept) = match variant {
        Variant::F2 => Plan::<4, 2, F2>::new(g).forward(x, w, keep),
        Variant::F4 => Plan::<6, 4, F4>::new(g).forward(x, w, keep),
    };
    (y, kept.map(|(v, u)| Kept { variant, v, u }))
}

/// The transformed weights `U` of a variant, for [`forward_with`].
pub(super) struct Transformed {
    variant: Variant,
    u: Buf,
}

impl Transformed {
    /// The variant it was transformed for.
    pub(super) fn variant(&self) -> Variant {
        self.variant
    }

    /// Its size in bytes.
    pub(super) fn bytes(&self) -> usize {
        self.u.len * std::mem::size_of::<f32>()
    }
}

/// `U` of the weights `w` (Burn's `[O, C, 3, 3]`) for this geometry.
pub(super) fn transformed(w: &[f32], g: &Geometry, variant: Variant) -> Transformed {
    let u = match variant {
        Variant::F2 => Plan::<4, 2, F2>::new(g).weight_transform(w),
        Variant::F4 => Plan::<6, 4, F4>::new(g).weight_transform(w),
    };
    Transformed { variant, u }
}

/// The NCHW output of the forward from weights transformed earlier, or
/// `None` when they are not this geometry's.
pub(super) fn forward_with(x: &[f32], u: &Transformed, g: &Geometry) -> Option<Vec<f32>> {
    let (a2, len) = match u.variant {
        Variant::F2 => (16, u.u.len),
        Variant::F4 => (36, u.u.len),
    };
    if len != a2 * g.o * g.c {
        return None;
    }
    Some(match u.variant {
        Variant::F2 => Plan::<4, 2, F2>::new(g).forward_with(x, &u.u).0,
        Variant::F4 => Plan::<6, 4, F4>::new(g).forward_with(x, &u.u).0,
    })
}

/// The weight gradient (Burn's `[O, C, 3, 3]`) and, with `input_grad`,
/// the NCHW input gradient of a stride-1 3x3 convolution, from the NCHW
/// output gradient `gy`; with the forward's [`Kept`] operands when it
/// kept them for the same variant.
pub(super) fn backward(
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    g: &Geometry,
    variant: Variant,
    input_grad: bool,
    kept: Option<Kept>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let kept = kept.filter(|k| k.variant == variant).map(|k| (k.v, k.u));
    match variant {
        Variant::F2 => Plan::<4, 2, F2>::new(g).backward(x, w, gy, input_grad, kept),
        Variant::F4 => Plan::<6, 4, F4>::new(g).backward(x, w, gy, input_grad, kept),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::super::{forward_f32, input_grad_f32, swap_batch, weight_grad_f32};
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn worst(ours: &[f32], direct: &[f32]) -> f32 {
        assert_eq!(ours.len(), direct.len());
        let scale = direct.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        ours.iter()
            .zip(direct)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }

    /// Winograd takes the stride-1 3x3 convolutions with at least a 4x4
    /// output map, and nothing else.
    #[test]
    fn which_convolutions_take_winograd() {
        let geometry = |size: usize, kernel: usize, stride: usize| {
            let pad = kernel / 2;
            Geometry::new(
                [2, 8, size, size],
                [8, 8, kernel, kernel],
                [stride, stride],
                [pad; 4],
            )
            .unwrap()
        };
        assert_eq!(variant(&geometry(7, 3, 1)), Some(Variant::F4));
        assert_eq!(variant(&geometry(4, 3, 1)), Some(Variant::F4));
        assert_eq!(variant(&geometry(56, 3, 1)), Some(Variant::F4));
        assert_eq!(variant(&geometry(3, 3, 1)), None, "under one tile");
        assert_eq!(variant(&geometry(2, 3, 1)), None, "layer4 at 64x64 input");
        assert_eq!(variant(&geometry(14, 3, 2)), None, "stride 2");
        assert_eq!(variant(&geometry(7, 1, 1)), None, "1x1");
        assert_eq!(variant(&geometry(16, 7, 1)), None, "7x7 kernel");
    }

    /// Forward, weight and input gradients equal the direct batched
    /// products (im2col) for both variants, on maps that tiles fit
    /// exactly and that they overhang, channel counts that are not a
    /// multiple of the lanes, and the padding ResNets use and none.
    #[test]
    fn winograd_equals_the_direct_products() {
        // (batch, cin, cout, height, width, [top, left, bottom, right])
        let cases = [
            (3, 20, 17, 7, 7, [1, 1, 1, 1]),
            (2, 16, 32, 8, 8, [1, 1, 1, 1]),
            (2, 5, 3, 9, 6, [0, 0, 0, 0]),
            (1, 33, 18, 2, 2, [1, 1, 1, 1]),
            (2, 8, 8, 14, 14, [1, 1, 1, 1]),
        ];
        for variant in [Variant::F2, Variant::F4] {
            let bar = match variant {
                Variant::F2 => 2e-6,
                Variant::F4 => 2e-5,
            };
            for (i, (n, c, o, h, w, pad)) in cases.into_iter().enumerate() {
                let g = Geometry::new([n, c, h, w], [o, c, 3, 3], [1, 1], pad).unwrap();
                let x = values(n * c * h * w, 1 + i as u64);
                let wt = values(o * c * 9, 100 + i as u64);
                let gy = values(n * o * g.p(), 200 + i as u64);
                let what = format!("{variant:?}, case {i}");

                let (y, none) = forward(&x, &wt, &g, variant, false);
                assert!(none.is_none(), "{what}: kept operands nobody asked for");
                let (gw, gx) = backward(&x, &wt, &gy, &g, variant, true, None);
                let gy_t = swap_batch(&gy, n, o, g.p(), true);
                let errors = [
                    worst(&y, &forward_f32(&x, &wt, &g, false).0),
                    worst(&gw, &weight_grad_f32(&x, &gy_t, &g, None)),
                    worst(gx.as_deref().unwrap(), &input_grad_f32(&wt, &gy_t, &g)),
                ];
                eprintln!("{what}: forward, weight and input gradients off by {errors:?}");
                for (e, part) in
                    errors
                        .into_iter()
                        .zip(["forward", "weight gradient", "input gradient"])
                {
                    assert!(e <= bar, "{what}: {part} off by {e} of its scale");
                }

                let (gw2, none) = backward(&x, &wt, &gy, &g, variant, false, None);
                assert!(none.is_none());
                assert_eq!(gw, gw2, "{what}: the weight gradient alone");

                // The forward's kept `V` and `U` give the same backward.
                let (y3, kept) = forward(&x, &wt, &g, variant, true);
                assert_eq!(y, y3, "{what}: the forward that keeps its operands");
                assert!(kept.is_some(), "{what}: nothing kept");
                let (gw3, gx3) = backward(&x, &wt, &gy, &g, variant, true, kept);
                assert_eq!(gw, gw3, "{what}: the weight gradient from kept operands");
                assert_eq!(gx, gx3, "{what}: the input gradient from kept operands");
            }
        }
    }
}
