//! The trained stages' ReLU, and the residual sum with its ReLU, on the
//! flex device, forward and backward, over rayon's threads.
//!
//! Burn's flex `relu`, `add` and their backward run on the calling thread:
//! in a system-wide `perf` profile of a cached `layer4` epoch on 2 cores,
//! they were the largest stretch with the other core idle (about 16 ms of
//! a 300 ms step, at `[32, 512, 7, 7]` per tensor). These are the same
//! operations, element by element (so the same values, bit for bit), split
//! over the threads:
//!
//! - `relu(x) = 0` where `x ≤ 0`, else `x` (a NaN stays a NaN);
//! - `add_relu(a, b) = relu(a + b)`, the end of a residual block;
//! - their backward: the output gradient where the output is not `≤ 0`,
//!   else 0 (Burn's rule, which reads the output), given to each input.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::activation;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::train_conv::{dims4, flex_tensor, values};

/// Values a task: enough to outweigh handing it to another thread.
const CHUNK: usize = 1 << 14;

/// ReLU and the residual sum's ReLU as backend operations (flex, with or
/// without autodiff). Call them through [`relu`] and [`add_relu`].
#[backend_extension(Flex, Autodiff)]
pub trait TrainReluOps: Backend {
    /// `max(x, 0)` element by element (`x ≤ 0` gives 0).
    fn avp_relu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `relu(a + b)`, `a` and `b` of one shape.
    fn avp_add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Whether both tensors live on the flex device in `f32` with one shape.
fn on_flex(a: &Tensor<4>, b: Option<&Tensor<4>>) -> bool {
    crate::is_flex(&a.device().inner())
        && a.dtype() == DType::F32
        && b.is_none_or(|b| b.dtype() == DType::F32 && b.dims() == a.dims())
}

/// `relu(x)`: the operation above on flex `f32` tensors, Burn's `relu`
/// elsewhere.
pub fn relu(x: Tensor<4>) -> Tensor<4> {
    if !on_flex(&x, None) {
        return activation::relu(x);
    }
    Tensor::from_dispatch(<Dispatch as TrainReluOps>::avp_relu(x.into_dispatch()))
}

/// `relu(a + b)`: the operation above on flex `f32` tensors of one shape,
/// Burn's `add` and `relu` elsewhere.
pub fn add_relu(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    if !on_flex(&a, Some(&b)) {
        return activation::relu(a + b);
    }
    Tensor::from_dispatch(<Dispatch as TrainReluOps>::avp_add_relu(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

#[inline(always)]
fn clamp(v: f32) -> f32 {
    if v <= 0.0 { 0.0 } else { v }
}

fn relu_f32(x: &[f32]) -> Vec<f32> {
    x.par_iter()
        .with_min_len(CHUNK)
        .map(|&v| clamp(v))
        .collect()
}

fn add_relu_f32(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.par_iter()
        .with_min_len(CHUNK)
        .zip(b.par_iter().with_min_len(CHUNK))
        .map(|(&a, &b)| clamp(a + b))
        .collect()
}

/// The input gradient from the output `y` and its gradient `g`.
fn backward_f32(y: &[f32], g: &[f32]) -> Vec<f32> {
    y.par_iter()
        .with_min_len(CHUNK)
        .zip(g.par_iter().with_min_len(CHUNK))
        .map(|(&y, &g)| if y <= 0.0 { 0.0 } else { g })
        .collect()
}

impl TrainReluOps for Flex {
    fn avp_relu(x: FlexTensor) -> FlexTensor {
        flex_tensor(relu_f32(&values(&x)), dims4(&x))
    }

    fn avp_add_relu(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        flex_tensor(add_relu_f32(&values(&a), &values(&b)), dims4(&a))
    }
}

/// The backward of both operations: the output kept, its gradient masked
/// and given to every tracked input.
#[derive(Debug)]
struct ReluBackward;

impl<const N: usize> Backward<Flex, N> for ReluBackward {
    /// The output.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let y = ops.state;
        let dims = dims4(&y);
        let gx = flex_tensor(backward_f32(&values(&y), &values(&grad)), dims);
        for node in ops.parents.into_iter().flatten() {
            grads.register::<Flex>(node.id, gx.clone());
        }
    }
}

impl<C: CheckpointStrategy> TrainReluOps for Autodiff<Flex, C> {
    fn avp_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = ReluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let y = <Flex as TrainReluOps>::avp_relu(x.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn avp_add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = ReluBackward
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful();
        let y = <Flex as TrainReluOps>::avp_add_relu(a.into_primitive(), b.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Forward and backward equal Burn's `relu` and `add` bit for bit,
    /// zeros, negative zeros and a NaN included, on the autodiff device.
    #[test]
    fn relu_and_add_relu_equal_burns_forward_and_backward() {
        let device = Device::flex().autodiff();
        let shape = [3, 5, 7, 7];
        let special = |t: Tensor<4>| {
            let mut v = host(t);
            v[0] = 0.0;
            v[1] = -0.0;
            v[2] = f32::NAN;
            v[3] = 1e-30;
            Tensor::<4>::from_data(burn::tensor::TensorData::new(v, shape), &device)
        };
        let a = special(Tensor::random(
            shape,
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
        let b = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
            let (r, s) = if ours {
                (relu(a.clone()), add_relu(a.clone(), b.clone()))
            } else {
                (
                    activation::relu(a.clone()),
                    activation::relu(a.clone() + b.clone()),
                )
            };
            let loss = (r.clone() * w.clone()).sum() + (s.clone() * w.clone() * 2.0).sum();
            let grads = loss.backward();
            let ga = a.grad(&grads).unwrap();
            let gb = b.grad(&grads).unwrap();
            let flat = |t: Tensor<4>| host(t.inner());
            (flat(r), flat(s), host(ga), host(gb))
        };
        let (ours, burn) = (run(true), run(false));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours.0), bits(&burn.0), "relu");
        assert_eq!(bits(&ours.1), bits(&burn.1), "add_relu");
        assert_eq!(bits(&ours.2), bits(&burn.2), "gradient of the first input");
        assert_eq!(bits(&ours.3), bits(&burn.3), "gradient of the second input");
        assert!(ours.0[2].is_nan() && ours.0[0] == 0.0);
    }
}
