//! A fused CPU path for a frozen ResNet on the flex device.
//!
//! Burn's flex backend runs a convolution as: weights reordered, input
//! transposed NCHW → NHWC, im2col, one matrix product per tile, results
//! scattered back to NCHW, then separate passes for the bias, BatchNorm,
//! ReLU and the residual add, each a trip through memory with an allocation.
//!
//! This module keeps the activations NHWC from the stem to the pool, packs
//! every convolution's weights once, and runs each convolution tile by tile
//! (256 output pixels) on the rayon pool: the tile's im2col rows (none for a
//! stride-1 1x1 convolution, whose input rows are the matrix), the output
//! tile pre-filled with the bias (plus the shortcut, for the last
//! convolution of a block), one single-threaded `gemm` that accumulates into
//! it, and the epilogue on the tile while it is still in cache. Activation
//! buffers are reused across layers and calls.
//!
//! BatchNorm, three ways:
//! - folded into the convolutions ([`crate::ResNet::fold_batchnorm`]):
//!   conv + bias + shortcut + ReLU is one pass;
//! - running statistics (an unfolded network, [`BatchNormUse::Module`]):
//!   a per-channel scale and shift in the same tile pass;
//! - batch statistics ([`BatchNormUse::BatchStatistics`], PyTorch's
//!   `model.train()` on a frozen network): per-tile channel sums while the
//!   tile is in cache, then one scale/shift/shortcut/ReLU pass, and the
//!   modules' running statistics updated as PyTorch does.
//!
//! Used only on the flex device and only for networks packed by
//! [`crate::ResNet::fold_batchnorm`] or [`crate::ResNet::with_fused_kernels`];
//! autodiff, ndarray and the GPU backends run Burn's modules. Results agree
//! with Burn's path and with onnxruntime/PyTorch to float rounding (tests
//! here, in `tests/import.rs` and `tests/real_weights.rs`).

use std::fmt;
use std::sync::Mutex;

use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::resnet::{BatchNormUse, ResNet};

/// Rows (output pixels) per tile. In a standalone measurement of `gemm` on
/// ResNet50's layer shapes at batch 8 (2 cores), 256-row tiles with a
/// single-threaded product each ran at 300–470 GFLOP/s, and one two-thread
/// product over the whole layer at 80–460 (worst on the wide 1x1 layers).
const MAX_TILE_ROWS: usize = 256;

/// Activation buffers handed back after use and taken again by the next
/// layer or the next batch. Fresh allocations of these sizes come from
/// `mmap`, and first-touch page faults cost as much as the arithmetic of a
/// small layer (measured: a 1568x256x1024 product ran at 210 instead of 460
/// GFLOP/s into a new buffer). Holds at most [`KEPT_BUFFERS`] buffers.
#[derive(Default)]
struct Buffers(Mutex<Vec<Vec<f32>>>);

/// Buffers kept between batches: a bottleneck block has five maps alive.
const KEPT_BUFFERS: usize = 8;

impl Buffers {
    /// A buffer of `len` floats; its contents are unspecified (every caller
    /// writes all of it).
    fn take(&self, len: usize) -> Vec<f32> {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fits = (0..free.len())
            .filter(|&i| free[i].capacity() >= len)
            .min_by_key(|&i| free[i].capacity());
        let pick = fits.or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
        let mut buf = pick.map(|i| free.swap_remove(i)).unwrap_or_default();
        drop(free);
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0.0);
        }
        buf
    }

    fn give(&self, map: Map) {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEPT_BUFFERS {
            free.push(map.data);
        }
    }
}

