//! One Adam step of a parameter as a single pass over its values.
//!
//! Burn's `Adam` runs a step as about a dozen tensor operations (the two
//! moments' updates, the bias corrections, the square root, the quotient,
//! the learning rate, the subtraction), each a pass over the parameter that
//! allocates its result. Fine-tuning `layer4` of the committed ResNet18
//! steps 13M parameters: 65–75 ms a step in a timing probe on a 2-core
//! Xeon, a sixth of a cached step. [`adam_update`] does the same
//! arithmetic in one pass, in place, in the same order of `f32`
//! operations as Burn's (so the same values bit for bit: see the tests of
//! `avp-train`'s optimiser, which compare the two); [`adam_step`] runs it
//! on flex tensors, in place where flex holds the only reference to a
//! tensor, else into a new buffer (the parameter, which Burn's optimiser
//! hands over while another reference to it is still alive: copying it
//! first cost 2–2.5 ms per 2.4M values).
//!
//! For each value, with `t` the step number (1 for the first):
//!
//! - `g ← g + λ·p` with weight decay `λ` (PyTorch's L2 term),
//! - `m ← β₁·m + (1 − β₁)·g`, `v ← β₂·v + (1 − β₂)·g²`,
//! - `p ← p − lr·(c·m) / (√v + ε·√(1 − β₂ᵗ))` with
//!   `c = √(1 − β₂ᵗ) / (1 − β₁ᵗ)`.
//!
//! The first step starts from `m = v = 0`, where this equals Burn's
//! first step (`0·β + x` is `x` exactly).

#[cfg(feature = "flex")]
use burn::backend::flex::FlexTensor;
#[cfg(feature = "flex")]
use burn::backend::{BackendTensor, DispatchTensorKind};
#[cfg(feature = "flex")]
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// The settings of one Adam step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// The learning rate.
    pub lr: f32,
    /// β₁, the first moment's decay.
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    pub beta_2: f32,
    /// ε, added to the second moment's square root.
    pub epsilon: f32,
    /// The L2 penalty added to the gradient (`None`: no weight decay).
    pub weight_decay: Option<f32>,
    /// The step number, 1 for the first step.
    pub time: i32,
}

/// The per-step constants of [`AdamStep`], as Burn's `Adam` computes them
/// (in `f32`).
#[derive(Clone, Copy)]
struct Scalars {
    b1: f32,
    b2: f32,
    f1: f32,
    f2: f32,
    factor: f32,
    eps: f32,
    lr: f32,
    decay: Option<f32>,
}

impl Scalars {
    /// Never inlined: `β₂^t` comes out of `powi`, and where a caller's
    /// step number is a constant (a test's), the inlined `powi` was folded
    /// at compile time and differed by an ulp from the run-time one; with
    /// `1 − β₂^t` near 0.003 at step 3, that moved every step by about
    /// 2e-5 of itself, and the in-place and new-buffer passes of one build
    /// differed (`into_a_new_buffer_equals_in_place`). One compiled
    /// function gives every caller the same constants.
    #[inline(never)]
    fn new(step: &AdamStep) -> Self {
        let bias_2_sqrt = (1.0 - step.beta_2.powi(step.time)).sqrt();
        Self {
            b1: step.beta_1,
            b2: step.beta_2,
            f1: 1.0 - step.beta_1,
            f2: 1.0 - step.beta_2,
            factor: bias_2_sqrt / (1.0 - step.beta_1.powi(step.time)),
            eps: step.epsilon * bias_2_sqrt,
            lr: step.lr,
            decay: step.weight_decay,
        }
    }

    /// The parameter value after the step from `p`, updating the moments.
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: &mut f32, v: &mut f32) -> f32 {
        let g = match self.decay {
            Some(d) => p * d + g,
            None => g,
        };
        *m = *m * self.b1 + g * self.f1;
        *v = *v * self.b2 + g * g * self.f2;
        let update = (*m * self.factor) / (v.sqrt() + self.eps);
        p - update * self.lr
    }
}

/// Values per parallel task: large enough that a task's overhead is
/// small, small enough that two threads share a 2.4M-value parameter.
const CHUNK: usize = 1 << 15;

