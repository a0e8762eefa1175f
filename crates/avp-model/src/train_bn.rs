//! The trained stages' BatchNorm in training mode (batch statistics) on
//! the flex device, forward and backward, as one backend operation each.
//!
//! Burn's `batch_norm_train` and its default backward are built from
//! tensor operations, each a pass over the activation: at `layer4`'s
//! `[32, 512, 7, 7]` a layer's forward and backward took 10–14 ms in a
//! timing probe, and a fine-tuning step of the committed ResNet18's
//! `layer4` runs seven of them. Here the forward reads the input twice
//! (the statistics, then the normalization), the backward reads the input
//! and its gradient twice, a channel at a time, with the sums in `f64`:
//! 3.1 ms for both in the same probe, the running statistics' update
//! included ([`batch_stats`] reads the input twice more for it: an
//! operation returns one tensor).
//!
//! With `M = N·H·W` values per channel, `x̂ = (x − μ)/√(σ² + ε)` (σ² the
//! biased variance of the batch, as PyTorch normalizes) and `y = γ·x̂ + β`:
//!
//! - `∂β = Σ g`, `∂γ = Σ g·x̂` (over the channel's values),
//! - `∂x = γ/√(σ² + ε) · (g − ∂β/M − x̂·∂γ/M)`.
//!
//! The running statistics are updated by the caller
//! ([`crate::batchnorm`]) from [`batch_stats`], as before.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::train_conv::{dims4, flex_tensor, same_values, values};