thread_local! {
    static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An activation map in NHWC order.
struct Map {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    data: Vec<f32>,
}

/// One convolution with its bias, weights packed as a `[kh·kw·cin, cout]`
/// row-major matrix (the im2col row order is `ky, kx, cin`).
struct Conv {
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: [usize; 2],
    /// top, left, bottom, right
    pad: [usize; 4],
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// Index of the BatchNorm after this convolution in [`batchnorms`]
    /// order, for a network that is not folded.
    bn: Option<usize>,
}

/// A BatchNorm layer read back from its module for one forward pass.
struct BnHost {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    epsilon: f32,
    momentum: f32,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

impl BnHost {
    fn read(bn: &BatchNorm) -> Option<Self> {
        Some(Self {
            gamma: floats(bn.gamma.val())?,
            beta: floats(bn.beta.val())?,
            epsilon: bn.epsilon as f32,
            momentum: bn.momentum as f32,
            running_mean: floats(bn.running_mean.value_sync())?,
            running_var: floats(bn.running_var.value_sync())?,
        })
    }

    /// `(scale, shift)` with `bn(y) = y·scale + shift` for the given
    /// statistics.
    fn affine(&self, mean: &[f32], var: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let scale: Vec<f32> = self
            .gamma
            .iter()
            .zip(var)
            .map(|(g, v)| g / (v + self.epsilon).sqrt())
            .collect();
        let shift = self
            .beta
            .iter()
            .zip(mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        (scale, shift)
    }
}

/// Every BatchNorm of a network, in the order the fused path numbers them
/// (stem; then per block `bn1`, `bn2`, `bn3`, the shortcut's).
fn batchnorms(net: &ResNet) -> Vec<&BatchNorm> {
    let mut out = vec![&net.bn1];
    for b in net.blocks() {
        out.push(&b.bn1);
        out.push(&b.bn2);
        out.extend(&b.bn3);
        out.extend(b.downsample.as_ref().map(|d| &d.bn));
    }
    out
}

/// How the BatchNorm layers run in one forward pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Norm {
    /// Folded into the convolutions: nothing to do.
    Folded,
    /// Running statistics: a per-channel scale and shift in each tile.
    Running,
    /// Batch statistics (PyTorch's `model.train()`): a reduction over the
    /// whole output before the scale and shift, and the running statistics
    /// updated afterwards.
    Batch,
}

/// One forward pass's state: BatchNorm values, the statistics gathered in
/// batch mode, the buffer pool.
struct Pass<'a> {
    norm: Norm,
    bns: Vec<BnHost>,
    /// Running-statistics `(scale, shift)` per BatchNorm ([`Norm::Running`]).
    affine: Vec<(Vec<f32>, Vec<f32>)>,
    /// Statistics of each layer's batch ([`Norm::Batch`]).
    batch_stats: Mutex<Vec<BatchStats>>,
    buffers: &'a Buffers,
}

/// One BatchNorm layer's statistics over a batch.
struct BatchStats {
    layer: usize,
    mean: Vec<f32>,
    /// Biased (population) variance, what the normalization uses.
    var: Vec<f32>,
    /// Values per channel (N·H·W).
    count: usize,
}

/// `y·scale + shift (+ residual)`, then ReLU, over whole rows of `dst`.
fn scale_shift(
    dst: &mut [f32],
    residual: Option<&[f32]>,
    (scale, shift): (&[f32], &[f32]),
    relu: bool,
) {
    let c = scale.len();
    for (r, row) in dst.chunks_exact_mut(c).enumerate() {
        for ((v, s), b) in row.iter_mut().zip(scale).zip(shift) {
            *v = *v * s + b;
        }
        if let Some(res) = residual {
            for (v, x) in row.iter_mut().zip(&res[r * c..(r + 1) * c]) {
                *v += x;
            }
        }
        if relu {
            clamp_negative(row);
        }
    }
}

fn clamp_negative(v: &mut [f32]) {
    for v in v.iter_mut() {
        if *v < 0.0 {
            *v = 0.0;
        }
    }
}

struct Pool {
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
}

struct FusedBlock {
    conv1: Conv,
    conv2: Conv,
    conv3: Option<Conv>,
    downsample: Option<Conv>,
}

/// The packed, NHWC form of a [`ResNet`] backbone (the part up to the
/// global average pool) for the fused CPU path.
pub struct FusedResNet {
    stem: Conv,
    pool: Pool,
    blocks: Vec<FusedBlock>,
    features: usize,
    folded: bool,
    /// BatchNorm layers of the source network (checked at each call).
    batchnorms: usize,
    buffers: Buffers,
}

impl fmt::Debug for FusedResNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FusedResNet {{ blocks: {}, features: {} }}",
            self.blocks.len(),
            self.features
        )
    }
}

