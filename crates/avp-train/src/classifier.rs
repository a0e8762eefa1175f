//! `Classifier` = a frozen [`Backbone`] + a trainable head, and, when
//! fine-tuning, the backbone's last stages as trainable Burn modules
//! ([`ResNetStages`]) between the two.
//!
//! The backbone runs on the *inner* device (never on the autodiff tape):
//! [`Backbone::features`] takes images off autodiff, and the pooled
//! features are lifted back onto the autodiff device for the head, so a
//! training step records only the head. The backbone is held outside the
//! Burn module tree (a `#[module(skip)]` field), which also keeps it out of
//! the optimizer's reach and out of every checkpoint of the head. How it
//! runs (folded, fused) is the backbone's business; which BatchNorm use
//! each phase asks for is [`BnMode::batchnorm_use`].
//!
//! Fine-tuning splits the backbone at a stage boundary: the frozen prefix
//! runs as above (off the tape, folded, fused on flex) and returns the
//! feature map entering the first trained stage; the trained stages run on
//! the tape with batch statistics and PyTorch's running update while
//! training, and with their running statistics in validation (PyTorch's
//! `model.train()` / `model.eval()` for a trained layer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use avp_data::ImageBatch;
use avp_model::resnet::global_pool;
use avp_model::{Backbone, BatchNormUse, ResNetStages, Stage};
use burn::config::Config;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};

use crate::cache::FeatureBatch;
use crate::error::TrainError;

/// The trainable head: `Linear(F, h1) → ReLU → … → Linear(hN, classes)`,
/// with optional dropout before each hidden ReLU. The default is the
/// lesson's `Linear(F, 128) → ReLU → Linear(128, classes)`.
#[derive(Config, Debug)]
pub struct HeadConfig {
    /// Hidden layer widths (the lesson: `[128]`).
    #[config(default = "vec![128]")]
    pub hidden: Vec<usize>,
    /// Dropout probability after each hidden layer (the lesson: 0).
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl HeadConfig {
    /// Builds the head for `features` inputs and `classes` outputs.
    pub fn init(
        &self,
        features: usize,
        classes: usize,
        device: &Device,
    ) -> Result<Head, TrainError> {
        if features == 0 || classes < 2 {
            return Err(TrainError::Config(format!(
                "a head needs features > 0 and at least 2 classes (got {features} features, {classes} classes)"
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainError::Config(format!(
                "dropout {} is not in [0, 1)",
                self.dropout
            )));
        }
        let mut widths = vec![features];
        widths.extend(self.hidden.iter().copied());
        widths.push(classes);
        if widths.contains(&0) {
            return Err(TrainError::Config(format!(
                "hidden widths must be positive: {:?}",
                self.hidden
            )));
        }
        let layers = widths
            .windows(2)
            .map(|w| LinearConfig::new(w[0], w[1]).init(device))
            .collect();
        Ok(Head {
            layers,
            dropout: DropoutConfig::new(self.dropout).init(),
        })
    }
}

/// The trainable head.
#[derive(Module, Debug)]
pub struct Head {
    /// The linear layers.
    pub layers: Vec<Linear>,
    /// Dropout after each hidden layer.
    pub dropout: Dropout,
}

impl Head {
    /// Logits for pooled features.
    pub fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i + 1 < n {
                x = relu(self.dropout.forward(x));
            }
        }
        x
    }

    /// Input width.
    pub fn features(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.weight.lazy_shape().dims::<2>()[0])
            .unwrap_or(0)
    }

    /// Output width.
    pub fn classes(&self) -> usize {
        self.layers
            .last()
            .map(|l| l.weight.lazy_shape().dims::<2>()[1])
            .unwrap_or(0)
    }
}

/// How the frozen backbone's BatchNorm layers behave while training.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum BnMode {
    /// Running statistics, always (the default): the backbone is a fixed
    /// function, and features can be cached.
    Frozen,
    /// Batch statistics during the training phase, updating the running
    /// statistics (momentum 0.1): what the PyTorch lesson does when it calls
    /// `model.train()` on a network whose parameters are all frozen.
    Lesson,
}

impl BnMode {
    /// What the backbone's BatchNorm layers do in the training phase
    /// (`train`) or in validation and inference: frozen runs the folded
    /// network always; the lesson uses batch statistics while training and
    /// the (moving) running statistics otherwise.
    pub fn batchnorm_use(self, train: bool) -> BatchNormUse {
        match (self, train) {
            (BnMode::Frozen, _) => BatchNormUse::Folded,
            (BnMode::Lesson, true) => BatchNormUse::Batch,
            (BnMode::Lesson, false) => BatchNormUse::Running,
        }
    }
}

