//! Fine-tuning and the optimiser: which backbone stages train, and the
//! optimiser, learning rates and step schedule of a run, built from Burn's
//! optimisers and schedulers with PyTorch's semantics.
//!
//! - Adam has PyTorch's epsilon (1e-8; Burn's default is 1e-5) and
//!   `weight_decay` as PyTorch's Adam applies it (an L2 term added to the
//!   gradient). On flex each parameter's step is one in-place pass
//!   ([`OnePassAdam`]), the same values as Burn's `Adam` bit for bit.
//! - SGD's momentum has PyTorch's dampening, 0 (Burn's default is 0.1).
//! - The step schedule is PyTorch's `StepLR(step_size=E, gamma=G)` stepped
//!   once per epoch: Burn's scheduler steps once per batch, so it is given
//!   `E × batches per epoch`.
//! - The fine-tuned stages (`trained_stages` in the module tree) have their
//!   own learning rate, `backbone_lr`, through a Burn parameter group; the
//!   head keeps `lr`.

use avp_model::Stage;
use avp_model::train_adam::{AdamStep, adam_step};
use burn::config::Config;
use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::{ModuleLrScheduler, ModuleLrSchedulerConfig};
use burn::lr_scheduler::step::StepLrSchedulerConfig;
use burn::module::ParamGroup;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;

use burn::optim::{
    Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
    SgdConfig,
};
use burn::tensor::{DType, Device, Tensor};

use crate::error::TrainError;
use crate::train::TrainConfig;

/// The backbone learning rate when `--finetune` is given without
/// `--backbone-lr`.
pub const DEFAULT_BACKBONE_LR: f64 = 1e-4;

/// The name of the fine-tuned stages in the classifier's module tree (the
/// parameter group of `backbone_lr`).
const STAGES_FIELD: &str = "trained_stages";

/// The optimiser of a run.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum OptimizerKind {
    /// Adam (betas 0.9 and 0.999, epsilon 1e-8), the lesson's.
    Adam,
    /// Stochastic gradient descent, with `momentum` when above 0.
    Sgd,
}

/// The stages a `--finetune` value names: a comma-separated list of
/// `stem`, `layer1` … `layer4`, or `all`. Fine-tuning trains the *last*
/// stages, so the list must run to `layer4` without a gap; any order and
/// repeats are accepted.
pub fn parse_stages(list: &str) -> Result<Vec<Stage>, TrainError> {
    if list.trim().eq_ignore_ascii_case("all") {
        return Ok(Stage::ALL.to_vec());
    }
    let mut stages = Vec::new();
    for name in list.split(',').filter(|s| !s.trim().is_empty()) {
        let stage: Stage = name.parse().map_err(|e: avp_model::ModelError| {
            TrainError::Config(format!("--finetune: {e}, or all"))
        })?;
        stages.push(stage);
    }
    stages.sort();
    stages.dedup();
    check_stages(&stages)?;
    Ok(stages)
}

/// Refuses a stage list that is not the last stages of the backbone.
pub fn check_stages(stages: &[Stage]) -> Result<(), TrainError> {
    let Some(&first) = stages.first() else {
        return Err(TrainError::Config(
            "--finetune needs at least one stage: stem, layer1 … layer4, or all".into(),
        ));
    };
    let run: Vec<Stage> = Stage::ALL.into_iter().filter(|s| *s >= first).collect();
    if stages != run.as_slice() {
        let names = |s: &[Stage]| s.iter().map(|s| s.name()).collect::<Vec<_>>().join(",");
        return Err(TrainError::Config(format!(
            "--finetune {}: fine-tuning trains the last stages of the backbone, up to layer4 without a gap \
             (a frozen stage after a trained one would still need gradients through it); \
             to train from {first} on, pass --finetune {}",
            names(stages),
            names(&run)
        )));
    }
    Ok(())
}

