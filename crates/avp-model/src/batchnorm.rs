//! BatchNorm, in one place: how a pass uses it ([`BatchNormUse`]), the
//! batch-statistics pass with PyTorch's running update on Burn tensors, and
//! folding a network's BatchNorm layers into its convolutions
//! ([`fold_batchnorm`]). The fused CPU path implements the
//! same three uses in its own tiles.

use burn::module::Param;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use crate::resnet::ResNet;

/// How the BatchNorm layers of a backbone run in one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BatchNormUse {
    /// Running statistics, read from the layers at each pass (PyTorch's
    /// `model.eval()`).
    Running,
    /// Statistics of the batch at hand, and the running statistics updated
    /// as PyTorch's `model.train()` does (momentum 0.1, unbiased variance),
    /// whatever the device. What the PyTorch lesson does when it calls
    /// `model.train()` on a network whose parameters are all frozen.
    Batch,
    /// Running statistics folded into the convolutions before them: the
    /// function of [`BatchNormUse::Running`] up to float rounding, one pass
    /// over memory fewer per layer. The folded form is a snapshot of the
    /// statistics when it was made.
    Folded,
}

/// `bn(x)` with the given use on Burn tensors. [`BatchNormUse::Folded`]
/// is the identity: the layer already lives in the convolution before it.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>, mode: BatchNormUse) -> Tensor<4> {
    match mode {
        BatchNormUse::Folded => x,
        BatchNormUse::Running => running_statistics(bn, x),
        BatchNormUse::Batch => batch_statistics(bn, x),
    }
}

/// `γ·(x − μ)/√(σ² + ε) + β` with the layer's running statistics, as one
/// scale `α = γ/√(σ² + ε)` and one shift `β − μ·α` per channel (the form
/// PyTorch's CPU `batch_norm` computes in evaluation): two passes over `x`
/// where Burn's `batch_norm` makes four (subtract, divide, multiply, add).
/// At `layer4`'s `[32, 512, 7, 7]` a layer took 0.4 ms in a timing probe,
/// and a cached fine-tuning run's validation batch went from 116–177 ms to
/// 111–135 ms (two alternating rounds on the 2-core Xeon). On the autodiff
/// tape too it uses the running statistics (the gradient reaches γ and β
/// through `α` and the shift).
fn running_statistics(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let c = x.dims()[1];
    let device = x.device();
    let mean = bn.running_mean.value_sync().to_device(&device);
    let var = bn.running_var.value_sync().to_device(&device);
    let scale = bn.gamma.val().div(var.add_scalar(bn.epsilon).sqrt());
    let shift = bn.beta.val().sub(mean.mul(scale.clone()));
    x.mul(scale.reshape([1, c, 1, 1]))
        .add(shift.reshape([1, c, 1, 1]))
}

/// Normalizes with the batch's statistics and updates the layer's running
/// statistics as PyTorch does: `running = (1 − m)·running + m·batch`, with
/// the unbiased variance.
fn batch_statistics(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let [n, _, h, w] = x.dims();
    let count = (n * h * w) as f64;
    let (output, mean, variance) = normalized(bn, x);
    let unbiased = if count > 1.0 {
        count / (count - 1.0)
    } else {
        1.0
    };
    let m = bn.momentum;
    let device = mean.device();
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    bn.running_mean.update(
        running_mean
            .mul_scalar(1.0 - m)
            .add(mean.detach().mul_scalar(m))
            .detach(),
    );
    bn.running_var.update(
        running_var
            .mul_scalar(1.0 - m)
            .add(variance.detach().mul_scalar(m * unbiased))
            .detach(),
    );
    output
}

/// The output, and each channel's mean and biased variance over the
/// batch: on the flex device [`crate::train_bn`]'s operations (unless
/// `AVP_TRAIN_BN=burn`), elsewhere Burn's `batch_norm_train`.
fn normalized(bn: &BatchNorm, x: Tensor<4>) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    #[cfg(feature = "flex")]
    if !burn_requested() {
        let gamma = bn.gamma.val();
        let output = crate::train_bn::batch_norm_train(&x, gamma, bn.beta.val(), bn.epsilon);
        if let (Some(output), Some((mean, variance))) = (output, crate::train_bn::batch_stats(&x)) {
            return (output, mean, variance);
        }
    }
    let r = burn::tensor::module::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon);
    (r.output, r.mean, r.variance)
}

