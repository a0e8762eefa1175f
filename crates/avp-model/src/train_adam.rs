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
//! `avp-train`'s optimiser, which compare the two).
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
    // The scalars exactly as Burn's `Adam` computes them (in `f32`).
    let bias_2_sqrt = (1.0 - step.beta_2.powi(step.time)).sqrt();
    let factor = bias_2_sqrt / (1.0 - step.beta_1.powi(step.time));
    let eps = step.epsilon * bias_2_sqrt;
    let (b1, b2) = (step.beta_1, step.beta_2);
    let (f1, f2) = (1.0 - b1, 1.0 - b2);
    let (lr, decay) = (step.lr, step.weight_decay);
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
                        let g = match decay {
                            Some(d) => *p * d + g,
                            None => g,
                        };
                        *m = *m * b1 + g * f1;
                        *v = *v * b2 + g * g * f2;
                        let update = (*m * factor) / (v.sqrt() + eps);
                        *p -= update * lr;
                    }
                },
            )
        });
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let step = AdamStep {
                lr: 1e-3,
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-8,
                weight_decay: Some(0.01),
                time,
            };
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

    #[test]
    fn lengths_that_differ_change_nothing() {
        let step = AdamStep {
            lr: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: None,
            time: 1,
        };
        let mut p = vec![1f32; 4];
        let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 3]);
        assert!(adam_update(&step, &mut p, &[1.0; 4], &mut m, &mut v).is_none());
        assert_eq!(p, vec![1f32; 4]);
        assert_eq!(m, vec![0f32; 4]);
    }
}