/// The optimiser `config` asks for (see the module documentation).
pub fn optimizer(config: &TrainConfig) -> ModuleOptimizer {
    let decay =
        (config.weight_decay > 0.0).then(|| WeightDecayConfig::new(config.weight_decay as f32));
    match config.optimizer {
        OptimizerKind::Adam => OnePassAdam::new(decay.map(|d| d.penalty)).into(),
        OptimizerKind::Sgd => SgdConfig::new()
            .with_weight_decay(decay)
            .with_momentum((config.momentum > 0.0).then(|| {
                MomentumConfig::new()
                    .with_momentum(config.momentum)
                    .with_dampening(0.0)
                    .with_nesterov(false)
            }))
            .init(),
    }
}

/// Adam's β₁ and β₂ (PyTorch's and Burn's defaults) and PyTorch's ε.
const ADAM_BETAS: (f32, f32) = (0.9, 0.999);
const ADAM_EPSILON: f32 = 1e-8;

/// Burn's `Adam` (PyTorch's ε, L2 weight decay), with each parameter's step
/// on the flex device as one in-place pass
/// ([`avp_model::train_adam::adam_update`]) instead of Burn's dozen tensor
/// operations: the same `f32` arithmetic in the same order, so the same
/// values (a test compares the two bit for bit), and Burn's `AdamState`,
/// so checkpoints are Burn's `Adam`'s. Other devices and dtypes run
/// Burn's `Adam` itself, as every device does with `AVP_ADAM=burn`.
#[derive(Clone)]
pub struct OnePassAdam {
    burn: Adam,
    weight_decay: Option<f32>,
}

impl OnePassAdam {
    /// Adam with the L2 penalty `weight_decay` (`None`: none).
    pub fn new(weight_decay: Option<f32>) -> Self {
        let burn = AdamConfig::new()
            .with_beta_1(ADAM_BETAS.0)
            .with_beta_2(ADAM_BETAS.1)
            .with_epsilon(ADAM_EPSILON)
            .with_weight_decay(weight_decay.map(WeightDecayConfig::new))
            .build();
        Self { burn, weight_decay }
    }
}

impl Optimizer for OnePassAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamState<D>>,
    ) -> (Tensor<D>, Option<AdamState<D>>) {
        // The one-pass step takes f32 values of one shape on flex, and no
        // AMSGrad state; anything else is Burn's `Adam`'s.
        let f32s = |t: &Tensor<D>| t.dtype() == DType::F32 && t.dims() == tensor.dims();
        let fits = avp_model::is_flex(&tensor.device())
            && f32s(&tensor)
            && f32s(&grad)
            && state.as_ref().is_none_or(|s| {
                f32s(&s.momentum.moment_1)
                    && f32s(&s.momentum.moment_2)
                    && s.momentum.max_moment_2.is_none()
            });
        if !fits || burn_adam_requested() {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (time, m1, m2) = match state {
            Some(s) => (
                s.momentum.time + 1,
                s.momentum.moment_1,
                s.momentum.moment_2,
            ),
            None => {
                let zeros = || Tensor::zeros(tensor.shape(), &tensor.device());
                (1, zeros(), zeros())
            }
        };
        let step = AdamStep {
            lr: lr as f32,
            beta_1: ADAM_BETAS.0,
            beta_2: ADAM_BETAS.1,
            epsilon: ADAM_EPSILON,
            weight_decay: self.weight_decay,
            time: i32::try_from(time).unwrap_or(i32::MAX),
        };
        match adam_step(&step, [tensor, grad, m1, m2]) {
            Ok([tensor, m1, m2]) => {
                let state = AdamState::new(AdaptiveMomentumState::new(time, m1, m2));
                (tensor, Some(state))
            }
            // Not reached after the checks above: Burn's `Adam` takes the
            // step from the same values.
            Err(back) => {
                let [tensor, grad, m1, m2] = *back;
                let state = (time > 1)
                    .then(|| AdamState::new(AdaptiveMomentumState::new(time - 1, m1, m2)));
                self.burn.step(lr, tensor, grad, state)
            }
        }
    }

    fn to_device<const D: usize>(state: AdamState<D>, device: &Device) -> AdamState<D> {
        <Adam as Optimizer>::to_device(state, device)
    }
}