/// The frozen backbone, shared (not copied) by every clone of the
/// classifier.
#[derive(Clone, Debug)]
pub struct FrozenBackbone(pub Arc<Backbone>);

/// How the fine-tuned stages' BatchNorm layers run: PyTorch's
/// `model.train()` while training (batch statistics, running update),
/// `model.eval()` otherwise.
fn trained_stages_bn(train: bool) -> BatchNormUse {
    if train {
        BatchNormUse::Batch
    } else {
        BatchNormUse::Running
    }
}

/// A copy of `backbone`'s stages from `first` on, on `device` (the inner
/// device of training), with gradients on: what fine-tuning trains.
pub fn trainable_stages(backbone: &Backbone, first: Stage, device: &Device) -> ResNetStages {
    backbone
        .network()
        .stages_from(first)
        .to_device(&device.clone().without_autodiff())
        .unfreeze()
        .train()
}

/// A frozen backbone and a trainable head, with the backbone's last
/// stages trained too when fine-tuning.
#[derive(Module, Debug)]
pub struct Classifier {
    /// The trainable head.
    pub head: Head,
    /// The fine-tuned stages, which replace the backbone's own from their
    /// first stage on; `None` when the whole backbone is frozen.
    pub trained_stages: Option<ResNetStages>,
    /// The frozen backbone, on the inner (non-autodiff) device.
    #[module(skip)]
    pub backbone: FrozenBackbone,
    /// BatchNorm behaviour while training.
    #[module(skip)]
    pub bn_mode: BnMode,
    /// The frozen prefix's outputs on the validation images, kept from the
    /// first validation pass for the later ones (see [`ValidMemo`]);
    /// `None`: computed in every pass.
    #[module(skip)]
    pub valid_memo: Option<ValidMemo>,
}

/// The most bytes of frozen-prefix outputs a [`ValidMemo`] keeps (1 GiB);
/// the validation images past it run through the backbone in every pass.
pub const VALID_MEMO_MAX_BYTES: usize = 1 << 30;

/// The frozen part's output for each validation image, by dataset index,
/// kept from the first validation pass of a training run.
///
/// With the backbone's BatchNorm frozen ([`BnMode::Frozen`]) and the
/// validation transform deterministic (it is: resize, crop, normalize),
/// the frozen prefix gives every validation image the same output in every
/// epoch; later passes run only what trains (the head, and the fine-tuned
/// stages). The results are those of a full pass: the same numbers go into
/// the same head. Up to [`VALID_MEMO_MAX_BYTES`] are kept (a batch is kept
/// whole or not at all); the rest is recomputed. The PyTorch reference
/// script does the same by default (`--no-valid-reuse` turns it off there,
/// and `TrainConfig::valid_reuse` here).
///
/// A memo belongs to one validation split: the keys are its dataset
/// indices. Training sets it for the validation passes and removes it from
/// the classifier it returns.
#[derive(Clone, Debug, Default)]
pub struct ValidMemo(Arc<Mutex<MemoTable>>);

#[derive(Debug, Default)]
struct MemoTable {
    rows: HashMap<usize, Vec<f32>>,
    /// The shape of one row (`[F]` or `[C, H, W]`).
    row_shape: Vec<usize>,
    bytes: usize,
}

impl ValidMemo {
    /// An empty memo.
    pub fn new() -> Self {
        Self::default()
    }

