//! BatchNorm inside the fused tiles: layers read back from their modules,
//! the per-channel scale and shift, batch statistics and PyTorch's
//! running-statistics update.

use std::sync::Mutex;

use burn::nn::BatchNorm;
use burn::tensor::{Tensor, TensorData};

use super::buffers::Buffers;
use super::floats;
use crate::batchnorm::BatchNormUse;

/// A BatchNorm layer read back from its module for one forward pass.
pub(super) struct BnHost {
    pub(super) gamma: Vec<f32>,
    pub(super) beta: Vec<f32>,
    pub(super) epsilon: f32,
    pub(super) momentum: f32,
    pub(super) running_mean: Vec<f32>,
    pub(super) running_var: Vec<f32>,
}

impl BnHost {
    pub(super) fn read(bn: &BatchNorm) -> Option<Self> {
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
    pub(super) fn affine(&self, mean: &[f32], var: &[f32]) -> (Vec<f32>, Vec<f32>) {
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

/// One forward pass's state: BatchNorm values, the statistics gathered in
/// batch mode, the buffer pool.
pub(super) struct Pass<'a> {
    pub(super) norm: BatchNormUse,
    pub(super) bns: Vec<BnHost>,
    /// Running-statistics `(scale, shift)` per BatchNorm ([`BatchNormUse::Running`]).
    pub(super) affine: Vec<(Vec<f32>, Vec<f32>)>,
    /// Statistics of each layer's batch ([`BatchNormUse::Batch`]).
    pub(super) batch_stats: Mutex<Vec<BatchStats>>,
    pub(super) buffers: &'a Buffers,
}

/// One BatchNorm layer's statistics over a batch.
pub(super) struct BatchStats {
    pub(super) layer: usize,
    pub(super) mean: Vec<f32>,
    /// Biased (population) variance, what the normalization uses.
    pub(super) var: Vec<f32>,
    /// Values per channel (N·H·W).
    pub(super) count: usize,
}

/// `y·scale + shift (+ residual)`, then ReLU, over whole rows of `dst`.
#[inline(always)]
pub(super) fn scale_shift(
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
        residual_relu(row, residual.map(|res| &res[r * c..(r + 1) * c]), relu);
    }
}

/// `(y + bias)·scale + shift (+ residual)`, then ReLU, over whole rows of
/// `dst`: a convolution's bias and its running-statistics BatchNorm in one
/// pass.
#[inline(always)]
pub(super) fn bias_scale_shift(
    dst: &mut [f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    (scale, shift): (&[f32], &[f32]),
    relu: bool,
) {
    let c = scale.len();
    for (r, row) in dst.chunks_exact_mut(c).enumerate() {
        for (((v, b), s), t) in row.iter_mut().zip(bias).zip(scale).zip(shift) {
            *v = (*v + b) * s + t;
        }
        residual_relu(row, residual.map(|res| &res[r * c..(r + 1) * c]), relu);
    }
}

/// `y + bias (+ residual)`, then ReLU, over whole rows of `dst` (a folded
/// convolution's epilogue).
#[inline(always)]
pub(super) fn bias_residual_relu(
    dst: &mut [f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) {
    let c = bias.len();
    for (r, row) in dst.chunks_exact_mut(c).enumerate() {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
        residual_relu(row, residual.map(|res| &res[r * c..(r + 1) * c]), relu);
    }
}

/// The end of every epilogue, on one row: the shortcut added, then ReLU.
#[inline(always)]
fn residual_relu(row: &mut [f32], residual: Option<&[f32]>, relu: bool) {
    if let Some(res) = residual {
        for (v, x) in row.iter_mut().zip(res) {
            *v += x;
        }
    }
    if relu {
        clamp_negative(row);
    }
}

/// ReLU in place; NaN stays NaN, as in PyTorch. A select, not a
/// conditional store: `if *v < 0.0 { *v = 0.0 }` compiled to one branch
/// and one scalar store per element (a quarter of ResNet50's inference
/// time at batch 8, in a `perf` profile: the branch mispredicts on half
/// the values).
#[inline(always)]
pub(super) fn clamp_negative(v: &mut [f32]) {
    for v in v.iter_mut() {
        *v = if *v < 0.0 { 0.0 } else { *v };
    }
}

/// PyTorch's running-statistics update after a batch-statistics pass:
/// momentum-weighted, with the unbiased variance.
pub(super) fn update_running(bn: &BatchNorm, host: &BnHost, stats: &BatchStats) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_zeroes_negatives_and_keeps_nan() {
        let mut v = vec![
            -1.5,
            0.0,
            2.0,
            f32::NAN,
            -1e-30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        clamp_negative(&mut v);
        assert_eq!(&v[..3], &[0.0, 0.0, 2.0]);
        assert!(v[3].is_nan(), "NaN must propagate, as in PyTorch's ReLU");
        assert_eq!(&v[4..], &[0.0, f32::INFINITY, 0.0]);
    }
}
