//! The trained stages' convolutions on the flex device, forward and
//! backward, each as one batched matrix product.
//!
//! Fine-tuning runs the trained stages as Burn modules on the autodiff
//! tape. Burn's flex backend computes a convolution image by image, and its
//! default backward derives the weight gradient as another convolution with
//! the batch as the channels and the output map as the kernel: for
//! `layer4`'s 7x7 maps that is one tiny product (9 rows) per input channel.
//! A `perf` profile of fine-tuning put most of the time there.
//!
//! This module registers one backend operation ([`TrainConvOps`], through
//! Burn's `#[backend_extension]`) with its own backward on
//! `Autodiff<Flex>`. With `K = C·kh·kw` and `NP = N·OH·OW` (every output
//! pixel of the batch):
//!
//! - forward: `colsᵀ [K, NP]` (im2col of the whole batch, one row per
//!   kernel tap), `outᵀ [O, NP] = W [O, K] · colsᵀ`, then NCHW;
//! - weight gradient: `gW [O, K] = gᵀ [O, NP] · cols [NP, K]`;
//! - input gradient (only when the input is on the tape: not for the first
//!   trained stage, whose input comes from the frozen prefix):
//!   `gColsᵀ [K, NP] = Wᵀ [K, O] · gᵀ`, scattered back (col2im).
//!
//! Stride-1 3x3 convolutions whose output map holds at least a 4x4 tile
//! (all of `layer4`'s but the first at 224x224 input) run all three as
//! Winograd F(4x4, 3x3) instead (the `winograd` submodule): 36 products of
//! a quarter of the size over the transformed tiles, about a third of the
//! direct products' multiplications on a 7x7 map.
//!
//! Each product runs multi-threaded in `gemm`. Results agree with Burn's
//! modules to float rounding (tests here) and the fine-tuning step with
//! PyTorch's to 1e-4 (`avp-train`'s `finetune` tests). Other devices,
//! dtypes, grouped or dilated convolutions, `Same` padding and convolutions
//! with a bias run Burn's `Conv2d::forward` unchanged, and so does every
//! convolution when the environment has `AVP_TRAIN_CONV=burn`;
//! `AVP_TRAIN_CONV=direct` keeps the batched products without Winograd,
//! `AVP_WINOGRAD=f2` takes F(2x2, 3x3) instead of F(4x4).

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

mod winograd;

/// The batched convolution as a backend operation (flex, with or without
/// autodiff). Call it through [`conv2d`], which checks that it applies.
#[backend_extension(Flex, Autodiff)]
pub trait TrainConvOps: Backend {
    /// `x [N, C, H, W]` convolved with `weight [O, C, kh, kw]`, no bias,
    /// stride `stride`, zero padding `pad = [top, left, bottom, right]`.
    fn avp_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        pad: [usize; 4],
    ) -> FloatTensor<Self>;
}

/// `conv.forward(x)`; on the flex device (autodiff or not) an `f32`
/// ungrouped, undilated, bias-free convolution with explicit padding runs
/// as this module's batched products instead.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match batched_options(conv, &x) {
        Some((stride, pad)) => {
            let w = conv.weight.val();
            Tensor::from_dispatch(<Dispatch as TrainConvOps>::avp_conv2d(
                x.into_dispatch(),
                w.into_dispatch(),
                stride,
                pad,
            ))
        }
        None => conv.forward(x),
    }
}

/// `AVP_TRAIN_CONV` (read once): `burn` keeps Burn's convolutions in the
/// trained stages, `direct` keeps this module's products but without
/// Winograd; for measuring one path against another, or for ruling one
/// out when a result looks wrong.
fn requested() -> Option<&'static str> {
    static CHOICE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| std::env::var("AVP_TRAIN_CONV").ok())
        .as_deref()
}

fn burn_requested() -> bool {
    requested() == Some("burn")
}

/// The Winograd variant a convolution runs, if any: stride-1 3x3
/// convolutions take F(4x4, 3x3), or F(2x2, 3x3) with `AVP_WINOGRAD=f2`
/// (as on the fused inference path); `AVP_TRAIN_CONV=direct` turns it off.
fn winograd_variant(g: &Geometry) -> Option<winograd::Variant> {
    static F2_ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if requested() == Some("direct") {
        return None;
    }
    let f2 = *F2_ONLY
        .get_or_init(|| std::env::var("AVP_WINOGRAD").is_ok_and(|v| v.eq_ignore_ascii_case("f2")));
    winograd::variant(g).map(|v| if f2 { winograd::Variant::F2 } else { v })
}

