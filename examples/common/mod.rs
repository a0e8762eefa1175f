//! What the examples share: the committed defaults, the flag groups
//! (backbone, device and kernels; training; feature cache) pulled into each
//! program with `#[command(flatten)]`, the one path from flags to a loaded
//! [`Backbone`], and printing what the library reports.
#![allow(dead_code)] // each example uses the part it needs

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use avp::model::{
    Backbone, DownloadOptions, Kernels, LoadOptions, LoadedModel, compiled_backends, load_weights,
    parse_device, report, resolve_weights,
};
use avp::train::{Augmentation, BnMode, EvalTransform, OptimizerKind, TrainConfig, parse_stages};
use burn::tensor::Device;
use clap::ValueEnum;

/// The lesson's photos, committed.
pub const DEFAULT_DATA: &str = "data/alien_vs_predator_thumbnails/data";
/// The real ImageNet ResNet18, committed.
pub const DEFAULT_WEIGHTS: &str = "weights/mlnet-resnet18/ResNet18.onnx";
/// Its preprocessing graph (the normalization it expects).
pub const DEFAULT_PREP: &str = "weights/mlnet-resnet18/ResNetPreprocess.onnx";

/// Prints what the library reports: progress and notes on stdout,
/// warnings on stderr. Library code itself never prints.
pub fn print_library_messages() {
    report::set_listener(|level, text| match level {
        report::Level::Warn => eprintln!("{text}"),
        _ => println!("{text}"),
    });
}

/// A device name this build can run, checked when the flags are parsed.
fn device_name(name: &str) -> std::result::Result<String, String> {
    parse_device(name)
        .map(|_| name.to_string())
        .map_err(|e| format!("{e} (this build has: {})", compiled_backends().join(", ")))
}

/// Where and how a backbone runs.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Backend: flex, ndarray, wgpu, vulkan, cuda or cuda:N (those compiled
    /// into this build)
    #[arg(long, env = "AVP_DEVICE", default_value = "flex", value_parser = device_name)]
    pub device: String,
    /// Kernels of the frozen backbone: auto (the fused CPU path on flex,
    /// Burn's modules elsewhere), burn, or fused. AVP_FUSED=0 in the
    /// environment means burn.
    #[arg(long, env = "AVP_KERNELS", default_value = "auto", value_parser = kernels)]
    pub kernels: Kernels,
}

fn kernels(s: &str) -> std::result::Result<Kernels, String> {
    s.parse::<Kernels>().map_err(|e| e.to_string())
}

impl RunArgs {
    /// The device, its adapter reported on stderr (for GPU backends).
    pub fn device(&self) -> Result<Device> {
        let device = parse_device(&self.device)?;
        if let Some(line) = avp::model::device_report(&self.device) {
            eprintln!("{line}");
        }
        Ok(device)
    }

    /// The kernels asked for; the older switch `AVP_FUSED=0` turns `auto`
    /// into `burn`.
    pub fn kernels(&self) -> Kernels {
        let off = std::env::var("AVP_FUSED").is_ok_and(|v| v.trim() == "0");
        if off && self.kernels == Kernels::Auto {
            Kernels::Burn
        } else {
            self.kernels
        }
    }
}

/// The pretrained backbone: its weights, its normalization, where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct BackboneArgs {
    /// Backbone weights: .onnx, .pth/.pt, .safetensors or .bpk, or a known
    /// name to download once into the cache: torchvision-resnet50 (the
    /// lesson's network: torchvision's IMAGENET1K_V1), torchvision-resnet18,
    /// -34, -101, -152 (found in torch's own cache when it has them); or
    /// hf:OWNER/NAME[/FILE] from the Hugging Face hub (e.g.
    /// hf:timm/resnet50.a1_in1k)
    #[arg(long, env = "AVP_WEIGHTS", default_value = DEFAULT_WEIGHTS)]
    pub weights: PathBuf,
    /// Preprocessing ONNX that defines the backbone's input normalization
    /// (default: the committed ResNet18's, when --weights is the default)
    #[arg(long, env = "AVP_PREP")]
    pub prep: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl BackboneArgs {
    /// Loads the backbone (a file or a known name, downloaded once), with
    /// `--prep` or, for the committed ResNet18, its committed preprocessing
    /// file, on `device` and the chosen kernels. The one load path of the
    /// examples.
    pub fn load(&self, device: &Device) -> Result<Backbone> {
        let weights = &self.weights;
        let prep = self.prep.clone().or_else(|| {
            (weights == Path::new(DEFAULT_WEIGHTS) && Path::new(DEFAULT_PREP).exists())
                .then(|| PathBuf::from(DEFAULT_PREP))
        });
        let loaded = load_weights_file(weights, prep, device)?;
        Ok(Backbone::from(loaded).with_kernels(self.run.kernels())?)
    }
}