/// `AVP_ADAM=burn` (read once) keeps Burn's `Adam` on the flex device too,
/// for measuring one against the other.
fn burn_adam_requested() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| std::env::var("AVP_ADAM").is_ok_and(|v| v == "burn"))
}

/// The learning rates of a run with `batches` optimiser steps per epoch:
/// `lr` for the head, `backbone_lr` for the fine-tuned stages, each
/// constant or on the epoch-wise step schedule.
pub fn schedule(config: &TrainConfig, batches: usize) -> Result<ModuleLrScheduler, TrainError> {
    let one = |lr: f64| -> LrSchedulerConfig {
        match config.lr_step {
            Some(epochs) => StepLrSchedulerConfig::new(lr, epochs.saturating_mul(batches.max(1)))
                .with_gamma(config.lr_gamma)
                .into(),
            None => LrSchedulerConfig::Constant(lr),
        }
    };
    let mut policy = ModuleLrSchedulerConfig::new(one(config.lr));
    if !config.finetune.is_empty() {
        let lr = config.backbone_lr.unwrap_or(DEFAULT_BACKBONE_LR);
        policy = policy.with_group(ParamGroup::from_predicate(STAGES_FIELD), one(lr));
    }
    policy
        .init()
        .map_err(|e| TrainError::Config(format!("learning-rate schedule: {e}")))
}

/// What a run trains and how, in one line, e.g. `the head (lr 0.001) and
/// layer4 (lr 0.0001), Adam` or `the head on a frozen backbone, SGD
/// (momentum 0.9), lr 0.001, x0.1 every 7 epochs`.
pub fn describe(config: &TrainConfig) -> String {
    let optimizer = match config.optimizer {
        OptimizerKind::Adam => "Adam".to_string(),
        OptimizerKind::Sgd if config.momentum > 0.0 => {
            format!("SGD (momentum {})", config.momentum)
        }
        OptimizerKind::Sgd => "SGD".to_string(),
    };
    let mut s = if config.finetune.is_empty() {
        format!(
            "the head on a frozen backbone, {optimizer}, lr {}",
            config.lr
        )
    } else {
        let stages: Vec<&str> = config.finetune.iter().map(|s| s.name()).collect();
        format!(
            "the head (lr {}) and {} (lr {}), {optimizer}",
            config.lr,
            stages.join(", "),
            config.backbone_lr.unwrap_or(DEFAULT_BACKBONE_LR)
        )
    };
    if config.weight_decay > 0.0 {
        s.push_str(&format!(", weight decay {}", config.weight_decay));
    }
    if let Some(e) = config.lr_step {
        s.push_str(&format!(", x{} every {e} epochs", config.lr_gamma));
    }
    s
}