/// The stride and padding when [`conv2d`] takes the batched path.
fn batched_options(conv: &Conv2d, x: &Tensor<4>) -> Option<([usize; 2], [usize; 4])> {
    if burn_requested() {
        return None;
    }
    let device = x.device();
    let on_flex = crate::is_flex(&device.clone().inner());
    let simple = conv.groups == 1 && conv.dilation == [1, 1] && conv.bias.is_none();
    if !(on_flex && simple && x.dtype() == DType::F32) {
        return None;
    }
    let pad = crate::fused::explicit(&conv.padding)?;
    let [_, c, h, w] = x.dims();
    // A channel count that does not match the weights is left to Burn's
    // convolution, which reports it.
    if conv.weight.dims()[1] != c {
        return None;
    }
    Geometry::new(
        [1, 1, h, w],
        [1, 1, conv.kernel_size[0], conv.kernel_size[1]],
        conv.stride,
        pad,
    )?;
    Some((conv.stride, pad))
}

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: [usize; 2],
    /// Top and left zero padding (bottom and right only shape the output).
    pad: [usize; 2],
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// `None` when the kernel does not fit the padded input or a stride is 0.
    fn new(x: [usize; 4], w: [usize; 4], stride: [usize; 2], pad: [usize; 4]) -> Option<Self> {
        let ph = x[2] + pad[0] + pad[2];
        let pw = x[3] + pad[1] + pad[3];
        if stride.contains(&0) || ph < w[2] || pw < w[3] {
            return None;
        }
        Some(Self {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: w[0],
            kh: w[2],
            kw: w[3],
            stride,
            pad: [pad[0], pad[1]],
            oh: (ph - w[2]) / stride[0] + 1,
            ow: (pw - w[3]) / stride[1] + 1,
        })
    }

    /// Rows of `colsᵀ`: one per input channel and kernel tap.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels of one image.
    fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Columns of `colsᵀ`: every output pixel of the batch.
    fn np(&self) -> usize {
        self.n * self.p()
    }

    /// The input column `ix` read by output column `ox` at tap `kj`, if
    /// inside the image (likewise rows).
    fn source(o: usize, k: usize, stride: usize, pad: usize, len: usize) -> Option<usize> {
        (o * stride + k).checked_sub(pad).filter(|&i| i < len)
    }

    /// The output columns `ox` whose tap `kj` reads inside the image:
    /// `lo..hi` (empty when `lo >= hi`).
    fn valid_range(&self, kj: usize) -> (usize, usize) {
        let [_, sw] = self.stride;
        let pl = self.pad[1];
        // ox*sw + kj >= pl
        let lo = pl.saturating_sub(kj).div_ceil(sw);
        // ox*sw + kj - pl <= w - 1
        let hi = if self.w + pl > kj {
            ((self.w + pl - kj - 1) / sw + 1).min(self.ow)
        } else {
            0
        };
        (lo, hi)
    }
}

/// `colsᵀ [K, NP]` of NCHW `x`: row `(c·kh + ki)·kw + kj`, column
/// `n·P + oy·OW + ox` holds `x[n, c, oy·sh + ki − pt, ox·sw + kj − pl]` (0
/// in the padding).
#[allow(unsafe_code)]
fn im2col_t(x: &[f32], g: &Geometry) -> Vec<f32> {
    let (np, p, taps) = (g.np(), g.p(), g.kh * g.kw);
    let zero = MaybeUninit::new(0.0);
    let write = |cols: &mut [MaybeUninit<f32>]| {
        if np == 0 {
            return;
        }
        cols.par_chunks_mut(taps * np)
            .enumerate()
            .for_each(|(c, rows)| {
                for (tap, row) in rows.chunks_mut(np).enumerate() {
                    let (ki, kj) = (tap / g.kw, tap % g.kw);
                    let (lo, hi) = g.valid_range(kj);
                    let (lo, hi) = (lo.min(g.ow), hi.min(g.ow).max(lo.min(g.ow)));
                    for n in 0..g.n {
                        let plane = &x[(n * g.c + c) * g.h * g.w..][..g.h * g.w];
                        for oy in 0..g.oh {
                            let dst = &mut row[n * p + oy * g.ow..][..g.ow];
                            let source = Geometry::source(oy, ki, g.stride[0], g.pad[0], g.h);
                            let Some(iy) = source.filter(|_| lo < hi) else {
                                dst.fill(zero);
                                continue;
                            };
                            let src = &plane[iy * g.w..][..g.w];
                            dst[..lo].fill(zero);
                            dst[hi..].fill(zero);
                            let ix0 = lo * g.stride[1] + kj - g.pad[1];
                            if g.stride[1] == 1 {
                                put(&mut dst[lo..hi], &src[ix0..ix0 + (hi - lo)]);
                            } else {
                                for (i, d) in dst[lo..hi].iter_mut().enumerate() {
                                    d.write(src[ix0 + i * g.stride[1]]);
                                }
                            }
                        }
                    }
                }
            });
    };
    // SAFETY: the chunks tile `cols` (`C` blocks of `taps` rows of `NP`),
    // and each row's `N·OH` runs of `OW` are written whole: zeros outside
    // `lo..hi` (all of it where the source row is padding), the input
    // inside.
    unsafe { written(g.k() * np, write) }
}