/// A weights file or a known name (downloaded once into the cache),
/// loaded with `prep` when given: the load path every example shares.
pub fn load_weights_file(
    weights: &Path,
    prep: Option<PathBuf>,
    device: &Device,
) -> Result<LoadedModel> {
    let file = resolve_weights(
        &weights.to_string_lossy(),
        device,
        &DownloadOptions::default(),
    )?;
    let options = LoadOptions {
        prep,
        ..Default::default()
    };
    load_weights(&file, device, &options)
        .with_context(|| format!("loading the backbone {}", weights.display()))
}

/// The feature cache.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Run the backbone once per image and train the head on the stored
    /// features (much faster; with augmentation it needs --cache-views).
    /// With --finetune: the frozen prefix once, the trained stages and the
    /// head on its stored output.
    /// The features are kept on disk and reused by later runs with the same
    /// images, weights and transform.
    #[arg(long)]
    pub feature_cache: bool,
    /// With augmentation: precompute K augmented views of every training
    /// image and sample one per epoch (implies --feature-cache).
    #[arg(long, value_name = "K")]
    pub cache_views: Option<usize>,
    /// Folder of the feature cache (default: $AVP_CACHE_DIR/features, or
    /// ~/.cache/avp/features).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// The largest feature cache (in GB) to compute and hold in memory; a
    /// larger one is refused before the backbone runs.
    #[arg(long, default_value_t = 8.0, value_name = "GB")]
    pub cache_max_gb: f64,
}

impl CacheArgs {
    /// Whether the cache is on (`--cache-views` implies it).
    pub fn enabled(&self) -> bool {
        self.feature_cache || self.cache_views.is_some()
    }
}

/// Augmentation of the training images.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AugmentArg {
    /// The lesson's RandomAffine(0, shear=10, scale=(0.8,1.2)) + flip, after the squash.
    Lesson,
    /// torchvision's tutorial: RandomResizedCrop(224) + flip.
    Tutorial,
    /// No augmentation (the evaluation transform for training too).
    None,
}

/// The evaluation transform.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EvalArg {
    /// The weights' own (torchvision's and timm's Resize(256) + CenterCrop(224)), else squash.
    Auto,
    /// The lesson's Resize((224, 224)).
    Squash,
    /// Resize(256) + CenterCrop(224).
    CenterCrop,
}

/// BatchNorm behaviour of the frozen backbone while training.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BnArg {
    /// Running statistics (the backbone is a fixed function)
    Frozen,
    /// Batch statistics while training, as the PyTorch lesson's model.train()
    Lesson,
}

/// The optimiser.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptimizerArg {
    /// Adam (betas 0.9, 0.999; epsilon 1e-8), the lesson's
    Adam,
    /// SGD, with --momentum
    Sgd,
}