/// BatchNorm with the batch's statistics as a backend operation (flex,
/// with or without autodiff). Call it through [`batch_norm_train`].
#[backend_extension(Flex, Autodiff)]
pub trait TrainBatchNormOps: Backend {
    /// `γ·(x − μ)/√(σ² + ε) + β` per channel of `x [N, C, H, W]`, with the
    /// mean μ and biased variance σ² of the channel over the batch.
    fn avp_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// `[2, C]`: the mean and the biased variance of each channel of
    /// `x [N, C, H, W]` over the batch, off the autodiff tape.
    fn avp_batch_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The normalized output when `x` lives on the flex device in `f32` (with
/// or without autodiff), else `None`: the caller then runs Burn's
/// `batch_norm_train`.
pub fn batch_norm_train(
    x: &Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> Option<Tensor<4>> {
    let device = x.device();
    let fits = crate::is_flex(&device.clone().inner())
        && x.dtype() == DType::F32
        && gamma.dtype() == DType::F32
        && beta.dtype() == DType::F32
        && gamma.dims()[0] == x.dims()[1]
        && beta.dims()[0] == x.dims()[1];
    if !fits {
        return None;
    }
    Some(Tensor::from_dispatch(
        <Dispatch as TrainBatchNormOps>::avp_batch_norm_train(
            x.clone().into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            epsilon,
        ),
    ))
}

/// Each channel's mean and biased variance over the batch (`[C]` each),
/// off the autodiff tape, when `x` lives on the flex device in `f32`.
pub fn batch_stats(x: &Tensor<4>) -> Option<(Tensor<1>, Tensor<1>)> {
    let device = x.device();
    if !(crate::is_flex(&device.clone().inner()) && x.dtype() == DType::F32) {
        return None;
    }
    let c = x.dims()[1];
    let stats: Tensor<2> = Tensor::from_dispatch(<Dispatch as TrainBatchNormOps>::avp_batch_stats(
        x.clone().into_dispatch(),
    ));
    Some((
        stats.clone().slice([0..1, 0..c]).reshape([c]),
        stats.slice([1..2, 0..c]).reshape([c]),
    ))
}

/// `Σ f(v)` over `xs` in `f64`, in eight running sums (a fixed order,
/// which vectorizes; one running sum is a chain of dependent additions).
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f64>() + rest
}

/// The mean and biased variance of each channel of `x [N, C, H, W]`, in
/// `f64` (two passes: the mean, then the squared deviations from it).
fn channel_stats(x: &[f32], [n, c, h, w]: [usize; 4]) -> (Vec<f64>, Vec<f64>) {
    let hw = h * w;
    let count = (n * hw).max(1) as f64;
    let planes = |ci: usize| (0..n).map(move |ni| &x[(ni * c + ci) * hw..][..hw]);
    (0..c)
        .into_par_iter()
        .map(|ci| {
            crate::simd::widest(
                #[inline(always)]
                || {
                    let sum: f64 = planes(ci).map(|p| sum_f64(p, |v| v as f64)).sum();
                    let mean = sum / count;
                    let dev: f64 = planes(ci)
                        .map(|p| sum_f64(p, |v| (v as f64 - mean) * (v as f64 - mean)))
                        .sum();
                    (mean, dev / count)
                },
            )
        })
        .unzip()
}

/// `y` and, per channel, `μ`, `σ²` and `1/√(σ² + ε)`.
#[allow(unsafe_code)]
fn forward_f32(
    x: &[f32],
    dims: [usize; 4],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let [_, c, h, w] = dims;
    let hw = h * w;
    let (mean, var) = channel_stats(x, dims);
    let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect();
    let write = |y: &mut [std::mem::MaybeUninit<f32>]| {
        y.par_chunks_mut(hw.max(1))
            .zip(x.par_chunks(hw.max(1)))
            .enumerate()
            .for_each(|(plane, (out, src))| {
                let ci = plane % c;
                let scale = gamma[ci] as f64 * inv[ci];
                let shift = beta[ci] as f64 - mean[ci] * scale;
                let (scale, shift) = (scale as f32, shift as f32);
                for (o, &v) in out.iter_mut().zip(src) {
                    o.write(v * scale + shift);
                }
            });
    };
    // SAFETY: `y`'s planes pair with `x`'s (the same length), each element
    // written from its input.
    let y = unsafe { crate::train_conv::written(x.len(), write) };
    (y, mean, var, inv)
}

/// An input, and the mean and variance of each of its channels.
type Stats = (FlexTensor, Vec<f64>, Vec<f64>);

thread_local! {
    /// The statistics of the last forward on this thread, with (a clone
    /// of) its input. Training updates the running statistics right after
    /// the forward, through `avp_batch_stats` on the same input, which
    /// takes them from here instead of computing them again (1% of a
    /// cached `layer4` fine-tuning, in timing probes); the input is
    /// recognised by [`same_values`].
    static LAST_STATS: std::cell::RefCell<Option<Stats>> =
        const { std::cell::RefCell::new(None) };
}

fn remember(x: &FlexTensor, mean: &[f64], var: &[f64]) {
    let _ =
        LAST_STATS.try_with(|l| *l.borrow_mut() = Some((x.clone(), mean.to_vec(), var.to_vec())));
}

/// The statistics [`remember`]ed for this very input, taken.
fn recall(x: &FlexTensor) -> Option<(Vec<f64>, Vec<f64>)> {
    let (kept, mean, var) = LAST_STATS.try_with(|l| l.borrow_mut().take()).ok()??;
    same_values(&kept, x).then_some((mean, var))
}

/// `∂x`, `∂γ` and `∂β` from the output gradient `g`.
#[allow(unsafe_code)]
fn backward_f32(
    x: &[f32],
    g: &[f32],
    dims: [usize; 4],
    gamma: &[f32],
    mean: &[f64],
    inv: &[f64],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let [n, c, h, w] = dims;
    let hw = h * w;
    let count = (n * hw).max(1) as f64;
    // Per channel: Σ g and Σ g·x̂.
    let (dbeta, dgamma): (Vec<f64>, Vec<f64>) = (0..c)
        .into_par_iter()
        .map(|ci| {
            crate::simd::widest(
                #[inline(always)]
                || {
                    // Σ g, and Σ g·x from which Σ g·x̂ = (Σ g·x − μ·Σ g)·inv.
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    for ni in 0..n {
                        let at = (ni * c + ci) * hw;
                        let (gp, xp) = (&g[at..][..hw], &x[at..][..hw]);
                        sg += sum_f64(gp, |v| v as f64);
                        let mut acc = [0f64; 8];
                        let (gc, xc) = (gp.chunks_exact(8), xp.chunks_exact(8));
                        let rest: f64 = gc
                            .remainder()
                            .iter()
                            .zip(xc.remainder())
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        for (gs, xs) in gc.zip(xc) {
                            for ((a, &gv), &xv) in acc.iter_mut().zip(gs).zip(xs) {
                                *a += gv as f64 * xv as f64;
                            }
                        }
                        sgx += acc.iter().sum::<f64>() + rest;
                    }
                    (sg, (sgx - mean[ci] * sg) * inv[ci])
                },
            )
        })
        .unzip();
    let write = |dx: &mut [std::mem::MaybeUninit<f32>]| {
        dx.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(plane, out)| {
                let ci = plane % c;
                let at = plane * hw;
                let k = gamma[ci] as f64 * inv[ci];
                let (mg, mgx) = (dbeta[ci] / count, dgamma[ci] / count);
                // ∂x = k·(g − mg − x̂·mgx), x̂ = (x − μ)·inv: as a·g + b·x + d.
                let a = k as f32;
                let b = (-k * mgx * inv[ci]) as f32;
                let d = (k * (mgx * inv[ci] * mean[ci] - mg)) as f32;
                for ((o, &gv), &xv) in out.iter_mut().zip(&g[at..][..hw]).zip(&x[at..][..hw]) {
                    o.write(a * gv + b * xv + d);
                }
            });
    };
    // SAFETY: each plane of `dx` (`hw` long: `x.len()` is `n·c·hw`) is
    // written whole from the same plane of `g` and `x`.
    let dx = unsafe { crate::train_conv::written(x.len(), write) };
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect::<Vec<f32>>();
    (dx, to_f32(dgamma), to_f32(dbeta))
}

impl TrainBatchNormOps for Flex {
    fn avp_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> FlexTensor {
        let dims = dims4(&x);
        let (y, mean, var, _) =
            forward_f32(&values(&x), dims, &values(&gamma), &values(&beta), epsilon);
        remember(&x, &mean, &var);
        flex_tensor(y, dims)
    }