/// The inverse scatter of [`im2col_t`]: `gx [N, C, H, W]` summed from
/// `gcols [K, NP]`.
#[allow(unsafe_code)]
fn col2im(gcols: &[f32], g: &Geometry) -> Vec<f32> {
    let (np, p, taps, hw) = (g.np(), g.p(), g.kh * g.kw, g.h * g.w);
    // Channel-major while scattering, so that each thread owns whole
    // channels; reordered to NCHW at the end.
    let mut by_channel = zeros(g.c * g.n * hw);
    by_channel
        .par_chunks_mut(g.n * hw)
        .enumerate()
        .for_each(|(c, planes)| {
            for tap in 0..taps {
                let (ki, kj) = (tap / g.kw, tap % g.kw);
                let (lo, hi) = g.valid_range(kj);
                if lo >= hi {
                    continue;
                }
                let row = &gcols[(c * taps + tap) * np..][..np];
                for n in 0..g.n {
                    let plane = &mut planes[n * hw..][..hw];
                    for oy in 0..g.oh {
                        let Some(iy) = Geometry::source(oy, ki, g.stride[0], g.pad[0], g.h) else {
                            continue;
                        };
                        let src = &row[n * p + oy * g.ow..][..g.ow];
                        let dst = &mut plane[iy * g.w..][..g.w];
                        let ix0 = lo * g.stride[1] + kj - g.pad[1];
                        for (i, s) in src[lo..hi].iter().enumerate() {
                            dst[ix0 + i * g.stride[1]] += s;
                        }
                    }
                }
            }
        });
    let write = |gx: &mut [MaybeUninit<f32>]| {
        if hw == 0 {
            return;
        }
        gx.par_chunks_mut(g.c * hw)
            .enumerate()
            .for_each(|(n, img)| {
                for (c, plane) in img.chunks_mut(hw).enumerate() {
                    put(plane, &by_channel[(c * g.n + n) * hw..][..hw]);
                }
            });
    };
    // SAFETY: the images' planes tile `gx`, each copied whole.
    unsafe { written(g.n * g.c * hw, write) }
}

/// `len` zeros, written by rayon's threads. (`vec![0.0; len]` on memory
/// the allocator reuses is one `memset` on the calling thread while the
/// pool's threads wait: in a system-wide `perf` profile of a cached
/// `layer4` epoch on 2 cores, `memset` was the largest stretch with one
/// core idle, about 12 ms a step from the trained stages' buffers.)
#[allow(unsafe_code)]
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    const SERIAL_BELOW: usize = 1 << 16;
    if len < SERIAL_BELOW {
        return vec![0.0; len];
    }
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(SERIAL_BELOW)
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the loop above wrote each of the first `len` slots.
    unsafe {
        v.set_len(len);
    }
    v
}

/// `len` floats, each written by `write`, which gets them uninitialized:
/// a buffer that is overwritten whole needs no [`zeros`] first (the
/// trained stages' outputs, products and transposes: 2–3% of a cached
/// `layer4` epoch was `memset`, in a `perf` profile on a 2-core Xeon).
///
/// # Safety
///
/// `write` must initialize every element of the slice it is given (or
/// panic).
#[allow(unsafe_code)]
pub(crate) unsafe fn written(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    write(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `write` initialized each of the first `len`
    // slots (a panic in it leaves `v` empty).
    unsafe {
        v.set_len(len);
    }
    v
}

/// Copies `src` into `dst` (of the same length).
#[inline(always)]
pub(crate) fn put(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(v);
    }
}

/// `[N, O, P]` (NCHW) from `[O, N·P]`, or back with `to_rows = true`.
#[allow(unsafe_code)]
fn swap_batch(src: &[f32], n: usize, o: usize, p: usize, to_rows: bool) -> Vec<f32> {
    let write = |dst: &mut [MaybeUninit<f32>]| {
        if n * o * p == 0 {
            return;
        }
        if to_rows {
            // dst [O, N·P] from src [N, O, P]
            dst.par_chunks_mut(n * p).enumerate().for_each(|(oi, row)| {
                for ni in 0..n {
                    put(&mut row[ni * p..][..p], &src[(ni * o + oi) * p..][..p]);
                }
            });
        } else {
            dst.par_chunks_mut(o * p).enumerate().for_each(|(ni, img)| {
                for oi in 0..o {
                    put(&mut img[oi * p..][..p], &src[oi * n * p + ni * p..][..p]);
                }
            });
        }
    };
    // SAFETY: either way, the chunks tile `dst` and each is written whole
    // (`n` runs of `p`, or `o` runs of `p`).
    unsafe { written(n * o * p, write) }
}