/// The training recipe.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Epochs
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Batch size
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Learning rate (of the head, when fine-tuning)
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Fine-tune the backbone's last stages with the head: stage names
    /// separated by commas, up to layer4 (layer4; layer3,layer4), or all
    /// (the stem too). Default: the whole backbone is frozen
    #[arg(long, value_name = "STAGES")]
    pub finetune: Option<String>,
    /// Learning rate of the fine-tuned stages (default 1e-4; needs --finetune)
    #[arg(long, value_name = "LR")]
    pub backbone_lr: Option<f64>,
    /// Optimiser
    #[arg(long, value_enum, default_value = "adam")]
    pub optimizer: OptimizerArg,
    /// SGD momentum, as PyTorch's (dampening 0); needs --optimizer sgd
    #[arg(long)]
    pub momentum: Option<f64>,
    /// L2 weight decay, added to the gradients as PyTorch's Adam and SGD do
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Multiply the learning rates by --lr-gamma every EPOCHS epochs
    /// (PyTorch's StepLR)
    #[arg(long, value_name = "EPOCHS")]
    pub lr_step: Option<usize>,
    /// The factor of --lr-step (default 0.1)
    #[arg(long, value_name = "G")]
    pub lr_gamma: Option<f64>,
    /// BatchNorm behaviour of the frozen backbone while training
    #[arg(long, value_enum, default_value = "frozen")]
    pub bn_mode: BnArg,
    /// Training augmentation.
    #[arg(long, value_enum, default_value = "lesson")]
    pub augment: AugmentArg,
    /// Train without augmentation (the same as --augment none).
    #[arg(long)]
    pub no_augment: bool,
    /// Validation and prediction transform.
    #[arg(long, value_enum, default_value = "auto")]
    pub eval_transform: EvalArg,
    /// Follow links to folders inside the class folders (not followed by
    /// default, as torchvision's ImageFolder); each folder is read once and
    /// a link out of its class folder is refused.
    #[arg(long)]
    pub follow_links: bool,
    /// How each image is checked when the folders are opened: full
    /// (decoded), header (format and size only: fast on large folders; a
    /// broken image is reported when first read), or auto (full up to
    /// 20,000 images, header above)
    #[arg(long, default_value = "auto", value_name = "CHECK")]
    pub verify: String,
    /// Run the frozen backbone over the validation images in every epoch
    /// (by default its outputs are kept from the first epoch: the same
    /// numbers, computed once; the lesson's --bn-mode always recomputes)
    #[arg(long)]
    pub no_valid_reuse: bool,
}

impl TrainArgs {
    /// Whether training images are augmented.
    pub fn augmented(&self) -> bool {
        !(self.no_augment || matches!(self.augment, AugmentArg::None))
    }

    /// The training configuration these flags and `cache` describe, for
    /// `seed`; checked before any work.
    pub fn config(&self, cache: &CacheArgs, seed: u64) -> Result<TrainConfig> {
        if !self.lr.is_finite() || self.lr <= 0.0 {
            bail!(
                "--lr {} is not a usable learning rate: pass a finite number above 0 (the lesson uses 1e-3)",
                self.lr
            );
        }
        if cache.enabled() && self.augmented() && cache.cache_views.is_none() {
            bail!(
                "--feature-cache with augmentation needs --cache-views K (K augmented views per image); \
                 or add --no-augment to cache one plain view per image"
            );
        }
        if self.lr_gamma.is_some() && self.lr_step.is_none() {
            bail!(
                "--lr-gamma is the factor of --lr-step: add --lr-step EPOCHS, or drop --lr-gamma"
            );
        }
        let finetune = match &self.finetune {
            Some(list) => parse_stages(list)?,
            None => Vec::new(),
        };
        let config = TrainConfig::new()
            .with_epochs(self.epochs)
            .with_batch_size(self.batch_size)
            .with_lr(self.lr)
            .with_seed(seed)
            .with_augment(self.augmented())
            .with_augmentation(match self.augment {
                AugmentArg::Tutorial => Augmentation::Tutorial,
                AugmentArg::Lesson | AugmentArg::None => Augmentation::Lesson,
            })
            .with_eval_transform(match self.eval_transform {
                EvalArg::Auto => EvalTransform::Auto,
                EvalArg::Squash => EvalTransform::Squash,
                EvalArg::CenterCrop => EvalTransform::CenterCrop,
            })
            .with_bn_mode(match self.bn_mode {
                BnArg::Frozen => BnMode::Frozen,
                BnArg::Lesson => BnMode::Lesson,
            })
            .with_feature_cache(cache.enabled())
            .with_cache_views(cache.cache_views.unwrap_or(1))
            .with_cache_dir(cache.cache_dir.clone())
            .with_cache_max_gb(cache.cache_max_gb)
            .with_follow_links(self.follow_links)
            .with_verify(self.verify.parse().map_err(anyhow::Error::msg)?)
            .with_finetune(finetune)
            .with_backbone_lr(self.backbone_lr)
            .with_optimizer(match self.optimizer {
                OptimizerArg::Adam => OptimizerKind::Adam,
                OptimizerArg::Sgd => OptimizerKind::Sgd,
            })
            .with_momentum(self.momentum.unwrap_or(0.0))
            .with_weight_decay(self.weight_decay)
            .with_lr_step(self.lr_step)
            .with_lr_gamma(self.lr_gamma.unwrap_or(0.1))
            .with_valid_reuse(!self.no_valid_reuse);
        config.validate()?;
        Ok(config)
    }
}