/// One Adam step over `param` in place, with its gradient `grad` and its
/// moments `m1` and `m2` (updated in place). `None` (and nothing changed)
/// when the four slices' lengths differ.
pub fn adam_update(
    step: &AdamStep,
    param: &mut [f32],
    grad: &[f32],
    m1: &mut [f32],
    m2: &mut [f32],
) -> Option<()> {
    let n = param.len();
    if grad.len() != n || m1.len() != n || m2.len() != n {
        return None;
    }
    let k = Scalars::new(step);
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m1.par_chunks_mut(CHUNK))
        .zip(m2.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            crate::simd::widest(
                #[inline(always)]
                || {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v) {
                        *p = k.apply(*p, g, m, v);
                    }
                },
            )
        });
    Some(())
}

/// [`adam_update`] reading the parameter from `param` and writing the
/// stepped values to `out` (every one of them), the moments in place.
/// `None` (and nothing written) when the lengths differ.
#[cfg(feature = "flex")]
fn adam_update_into(
    step: &AdamStep,
    param: &[f32],
    out: &mut [std::mem::MaybeUninit<f32>],
    grad: &[f32],
    m1: &mut [f32],
    m2: &mut [f32],
) -> Option<()> {
    let n = param.len();
    if out.len() != n || grad.len() != n || m1.len() != n || m2.len() != n {
        return None;
    }
    let k = Scalars::new(step);
    out.par_chunks_mut(CHUNK)
        .zip(param.par_chunks(CHUNK))
        .zip(grad.par_chunks(CHUNK))
        .zip(m1.par_chunks_mut(CHUNK))
        .zip(m2.par_chunks_mut(CHUNK))
        .for_each(|((((o, p), g), m), v)| {
            crate::simd::widest(
                #[inline(always)]
                || {
                    let values = o.iter_mut().zip(p).zip(g).zip(m.iter_mut()).zip(v);
                    for ((((o, &p), &g), m), v) in values {
                        o.write(k.apply(p, g, m, v));
                    }
                },
            )
        });
    Some(())
}

/// The stepped parameter as a new vector, from a parameter someone else
/// still holds.
#[cfg(feature = "flex")]
fn stepped_copy(
    step: &AdamStep,
    param: &[f32],
    grad: &[f32],
    m1: &mut [f32],
    m2: &mut [f32],
) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(param.len());
    adam_update_into(
        step,
        param,
        &mut out.spare_capacity_mut()[..param.len()],
        grad,
        m1,
        m2,
    )?;
    #[allow(unsafe_code)]
    // SAFETY: `adam_update_into` returned `Some`, so it wrote every one of
    // the first `param.len()` slots (its output has that length, and its
    // loop writes each output value once).
    unsafe {
        out.set_len(param.len());
    }
    Some(out)
}