/// Where [`interleaved_products`] write: floats, or room for them (which
/// the products initialize: each element of the outputs they cover).
trait Dst {
    fn len(&self) -> usize;
    fn start(&mut self) -> *mut f32;
    fn zero(&mut self);
}

impl Dst for [f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
    fn start(&mut self) -> *mut f32 {
        self.as_mut_ptr()
    }
    fn zero(&mut self) {
        self.fill(0.0);
    }
}

impl Dst for [MaybeUninit<f32>] {
    fn len(&self) -> usize {
        <[MaybeUninit<f32>]>::len(self)
    }
    fn start(&mut self) -> *mut f32 {
        self.as_mut_ptr().cast()
    }
    fn zero(&mut self) {
        self.fill(MaybeUninit::new(0.0));
    }
}

/// A matrix operand: elements `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Strides {
    rs: usize,
    cs: usize,
}

/// `dst [m, n] = lhs [m, k] · rhs [k, n]` (`dst` row-major, the operands
/// with any strides), split over rayon's threads by `gemm`.
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut (impl Dst + ?Sized),
    (lhs, ls): (&[f32], Strides),
    (rhs, rs): (&[f32], Strides),
) {
    interleaved_products(1, (m, n, k), (dst, n, n), (lhs, ls, 0), (rhs, rs, 0));
}

/// `count` products `dst[i] = lhs[i] · rhs[i]` (`[m, k] · [k, n]`), the
/// `i`-th operand of each `step` floats after the one before, spread over
/// rayon's threads a product each, every product on one thread (a single
/// product is split over the threads by `gemm` instead).
///
/// The Winograd products (36 of `[128, 512] · [512, 512]` for a `layer4`
/// convolution at batch 32) are small: each split over both threads by
/// `gemm`, they ran at 30% of the peak of a 2-core AVX-512 Xeon, and one
/// per thread at about 57%.
///
/// `dst[i]` starts `i · dst_step` floats in, its rows `rs` apart. The
/// outputs must not overlap, which holds when they interleave within rows
/// (`n ≤ dst_step` and `(count - 1) · dst_step + n ≤ rs`) or each is a
/// block of whole rows (`n ≤ rs` and `(m - 1) · rs + n ≤ dst_step`),
/// asserted below.
#[allow(unsafe_code)]
fn interleaved_products(
    count: usize,
    (m, n, k): (usize, usize, usize),
    (dst, d_rs, d_step): (&mut (impl Dst + ?Sized), usize, usize),
    (lhs, ls, l_step): (&[f32], Strides, usize),
    (rhs, rs, r_step): (&[f32], Strides, usize),
) {
    use rayon::prelude::*;
    if count == 0 || m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, s: Strides| (rows - 1) * s.rs + (cols - 1) * s.cs;
    let ds = Strides { rs: d_rs, cs: 1 };
    // Disjoint outputs: each product owns columns `i·step .. i·step + n`
    // of every row, and all of them fit in one row (or each product's rows
    // are a block of their own, after the last row of the one before).
    assert!(
        (n <= d_step && (count - 1) * d_step + n <= d_rs)
            || (n <= d_rs && (m - 1) * d_rs + n <= d_step)
    );
    assert!((count - 1) * d_step + last(m, n, ds) < dst.len());
    if k == 0 {
        dst.zero();
        return;
    }
    assert!((count - 1) * l_step + last(m, k, ls) < lhs.len());
    assert!((count - 1) * r_step + last(k, n, rs) < rhs.len());
    // The address crosses threads as an integer: a raw pointer is not
    // `Send`.
    let dst_at = dst.start() as usize;
    let run = |i: usize, parallelism: gemm::Parallelism| {
        // SAFETY: the assertions above keep every element the `i`-th
        // product reads inside `lhs` and `rhs`, and every element it
        // writes inside `dst`, which is borrowed mutably for the whole
        // call (so it aliases neither operand). Products write disjoint
        // elements of `dst` (distinct column ranges of each row, or blocks
        // of distinct rows; the rows `d_rs` apart): no two threads write
        // the same float, and nothing reads `dst` (`read_dst` is false).
        unsafe {
            let out = (dst_at as *mut f32).add(i * d_step);
            gemm::gemm(
                m,
                n,
                k,
                out,
                ds.cs as isize,
                ds.rs as isize,
                false,
                lhs.as_ptr().add(i * l_step),
                ls.cs as isize,
                ls.rs as isize,
                rhs.as_ptr().add(i * r_step),
                rs.cs as isize,
                rs.rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    };
    if count == 1 {
        run(0, gemm::Parallelism::Rayon(rayon::current_num_threads()));
    } else {
        (0..count)
            .into_par_iter()
            .for_each(|i| run(i, gemm::Parallelism::None));
    }
}

/// Row-major strides of a `[_, cols]` matrix.
fn rows(cols: usize) -> Strides {
    Strides { rs: cols, cs: 1 }
}

/// The transpose of a row-major `[rows, cols]` matrix, as `[cols, rows]`.
fn transposed(cols: usize) -> Strides {
    Strides { rs: 1, cs: cols }
}

/// The output, and with `keep` the im2col columns for the weight
/// gradient.
#[allow(unsafe_code)]
fn forward_f32(x: &[f32], w: &[f32], g: &Geometry, keep: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let (k, np) = (g.k(), g.np());
    let cols = im2col_t(x, g);
    // SAFETY: the product writes each element of its `[O, NP]` output.
    let out_t = unsafe {
        written(g.o * np, |out| {
            product((g.o, np, k), out, (w, rows(k)), (&cols, rows(np)))
        })
    };
    (
        swap_batch(&out_t, g.n, g.o, g.p(), false),
        keep.then_some(cols),
    )
}

/// The weight gradient; the im2col columns from `kept` when the forward
/// kept them (and their size fits), else computed again.
#[allow(unsafe_code)]
fn weight_grad_f32(x: &[f32], grad_t: &[f32], g: &Geometry, kept: Option<Vec<f32>>) -> Vec<f32> {
    let (k, np) = (g.k(), g.np());
    let cols = kept
        .filter(|c| c.len() == k * np)
        .unwrap_or_else(|| im2col_t(x, g));
    // SAFETY: the product writes each element of its `[O, K]` output.
    unsafe {
        written(g.o * k, |gw| {
            product(
                (g.o, k, np),
                gw,
                (grad_t, rows(np)),
                (&cols, transposed(np)),
            )
        })
    }
}

#[allow(unsafe_code)]
fn input_grad_f32(w: &[f32], grad_t: &[f32], g: &Geometry) -> Vec<f32> {
    let (k, np) = (g.k(), g.np());
    // SAFETY: the product writes each element of its `[K, NP]` output.
    let gcols = unsafe {
        written(k * np, |gcols| {
            product((k, np, g.o), gcols, (w, transposed(k)), (grad_t, rows(np)))
        })
    };
    col2im(&gcols, g)
}

/// A flex tensor's `f32` values in row-major order (copied only when its
/// layout is not contiguous already).
pub(crate) fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .map(<[f32]>::to_vec)
                .unwrap_or_default(),
        ),
    }
}