    /// Images kept so far.
    pub fn len(&self) -> usize {
        self.0.lock().map(|t| t.rows.len()).unwrap_or(0)
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kept rows of `indices`, stacked in their order on `device`;
    /// `None` unless every one is kept with a `D - 1`-dimensional shape.
    fn lookup<const D: usize>(&self, indices: &[usize], device: &Device) -> Option<Tensor<D>> {
        let table = self.0.lock().ok()?;
        if indices.is_empty() || table.row_shape.len() + 1 != D {
            return None;
        }
        let row: usize = table.row_shape.iter().product();
        let mut data = Vec::with_capacity(indices.len() * row);
        for i in indices {
            data.extend_from_slice(table.rows.get(i)?);
        }
        let mut shape = vec![indices.len()];
        shape.extend_from_slice(&table.row_shape);
        Some(Tensor::from_data(TensorData::new(data, shape), device))
    }

    /// Keeps the rows of `output` (one per entry of `indices`) when they
    /// fit the budget and the shape of the rows kept before.
    fn store<const D: usize>(&self, indices: &[usize], output: &Tensor<D>) {
        let dims = output.dims();
        if dims[0] != indices.len() || indices.is_empty() {
            return;
        }
        let Ok(mut table) = self.0.lock() else {
            return;
        };
        let row: usize = dims[1..].iter().product();
        let bytes = row * indices.len() * std::mem::size_of::<f32>();
        if table.bytes + bytes > VALID_MEMO_MAX_BYTES
            || (!table.rows.is_empty() && table.row_shape != dims[1..])
        {
            return;
        }
        let Ok(values) = output
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
        else {
            return;
        };
        table.row_shape = dims[1..].to_vec();
        for (k, &i) in indices.iter().enumerate() {
            if let Some(old) = table
                .rows
                .insert(i, values[k * row..(k + 1) * row].to_vec())
            {
                table.bytes -= old.len() * std::mem::size_of::<f32>();
            }
        }
        table.bytes += bytes;
    }
}

impl Classifier {
    /// Joins a backbone and a head, checking that their widths fit.
    pub fn new(backbone: Arc<Backbone>, head: Head, bn_mode: BnMode) -> Result<Self, TrainError> {
        let f = backbone.num_features();
        if head.features() != f {
            return Err(TrainError::Config(format!(
                "the backbone gives {f} features but the head expects {}",
                head.features()
            )));
        }
        Ok(Self {
            head,
            trained_stages: None,
            backbone: FrozenBackbone(backbone),
            bn_mode,
            valid_memo: None,
        })
    }

    /// The same classifier keeping its frozen prefix's validation outputs
    /// in `memo` (see [`ValidMemo`]). Only a frozen BatchNorm mode uses it:
    /// with [`BnMode::Lesson`] the running statistics move every epoch.
    pub fn with_valid_memo(mut self, memo: ValidMemo) -> Self {
        self.valid_memo = Some(memo);
        self
    }

    /// The same classifier with the backbone's stages from `first` on
    /// trained too (fine-tuning): a copy of them, on `device` (the inner
    /// device of training), with gradients on.
    pub fn with_trained_stages(mut self, first: Stage, device: &Device) -> Self {
        self.trained_stages = Some(trainable_stages(&self.backbone.0, first, device));
        self
    }

    /// The stages being fine-tuned (empty when the backbone is frozen).
    pub fn finetuned(&self) -> Vec<Stage> {
        self.trained_stages
            .as_ref()
            .map(ResNetStages::stages)
            .unwrap_or_default()
    }

    /// The classifier with its fine-tuned stages put back into its
    /// backbone: a frozen backbone and a head that compute what this one
    /// computes in validation (running statistics), ready to save, fold
    /// and fuse. Unchanged when nothing is fine-tuned.
    pub fn merged(self) -> Result<Self, TrainError> {
        let Some(stages) = self.trained_stages else {
            return Ok(self);
        };
        let old = &self.backbone.0;
        let stages = stages.valid().to_device(&old.device());
        let network = old.network().clone().with_stages(stages)?;
        let backbone = Backbone::new(
            network,
            old.config().clone(),
            old.provenance().clone(),
            old.normalization().clone(),
        )
        .with_kernels(old.kernels())?;
        Classifier::new(Arc::new(backbone), self.head, self.bn_mode)
    }

    /// Pooled backbone features, computed off the tape and returned on the
    /// device of `images` (lifted onto autodiff when `images` are).
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        self.features_in_phase(images, false)
    }

    /// Features in the training phase (`train = true`) or otherwise (see
    /// [`BnMode::batchnorm_use`]).
    pub fn features_in_phase(&self, images: Tensor<4>, train: bool) -> Tensor<2> {
        let on_tape = images.is_autodiff();
        let frozen = self.bn_mode.batchnorm_use(train);
        let Some(stages) = &self.trained_stages else {
            let f = self.backbone.0.features(images, frozen);
            return if on_tape { f.autodiff() } else { f };
        };
        let first = stages.first().unwrap_or(Stage::Layer4);
        let map = self.backbone.0.feature_map_before(images, first, frozen);
        let map = if on_tape { map.autodiff() } else { map };
        global_pool(stages.forward_map(map, trained_stages_bn(train)))
    }

    /// Logits for images.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.features(images))
    }

    /// Softmax probabilities for images, off the tape (a classifier in
    /// validation mode: see `Module::valid`).
    pub fn probabilities(&self, images: Tensor<4>) -> Tensor<2> {
        burn::tensor::activation::softmax(self.forward(images.without_autodiff()), 1)
    }

    fn classify(
        &self,
        images: Tensor<4>,
        targets: Tensor<1, Int>,
        train: bool,
    ) -> ClassificationOutput {
        let logits = self.head.forward(self.features_in_phase(images, train));
        classify_logits(logits, targets)
    }
}

