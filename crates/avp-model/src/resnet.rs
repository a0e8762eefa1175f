//! The ResNet family (18, 34, 50, 101, 152 and any other four-stage block
//! count) built from Burn modules.
//!
//! Field names follow torchvision (`conv1`, `bn1`, `layer1..layer4`,
//! `downsample`, `fc`) so that a torchvision state dict maps with two small
//! remaps (`downsample.0`/`downsample.1` become `downsample.conv`/`.bn`).
//! Deviations from torchvision, all needed to import other exporters'
//! networks faithfully, are configuration: the stride may sit on the first
//! 1x1 convolution of a bottleneck (the original paper, Caffe-era exports),
//! padding may be "begin-heavy" as CNTK writes it, and the final average
//! pool may be a fixed window instead of a global pool.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::batchnorm::{BatchNormUse, batch_norm};
use crate::error::ModelError;

/// The residual block kind.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet 18 and 34); expansion 1.
    Basic,
    /// 1x1, 3x3, 1x1 convolutions (ResNet 50, 101, 152); expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block divided by its inner width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Where the stride of a downsampling bottleneck sits.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum StridePlacement {
    /// On the 3x3 convolution, as torchvision does ("ResNet v1.5").
    Conv3x3,
    /// On the first 1x1 convolution, as the original paper and Caffe/CNTK
    /// exports do.
    Conv1x1,
}

/// How convolutions and the stem max pool are padded.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum PaddingStyle {
    /// `kernel / 2` on every side, as torchvision.
    Symmetric,
    /// `kernel - stride` in all, the larger half first (top/left), as CNTK
    /// exports write it (`pads=[3,3,2,2]` on the 7x7 stem). At input sizes
    /// that are multiples of 32 it gives the same windows as `Symmetric`.
    BeginHeavy,
}

impl PaddingStyle {
    /// `(begin, end)` padding for a square window of `kernel` and `stride`.
    pub fn pads(self, kernel: usize, stride: usize) -> (usize, usize) {
        match self {
            PaddingStyle::Symmetric => (kernel / 2, kernel / 2),
            PaddingStyle::BeginHeavy => {
                let total = kernel.saturating_sub(stride);
                (total - total / 2, total / 2)
            }
        }
    }

    fn config(self, kernel: usize, stride: usize) -> PaddingConfig2d {
        let (b, e) = self.pads(kernel, stride);
        PaddingConfig2d::Explicit(b, b, e, e)
    }
}

/// The architecture of a [`ResNet`]. Presets: [`ResNetConfig::resnet18`] and
/// friends; any four block counts and widths are allowed, which is what
/// importing networks that are not torchvision's needs.
#[derive(Config, Debug)]
pub struct ResNetConfig {
    /// Basic or bottleneck blocks.
    pub block: BlockKind,
    /// Number of blocks in each of the four stages.
    pub layers: [usize; 4],
    /// Inner width of each stage (the block output is `width * expansion`).
    #[config(default = "[64, 128, 256, 512]")]
    pub widths: [usize; 4],
    /// Output channels of the stem convolution.
    #[config(default = 64)]
    pub stem_width: usize,
    /// Kernel of the stem convolution (7 in every ImageNet ResNet).
    #[config(default = 7)]
    pub stem_kernel: usize,
    /// Where a bottleneck puts its stride.
    #[config(default = "StridePlacement::Conv3x3")]
    pub stride_on: StridePlacement,
    /// How convolutions and the stem pool are padded.
    #[config(default = "PaddingStyle::Symmetric")]
    pub padding: PaddingStyle,
    /// Classes of the `fc` layer, or `None` for a headless backbone.
    #[config(default = "Some(1000)")]
    pub num_classes: Option<usize>,
    /// A fixed final average-pool window (CNTK exports write `AveragePool
    /// 7x7`), or `None` for torchvision's global pool. The model always pools
    /// globally; a fixed window only restricts the input sizes at which the
    /// model agrees with its source file (see [`ResNet::check_input_size`]).
    #[config(default = "None")]
    pub final_pool_window: Option<usize>,
    /// BatchNorm epsilon.
    #[config(default = 1e-5)]
    pub bn_epsilon: f64,
}