pub(crate) fn flex_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Whether `a` and `b` are views of the very same values: both contiguous
/// in one buffer, at the same address, length and shape. The caches that
/// recognise an earlier input this way hold a clone of it, so that its
/// buffer can neither be freed (and its address reused) nor changed in
/// place (flex changes a tensor in place only when nothing else holds it).
pub(crate) fn same_values(a: &FlexTensor, b: &FlexTensor) -> bool {
    let (x, y) = (values(a), values(b));
    matches!((&x, &y), (Cow::Borrowed(_), Cow::Borrowed(_)))
        && x.as_ptr() == y.as_ptr()
        && x.len() == y.len()
        && a.shape() == b.shape()
}

pub(crate) fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

fn geometry(x: &FlexTensor, w: &FlexTensor, stride: [usize; 2], pad: [usize; 4]) -> Geometry {
    // `conv2d` checked the shapes before dispatching here.
    Geometry::new(dims4(x), dims4(w), stride, pad).unwrap_or_else(|| {
        unreachable!("avp_conv2d called with a kernel that does not fit its input")
    })
}

impl TrainConvOps for Flex {
    fn avp_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: [usize; 2],
        pad: [usize; 4],
    ) -> FlexTensor {
        flex_forward(&x, &weight, stride, pad, false).0
    }
}

/// The forward on flex, and with `keep` (a tracked forward) the operands
/// its backward reuses.
fn flex_forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: [usize; 2],
    pad: [usize; 4],
    keep: bool,
) -> (FlexTensor, Option<Kept>) {
    let g = geometry(x, weight, stride, pad);
    let (out, kept) = match winograd_variant(&g) {
        Some(v) if !keep => (untracked_winograd(x, weight, &g, v), None),
        Some(v) => {
            // Training: the weights change at every step, and the cache's
            // entries would only hold old weights and their `U`.
            if let Ok(mut cache) = TRANSFORMED.lock() {
                cache.clear();
            }
            let (y, kept) = winograd::forward(&values(x), &values(weight), &g, v, keep);
            (y, kept.map(Kept::Winograd))
        }
        None => {
            let (y, cols) = forward_f32(&values(x), &values(weight), &g, keep);
            (y, cols.map(Kept::Columns))
        }
    };
    (flex_tensor(out, [g.n, g.o, g.oh, g.ow]), kept)
}