/// The optimiser settings of `config` that are not the lesson's, checked
/// before any work (see [`TrainConfig::validate`]).
pub(crate) fn validate(config: &TrainConfig) -> Result<(), TrainError> {
    let bad = |why: String| Err(TrainError::Config(why));
    if !config.finetune.is_empty() {
        check_stages(&config.finetune)?;
        if config.bn_mode == crate::classifier::BnMode::Lesson {
            return bad(
                "--bn-mode lesson puts a frozen backbone's BatchNorm layers in batch mode; with --finetune the \
                 trained stages already train theirs (batch statistics while training, running statistics in \
                 validation, as PyTorch's model.train()/model.eval() do) and the frozen stages keep their \
                 running statistics: drop --bn-mode lesson"
                    .into(),
            );
        }
    }
    if let Some(lr) = config.backbone_lr {
        if config.finetune.is_empty() {
            return bad(
                "--backbone-lr sets the learning rate of fine-tuned backbone stages, and none are: add \
                 --finetune layer4 (or other stages), or drop --backbone-lr"
                    .into(),
            );
        }
        if !lr.is_finite() || lr <= 0.0 {
            return bad(format!(
                "--backbone-lr {lr} is not a usable learning rate: pass a finite number above 0 (default {DEFAULT_BACKBONE_LR})"
            ));
        }
    }
    if !config.weight_decay.is_finite() || config.weight_decay < 0.0 {
        return bad(format!(
            "--weight-decay {} must be a finite number of at least 0",
            config.weight_decay
        ));
    }
    if !config.momentum.is_finite() || !(0.0..1.0).contains(&config.momentum) {
        return bad(format!(
            "--momentum {} must be in [0, 1) (PyTorch's tutorial uses 0.9)",
            config.momentum
        ));
    }
    if config.momentum > 0.0 && config.optimizer == OptimizerKind::Adam {
        return bad(format!(
            "--momentum {} is SGD's: Adam keeps its own moments; add --optimizer sgd, or drop --momentum",
            config.momentum
        ));
    }
    if config.lr_step == Some(0) {
        return bad("--lr-step is a number of epochs and must be at least 1".into());
    }
    if !config.lr_gamma.is_finite() || config.lr_gamma <= 0.0 || config.lr_gamma > 1.0 {
        return bad(format!(
            "--lr-gamma {} must be in (0, 1]: the factor the learning rate is multiplied by every --lr-step epochs",
            config.lr_gamma
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn values<const D: usize>(t: &Tensor<D>) -> Vec<u32> {
        let data = t.to_data();
        data.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// How many values of `a` and `b` differ in any bit.
    fn differing<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> usize {
        let (a, b) = (values(a), values(b));
        a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
    }

    /// Three steps of [`OnePassAdam`] and of Burn's `Adam` from the same
    /// start give the same parameters and moments, bit for bit, with and
    /// without weight decay, on every CPU device compiled in (the one-pass
    /// step on flex, Burn's elsewhere); a tensor shared with the caller is
    /// not changed under it.
    #[test]
    fn one_pass_adam_is_burns_adam_bit_for_bit() {
        for name in ["flex", "ndarray"] {
            let Ok(device) = avp_model::parse_device(name) else {
                continue;
            };
            let wave = |seed: usize, n: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) / 997.0)
                    .collect()
            };
            // Two of the one-pass step's parallel chunks and a remainder.
            let shape = [3, 25_000];
            let n = shape[0] * shape[1];
            let start = || Tensor::<2>::from_data(TensorData::new(wave(0, n), shape), &device);
            for decay in [None, Some(0.05f32)] {
                let ours = OnePassAdam::new(decay);
                let burn = AdamConfig::new()
                    .with_epsilon(1e-8)
                    .with_weight_decay(decay.map(WeightDecayConfig::new))
                    .build();
                let (mut p_ours, mut p_burn) = (start(), start());
                let (mut s_ours, mut s_burn) = (None, None);
                for step in 1..=3 {
                    let grad =
                        Tensor::<2>::from_data(TensorData::new(wave(step, n), shape), &device);
                    // Odd steps: the caller still holds the parameter (the
                    // one-pass step writes a new buffer); even steps: it
                    // does not (the step runs in place).
                    let before = values(&p_ours);
                    let shared = (step % 2 == 1).then(|| p_ours.clone());
                    (p_ours, s_ours) = ours.step(1e-3, p_ours, grad.clone(), s_ours);
                    (p_burn, s_burn) = burn.step(1e-3, p_burn, grad, s_burn);
                    if let Some(shared) = shared {
                        assert!(values(&shared) == before, "{name}: a shared tensor changed");
                    }
                    let moved = values(&p_ours)
                        .iter()
                        .zip(&before)
                        .filter(|(a, b)| a != b)
                        .count();
                    assert!(moved > n / 2, "{name}: the step left most values");
                    assert_eq!(
                        differing(&p_ours, &p_burn),
                        0,
                        "{name} step {step}: parameters"
                    );
                    let a = &s_ours.as_ref().unwrap().momentum;
                    let b = &s_burn.as_ref().unwrap().momentum;
                    assert_eq!(a.time, b.time);
                    assert_eq!(
                        differing(&a.moment_1, &b.moment_1),
                        0,
                        "{name}: first moments"
                    );
                    assert_eq!(
                        differing(&a.moment_2, &b.moment_2),
                        0,
                        "{name}: second moments"
                    );
                }
            }
        }
    }

    #[test]
    fn stage_lists_run_to_layer4() {
        assert_eq!(parse_stages("layer4").unwrap(), vec![Stage::Layer4]);
        assert_eq!(
            parse_stages(" layer4, layer3 ,layer4").unwrap(),
            vec![Stage::Layer3, Stage::Layer4]
        );
        assert_eq!(parse_stages("ALL").unwrap(), Stage::ALL.to_vec());
        let e = parse_stages("layer3").unwrap_err().to_string();
        assert!(e.contains("--finetune layer3,layer4"), "{e}");
        let e = parse_stages("layer2,layer4").unwrap_err().to_string();
        assert!(e.contains("--finetune layer2,layer3,layer4"), "{e}");
        let e = parse_stages("layer5").unwrap_err().to_string();
        assert!(
            e.contains("unknown stage `layer5`") && e.contains("or all"),
            "{e}"
        );
        let e = parse_stages(" , ").unwrap_err().to_string();
        assert!(e.contains("at least one stage"), "{e}");
    }

    #[test]
    fn optimiser_settings_that_mean_nothing_are_refused() {
        let ft = || TrainConfig::new().with_finetune(vec![Stage::Layer4]);
        let refused = |c: TrainConfig, says: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        };
        refused(TrainConfig::new().with_backbone_lr(Some(1e-4)), "none are");
        refused(ft().with_backbone_lr(Some(0.0)), "--backbone-lr 0");
        refused(
            ft().with_bn_mode(crate::classifier::BnMode::Lesson),
            "drop --bn-mode lesson",
        );
        refused(TrainConfig::new().with_momentum(0.9), "--optimizer sgd");
        refused(
            TrainConfig::new()
                .with_optimizer(OptimizerKind::Sgd)
                .with_momentum(1.0),
            "[0, 1)",
        );
        refused(TrainConfig::new().with_weight_decay(-1.0), "--weight-decay");
        refused(TrainConfig::new().with_lr_step(Some(0)), "--lr-step");
        refused(TrainConfig::new().with_lr_gamma(0.0), "--lr-gamma");
        refused(
            TrainConfig::new().with_finetune(vec![Stage::Layer2]),
            "--finetune layer2,layer3,layer4",
        );
        // PyTorch's tutorial recipe is expressible.
        ft().with_finetune(Stage::ALL.to_vec())
            .with_optimizer(OptimizerKind::Sgd)
            .with_momentum(0.9)
            .with_lr_step(Some(7))
            .with_lr_gamma(0.1)
            .validate()
            .unwrap();
    }

    #[test]
    fn the_step_schedule_is_pytorchs_per_epoch_step_lr() {
        let config = TrainConfig::new()
            .with_lr(1e-3)
            .with_finetune(vec![Stage::Layer4])
            .with_lr_step(Some(2))
            .with_lr_gamma(0.1);
        // 3 batches per epoch: epochs 1-2 at lr, 3-4 at lr/10, 5 at lr/100.
        let mut s = schedule(&config, 3).unwrap();
        let lrs: Vec<f64> = (0..15)
            .map(|_| {
                s.step()
                    .lr_from_param(burn::module::ParamId::new(), Some("head.layers.0.weight"))
            })
            .collect();
        let expect = |e: usize| 1e-3 * 0.1f64.powi((e / 2) as i32);
        for (i, lr) in lrs.iter().enumerate() {
            assert!((lr - expect(i / 3)).abs() < 1e-12, "batch {i}: {lr}");
        }
        let mut s = schedule(&config, 3).unwrap();
        let lr = s.step().lr_from_param(
            burn::module::ParamId::new(),
            Some("trained_stages.layer4.0.conv1.weight"),
        );
        assert!((lr - DEFAULT_BACKBONE_LR).abs() < 1e-15, "{lr}");
    }
}