/// Whether `device` is the flex CPU device (the one device the fused path
/// serves).
pub fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

fn floats<const D: usize>(t: Tensor<D>) -> Option<Vec<f32>> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().ok()
}

fn explicit(p: &PaddingConfig2d) -> Option<[usize; 4]> {
    match *p {
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some([top, left, bottom, right]),
        PaddingConfig2d::Valid => Some([0; 4]),
        PaddingConfig2d::Same => None,
    }
}

impl Conv {
    fn from_burn(conv: &Conv2d, bn: Option<usize>) -> Option<Self> {
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
    /// batch statistics need the whole output first, then a second pass.
    fn run(&self, x: &Map, residual: Option<&Map>, relu: bool, pass: &Pass) -> Option<Map> {
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
            Norm::Folded => None,
            _ => Some(self.bn?),
        };
        if bn.is_some_and(|i| i >= pass.bns.len() || pass.bns[i].gamma.len() != cout) {
            return None;
        }
        let k = self.kh * self.kw * self.cin;
        let tile = rows
            .div_ceil(rayon::current_num_threads().max(1))
            .clamp(1, MAX_TILE_ROWS);
        let mut out = pass.buffers.take(rows * cout);
        let pointwise = self.is_pointwise();
        let res_rows = |r0: usize, n: usize| residual.map(|r| &r.data[r0 * cout..(r0 + n) * cout]);
        let partial_sums: Vec<Vec<f64>> = out
            .par_chunks_mut(tile * cout)
            .enumerate()
            .map(|(t, dst)| {
                let r0 = t * tile;
                let n_rows = dst.len() / cout;
                // Without a BatchNorm between them, the shortcut goes in
                // with the bias, before the product accumulates.
                match res_rows(r0, n_rows).filter(|_| bn.is_none()) {
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
                if pointwise {
                    let lhs = &x.data[r0 * k..(r0 + n_rows) * k];
                    gemm_accumulate(n_rows, cout, k, lhs, &self.weight, dst);
                } else {
                    // One im2col buffer per worker thread, kept across
                    // tiles and layers: a fresh allocation per tile costs
                    // more in page faults than the copy itself.
                    COLUMNS.with_borrow_mut(|col| {
                        self.im2col(x, (oh, ow), r0, n_rows, col);
                        gemm_accumulate(n_rows, cout, k, col, &self.weight, dst);
                    });
                }
                match (bn, pass.norm) {
                    (Some(i), Norm::Running) => {
                        let (scale, shift) = &pass.affine[i];
                        scale_shift(dst, res_rows(r0, n_rows), (scale, shift), relu);
                        Vec::new()
                    }
                    (Some(_), _) => {
                        // Per-channel sum and sum of squares of this tile.
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
            })
            .collect();
        if let (Some(i), Norm::Batch) = (bn, pass.norm) {
            let mut sums = vec![0f64; 2 * cout];
            for p in &partial_sums {
                for (s, v) in sums.iter_mut().zip(p) {
                    *s += v;
                }
            }
            let count = rows as f64;
            let mean: Vec<f32> = sums[..cout].iter().map(|s| (s / count) as f32).collect();
            let var: Vec<f32> = sums[..cout]
                .iter()
                .zip(&sums[cout..])
                .map(|(s, q)| (q / count - (s / count).powi(2)).max(0.0) as f32)
                .collect();
            let (scale, shift) = pass.bns[i].affine(&mean, &var);
            out.par_chunks_mut(tile * cout)
                .enumerate()
                .for_each(|(t, dst)| {
                    let rows_here = dst.len() / cout;
                    scale_shift(dst, res_rows(t * tile, rows_here), (&scale, &shift), relu);
                });
            pass.batch_stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(BatchStats {
                    layer: i,
                    mean,
                    var,
                    count: rows,
                });
        }
        Some(Map {
            n: x.n,
            h: oh,
            w: ow,
            c: cout,
            data: out,
        })
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

fn out_size(
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

impl Pool {
    fn from_burn(pool: &MaxPool2d) -> Option<Self> {
        if pool.dilation != [1, 1] || pool.ceil_mode {
            return None;
        }
        Some(Self {
            k: pool.kernel_size,
            stride: pool.stride,
            pad: explicit(&pool.padding)?,
        })
    }

    fn run(&self, x: &Map, buffers: &Buffers) -> Option<Map> {
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

impl FusedBlock {
    fn run(&self, x: Map, pass: &Pass) -> Option<Map> {
        let projected = match &self.downsample {
            Some(ds) => Some(ds.run(&x, None, false, pass)?),
            None => None,
        };
        let mut out = self.conv1.run(&x, None, true, pass)?;
        if self.conv3.is_some() {
            let inner = self.conv2.run(&out, None, true, pass)?;
            pass.buffers.give(std::mem::replace(&mut out, inner));
        }
        let last = self.conv3.as_ref().unwrap_or(&self.conv2);
        let y = last.run(&out, Some(projected.as_ref().unwrap_or(&x)), true, pass);
        pass.buffers.give(out);
        pass.buffers.give(x);
        if let Some(p) = projected {
            pass.buffers.give(p);
        }
        y
    }
}

impl FusedResNet {
    /// Packs a network's convolutions, `None` when it uses a layer shape
    /// this path does not implement (grouped or dilated convolutions,
    /// `Same` padding, a ceil-mode pool). A folded network runs as it is; an
    /// unfolded one applies its BatchNorm layers, read from the network
    /// passed to each forward call, with running or batch statistics.
    pub fn new(net: &ResNet) -> Option<Self> {
        let folded = net.batchnorm_folded;
        let mut next_bn = 0;
        let mut conv = |c: &Conv2d| {
            let bn = (!folded).then_some(next_bn);
            next_bn += 1;
            Conv::from_burn(c, bn)
        };
        let stem = conv(&net.conv1)?;
        let pool = Pool::from_burn(&net.maxpool)?;
        let mut blocks = Vec::new();
        for b in net.blocks() {
            // The same order as `batchnorms`.
            let conv1 = conv(&b.conv1)?;
            let conv2 = conv(&b.conv2)?;
            let conv3 = match &b.conv3 {
                Some(c) => Some(conv(c)?),
                None => None,
            };
            let downsample = match &b.downsample {
                Some(d) => Some(conv(&d.conv)?),
                None => None,
            };
            blocks.push(FusedBlock {
                conv1,
                conv2,
                conv3,
                downsample,
            });
        }
        let features = blocks
            .last()
            .map(|b| b.conv3.as_ref().unwrap_or(&b.conv2).cout)
            .unwrap_or(stem.cout);
        Some(Self {
            stem,
            pool,
            blocks,
            features,
            folded,
            batchnorms: next_bn,
            buffers: Buffers::default(),
        })
    }

    /// Width of the pooled features.
    pub fn num_features(&self) -> usize {
        self.features
    }

    /// Whether the packed network had its BatchNorm folded.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// Pooled features `[N, F]` of NCHW `images` (on the host, `f32`), or
    /// `None` when the shapes do not fit.
    ///
    /// `net` is the network this was packed from: an unfolded network's
    /// BatchNorm layers are read from it, and with
    /// [`BatchNormUse::BatchStatistics`] their running statistics are
    /// updated in it as PyTorch's `model.train()` does. A folded network
    /// ignores `bn`.
    pub fn features_from_nchw(
        &self,
        net: &ResNet,
        images: &[f32],
        dims: [usize; 4],
        bn: BatchNormUse,
    ) -> Option<Vec<f32>> {
        let [n, c, h, w] = dims;
        if images.len() != n * c * h * w || c != self.stem.cin || n == 0 {
            return None;
        }
        let norm = match (self.folded, bn) {
            (true, _) => Norm::Folded,
            (false, BatchNormUse::Module) => Norm::Running,
            (false, BatchNormUse::BatchStatistics) => Norm::Batch,
            (false, BatchNormUse::Folded) => return None,
        };
        let modules = batchnorms(net);
        let bns = match norm {
            Norm::Folded => Vec::new(),
            _ if modules.len() != self.batchnorms => return None,
            _ => modules
                .iter()
                .map(|bn| BnHost::read(bn))
                .collect::<Option<Vec<_>>>()?,
        };
        let affine = match norm {
            Norm::Running => bns
                .iter()
                .map(|b| b.affine(&b.running_mean, &b.running_var))
                .collect(),
            _ => Vec::new(),
        };
        let pass = Pass {
            norm,
            bns,
            affine,
            batch_stats: Mutex::new(Vec::new()),
            buffers: &self.buffers,
        };
        let buffers = &self.buffers;
        let mut data = buffers.take(images.len());
        data.par_chunks_mut(h * w * c)
            .zip(images.par_chunks(c * h * w))
            .for_each(|(dst, src)| {
                for (p, px) in dst.chunks_exact_mut(c).enumerate() {
                    for (ch, v) in px.iter_mut().enumerate() {
                        *v = src[ch * h * w + p];
                    }
                }
            });
        let input = Map { n, h, w, c, data };
        let stem = self.stem.run(&input, None, true, &pass)?;
        buffers.give(input);
        let mut x = self.pool.run(&stem, buffers)?;
        buffers.give(stem);
        for block in &self.blocks {
            x = block.run(x, &pass)?;
        }
        let pixels = x.h * x.w;
        if pixels == 0 {
            return None;
        }
        let mut pooled = vec![0.0f32; n * x.c];
        for (dst, src) in pooled
            .chunks_exact_mut(x.c)
            .zip(x.data.chunks_exact(pixels * x.c))
        {
            for px in src.chunks_exact(x.c) {
                for (d, s) in dst.iter_mut().zip(px) {
                    *d += s;
                }
            }
            for d in dst.iter_mut() {
                *d /= pixels as f32;
            }
        }
        buffers.give(x);
        if norm == Norm::Batch {
            let stats = pass
                .batch_stats
                .into_inner()
                .unwrap_or_else(|e| e.into_inner());
            for st in stats {
                update_running(modules[st.layer], &pass.bns[st.layer], &st);
            }
        }
        Some(pooled)
    }

    /// [`FusedResNet::features_from_nchw`] on a tensor, the result on the
    /// tensor's device; `None` when the tensor cannot be read as `f32` or
    /// its shape does not fit.
    pub fn forward_features(
        &self,
        net: &ResNet,
        images: Tensor<4>,
        bn: BatchNormUse,
    ) -> Option<Tensor<2>> {
        let device = images.device();
        let dims = images.dims();
        let data = floats(images)?;
        let out = self.features_from_nchw(net, &data, dims, bn)?;
        Some(Tensor::from_data(
            TensorData::new(out, [dims[0], self.features]),
            &device,
        ))
    }
}

/// PyTorch's running-statistics update after a batch-statistics pass:
/// momentum-weighted, with the unbiased variance.
fn update_running(bn: &BatchNorm, host: &BnHost, stats: &BatchStats) {
    let (mean, var, count) = (&stats.mean, &stats.var, stats.count);
    let m = host.momentum;
    let unbiased = if count > 1 {
        count as f32 / (count - 1) as f32
    } else {
        1.0
    };
    let c = mean.len();
    let device = bn.gamma.val().device();
    let blend = |old: &[f32], new: &[f32], f: f32| -> Tensor<1> {
        let v: Vec<f32> = old
            .iter()
            .zip(new)
            .map(|(o, n)| o * (1.0 - m) + n * f * m)
            .collect();
        Tensor::from_data(TensorData::new(v, [c]), &device)
    };
    bn.running_mean.update(blend(&host.running_mean, mean, 1.0));
    bn.running_var
        .update(blend(&host.running_var, var, unbiased));
}

/// Reads a parameter back to the host, for tests.
#[cfg(test)]
fn host<const D: usize>(p: &burn::module::Param<Tensor<D>>) -> Vec<f32> {
    floats(p.val()).unwrap_or_default()
}

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::unwrap_used)] // helpers of the tests below
mod tests {
    use super::*;
    use crate::resnet::{BlockKind, PaddingStyle, ResNetConfig, StridePlacement};
    use burn::module::{Module, Param};
    use burn::tensor::Distribution;

    fn randomize_bn(net: ResNet) -> ResNet {
        // Random BatchNorm statistics so that folding changes the weights.
        let device = Device::flex();
        let mut net = net;
        let touch = |bn: &mut burn::nn::BatchNorm| {
            let [c] = bn.gamma.lazy_shape().dims::<1>();
            let r =
                |lo: f64, hi: f64| Tensor::<1>::random([c], Distribution::Uniform(lo, hi), &device);
            bn.gamma = Param::from_tensor(r(0.5, 1.5));
            bn.beta = Param::from_tensor(r(-0.5, 0.5));
            bn.running_mean = burn::module::RunningState::new(r(-0.2, 0.2));
            bn.running_var = burn::module::RunningState::new(r(0.5, 2.0));
        };
        touch(&mut net.bn1);
        for b in net
            .layer1
            .iter_mut()
            .chain(net.layer2.iter_mut())
            .chain(net.layer3.iter_mut())
            .chain(net.layer4.iter_mut())
        {
            touch(&mut b.bn1);
            touch(&mut b.bn2);
            if let Some(bn3) = &mut b.bn3 {
                touch(bn3);
            }
            if let Some(ds) = &mut b.downsample {
                touch(&mut ds.bn);
            }
        }
        net
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn check(cfg: ResNetConfig, dims: [usize; 4]) {
        let device = Device::flex();
        let net = randomize_bn(cfg.init(&device));
        let folded = net.fold_batchnorm();
        let fused = folded.fused().expect("a flex network is fused when folded");
        assert!(fused.is_folded());
        let x = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let want = floats(net.forward_features(x.clone())).unwrap();
        let burn_folded = floats(folded.clone().unfused().forward_features(x.clone())).unwrap();
        let got = floats(
            fused
                .forward_features(&folded, x.clone(), BatchNormUse::Module)
                .unwrap(),
        )
        .unwrap();
        let via_model = floats(folded.forward_features(x.clone())).unwrap();
        assert_eq!(got.len(), dims[0] * fused.num_features());
        assert_eq!(
            got, via_model,
            "the folded model's forward uses the fused path"
        );
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "fused vs unfolded Burn: {e}");
        let e = max_rel_diff(&got, &burn_folded);
        assert!(e < 1e-4, "fused vs folded Burn: {e}");

        // Unfolded, running statistics: the same function.
        let packed = net.clone().with_fused_kernels();
        assert!(!packed.fused().unwrap().is_folded());
        let got = floats(packed.forward_features(x.clone())).unwrap();
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "fused running statistics vs Burn: {e}");

        // Batch statistics: features and the updated running statistics
        // agree with Burn's path on a copy of the network.
        // (Clones share their running statistics: copy through a record.)
        let copy = || cfg.init(&device).load_record(net.clone().into_record());
        let burn_net = copy();
        let fused_net = copy().with_fused_kernels();
        let a = floats(burn_net.forward_features_with(x.clone(), BatchNormUse::BatchStatistics))
            .unwrap();
        let b = floats(fused_net.forward_features_with(x, BatchNormUse::BatchStatistics)).unwrap();
        let e = max_rel_diff(&b, &a);
        assert!(e < 1e-4, "fused batch statistics vs Burn: {e}");
        let before = batchnorms(&net);
        for ((bn_a, bn_b), orig) in batchnorms(&burn_net)
            .into_iter()
            .zip(batchnorms(&fused_net))
            .zip(before)
        {
            let ra = floats(bn_a.running_var.value_sync()).unwrap();
            let rb = floats(bn_b.running_var.value_sync()).unwrap();
            let r0 = floats(orig.running_var.value_sync()).unwrap();
            assert_ne!(ra, r0, "Burn's pass updated the running variance");
            assert!(max_rel_diff(&rb, &ra) < 1e-4, "running variance");
            let ma = floats(bn_a.running_mean.value_sync()).unwrap();
            let mb = floats(bn_b.running_mean.value_sync()).unwrap();
            assert!(max_rel_diff(&mb, &ma) < 1e-4, "running mean");
        }
    }

    #[test]
    fn weights_are_packed_as_im2col_rows() {
        let device = Device::flex();
        let conv = burn::nn::conv::Conv2dConfig::new([2, 3], [3, 3]).init(&device);
        let w = host(&conv.weight);
        let packed = Conv::from_burn(&conv, None).unwrap();
        // weight[co][ci][ky][kx] sits at row (ky·3 + kx)·2 + ci, column co.
        let (co, ci, ky, kx) = (2, 1, 0, 2);
        assert_eq!(
            packed.weight[((ky * 3 + kx) * 2 + ci) * 3 + co],
            w[((co * 2 + ci) * 3 + ky) * 3 + kx]
        );
    }

    #[test]
    fn bottleneck_matches_burn() {
        let cfg = ResNetConfig::new(BlockKind::Bottleneck, [2, 1, 2, 1])
            .with_widths([4, 8, 8, 16])
            .with_stem_width(8);
        check(cfg, [3, 3, 64, 64]);
    }

    #[test]
    fn basic_odd_sizes_and_cntk_layout_match_burn() {
        let cfg = ResNetConfig::new(BlockKind::Basic, [1, 2, 1, 1])
            .with_widths([8, 8, 16, 16])
            .with_stem_width(8);
        check(cfg, [2, 3, 67, 45]);
        let cfg = ResNetConfig::new(BlockKind::Bottleneck, [1, 1, 1, 1])
            .with_widths([4, 8, 8, 8])
            .with_stem_width(4)
            .with_stride_on(StridePlacement::Conv1x1)
            .with_padding(PaddingStyle::BeginHeavy);
        check(cfg, [1, 3, 96, 96]);
    }

    #[test]
    fn mismatched_input_or_network_is_refused() {
        let device = Device::flex();
        let cfg = ResNetConfig::new(BlockKind::Basic, [1, 1, 1, 1])
            .with_widths([4, 4, 4, 4])
            .with_stem_width(4);
        let net = cfg.init(&device).fold_batchnorm();
        let fused = FusedResNet::new(&net).unwrap();
        let bn = BatchNormUse::Module;
        assert!(
            fused
                .features_from_nchw(&net, &[0.0; 10], [1, 3, 2, 2], bn)
                .is_none()
        );
        let wrong_channels = vec![0.0; 4 * 64 * 64];
        assert!(
            fused
                .features_from_nchw(&net, &wrong_channels, [1, 4, 64, 64], bn)
                .is_none()
        );
        // An unfolded pack refuses a network with other BatchNorm layers,
        // and BatchNorm "folded" on a network that is not.
        let unfolded = FusedResNet::new(&cfg.init(&device)).unwrap();
        let other = ResNetConfig::new(BlockKind::Basic, [2, 1, 1, 1])
            .with_widths([4, 4, 4, 4])
            .with_stem_width(4)
            .init(&device);
        let x = vec![0.0; 3 * 64 * 64];
        assert!(
            unfolded
                .features_from_nchw(&other, &x, [1, 3, 64, 64], bn)
                .is_none()
        );
        let same = cfg.init(&device);
        assert!(
            unfolded
                .features_from_nchw(&same, &x, [1, 3, 64, 64], bn)
                .is_some()
        );
        let folded_use = BatchNormUse::Folded;
        assert!(
            unfolded
                .features_from_nchw(&same, &x, [1, 3, 64, 64], folded_use)
                .is_none()
        );
    }
}