/// Frees what the trained stages' convolutions keep between calls: the
/// Winograd scratch buffers of the calling thread and of each thread of
/// rayon's pool (up to 16 a thread, tens of MB each at `layer4`), and the
/// transformed weights kept for untracked forwards (up to 256 MB).
/// Training calls it when it ends, so that a program that goes on after
/// fine-tuning does not hold them; a later call allocates them again.
pub fn release_buffers() {
    rayon::broadcast(|_| winograd::release_pool());
    winograd::release_pool();
    if let Ok(mut cache) = TRANSFORMED.lock() {
        cache.clear();
    }
}

/// Weights and their Winograd transform `U`, kept between untracked
/// forwards (validation, inference): a fine-tuning run's validation
/// batches all run the same weights, and `U` took about 5 ms of each
/// `layer4` convolution's 18 ms at batch 32. An entry holds a clone of
/// the weight tensor, by which [`same_values`] recognises those weights.
static TRANSFORMED: std::sync::Mutex<Vec<(FlexTensor, winograd::Transformed)>> =
    std::sync::Mutex::new(Vec::new());

/// The most bytes of `U` the cache keeps (the five Winograd convolutions
/// of a ResNet18 `layer4` take 189 MB); the oldest entries go first.
const TRANSFORMED_MAX_BYTES: usize = 256 << 20;

/// The forward of an untracked Winograd convolution, its `U` from the
/// cache when it holds these very weights.
fn untracked_winograd(
    x: &FlexTensor,
    weight: &FlexTensor,
    g: &Geometry,
    v: winograd::Variant,
) -> Vec<f32> {
    let w = values(weight);
    let x = values(x);
    // Weights that are a copy (not contiguous in their buffer) have no
    // buffer to recognise them by.
    if matches!(w, Cow::Owned(_)) {
        return winograd::forward(&x, &w, g, v, false).0;
    }
    let same =
        |t: &FlexTensor, u: &winograd::Transformed| same_values(t, weight) && u.variant() == v;
    // Out of the cache while it runs (the lock is not held meanwhile).
    let found = TRANSFORMED.lock().ok().and_then(|mut cache| {
        let i = cache.iter().position(|(t, u)| same(t, u))?;
        Some(cache.remove(i))
    });
    let entry = found.unwrap_or_else(|| (weight.clone(), winograd::transformed(&w, g, v)));
    let y = winograd::forward_with(&x, &entry.1, g)
        .unwrap_or_else(|| winograd::forward(&x, &w, g, v, false).0);
    if let Ok(mut cache) = TRANSFORMED.lock() {
        // Most recent last; the oldest go while the cache is over its size.
        cache.push(entry);
        while cache.iter().map(|(_, u)| u.bytes()).sum::<usize>() > TRANSFORMED_MAX_BYTES
            && cache.len() > 1
        {
            cache.remove(0);
        }
    }
    y
}

/// What a tracked forward keeps for its backward.
#[derive(Debug)]
enum Kept {
    /// The Winograd operands `V` and `U` ([`winograd::Kept`]).
    Winograd(winograd::Kept),
    /// The direct product's im2col columns, which the weight gradient
    /// reads again (2.4–2.6 ms and 14 MB for the stride-2 convolution of a
    /// ResNet18 `layer4` at batch 32, in a timing probe).
    Columns(Vec<f32>),
}

/// A tracked forward's [`Kept`] operands, taken (and their buffers given
/// back) by the one backward that uses them.
#[derive(Clone, Debug, Default)]
struct KeptCell(std::sync::Arc<std::sync::Mutex<Option<Kept>>>);

impl KeptCell {
    fn new(kept: Option<Kept>) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(kept)))
    }

    fn take(&self) -> Option<Kept> {
        self.0.lock().ok().and_then(|mut k| k.take())
    }
}

/// The backward of [`TrainConvOps::avp_conv2d`] on `Autodiff<Flex>`.
#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 2> for ConvBackward {
    /// The input, the weights, stride and padding, and what the forward
    /// kept.
    type State = (FlexTensor, FlexTensor, [usize; 2], [usize; 4], KeptCell);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, w, stride, pad, kept) = ops.state;
        let g = geometry(&x, &w, stride, pad);
        if let Some(variant) = winograd_variant(&g) {
            let (gw, gx) = winograd::backward(
                &values(&x),
                &values(&w),
                &values(&grad),
                &g,
                variant,
                node_x.is_some(),
                match kept.take() {
                    Some(Kept::Winograd(k)) => Some(k),
                    _ => None,
                },
            );
            if let Some(node) = node_w {
                grads.register::<Flex>(node.id, flex_tensor(gw, [g.o, g.c, g.kh, g.kw]));
            }
            if let (Some(node), Some(gx)) = (node_x, gx) {
                grads.register::<Flex>(node.id, flex_tensor(gx, [g.n, g.c, g.h, g.w]));
            }
            return;
        }
        let grad_t = swap_batch(&values(&grad), g.n, g.o, g.p(), true);
        if let Some(node) = node_w {
            let cols = match kept.take() {
                Some(Kept::Columns(c)) => Some(c),
                _ => None,
            };
            let gw = weight_grad_f32(&values(&x), &grad_t, &g, cols);
            grads.register::<Flex>(node.id, flex_tensor(gw, [g.o, g.c, g.kh, g.kw]));
        }
        if let Some(node) = node_x {
            let gx = input_grad_f32(&values(&w), &grad_t, &g);
            grads.register::<Flex>(node.id, flex_tensor(gx, [g.n, g.c, g.h, g.w]));
        }
    }
}