/// Cross-entropy for one batch of logits. The epoch's loss and accuracy
/// are computed from this output by burn-train's metrics
/// (`crate::metrics`).
fn classify_logits(logits: Tensor<2>, targets: Tensor<1, Int>) -> ClassificationOutput {
    let loss = CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.clone(), targets.clone());
    ClassificationOutput::new(loss, logits, targets)
}

impl TrainStep for Classifier {
    type Input = ImageBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ImageBatch) -> TrainOutput<ClassificationOutput> {
        let out = self.classify(batch.images, batch.targets, true);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl Classifier {
    /// Validation logits with the frozen prefix's output taken from, or
    /// put into, `memo`; `None` where the memo does not apply (the
    /// lesson's BatchNorm mode, images on the tape, the stem fine-tuned).
    fn memo_logits(
        &self,
        memo: &ValidMemo,
        images: &Tensor<4>,
        indices: &[usize],
    ) -> Option<Tensor<2>> {
        if self.bn_mode != BnMode::Frozen || images.is_autodiff() {
            return None;
        }
        let device = images.device();
        let frozen = BatchNormUse::Folded;
        let Some(stages) = &self.trained_stages else {
            let features = memo.lookup::<2>(indices, &device).unwrap_or_else(|| {
                let f = self.backbone.0.features(images.clone(), frozen);
                memo.store(indices, &f);
                f
            });
            return Some(self.head.forward(features));
        };
        let first = stages.first().unwrap_or(Stage::Layer4);
        if first == Stage::Stem {
            return None;
        }
        let map = memo.lookup::<4>(indices, &device).unwrap_or_else(|| {
            let m = self
                .backbone
                .0
                .feature_map_before(images.clone(), first, frozen);
            memo.store(indices, &m);
            m
        });
        Some(self.head.forward(global_pool(
            stages.forward_map(map, trained_stages_bn(false)),
        )))
    }
}

impl InferenceStep for Classifier {
    type Input = ImageBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ImageBatch) -> ClassificationOutput {
        if let Some(memo) = &self.valid_memo
            && let Some(logits) = self.memo_logits(memo, &batch.images, &batch.indices)
        {
            return classify_logits(logits, batch.targets);
        }
        self.classify(batch.images, batch.targets, false)
    }
}

/// The fine-tuned stages and the head, trained on the cached input map of
/// the first trained stage (the frozen prefix's output, see
/// [`crate::cache`]); join them to their backbone with
/// [`Classifier::new`] and [`Classifier::trained_stages`] afterwards.
#[derive(Module, Debug)]
pub struct CachedStages {
    /// The trainable head.
    pub head: Head,
    /// The fine-tuned stages (the same field name as in [`Classifier`]:
    /// their learning rate follows it).
    pub trained_stages: ResNetStages,
    /// `[C, H, W]` of the cached map.
    #[module(skip)]
    pub shape: [usize; 3],
}

impl CachedStages {
    fn logits(&self, rows: Tensor<2>, train: bool) -> Tensor<2> {
        let [n, _] = rows.dims();
        let [c, h, w] = self.shape;
        let map = self
            .trained_stages
            .forward_map(rows.reshape([n, c, h, w]), trained_stages_bn(train));
        self.head.forward(global_pool(map))
    }
}

impl TrainStep for CachedStages {
    type Input = FeatureBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: FeatureBatch) -> TrainOutput<ClassificationOutput> {
        let out = classify_logits(self.logits(batch.features, true), batch.targets);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for CachedStages {
    type Input = FeatureBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: FeatureBatch) -> ClassificationOutput {
        classify_logits(self.logits(batch.features, false), batch.targets)
    }
}

/// The head alone, trained on cached backbone features (see
/// [`crate::cache`]); join it to its backbone with [`Classifier::new`]
/// afterwards.
#[derive(Module, Debug)]
pub struct CachedHead {
    /// The trainable head.
    pub head: Head,
}

impl CachedHead {
    /// Wraps a head.
    pub fn new(head: Head) -> Self {
        Self { head }
    }
}

impl TrainStep for CachedHead {
    type Input = FeatureBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: FeatureBatch) -> TrainOutput<ClassificationOutput> {
        let out = classify_logits(self.head.forward(batch.features), batch.targets);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for CachedHead {
    type Input = FeatureBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: FeatureBatch) -> ClassificationOutput {
        classify_logits(self.head.forward(batch.features), batch.targets)
    }
}