    fn avp_batch_stats(x: FlexTensor) -> FlexTensor {
        let dims = dims4(&x);
        let (mean, var) = recall(&x).unwrap_or_else(|| channel_stats(&values(&x), dims));
        let stats = mean.into_iter().chain(var).map(|v| v as f32).collect();
        flex_tensor(stats, [2, dims[1]])
    }
}

/// [`TrainBatchNormOps::avp_batch_stats`] has no parent on the tape and
/// so no backward.
#[derive(Debug)]
struct NoBackward;

impl Backward<Flex, 0> for NoBackward {
    type State = ();

    fn backward(self, _: Ops<(), 0>, _: &mut Gradients, _: &mut Checkpointer) {}
}

/// The backward of [`TrainBatchNormOps::avp_batch_norm_train`] on
/// `Autodiff<Flex>`.
#[derive(Debug)]
struct BatchNormBackward;

impl Backward<Flex, 3> for BatchNormBackward {
    /// The input, `γ`, and per channel `μ` and `1/√(σ² + ε)`.
    type State = (FlexTensor, FlexTensor, Vec<f64>, Vec<f64>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, gamma, mean, inv) = ops.state;
        let dims = dims4(&x);
        let (dx, dgamma, dbeta) = backward_f32(
            &values(&x),
            &values(&grad),
            dims,
            &values(&gamma),
            &mean,
            &inv,
        );
        let c = dims[1];
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, flex_tensor(dx, dims));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, flex_tensor(dgamma, [c]));
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, flex_tensor(dbeta, [c]));
        }
    }
}