impl<C: CheckpointStrategy> TrainConvOps for Autodiff<Flex, C> {
    fn avp_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        pad: [usize; 4],
    ) -> FloatTensor<Self> {
        let prep = ConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful();
        let (x, w) = (x.into_primitive(), weight.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, kept) = flex_forward(&x, &w, stride, pad, true);
                prep.finish((x, w, stride, pad, KeptCell::new(kept)), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(<Flex as TrainConvOps>::avp_conv2d(x, w, stride, pad))
            }
        }
    }
}

/// Asserts that `ours` is within `bar` of `burn`'s largest magnitude,
/// element by element, and prints the worst difference (the trained
/// stages' operations against Burn's own, in this module's tests and
/// `train_bn`'s).
#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
pub(crate) fn assert_close<const D: usize>(ours: Tensor<D>, burn: Tensor<D>, bar: f32, what: &str) {
    let a = ours.into_data().try_to_vec::<f32>().unwrap();
    let b = burn.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!("{what}: worst {:.2e} of scale {scale}", worst / scale);
    assert!(
        worst <= bar * scale,
        "{what}: max |diff| {worst} (scale {scale})"
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    /// [`assert_close`] at 1e-5 of the scale.
    fn close(ours: Tensor<4>, burn: Tensor<4>, what: &str) {
        assert_close(ours, burn, 1e-5, what);
    }

    /// Forward, input and weight gradients equal Burn's own convolution on
    /// the autodiff flex device, for the shapes ResNets use (3x3 stride 1
    /// and 2, asymmetric CNTK padding, 1x1 stride 1 and 2, the 7x7 stem).
    #[test]
    fn batched_conv_and_its_backward_equal_burns() {
        let device = Device::flex().autodiff();
        // (batch, cin, cout, size, kernel, stride, [top, left, bottom, right])
        let cases = [
            (3, 5, 7, 9, 3, 1, [1, 1, 1, 1]),
            (2, 4, 6, 10, 3, 2, [1, 1, 1, 1]),
            (2, 4, 6, 10, 3, 2, [0, 0, 1, 1]),
            (3, 6, 5, 7, 1, 1, [0, 0, 0, 0]),
            (2, 6, 5, 8, 1, 2, [0, 0, 0, 0]),
            (2, 3, 4, 16, 7, 2, [3, 3, 3, 3]),
            (1, 2, 3, 5, 3, 3, [2, 0, 1, 2]),
        ];
        for (i, (n, c, o, s, k, stride, pad)) in cases.into_iter().enumerate() {
            let conv = Conv2dConfig::new([c, o], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad[0], pad[1], pad[2], pad[3]))
                .with_bias(false)
                .init(&device);
            let x = Tensor::<4>::random([n, c, s, s], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            assert!(
                batched_options(&conv, &x).is_some(),
                "case {i} takes the batched path"
            );
            let reference = conv.forward(x.clone());
            let r = Tensor::<4>::random(reference.dims(), Distribution::Normal(0.0, 1.0), &device);
            let ours = conv2d(&conv, x.clone());
            assert_eq!(ours.dims(), reference.dims(), "case {i}: output shape");
            let g_ref = (reference.clone() * r.clone()).sum().backward();
            let g_ours = (ours.clone() * r).sum().backward();
            close(
                ours.inner(),
                reference.inner(),
                &format!("case {i}: forward"),
            );
            close(
                x.grad(&g_ours).unwrap(),
                x.grad(&g_ref).unwrap(),
                &format!("case {i}: input gradient"),
            );
            close(
                conv.weight.val().grad(&g_ours).unwrap(),
                conv.weight.val().grad(&g_ref).unwrap(),
                &format!("case {i}: weight gradient"),
            );
        }
    }

    /// A bias-free 3x3 convolution padded by one on every side.
    fn padded_3x3(cin: usize, cout: usize, device: &Device) -> Conv2d {
        Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(device)
    }

    /// An input off the tape (the frozen prefix's map) gets no gradient,
    /// the weights still do; the plain flex device runs the forward alone.
    #[test]
    fn untracked_input_and_plain_device() {
        let device = Device::flex().autodiff();
        let conv = padded_3x3(4, 3, &device);
        let x = Tensor::<4>::random([2, 4, 6, 6], Distribution::Normal(0.0, 1.0), &device);
        let grads = conv2d(&conv, x.clone()).sum().backward();
        assert!(x.grad(&grads).is_none());
        let gw = conv.weight.val().grad(&grads).unwrap();
        let reference = conv
            .weight
            .val()
            .grad(&conv.forward(x.clone()).sum().backward());
        close(
            gw,
            reference.unwrap(),
            "weight gradient, input off the tape",
        );

        let plain = conv.valid();
        let xi = x.inner();
        close(
            conv2d(&plain, xi.clone()),
            plain.forward(xi),
            "plain flex forward",
        );
    }

    /// Untracked Winograd forwards, which may take `U` from the cache, give
    /// the output of the Winograd forward itself, bit for bit: again with
    /// the same weights, with other weights, and after a tracked forward
    /// (other tests share the cache, so a hit is not asserted).
    #[test]
    fn untracked_forwards_never_see_an_old_u() {
        let device = Device::flex();
        let layer = |seed: f64| {
            let mut conv = padded_3x3(8, 8, &device);
            conv.weight = burn::module::Param::from_tensor(Tensor::random(
                [8, 8, 3, 3],
                Distribution::Normal(seed, 1.0),
                &device,
            ));
            conv
        };
        let bits =
            |t: Tensor<4>| -> Vec<u32> { t.into_data().iter::<f32>().map(f32::to_bits).collect() };
        // The forward without the cache: the Winograd forward itself.
        let uncached = |conv: &Conv2d, x: &Tensor<4>| -> Vec<u32> {
            let xv = x.clone().into_data().try_to_vec::<f32>().unwrap();
            let wv = conv.weight.val().into_data().try_to_vec::<f32>().unwrap();
            let g = Geometry::new([2, 8, 8, 8], [8, 8, 3, 3], [1, 1], [1; 4]).unwrap();
            let v = winograd_variant(&g).unwrap();
            let y = winograd::forward(&xv, &wv, &g, v, false).0;
            y.iter().map(|v| v.to_bits()).collect()
        };
        let x = Tensor::<4>::random([2, 8, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let (a, b) = (layer(0.0), layer(3.0));
        let first = bits(conv2d(&a, x.clone()));
        assert_eq!(first, uncached(&a, &x), "first forward");
        assert_eq!(bits(conv2d(&a, x.clone())), first, "from the cache");
        let other = bits(conv2d(&b, x.clone()));
        assert_eq!(other, uncached(&b, &x), "other weights");
        assert_ne!(other, first);
        assert_eq!(
            bits(conv2d(&a, x.clone())),
            first,
            "the first weights again"
        );
        // A tracked forward empties the cache; the untracked one after it
        // still gives the same output.
        let tracked = a.clone().to_device(&device.clone().autodiff());
        let _ = conv2d(&tracked, x.clone().to_device(&device.clone().autodiff()));
        assert_eq!(
            bits(conv2d(&a, x.clone())),
            first,
            "after a tracked forward"
        );
    }

    /// A Winograd forward and backward leave their scratch buffers in the
    /// calling thread's pool; `release_buffers` frees them.
    #[test]
    fn release_frees_the_scratch_buffers() {
        let device = Device::flex().autodiff();
        let conv = padded_3x3(8, 8, &device);
        let x = Tensor::<4>::random([2, 8, 8, 8], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let g = conv2d(&conv, x.clone()).sum().backward();
        assert!(x.grad(&g).is_some());
        assert!(
            winograd::pooled_bytes() > 0,
            "the Winograd path kept no buffer"
        );
        release_buffers();
        assert_eq!(winograd::pooled_bytes(), 0);
    }

    /// What the batched path does not take runs Burn's module.
    #[test]
    fn other_convolutions_fall_back() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 4, 6, 6], &device);
        let biased = Conv2dConfig::new([4, 4], [3, 3]).init(&device);
        assert!(batched_options(&biased, &x).is_none());
        let same = Conv2dConfig::new([4, 4], [3, 3])
            .with_bias(false)
            .with_padding(PaddingConfig2d::Same)
            .init(&device);
        assert!(batched_options(&same, &x).is_none());
        let grouped = Conv2dConfig::new([4, 4], [3, 3])
            .with_bias(false)
            .with_groups(2)
            .init(&device);
        assert!(batched_options(&grouped, &x).is_none());
        let plain = Conv2dConfig::new([4, 4], [3, 3])
            .with_bias(false)
            .init(&device);
        assert!(batched_options(&plain, &x).is_some());
        let three_channels = Tensor::<4>::zeros([1, 3, 6, 6], &device);
        assert!(batched_options(&plain, &three_channels).is_none());
        assert_eq!(
            conv2d(&grouped, x.clone()).dims(),
            grouped.forward(x).dims()
        );
    }
}