/// `AVP_TRAIN_BN=burn` (read once) keeps Burn's `batch_norm_train` on
/// the flex device too, for measuring one against the other.
#[cfg(feature = "flex")]
fn burn_requested() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| std::env::var("AVP_TRAIN_BN").is_ok_and(|v| v == "burn"))
}

/// `conv` followed by `bn` (running statistics) as one convolution with a
/// bias: `w' = w·γ/√(σ²+ε)`, `b' = (b − μ)·γ/√(σ²+ε) + β`.
pub(crate) fn fold_into(conv: &Conv2d, bn: &BatchNorm) -> Conv2d {
    let var = bn.running_var.value_sync();
    let mean = bn.running_mean.value_sync();
    let scale = bn.gamma.val().div(var.add_scalar(bn.epsilon).sqrt());
    let [c] = scale.dims();
    let weight = conv.weight.val().mul(scale.clone().reshape([c, 1, 1, 1]));
    let bias = match &conv.bias {
        Some(b) => b.val(),
        None => Tensor::zeros([c], &scale.device()),
    };
    let bias = bias.sub(mean).mul(scale).add(bn.beta.val());
    let mut folded = conv.clone();
    folded.weight = Param::from_tensor(weight);
    folded.bias = Some(Param::from_tensor(bias));
    folded
}

/// A copy of `net` with every BatchNorm folded into the convolution before
/// it (running statistics at the time of the call). Its BatchNorm modules
/// are kept, untouched, but must not run: pass it
/// [`BatchNormUse::Folded`]. The one place avp folds BatchNorm; the
/// [`crate::Backbone`] keeps the folded form it made.
pub fn fold_batchnorm(net: &ResNet) -> ResNet {
    let mut m = net.clone();
    m.conv1 = fold_into(&net.conv1, &net.bn1);
    for block in m.blocks_mut() {
        block.conv1 = fold_into(&block.conv1, &block.bn1);
        block.conv2 = fold_into(&block.conv2, &block.bn2);
        if let (Some(conv3), Some(bn3)) = (&block.conv3, &block.bn3) {
            block.conv3 = Some(fold_into(conv3, bn3));
        }
        if let Some(ds) = &mut block.downsample {
            ds.conv = fold_into(&ds.conv, &ds.bn);
        }
    }
    m
}

/// Every BatchNorm of a network in one fixed order: the stem's, then per
/// block `bn1`, `bn2`, `bn3`, the shortcut's. The fused path numbers its
/// layers this way.
pub fn batchnorms(net: &ResNet) -> Vec<&BatchNorm> {
    let mut out = vec![&net.bn1];
    for b in net.blocks() {
        out.push(&b.bn1);
        out.push(&b.bn2);
        out.extend(&b.bn3);
        out.extend(b.downsample.as_ref().map(|d| &d.bn));
    }
    out
}

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use burn::module::RunningState;
    use burn::nn::BatchNormConfig;
    use burn::tensor::Distribution;

    /// The scale-and-shift form equals Burn's `batch_norm` with the same
    /// running statistics (its definition) to float rounding, and is not
    /// the identity or the batch-statistics pass.
    #[test]
    fn running_statistics_are_burns_batch_norm() {
        let device = crate::parse_device("flex").unwrap();
        let c = 24;
        let mut bn = BatchNormConfig::new(c).init(&device);
        let channel =
            |lo: f64, hi: f64| Tensor::<1>::random([c], Distribution::Uniform(lo, hi), &device);
        bn.running_mean = RunningState::new(channel(-1.0, 1.0));
        bn.running_var = RunningState::new(channel(0.2, 3.0));
        bn.gamma = Param::from_tensor(channel(0.5, 1.5));
        bn.beta = Param::from_tensor(channel(-0.5, 0.5));
        let x = Tensor::<4>::random([3, c, 5, 7], Distribution::Normal(0.3, 2.0), &device);
        let burn = burn::tensor::module::batch_norm(
            x.clone(),
            bn.gamma.val(),
            bn.beta.val(),
            bn.running_mean.value(),
            bn.running_var.value(),
            bn.epsilon,
        );
        let ours = batch_norm(&bn, x.clone(), BatchNormUse::Running);
        let moved = (ours.clone() - x).abs().max().into_scalar::<f32>();
        assert!(moved > 0.1, "the layer changed nothing");
        crate::train_conv::assert_close(ours, burn, 1e-6, "running statistics");
    }
}
