//! The lesson: a frozen ImageNet ResNet, a new head, 5 epochs on the Alien
//! vs Predator photos, then the probabilities of three validation images.
//!
//! ```text
//! cargo run --example alien_vs_predator                 # offline, on the committed defaults
//! cargo run --example alien_vs_predator -- --help
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use avp::data::decode_rgb8;
use avp::model::parse_device;
use avp::train::{
    Augmentation, BnMode, EvalTransform, ExecutionStrategy, OutputPolicy, TrainConfig,
    train_with_policy,
};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

mod common;
use common::{DEFAULT_WEIGHTS, load_backbone};

/// The lesson's photos, committed.
const DEFAULT_DATA: &str = "data/alien_vs_predator_thumbnails/data";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AugmentArg {
    /// The lesson's RandomAffine(0, shear=10, scale=(0.8,1.2)) + flip, after the squash.
    Lesson,
    /// torchvision's tutorial: RandomResizedCrop(224) + flip.
    Tutorial,
    /// No augmentation (the evaluation transform for training too).
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EvalArg {
    /// The weights' own (torchvision's and timm's Resize(256) + CenterCrop(224)), else squash.
    Auto,
    /// The lesson's Resize((224, 224)).
    Squash,
    /// Resize(256) + CenterCrop(224).
    CenterCrop,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BnArg {
    /// Running statistics (the backbone is a fixed function).
    Frozen,
    /// Batch statistics while training, as the PyTorch lesson's model.train().
    Lesson,
}

/// Train a classifier head on a frozen ImageNet ResNet, as the PyTorch
/// transfer-learning lesson does with Alien vs Predator photos.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Image folder with train/val (or entrenamiento/validacion) splits of
    /// one subfolder per class.
    #[arg(long, env = "AVP_DATA", default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// Backbone weights: .onnx, .pth/.pt, .safetensors or .bpk, or a known
    /// name to download once into the cache: torchvision-resnet50 (the
    /// lesson's network: torchvision's IMAGENET1K_V1), torchvision-resnet18,
    /// -34, -101, -152 (found in torch's own cache when it has them); or
    /// hf:OWNER/NAME[/FILE] from the Hugging Face hub (e.g.
    /// hf:timm/resnet50.a1_in1k).
    #[arg(long, env = "AVP_WEIGHTS", default_value = DEFAULT_WEIGHTS)]
    weights: PathBuf,
    /// Preprocessing ONNX that defines the backbone's input normalization
    /// (default: the committed ResNet18's, when --weights is the default).
    #[arg(long, env = "AVP_PREP")]
    prep: Option<PathBuf>,
    /// Backend: flex, ndarray, wgpu, vulkan, cuda or cuda:N.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Epochs.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the head's initialisation, the shuffling and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for checkpoints, metrics.csv and config.json.
    #[arg(long, default_value = "runs/alien_vs_predator")]
    out: PathBuf,
    /// BatchNorm behaviour of the frozen backbone while training.
    #[arg(long, value_enum, default_value = "frozen")]
    bn_mode: BnArg,
    /// Training augmentation.
    #[arg(long, value_enum, default_value = "lesson")]
    augment: AugmentArg,
    /// Train without augmentation (the same as --augment none).
    #[arg(long)]
    no_augment: bool,
    /// Validation and prediction transform.
    #[arg(long, value_enum, default_value = "auto")]
    eval_transform: EvalArg,
    /// Run the backbone once per image and train the head on the stored
    /// features (much faster; with augmentation it needs --cache-views).
    /// The features are kept on disk and reused by later runs with the same
    /// images, weights and transform.
    #[arg(long)]
    feature_cache: bool,
    /// With augmentation: precompute K augmented views of every training
    /// image and sample one per epoch (implies --feature-cache).
    #[arg(long, value_name = "K")]
    cache_views: Option<usize>,
    /// Folder of the feature cache (default: $AVP_CACHE_DIR/features, or
    /// ~/.cache/avp/features).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The largest feature cache (in GB) to compute and hold in memory; a
    /// larger one is refused before the backbone runs.
    #[arg(long, default_value_t = 8.0, value_name = "GB")]
    cache_max_gb: f64,
    /// Follow links to folders inside the class folders (not followed by
    /// default, as torchvision's ImageFolder); each folder is read once and
    /// a link out of its class folder is refused.
    #[arg(long)]
    follow_links: bool,
    /// Remove a finished run in --out now, instead of keeping it until the
    /// new run has finished.
    #[arg(long)]
    overwrite: bool,
    /// Start afresh instead of resuming an interrupted run in --out (for
    /// instance when its checkpoint is damaged).
    #[arg(long)]
    restart: bool,
}

fn main() -> Result<()> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches)?;
    let from_env = |id: &str| matches.value_source(id) == Some(ValueSource::EnvVariable);
    if from_env("data") && !args.data.is_dir() {
        bail!(
            "AVP_DATA={} is not a folder: set AVP_DATA to a dataset folder (DIR/train and DIR/val), or unset it \
             to use the lesson's photos",
            args.data.display()
        );
    }
    let known_name = avp::model::download::downloadable()
        .iter()
        .any(|k| Path::new(&k.name) == args.weights)
        || args.weights.to_string_lossy().starts_with("hf:");
    if from_env("weights") && !args.weights.exists() && !known_name {
        bail!(
            "AVP_WEIGHTS={} does not exist: set AVP_WEIGHTS to a weights file or a known name, or unset it \
             to use the committed ResNet18",
            args.weights.display()
        );
    }
    if from_env("prep") && args.prep.as_ref().is_some_and(|p| !p.is_file()) {
        bail!(
            "AVP_PREP={} does not exist: set AVP_PREP to a preprocessing ONNX file, or unset it",
            args.prep
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!(
            "--out {} is a file, not a folder: pass a folder for the run's files (it is created if missing)",
            args.out.display()
        );
    }
    if !args.data.is_dir() {
        bail!(
            "no dataset at {}: expected DIR/train (or entrenamiento) and DIR/val (or validation, validacion), one subfolder per class. \
             The lesson's photos are committed in {DEFAULT_DATA} (run from the repository root), or pass --data DIR / set AVP_DATA.",
            args.data.display()
        );
    }
    let no_augment = args.no_augment || matches!(args.augment, AugmentArg::None);
    let feature_cache = args.feature_cache || args.cache_views.is_some();
    if feature_cache && !no_augment && args.cache_views.is_none() {
        bail!(
            "--feature-cache with augmentation needs --cache-views K (K augmented views per image); \
             or add --no-augment to cache one plain view per image"
        );
    }
    let device = parse_device(&args.device)?;
    if let Some(line) = avp::model::device_report(&args.device) {
        eprintln!("{line}");
    }
    if args.lr.is_nan() || !args.lr.is_finite() || args.lr <= 0.0 {
        bail!(
            "--lr {} is not a usable learning rate: pass a finite number above 0 (the lesson uses 1e-3)",
            args.lr
        );
    }
    let backbone = load_backbone(&args.weights, args.prep.as_deref(), &device)?;
    println!("backbone: {}", backbone.config.describe());
    println!("input:    {}", backbone.normalization.describe());
    let config = TrainConfig::new()
        .with_epochs(args.epochs)
        .with_batch_size(args.batch_size)
        .with_lr(args.lr)
        .with_seed(args.seed)
        .with_augment(!no_augment)
        .with_augmentation(match args.augment {
            AugmentArg::Tutorial => Augmentation::Tutorial,
            AugmentArg::Lesson | AugmentArg::None => Augmentation::Lesson,
        })
        .with_eval_transform(match args.eval_transform {
            EvalArg::Auto => EvalTransform::Auto,
            EvalArg::Squash => EvalTransform::Squash,
            EvalArg::CenterCrop => EvalTransform::CenterCrop,
        })
        .with_bn_mode(match args.bn_mode {
            BnArg::Frozen => BnMode::Frozen,
            BnArg::Lesson => BnMode::Lesson,
        })
        .with_feature_cache(feature_cache)
        .with_cache_views(args.cache_views.unwrap_or(1))
        .with_cache_dir(args.cache_dir.clone())
        .with_cache_max_gb(args.cache_max_gb)
        .with_follow_links(args.follow_links);
    // Refused here, before the backbone is loaded.
    config.validate()?;
    let policy = OutputPolicy {
        overwrite: args.overwrite,
        restart: args.restart,
    };
    let outcome = train_with_policy(
        backbone,
        &args.data,
        &args.out,
        &config,
        ExecutionStrategy::SingleDevice(device.clone().without_autodiff()),
        policy,
    )?;
    let last = outcome.epochs.last().context("no epoch finished")?;
    println!("final validation accuracy: {:.4}", last.valid_acc);

    // The lesson's figure: three validation images and their probabilities.
    let val = avp::data::Split::Validation.resolve(&args.data)?;
    let lesson_three = ["alien/11.jpg", "alien/22.jpg", "predator/33.jpg"];
    let picks: Vec<PathBuf> = if lesson_three.iter().all(|p| val.join(p).exists()) {
        lesson_three.iter().map(|p| val.join(p)).collect()
    } else {
        let folder = avp::data::ImageFolder::open_dir(&val, Default::default())?;
        (0..folder.classes.len())
            .filter_map(|c| {
                folder
                    .samples
                    .iter()
                    .find(|s| s.class == c)
                    .map(|s| s.path.clone())
            })
            .collect()
    };
    let trained = &outcome.model;
    let mut figure = Vec::new();
    for pred in trained.predict_paths(&picks, 8)? {
        let title: Vec<String> = trained
            .classes
            .iter()
            .zip(&pred.probabilities)
            .map(|(c, p)| format!("{:.0}% {}", p * 100.0, capitalize(c)))
            .collect();
        println!("{}: {}", pred.path.display(), title.join(", "));
        figure.push((decode_rgb8(&pred.path)?, title.join(", ")));
    }
    let out_dir = &outcome.out_dir;
    let predictions = out_dir.join("predictions.png");
    avp::train::plot_predictions(&figure, &predictions)?;
    println!();
    for (what, file) in [
        ("model", "model.bpk"),
        ("config", "config.json"),
        ("metrics", "metrics.csv"),
        ("curves", "curves.png"),
        ("predictions", "predictions.png"),
    ] {
        println!(
            "{:<12} {}",
            format!("{what}:"),
            out_dir.join(file).display()
        );
    }
    Ok(())
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
