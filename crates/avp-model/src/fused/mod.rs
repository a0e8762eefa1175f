//! A fused CPU path for a frozen ResNet on the flex device.
//!
//! Burn's flex backend runs a convolution as: weights reordered, input
//! transposed NCHW → NHWC, im2col, one matrix product per tile, results
//! scattered back to NCHW, then separate passes for the bias, BatchNorm,
//! ReLU and the residual add, each a trip through memory with an allocation.
//!
//! This module keeps the activations NHWC from the stem to the pool, packs
//! every convolution's weights once (in the panel layout of `gemm`'s
//! micro-kernels, `panels.rs`), and runs each convolution tile by tile
//! (up to 256 output pixels) on the rayon pool: the tile's im2col rows (none
//! for a stride-1 1x1 convolution, whose input rows are the matrix), one
//! single-threaded product over the packed weights writing the output
//! tile, and the epilogue (bias,
//! BatchNorm, the shortcut for the last convolution of a block, ReLU) on
//! the tile while it is still in cache. The
//! stride-1 3x3 convolutions run as Winograd instead, with the same
//! epilogue: F(4x4, 3x3) (36 matrix products over transformed 6x6 patches,
//! a quarter of the multiplications) up to 256x256 channels, F(2x2, 3x3)
//! (16 products over 4x4 patches, 16/36) on the wider layers
//! (`AVP_WINOGRAD=f2` everywhere). Activation buffers are reused across layers and
//! calls.
//!
//! Files: `conv.rs` (one convolution: im2col, product, epilogue),
//! `panels.rs` (weights packed for `gemm`'s kernels, and the products),
//! `winograd.rs` (the stride-1 3x3 convolutions),
//! `norm.rs` (BatchNorm in the tiles), `pool.rs` (the stem's max pool),
//! `buffers.rs` (NHWC maps and the buffer pool); this file runs the blocks.
//!
//! BatchNorm, three ways:
//! - folded into the convolutions ([`BatchNormUse::Folded`]):
//!   conv + bias + shortcut + ReLU is one pass;
//! - running statistics (an unfolded network, [`BatchNormUse::Running`]):
//!   a per-channel scale and shift in the same tile pass;
//! - batch statistics ([`BatchNormUse::Batch`], PyTorch's
//!   `model.train()` on a frozen network): per-tile channel sums while the
//!   tile is in cache, then one scale/shift/shortcut/ReLU pass, and the
//!   modules' running statistics updated as PyTorch does.
//!
//! [`crate::Backbone`] builds the packs (once per device) and chooses
//! this path on the flex device ([`crate::Kernels`]); autodiff, ndarray
//! and the GPU backends run Burn's modules. Results agree
//! with Burn's path and with onnxruntime/PyTorch to float rounding (tests
//! here, in `tests/import.rs` and `tests/real_weights.rs`).

mod buffers;
mod conv;
mod norm;
mod panels;
mod pool;
mod winograd;

use std::fmt;
use std::sync::Mutex;

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::batchnorm::{BatchNormUse, batchnorms, fold_into};
use crate::resnet::ResNet;
use buffers::{Buffers, Map};
use conv::Conv;
use norm::{BatchStats, BnHost, Pass, update_running};
use pool::Pool;

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

pub(super) fn floats<const D: usize>(t: Tensor<D>) -> Option<Vec<f32>> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().ok()
}