impl ResNetConfig {
    /// torchvision's `resnet18`: basic blocks [2, 2, 2, 2].
    pub fn resnet18() -> Self {
        Self::new(BlockKind::Basic, [2, 2, 2, 2])
    }
    /// torchvision's `resnet34`: basic blocks [3, 4, 6, 3].
    pub fn resnet34() -> Self {
        Self::new(BlockKind::Basic, [3, 4, 6, 3])
    }
    /// torchvision's `resnet50`: bottleneck blocks [3, 4, 6, 3].
    pub fn resnet50() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 6, 3])
    }
    /// torchvision's `resnet101`: bottleneck blocks [3, 4, 23, 3].
    pub fn resnet101() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 23, 3])
    }
    /// torchvision's `resnet152`: bottleneck blocks [3, 8, 36, 3].
    pub fn resnet152() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 8, 36, 3])
    }

    /// A preset by name (`resnet18` … `resnet152`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "resnet18" => Some(Self::resnet18()),
            "resnet34" => Some(Self::resnet34()),
            "resnet50" => Some(Self::resnet50()),
            "resnet101" => Some(Self::resnet101()),
            "resnet152" => Some(Self::resnet152()),
            _ => None,
        }
    }

    /// Width of the pooled features (`forward_features` output).
    pub fn num_features(&self) -> usize {
        self.widths[3] * self.block.expansion()
    }

    /// A one-line description, e.g. `bottleneck ResNet [3, 4, 6, 3], widths
    /// [64, 128, 256, 512], 1000 classes`.
    pub fn describe(&self) -> String {
        let kind = match self.block {
            BlockKind::Basic => "basic-block",
            BlockKind::Bottleneck => "bottleneck",
        };
        let head = match self.num_classes {
            Some(c) => format!("{c} classes"),
            None => format!("headless, {} features", self.num_features()),
        };
        let mut s = format!(
            "{kind} ResNet {:?}, widths {:?}, stem {}, {head}",
            self.layers, self.widths, self.stem_width
        );
        if self.block == BlockKind::Bottleneck && self.stride_on == StridePlacement::Conv1x1 {
            s.push_str(", stride on the first 1x1");
        }
        if self.padding == PaddingStyle::BeginHeavy {
            s.push_str(", begin-heavy padding");
        }
        s
    }

    /// Checks that the numbers make a network; every importer calls this
    /// before [`ResNetConfig::init`], which would otherwise panic inside Burn.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::InvalidConfig(why));
        if self.layers.contains(&0) {
            return bad(format!("every stage needs a block, got {:?}", self.layers));
        }
        if self.widths.contains(&0) || self.stem_width == 0 || self.stem_kernel == 0 {
            return bad("widths and kernels must be positive".into());
        }
        if self.num_classes == Some(0) {
            return bad("a classifier needs at least one class".into());
        }
        if !(self.bn_epsilon.is_finite() && self.bn_epsilon > 0.0) {
            return bad(format!(
                "BatchNorm epsilon {} is not positive",
                self.bn_epsilon
            ));
        }
        Ok(())
    }

    /// Builds the network with freshly initialised (random) parameters.
    /// Panics on an invalid configuration: call [`ResNetConfig::validate`]
    /// first for configurations that come from users or files.
    pub fn init(&self, device: &Device) -> ResNet {
        let pad = self.padding;
        let conv1 = Conv2dConfig::new([3, self.stem_width], [self.stem_kernel; 2])
            .with_stride([2, 2])
            .with_padding(pad.config(self.stem_kernel, 2))
            .with_bias(false)
            .init(device);
        let bn1 = self.bn(self.stem_width, device);
        let maxpool = MaxPool2dConfig::new([3, 3])
            .with_strides([2, 2])
            .with_padding(pad.config(3, 2))
            .init();
        let mut in_ch = self.stem_width;
        let mut stages: Vec<Vec<Block>> = Vec::with_capacity(4);
        for (stage, (&n, &width)) in self.layers.iter().zip(&self.widths).enumerate() {
            let stride = if stage == 0 { 1 } else { 2 };
            let mut blocks = Vec::with_capacity(n);
            for i in 0..n {
                let s = if i == 0 { stride } else { 1 };
                blocks.push(self.block(in_ch, width, s, device));
                in_ch = width * self.block.expansion();
            }
            stages.push(blocks);
        }
        let fc = self
            .num_classes
            .map(|c| LinearConfig::new(self.num_features(), c).init(device));
        let mut stages = stages.into_iter();
        let mut next = || stages.next().unwrap_or_default();
        ResNet {
            conv1,
            bn1,
            maxpool,
            layer1: next(),
            layer2: next(),
            layer3: next(),
            layer4: next(),
            fc,
            final_pool_window: self.final_pool_window,
        }
    }

    fn bn(&self, channels: usize, device: &Device) -> BatchNorm {
        BatchNormConfig::new(channels)
            .with_epsilon(self.bn_epsilon)
            .init(device)
    }

    fn conv(&self, io: [usize; 2], kernel: usize, stride: usize, device: &Device) -> Conv2d {
        Conv2dConfig::new(io, [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(self.padding.config(kernel, stride))
            .with_bias(false)
            .init(device)
    }

    fn block(&self, in_ch: usize, width: usize, stride: usize, device: &Device) -> Block {
        let out_ch = width * self.block.expansion();
        let downsample = (stride != 1 || in_ch != out_ch).then(|| Downsample {
            conv: self.conv([in_ch, out_ch], 1, stride, device),
            bn: self.bn(out_ch, device),
        });
        match self.block {
            BlockKind::Basic => Block {
                conv1: self.conv([in_ch, width], 3, stride, device),
                bn1: self.bn(width, device),
                conv2: self.conv([width, width], 3, 1, device),
                bn2: self.bn(width, device),
                conv3: None,
                bn3: None,
                downsample,
            },
            BlockKind::Bottleneck => {
                let (s1, s3) = match self.stride_on {
                    StridePlacement::Conv1x1 => (stride, 1),
                    StridePlacement::Conv3x3 => (1, stride),
                };
                Block {
                    conv1: self.conv([in_ch, width], 1, s1, device),
                    bn1: self.bn(width, device),
                    conv2: self.conv([width, width], 3, s3, device),
                    bn2: self.bn(width, device),
                    conv3: Some(self.conv([width, out_ch], 1, 1, device)),
                    bn3: Some(self.bn(out_ch, device)),
                    downsample,
                }
            }
        }
    }
}

/// Where a convolution and the BatchNorm after it sit in a [`ResNet`]:
/// the one place the module paths (torchvision's names, `layer2.0.conv1`,
/// `layer2.0.downsample.bn`) are spelled, for every importer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvSite {
    /// `conv1` / `bn1`.
    Stem,
    /// Convolution `conv` (from 0) of block `block` of stage `stage` (both
    /// from 0): `layer{stage+1}.{block}.conv{conv+1}`.
    Main {
        /// Stage, from 0.
        stage: usize,
        /// Block within the stage, from 0.
        block: usize,
        /// Convolution within the block, from 0.
        conv: usize,
    },
    /// The projection shortcut of a block: `layer{stage+1}.{block}.downsample`.
    Downsample {
        /// Stage, from 0.
        stage: usize,
        /// Block within the stage, from 0.
        block: usize,
    },
}

