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
        // Burn's module uses its running statistics off the autodiff tape,
        // which is where avp runs backbones (`crate::Backbone` takes its
        // input off the tape first).
        BatchNormUse::Running => bn.forward(x),
        BatchNormUse::Batch => batch_statistics(bn, x),
    }
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
fn fold_into(conv: &Conv2d, bn: &BatchNorm) -> Conv2d {
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