/// One Adam step of the flex tensors `[param, grad, m1, m2]` (one shape,
/// `f32`): the stepped parameter and the two new moments. The tensors back,
/// untouched, when they are not all flex `f32` tensors of one shape.
#[cfg(feature = "flex")]
pub fn adam_step<const D: usize>(
    step: &AdamStep,
    tensors: [Tensor<D>; 4],
) -> Result<[Tensor<D>; 3], Box<[Tensor<D>; 4]>> {
    let flex = |t: &Tensor<D>| match t.clone().into_dispatch().kind {
        DispatchTensorKind::Flex(BackendTensor::Float(f)) if f.dtype() == DType::F32 => Some(f),
        _ => None,
    };
    let shape = tensors[0].shape();
    let found: Option<Vec<FlexTensor>> = tensors.iter().map(flex).collect();
    let Some([p, g, m, v]) = found
        .filter(|f| f.iter().all(|t| t.layout().shape() == &shape))
        .and_then(|f| <[FlexTensor; 4]>::try_from(f).ok())
    else {
        return Err(Box::new(tensors));
    };
    let device = tensors[0].device();
    // Now each flex tensor holds the references the caller handed over.
    drop(tensors);
    let (mut m, mut v) = (m.into_data(), v.into_data());
    let g = crate::train_conv::values(&g);
    let (Ok(m_s), Ok(v_s)) = (m.as_mut_slice::<f32>(), v.as_mut_slice::<f32>()) else {
        unreachable!("flex f32 tensors give f32 data")
    };
    let p = if p.is_unique() {
        let mut p = p.into_data();
        let done = p
            .as_mut_slice::<f32>()
            .ok()
            .and_then(|p_s| adam_update(step, p_s, &g, m_s, v_s));
        done.map(|()| p)
    } else {
        stepped_copy(step, &crate::train_conv::values(&p), &g, m_s, v_s)
            .map(|p| TensorData::new(p, shape.clone()))
    };
    let Some(p) = p else {
        unreachable!("the four tensors have one shape, checked above")
    };
    let tensor = |data: TensorData| Tensor::from_data(data, &device);
    Ok([tensor(p), tensor(m), tensor(v)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Step `time` of the lesson's Adam (lr 1e-3, PyTorch's betas and ε).
    fn lesson_step(time: i32, weight_decay: Option<f32>) -> AdamStep {
        AdamStep {
            lr: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay,
            time,
        }
    }

    /// Against the formula written out in `f64`: the in-place pass is
    /// Adam (the bit-for-bit comparison with Burn's `Adam` is in
    /// `avp-train`, where the optimiser is).
    #[test]
    fn two_steps_follow_the_formula() {
        let n = 3 * CHUNK + 17;
        let mut p: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 104729) % 997) as f32 / 998.0 - 0.4999)
            .collect();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let start = p.clone();
        let mut expected: Vec<(f64, f64, f64)> = p.iter().map(|&x| (x as f64, 0.0, 0.0)).collect();
        for time in 1..=2 {
            let step = lesson_step(time, Some(0.01));
            adam_update(&step, &mut p, &g, &mut m, &mut v).unwrap();
            for ((pe, me, ve), &gi) in expected.iter_mut().zip(&g) {
                let gi = gi as f64 + 0.01 * *pe;
                *me = 0.9 * *me + 0.1 * gi;
                *ve = 0.999 * *ve + 0.001 * gi * gi;
                let t = time as f64;
                let mhat = *me / (1.0 - 0.9f64.powf(t));
                let vhat = *ve / (1.0 - 0.999f64.powf(t));
                *pe -= 1e-3 * mhat / (vhat.sqrt() + 1e-8);
            }
        }
        let worst = p
            .iter()
            .zip(&expected)
            .map(|(&a, &(e, _, _))| (a as f64 - e).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "worst difference {worst}");
        // Two steps of lr 1e-3 move every value by about 2e-3.
        assert!(p.iter().zip(&start).all(|(a, s)| (a - s).abs() > 1e-3));
    }

    /// The step into a new buffer (a parameter someone else holds) writes
    /// the values the in-place step gives, bit for bit, and the same
    /// moments.
    #[cfg(feature = "flex")]
    #[test]
    fn into_a_new_buffer_equals_in_place() {
        let n = 2 * CHUNK + 5;
        let p: Vec<f32> = (0..n)
            .map(|i| ((i * 31) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 17) % 89) as f32 / 44.0 - 0.9)
            .collect();
        let step = lesson_step(3, Some(0.01));
        let moments = || {
            (
                (0..n).map(|i| i as f32 * 1e-6).collect::<Vec<f32>>(),
                vec![1e-4f32; n],
            )
        };
        let (mut m_a, mut v_a) = moments();
        let mut in_place = p.clone();
        adam_update(&step, &mut in_place, &g, &mut m_a, &mut v_a).unwrap();
        let (mut m_b, mut v_b) = moments();
        let out = stepped_copy(&step, &p, &g, &mut m_b, &mut v_b).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&in_place));
        assert_eq!(bits(&m_b), bits(&m_a));
        assert_eq!(bits(&v_b), bits(&v_a));
        assert!(out.iter().zip(&p).filter(|(a, b)| a != b).count() > n / 2);
        // Lengths that differ: nothing written, no vector.
        assert!(stepped_copy(&step, &p, &g[1..], &mut m_b, &mut v_b).is_none());
        assert_eq!(bits(&m_b), bits(&m_a));
    }

    #[test]
    fn lengths_that_differ_change_nothing() {
        let step = lesson_step(1, None);
        let mut p = vec![1f32; 4];
        let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 3]);
        assert!(adam_update(&step, &mut p, &[1.0; 4], &mut m, &mut v).is_none());
        assert_eq!(p, vec![1f32; 4]);
        assert_eq!(m, vec![0f32; 4]);
    }
}