impl ConvSite {
    /// Module path of stage `stage` (from 0): `layer1` … `layer4`.
    pub fn stage(stage: usize) -> String {
        format!("layer{}", stage + 1)
    }

    /// Module path of the convolution.
    pub fn conv(&self) -> String {
        match *self {
            ConvSite::Stem => "conv1".into(),
            ConvSite::Main { stage, block, conv } => {
                format!("{}.{block}.conv{}", Self::stage(stage), conv + 1)
            }
            ConvSite::Downsample { stage, block } => {
                format!("{}.{block}.downsample.conv", Self::stage(stage))
            }
        }
    }

    /// Module path of the BatchNorm after it.
    pub fn bn(&self) -> String {
        match *self {
            ConvSite::Stem => "bn1".into(),
            ConvSite::Main { stage, block, conv } => {
                format!("{}.{block}.bn{}", Self::stage(stage), conv + 1)
            }
            ConvSite::Downsample { stage, block } => {
                format!("{}.{block}.downsample.bn", Self::stage(stage))
            }
        }
    }
}

/// The projection shortcut of a block whose shape changes (torchvision's
/// `downsample.0` / `downsample.1`).
#[derive(Module, Debug)]
pub struct Downsample {
    /// 1x1 convolution carrying the block's stride.
    pub conv: Conv2d,
    /// Its BatchNorm.
    pub bn: BatchNorm,
}