impl<C: CheckpointStrategy> TrainBatchNormOps for Autodiff<Flex, C> {
    fn avp_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let prep = BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (x, gamma, beta) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let dims = dims4(&x);
                let (y, mean, var, inv) =
                    forward_f32(&values(&x), dims, &values(&gamma), &values(&beta), epsilon);
                remember(&x, &mean, &var);
                prep.finish((x, gamma, mean, inv), flex_tensor(y, dims))
            }
            OpsKind::UnTracked(prep) => prep.finish(
                <Flex as TrainBatchNormOps>::avp_batch_norm_train(x, gamma, beta, epsilon),
            ),
        }
    }

    fn avp_batch_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let stats = <Flex as TrainBatchNormOps>::avp_batch_stats(x.into_primitive());
        NoBackward.prepare::<C>([]).compute_bound().stateless(stats)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::train_conv::assert_close as close;
    use burn::tensor::{Device, Distribution};

    /// The statistics of a forward serve `batch_stats` on that input, and
    /// only on it.
    #[test]
    fn statistics_are_reused_for_the_same_input_only() {
        let device = Device::flex().autodiff();
        let dims = [4, 3, 5, 7];
        let x = Tensor::<4>::random(dims, Distribution::Uniform(-1.0, 3.0), &device);
        let z = Tensor::<4>::random(dims, Distribution::Uniform(5.0, 9.0), &device);
        let (g, b) = (
            Tensor::<1>::ones([3], &device),
            Tensor::<1>::zeros([3], &device),
        );
        let burns = |t: &Tensor<4>| {
            let r = burn::tensor::module::batch_norm_train(t.clone(), g.clone(), b.clone(), 1e-5);
            (r.mean, r.variance)
        };
        // The same input: the forward's statistics, taken.
        let _ = batch_norm_train(&x, g.clone(), b.clone(), 1e-5).unwrap();
        let (mean, var) = batch_stats(&x).unwrap();
        assert!(LAST_STATS.with(|l| l.borrow().is_none()), "not taken");
        let (m2, v2) = burns(&x);
        close(mean, m2, 1e-5, "same input: mean");
        close(var, v2, 1e-5, "same input: variance");
        // Another input of the same shape after the forward: its own.
        let _ = batch_norm_train(&x, g.clone(), b.clone(), 1e-5).unwrap();
        let (mean, var) = batch_stats(&z).unwrap();
        let (m2, v2) = burns(&z);
        close(mean, m2, 1e-5, "another input: mean");
        close(var, v2, 1e-5, "another input: variance");
    }

    /// Forward and the gradients of input, γ and β equal Burn's
    /// `batch_norm_train` on the autodiff flex device, on shapes with one
    /// value a plane, planes that are not a multiple of the lanes, and a
    /// non-zero mean; the statistics equal Burn's too.
    #[test]
    fn batch_norm_and_its_backward_equal_burns() {
        let device = Device::flex().autodiff();
        for (i, dims) in [[4, 3, 5, 7], [8, 16, 1, 1], [2, 5, 7, 7]]
            .into_iter()
            .enumerate()
        {
            let what = format!("case {i} {dims:?}");
            let [_, c, _, _] = dims;
            let x0 = Tensor::<4>::random(dims, Distribution::Uniform(-1.0, 3.0), &device);
            let g0 = Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), &device);
            let b0 = Tensor::<1>::random([c], Distribution::Uniform(-0.5, 0.5), &device);
            let up = Tensor::<4>::random(dims, Distribution::Default, &device);
            let run = |ours: bool| {
                let x = x0.clone().detach().require_grad();
                let gamma = g0.clone().detach().require_grad();
                let beta = b0.clone().detach().require_grad();
                let y = if ours {
                    batch_norm_train(&x, gamma.clone(), beta.clone(), 1e-5).unwrap()
                } else {
                    burn::tensor::module::batch_norm_train(
                        x.clone(),
                        gamma.clone(),
                        beta.clone(),
                        1e-5,
                    )
                    .output
                };
                let grads = y.clone().mul(up.clone()).sum().backward();
                (
                    y.detach(),
                    x.grad(&grads).unwrap(),
                    gamma.grad(&grads).unwrap(),
                    beta.grad(&grads).unwrap(),
                )
            };
            let (y, gx, gg, gb) = run(true);
            let (y2, gx2, gg2, gb2) = run(false);
            close(y, y2.detach(), 1e-5, &format!("{what}: output"));
            close(gx, gx2, 1e-4, &format!("{what}: input gradient"));
            close(gg, gg2, 1e-5, &format!("{what}: γ gradient"));
            close(gb, gb2, 1e-5, &format!("{what}: β gradient"));

            let x = x0.clone().detach().require_grad();
            let (mean, var) = batch_stats(&x).unwrap();
            assert!(
                !mean.is_require_grad() && !var.is_require_grad(),
                "{what}: on the tape"
            );
            let r =
                burn::tensor::module::batch_norm_train(x0.clone(), g0.clone(), b0.clone(), 1e-5);
            close(mean, r.mean, 1e-5, &format!("{what}: mean"));
            close(var, r.variance, 1e-5, &format!("{what}: variance"));
        }
    }
}