pub(crate) fn explicit(p: &PaddingConfig2d) -> Option<[usize; 4]> {
    match *p {
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some([top, left, bottom, right]),
        PaddingConfig2d::Valid => Some([0; 4]),
        PaddingConfig2d::Same => None,
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
    /// `Same` padding, a ceil-mode pool). `folded` says that `net` came from
    /// [`crate::batchnorm::fold_batchnorm`]: it then runs as it is;
    /// otherwise its BatchNorm layers are read, at each call, from the
    /// network passed to [`FusedResNet::features_from_nchw`].
    pub fn new(net: &ResNet, folded: bool) -> Option<Self> {
        Self::pack(net, folded, |c, _, i| {
            Conv::from_burn(c, (!folded).then_some(i))
        })
    }

    /// [`FusedResNet::new`] of [`crate::batchnorm::fold_batchnorm`]`(net)`
    /// (the running statistics at the call), each BatchNorm folded into its
    /// convolution as that one is packed: the same weights, bit for bit,
    /// without a folded copy of the whole network beside the pack (94 MB
    /// of peak RSS for ResNet50). `None` as for [`FusedResNet::new`], and
    /// for a convolution without its BatchNorm.
    pub fn folding(net: &ResNet) -> Option<Self> {
        Self::pack(net, true, |c, bn, _| {
            Conv::from_burn(&fold_into(c, bn?), None)
        })
    }

    /// Packs every convolution of `net` with `conv(convolution, its
    /// BatchNorm, that BatchNorm's index in [`batchnorms`] order)`.
    fn pack(
        net: &ResNet,
        folded: bool,
        mut conv: impl FnMut(&Conv2d, Option<&BatchNorm>, usize) -> Option<Conv>,
    ) -> Option<Self> {
        let mut next_bn = 0;
        let mut conv = |c: &Conv2d, bn: Option<&BatchNorm>| {
            next_bn += 1;
            conv(c, bn, next_bn - 1)
        };
        let stem = conv(&net.conv1, Some(&net.bn1))?;
        let pool = Pool::from_burn(&net.maxpool)?;
        let mut blocks = Vec::new();
        for b in net.blocks() {
            // The same order as `batchnorms`.
            let conv1 = conv(&b.conv1, Some(&b.bn1))?;
            let conv2 = conv(&b.conv2, Some(&b.bn2))?;
            let conv3 = match &b.conv3 {
                Some(c) => Some(conv(c, b.bn3.as_ref())?),
                None => None,
            };
            let downsample = match &b.downsample {
                Some(d) => Some(conv(&d.conv, Some(&d.bn))?),
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
    /// `net` is the network this was packed from: an unfolded pack reads
    /// its BatchNorm layers from it ([`BatchNormUse::Running`] or
    /// [`BatchNormUse::Batch`], which also updates their running statistics
    /// as PyTorch's `model.train()` does). A folded pack takes
    /// [`BatchNormUse::Folded`] only.
    pub fn features_from_nchw(
        &self,
        net: &ResNet,
        images: &[f32],
        dims: [usize; 4],
        bn: BatchNormUse,
    ) -> Option<Vec<f32>> {
        let x = self.run_blocks(net, images, dims, bn, self.blocks.len())?;
        let pooled = global_pool(&x);
        self.buffers.give(x);
        pooled
    }

    /// The NCHW feature map after the stem and the first `blocks` residual
    /// blocks (in [`ResNet::blocks`] order), with its dimensions: the map
    /// entering a later stage, for fine-tuning a network's last stages on
    /// a frozen, fused prefix. Same arguments and `None` cases as
    /// [`FusedResNet::features_from_nchw`].
    pub fn map_from_nchw(
        &self,
        net: &ResNet,
        images: &[f32],
        dims: [usize; 4],
        bn: BatchNormUse,
        blocks: usize,
    ) -> Option<(Vec<f32>, [usize; 4])> {
        let x = self.run_blocks(net, images, dims, bn, blocks)?;
        let out = to_nchw(&x);
        let dims = [x.n, x.c, x.h, x.w];
        self.buffers.give(x);
        Some((out, dims))
    }

    /// The stem and the first `blocks` residual blocks, NHWC.
    fn run_blocks(
        &self,
        net: &ResNet,
        images: &[f32],
        dims: [usize; 4],
        bn: BatchNormUse,
        blocks: usize,
    ) -> Option<Map> {
        let [n, c, h, w] = dims;
        if images.len() != n * c * h * w || c != self.stem.cin || n == 0 {
            return None;
        }
        if self.folded != (bn == BatchNormUse::Folded) {
            return None;
        }
        let modules = batchnorms(net);
        let pass = self.pass(&modules, bn)?;
        let buffers = &self.buffers;
        let input = to_nhwc(images, dims, buffers);
        let stem = self.stem.run(&input, None, true, &pass)?;
        buffers.give(input);
        let mut x = self.pool.run(&stem, buffers)?;
        buffers.give(stem);
        for block in self.blocks.iter().take(blocks) {
            x = block.run(x, &pass)?;
        }
        if bn == BatchNormUse::Batch {
            let stats = pass
                .batch_stats
                .into_inner()
                .unwrap_or_else(|e| e.into_inner());
            for st in stats {
                update_running(modules[st.layer], &pass.bns[st.layer], &st);
            }
        }
        Some(x)
    }

    /// One pass's BatchNorm state: the layers read back (unless folded)
    /// and, for running statistics, each layer's scale and shift.
    fn pass(&self, modules: &[&burn::nn::BatchNorm], bn: BatchNormUse) -> Option<Pass<'_>> {
        let bns = match bn {
            BatchNormUse::Folded => Vec::new(),
            _ if modules.len() != self.batchnorms => return None,
            _ => modules
                .iter()
                .map(|bn| BnHost::read(bn))
                .collect::<Option<Vec<_>>>()?,
        };
        let affine = match bn {
            BatchNormUse::Running => bns
                .iter()
                .map(|b| b.affine(&b.running_mean, &b.running_var))
                .collect(),
            _ => Vec::new(),
        };
        Some(Pass {
            norm: bn,
            bns,
            affine,
            batch_stats: Mutex::new(Vec::<BatchStats>::new()),
            buffers: &self.buffers,
        })
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

    /// [`FusedResNet::map_from_nchw`] on a tensor, the map on the tensor's
    /// device.
    pub fn forward_map(
        &self,
        net: &ResNet,
        images: Tensor<4>,
        bn: BatchNormUse,
        blocks: usize,
    ) -> Option<Tensor<4>> {
        let device = images.device();
        let dims = images.dims();
        let data = floats(images)?;
        let (out, dims) = self.map_from_nchw(net, &data, dims, bn, blocks)?;
        Some(Tensor::from_data(TensorData::new(out, dims), &device))
    }
}

/// NCHW images into an NHWC map from the buffer pool.
fn to_nhwc(images: &[f32], [_, c, h, w]: [usize; 4], buffers: &Buffers) -> Map {
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
    Map {
        n: images.len() / (c * h * w),
        h,
        w,
        c,
        data,
    }
}

/// An NHWC map as NCHW values.
fn to_nchw(x: &Map) -> Vec<f32> {
    let (c, hw) = (x.c, x.h * x.w);
    let mut out = vec![0.0f32; x.n * c * hw];
    out.par_chunks_mut(c * hw)
        .zip(x.data.par_chunks(hw * c))
        .for_each(|(dst, src)| {
            for (p, px) in src.chunks_exact(c).enumerate() {
                for (ch, v) in px.iter().enumerate() {
                    dst[ch * hw + p] = *v;
                }
            }
        });
    out
}

/// The mean over each image's pixels, `[N, C]` row-major.
fn global_pool(x: &Map) -> Option<Vec<f32>> {
    let pixels = x.h * x.w;
    if pixels == 0 {
        return None;
    }
    let mut pooled = vec![0.0f32; x.n * x.c];
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
    Some(pooled)
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
    use crate::backbone::{Backbone, Kernels};
    use crate::batchnorm::fold_batchnorm;
    use crate::resnet::{BlockKind, PaddingStyle, ResNetConfig, StridePlacement};
    use burn::module::{Module, Param};
    use burn::tensor::Device;
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

    fn features(b: &Backbone, x: &Tensor<4>, bn: BatchNormUse) -> Vec<f32> {
        floats(b.features(x.clone(), bn)).unwrap()
    }

    fn check(cfg: ResNetConfig, dims: [usize; 4]) {
        let device = Device::flex();
        let net = randomize_bn(cfg.init(&device));
        let folded = fold_batchnorm(&net);
        let fused = FusedResNet::new(&folded, true).expect("these layers are fused");
        assert!(fused.is_folded());
        let x = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let want = floats(net.forward_features(x.clone())).unwrap();
        let got = floats(
            fused
                .forward_features(&folded, x.clone(), BatchNormUse::Folded)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(got.len(), dims[0] * fused.num_features());
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "fused vs unfolded Burn: {e}");
        // Folded conv by conv while packing: the same weights, bit for bit.
        let folding = FusedResNet::folding(&net).expect("these layers are fused");
        assert!(folding.is_folded());
        let again = folding.forward_features(&net, x.clone(), BatchNormUse::Folded);
        assert_eq!(floats(again.unwrap()).unwrap(), got);
        // Through the backbone, which chooses the fused path on flex.
        let fused_bb = Backbone::in_memory(net.clone(), cfg.clone());
        let burn_bb = Backbone::in_memory(net.clone(), cfg.clone())
            .with_kernels(Kernels::Burn)
            .unwrap();
        assert_eq!(fused_bb.kernels_for(&device, BatchNormUse::Folded), "fused");
        assert_eq!(burn_bb.kernels_for(&device, BatchNormUse::Folded), "burn");
        assert_eq!(features(&fused_bb, &x, BatchNormUse::Folded), got);
        let e = max_rel_diff(&got, &features(&burn_bb, &x, BatchNormUse::Folded));
        assert!(e < 1e-4, "fused vs folded Burn: {e}");

        // Unfolded, running statistics: the same function.
        let got = features(&fused_bb, &x, BatchNormUse::Running);
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "fused running statistics vs Burn: {e}");

        // Batch statistics: features and the updated running statistics
        // agree with Burn's path on a copy of the network.
        // (Clones share their running statistics: copy through a record.)
        let copy = || cfg.init(&device).load_record(net.clone().into_record());
        let burn_bb = Backbone::in_memory(copy(), cfg.clone())
            .with_kernels(Kernels::Burn)
            .unwrap();
        let fused_bb = Backbone::in_memory(copy(), cfg.clone())
            .with_kernels(Kernels::Fused)
            .unwrap();
        let a = features(&burn_bb, &x, BatchNormUse::Batch);
        let b = features(&fused_bb, &x, BatchNormUse::Batch);
        let e = max_rel_diff(&b, &a);
        assert!(e < 1e-4, "fused batch statistics vs Burn: {e}");
        let before = batchnorms(&net);
        for ((bn_a, bn_b), orig) in batchnorms(burn_bb.network())
            .into_iter()
            .zip(batchnorms(fused_bb.network()))
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
        // A folded pass after a batch-statistics pass folds the moved
        // statistics, not the ones it saw first.
        let after = features(&fused_bb, &x, BatchNormUse::Folded);
        let live = features(&fused_bb, &x, BatchNormUse::Running);
        assert!(max_rel_diff(&after, &live) < 1e-4, "stale folded snapshot");
    }

    #[test]
    fn weights_are_packed_as_im2col_rows() {
        let device = Device::flex();
        let conv = burn::nn::conv::Conv2dConfig::new([2, 3], [3, 3])
            .with_stride([2, 2])
            .init(&device);
        let w = host(&conv.weight);
        let packed = Conv::from_burn(&conv, None).unwrap();
        // weight[co][ci][ky][kx] sits at row (ky·3 + kx)·2 + ci, column co.
        let (co, ci, ky, kx) = (2, 1, 0, 2);
        assert_eq!(
            packed.weight.get((ky * 3 + kx) * 2 + ci, co),
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
        let net = fold_batchnorm(&cfg.init(&device));
        let fused = FusedResNet::new(&net, true).unwrap();
        let bn = BatchNormUse::Folded;
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
        // and BatchNorm "folded" on a network that is not; a folded pack
        // refuses any other use.
        assert!(
            fused
                .features_from_nchw(
                    &net,
                    &vec![0.0; 3 * 64 * 64],
                    [1, 3, 64, 64],
                    BatchNormUse::Running
                )
                .is_none()
        );
        let unfolded = FusedResNet::new(&cfg.init(&device), false).unwrap();
        let bn = BatchNormUse::Running;
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