/// One residual block; `conv3`/`bn3` are present in bottleneck blocks only.
#[derive(Module, Debug)]
pub struct Block {
    /// First convolution (3x3 basic, 1x1 bottleneck).
    pub conv1: Conv2d,
    /// BatchNorm after `conv1`.
    pub bn1: BatchNorm,
    /// Second convolution (3x3).
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`.
    pub bn2: BatchNorm,
    /// Third (1x1 expanding) convolution of a bottleneck.
    pub conv3: Option<Conv2d>,
    /// BatchNorm after `conv3`.
    pub bn3: Option<BatchNorm>,
    /// Projection shortcut, when the block changes shape.
    pub downsample: Option<Downsample>,
}

impl Block {
    /// `relu(main(x) + shortcut(x))`, BatchNorm as Burn's modules run it.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(ds) => ds.bn.forward(ds.conv.forward(x.clone())),
            None => x.clone(),
        };
        let mut out = relu(self.bn1.forward(self.conv1.forward(x)));
        out = self.bn2.forward(self.conv2.forward(out));
        if let (Some(conv3), Some(bn3)) = (&self.conv3, &self.bn3) {
            out = bn3.forward(conv3.forward(relu(out)));
        }
        relu(out + identity)
    }

    /// [`Block::forward`] with the BatchNorm layers run as `bn` says (see
    /// [`BatchNormUse`]).
    pub fn forward_with(&self, x: Tensor<4>, bn: BatchNormUse) -> Tensor<4> {
        self.forward_convs(x, bn, Conv2d::forward)
    }

    /// [`Block::forward_with`] for a trained block: on the flex device its
    /// convolutions (and their backward) run as batched products
    /// ([`crate::train_conv`]); elsewhere as Burn's modules.
    pub fn forward_trained(&self, x: Tensor<4>, bn: BatchNormUse) -> Tensor<4> {
        self.forward_convs(x, bn, trained_conv)
    }

    fn forward_convs(
        &self,
        x: Tensor<4>,
        bn: BatchNormUse,
        conv: fn(&Conv2d, Tensor<4>) -> Tensor<4>,
    ) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(ds) => batch_norm(&ds.bn, conv(&ds.conv, x.clone()), bn),
            None => x.clone(),
        };
        let mut out = trained_relu(batch_norm(&self.bn1, conv(&self.conv1, x), bn));
        out = batch_norm(&self.bn2, conv(&self.conv2, out), bn);
        if let (Some(conv3), Some(bn3)) = (&self.conv3, &self.bn3) {
            out = batch_norm(bn3, conv(conv3, trained_relu(out)), bn);
        }
        trained_add_relu(out, identity)
    }
}

/// A trained stage's ReLU: [`crate::train_relu::relu`] (over rayon's
/// threads) where the flex backend is compiled in, Burn's otherwise.
fn trained_relu(x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    {
        crate::train_relu::relu(x)
    }
    #[cfg(not(feature = "flex"))]
    {
        relu(x)
    }
}

/// `relu(a + b)`, the end of a trained residual block, as
/// [`trained_relu`] chooses.
fn trained_add_relu(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    {
        crate::train_relu::add_relu(a, b)
    }
    #[cfg(not(feature = "flex"))]
    {
        relu(a + b)
    }
}

/// A trained stage's convolution: [`crate::train_conv::conv2d`] where the
/// flex backend is compiled in, Burn's module otherwise.
fn trained_conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    {
        crate::train_conv::conv2d(conv, x)
    }
    #[cfg(not(feature = "flex"))]
    {
        conv.forward(x)
    }
}

/// A stage of a ResNet, in forward order: the stem (`conv1`, `bn1`, the
/// max pool), then `layer1` … `layer4`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// `conv1`, `bn1` and the max pool.
    Stem,
    /// `layer1`.
    Layer1,
    /// `layer2`.
    Layer2,
    /// `layer3`.
    Layer3,
    /// `layer4`.
    Layer4,
}

impl Stage {
    /// Every stage, in forward order.
    pub const ALL: [Stage; 5] = [
        Stage::Stem,
        Stage::Layer1,
        Stage::Layer2,
        Stage::Layer3,
        Stage::Layer4,
    ];

    /// The module name: `stem`, `layer1` … `layer4`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Stem => "stem",
            Stage::Layer1 => "layer1",
            Stage::Layer2 => "layer2",
            Stage::Layer3 => "layer3",
            Stage::Layer4 => "layer4",
        }
    }

    /// The residual stage index (0 for `layer1`), `None` for the stem.
    pub fn layer(self) -> Option<usize> {
        match self {
            Stage::Stem => None,
            other => Some(other as usize - 1),
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Stage {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == t)
            .ok_or_else(|| {
                ModelError::Unsupported(format!(
                    "unknown stage `{}`: the stages of a ResNet are stem, layer1, layer2, layer3 and layer4",
                    s.trim()
                ))
            })
    }
}

/// The stem of a ResNet as a module of its own.
#[derive(Module, Debug)]
pub struct Stem {
    /// Stem convolution.
    pub conv1: Conv2d,
    /// Stem BatchNorm.
    pub bn1: BatchNorm,
    /// Stem max pool.
    pub maxpool: MaxPool2d,
}

/// The last stages of a ResNet, from one stage to the end of `layer4`, as
/// a module of their own: what fine-tuning trains while the stages before
/// stay frozen. Stages before the first are absent (`None`, empty).
#[derive(Module, Debug)]
pub struct ResNetStages {
    /// The stem, when it is one of the stages.
    pub stem: Option<Stem>,
    /// `layer1`'s blocks, or empty.
    pub layer1: Vec<Block>,
    /// `layer2`'s blocks, or empty.
    pub layer2: Vec<Block>,
    /// `layer3`'s blocks, or empty.
    pub layer3: Vec<Block>,
    /// `layer4`'s blocks, or empty.
    pub layer4: Vec<Block>,
}

impl ResNetStages {
    /// The first stage held (`None` when empty).
    pub fn first(&self) -> Option<Stage> {
        if self.stem.is_some() {
            return Some(Stage::Stem);
        }
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .iter()
            .position(|l| !l.is_empty())
            .map(|i| Stage::ALL[i + 1])
    }

    /// The stages held, in order.
    pub fn stages(&self) -> Vec<Stage> {
        self.first()
            .map(|f| Stage::ALL.into_iter().filter(|s| *s >= f).collect())
            .unwrap_or_default()
    }

    /// The feature map after `layer4`, from the map entering the first
    /// stage held (the images, when the stem is held), BatchNorm as `bn`
    /// says.
    pub fn forward_map(&self, mut x: Tensor<4>, bn: BatchNormUse) -> Tensor<4> {
        if let Some(stem) = &self.stem {
            x = trained_relu(batch_norm(&stem.bn1, trained_conv(&stem.conv1, x), bn));
            x = stem.maxpool.forward(x);
        }
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = block.forward_trained(x, bn);
        }
        x
    }
}

/// A ResNet: stem, four stages of residual blocks, global average pool and
/// an optional `fc` classifier.
#[derive(Module, Debug)]
pub struct ResNet {
    /// Stem convolution.
    pub conv1: Conv2d,
    /// Stem BatchNorm.
    pub bn1: BatchNorm,
    /// Stem 3x3 stride-2 max pool.
    pub maxpool: MaxPool2d,
    /// Stage 1 (stride 1).
    pub layer1: Vec<Block>,
    /// Stage 2 (stride 2).
    pub layer2: Vec<Block>,
    /// Stage 3 (stride 2).
    pub layer3: Vec<Block>,
    /// Stage 4 (stride 2).
    pub layer4: Vec<Block>,
    /// The classifier, absent in a headless backbone.
    pub fc: Option<Linear>,
    /// See [`ResNetConfig::final_pool_window`].
    #[module(skip)]
    pub final_pool_window: Option<usize>,
}

impl ResNet {
    /// The feature map before pooling, `[N, F, H/32, W/32]`.
    pub fn forward_feature_map(&self, images: Tensor<4>) -> Tensor<4> {
        let x = relu(self.bn1.forward(self.conv1.forward(images)));
        let mut x = self.maxpool.forward(x);
        for block in self.blocks() {
            x = block.forward(x);
        }
        x
    }

    /// Every residual block, stage by stage (`layer1` … `layer4`).
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
    }

    /// Every residual block, mutably, stage by stage.
    pub fn blocks_mut(&mut self) -> impl Iterator<Item = &mut Block> {
        self.layer1
            .iter_mut()
            .chain(self.layer2.iter_mut())
            .chain(self.layer3.iter_mut())
            .chain(self.layer4.iter_mut())
    }

    /// Residual blocks that run before `stage` (0 for the stem and `layer1`).
    pub fn blocks_before(&self, stage: Stage) -> usize {
        let counts = [
            self.layer1.len(),
            self.layer2.len(),
            self.layer3.len(),
            self.layer4.len(),
        ];
        counts[..stage.layer().unwrap_or(0)].iter().sum()
    }

    /// A copy of the stages from `first` to the end of `layer4` (see
    /// [`ResNetStages`]).
    pub fn stages_from(&self, first: Stage) -> ResNetStages {
        let take = |stage: Stage, blocks: &Vec<Block>| {
            if stage >= first {
                blocks.clone()
            } else {
                Vec::new()
            }
        };
        ResNetStages {
            stem: (first == Stage::Stem).then(|| Stem {
                conv1: self.conv1.clone(),
                bn1: self.bn1.clone(),
                maxpool: self.maxpool.clone(),
            }),
            layer1: take(Stage::Layer1, &self.layer1),
            layer2: take(Stage::Layer2, &self.layer2),
            layer3: take(Stage::Layer3, &self.layer3),
            layer4: take(Stage::Layer4, &self.layer4),
        }
    }

    /// This network with the stages `stages` holds put in place of its
    /// own (the inverse of [`ResNet::stages_from`]); refused when a stage
    /// does not have this network's shape.
    pub fn with_stages(mut self, stages: ResNetStages) -> Result<Self, ModelError> {
        let ResNetStages {
            stem,
            layer1,
            layer2,
            layer3,
            layer4,
        } = stages;
        if let Some(stem) = stem {
            if stem.conv1.weight.lazy_shape().dims::<4>()
                != self.conv1.weight.lazy_shape().dims::<4>()
            {
                return Err(ModelError::InvalidConfig(
                    "the trained stem does not have this network's shape".into(),
                ));
            }
            self.conv1 = stem.conv1;
            self.bn1 = stem.bn1;
            self.maxpool = stem.maxpool;
        }
        for (stage, (mine, theirs)) in [
            (&mut self.layer1, layer1),
            (&mut self.layer2, layer2),
            (&mut self.layer3, layer3),
            (&mut self.layer4, layer4),
        ]
        .into_iter()
        .enumerate()
        {
            if theirs.is_empty() {
                continue;
            }
            let same = theirs.len() == mine.len()
                && theirs.iter().zip(mine.iter()).all(|(a, b)| {
                    a.conv1.weight.lazy_shape().dims::<4>()
                        == b.conv1.weight.lazy_shape().dims::<4>()
                });
            if !same {
                return Err(ModelError::InvalidConfig(format!(
                    "the trained {} does not have this network's shape",
                    ConvSite::stage(stage)
                )));
            }
            *mine = theirs;
        }
        Ok(self)
    }

    /// The headless backbone: globally average-pooled features `[N, F]`.
    pub fn forward_features(&self, images: Tensor<4>) -> Tensor<2> {
        global_pool(self.forward_feature_map(images))
    }

    /// Logits `[N, classes]`, or the pooled features for a headless model.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let features = self.forward_features(images);
        match &self.fc {
            Some(fc) => fc.forward(features),
            None => features,
        }
    }

    /// Width of the pooled features.
    pub fn num_features(&self) -> usize {
        let [out, ..] = self.conv1.weight.lazy_shape().dims::<4>();
        self.layer4
            .last()
            .map(|b| match &b.conv3 {
                Some(c) => c.weight.lazy_shape().dims::<4>()[0],
                None => b.conv2.weight.lazy_shape().dims::<4>()[0],
            })
            .unwrap_or(out)
    }

    /// Number of classes of the `fc` layer, `None` when headless.
    pub fn num_classes(&self) -> Option<usize> {
        self.fc
            .as_ref()
            .map(|fc| fc.weight.lazy_shape().dims::<2>()[1])
    }

    /// Replaces the classifier by a fresh `Linear(F, classes)`, or removes it
    /// with `None`.
    pub fn with_classes(mut self, classes: Option<usize>, device: &Device) -> Self {
        let f = self.num_features();
        self.fc = classes.map(|c| LinearConfig::new(f, c).init(device));
        self
    }

    /// Replaces the classifier by the given layer (or removes it).
    pub fn with_fc(mut self, fc: Option<Linear>) -> Self {
        self.fc = fc;
        self
    }

    /// Refuses input sizes at which this network would not compute what its
    /// source file computes: a fixed final pooling window (CNTK's `AveragePool
    /// 7x7`) equals a global pool only when the last feature map is exactly
    /// that size, i.e. at `32 * window` pixels (224 for 7).
    pub fn check_input_size(&self, height: usize, width: usize) -> Result<(), ModelError> {
        if height < 32 || width < 32 {
            return Err(ModelError::InputSize {
                height,
                width,
                why: "a ResNet needs at least 32x32 pixels".into(),
            });
        }
        if let Some(k) = self.final_pool_window {
            let (fh, fw) = (height.div_ceil(32), width.div_ceil(32));
            if fh != k || fw != k {
                return Err(ModelError::InputSize {
                    height,
                    width,
                    why: format!(
                        "the source file ends with a fixed {k}x{k} average pool, which equals a \
                         global pool only at {s}x{s} input (the final map here would be \
                         {fh}x{fw}); resize images to {s}x{s}",
                        s = 32 * k
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Global average pool `[N, C, H, W]` → `[N, C]`.
pub fn global_pool(map: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = map.dims();
    map.mean_dims(&[2, 3]).reshape([n, c])
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    #[test]
    fn begin_heavy_pads_match_cntk() {
        assert_eq!(PaddingStyle::BeginHeavy.pads(7, 2), (3, 2));
        assert_eq!(PaddingStyle::BeginHeavy.pads(3, 2), (1, 0));
        assert_eq!(PaddingStyle::BeginHeavy.pads(3, 1), (1, 1));
        assert_eq!(PaddingStyle::BeginHeavy.pads(1, 2), (0, 0));
        assert_eq!(PaddingStyle::Symmetric.pads(7, 2), (3, 3));
    }

    #[test]
    fn presets_have_torchvision_parameter_counts() {
        // torchvision's state-dict sizes without `num_batches_tracked`
        // (parameters 11,689,512 and 25,557,032, plus the BatchNorm running
        // statistics, which Burn's `num_params` counts too).
        let device = Device::flex();
        for (name, values) in [("resnet18", 11_699_112), ("resnet50", 25_610_152)] {
            let model = ResNetConfig::preset(name).unwrap().init(&device);
            assert_eq!(model.num_params(), values, "{name}");
        }
    }

    #[test]
    fn shapes_and_head_replacement() {
        let device = Device::flex();
        let cfg = ResNetConfig::new(BlockKind::Bottleneck, [1, 1, 1, 1])
            .with_widths([4, 8, 8, 16])
            .with_stem_width(8)
            .with_num_classes(Some(3));
        let model = cfg.init(&device);
        assert_eq!(model.num_features(), 64);
        assert_eq!(model.num_classes(), Some(3));
        let x = Tensor::<4>::zeros([2, 3, 64, 64], &device);
        assert_eq!(model.forward(x.clone()).dims(), [2, 3]);
        let model = model.with_classes(None, &device);
        assert_eq!(model.forward(x).dims(), [2, 64]);
    }

    #[test]
    fn invalid_configs_are_errors() {
        let cfg = ResNetConfig::new(BlockKind::Basic, [2, 0, 2, 2]);
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("every stage")
        );
        let cfg = ResNetConfig::resnet18().with_num_classes(Some(0));
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn fixed_pool_window_restricts_input_size() {
        let device = Device::flex();
        let model = ResNetConfig::new(BlockKind::Basic, [1, 1, 1, 1])
            .with_widths([4, 4, 4, 4])
            .with_stem_width(4)
            .with_final_pool_window(Some(7))
            .init(&device);
        assert!(model.check_input_size(224, 224).is_ok());
        let err = model.check_input_size(256, 256).unwrap_err().to_string();
        assert!(err.contains("224x224"), "{err}");
    }
}
