//! The lesson: a frozen ImageNet ResNet, a new head, 5 epochs on the Alien
//! vs Predator photos, then the probabilities of three validation images.
//!
//! ```text
//! cargo run --example alien_vs_predator                 # offline, on the committed defaults
//! cargo run --example alien_vs_predator -- --help
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use avp::data::{Pipeline, Rng, decode_rgb8};
use avp::model::{LoadOptions, load_weights, parse_device};
use avp::train::{BnMode, TrainConfig, data_normalize, train};
use burn::tensor::{Tensor, TensorData};
use clap::{Parser, ValueEnum};

const DEFAULT_DATA: &str = "data/alien_vs_predator_thumbnails/data";
const DEFAULT_WEIGHTS: &str = "weights/mlnet-resnet18/ResNet18.onnx";
const DEFAULT_PREP: &str = "weights/mlnet-resnet18/ResNetPreprocess.onnx";

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
#[command(version)]
struct Args {
    /// Image folder with train/val (or entrenamiento/validacion) splits of
    /// one subfolder per class.
    #[arg(long, env = "AVP_DATA", default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// Backbone weights: .onnx, .pth/.pt, .safetensors or .bpk.
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
    /// Train without the lesson's augmentation.
    #[arg(long)]
    no_augment: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.data.is_dir() {
        bail!(
            "no dataset at {}: expected DIR/train (or entrenamiento) and DIR/val (or validation, validacion), one subfolder per class. \
             The lesson's photos are committed in {DEFAULT_DATA} (run from the repository root), or pass --data DIR / set AVP_DATA.",
            args.data.display()
        );
    }
    let device = parse_device(&args.device)?;
    let prep = args.prep.clone().or_else(|| {
        (args.weights == Path::new(DEFAULT_WEIGHTS) && Path::new(DEFAULT_PREP).exists())
            .then(|| PathBuf::from(DEFAULT_PREP))
    });
    let options = LoadOptions {
        prep,
        ..Default::default()
    };
    let backbone = load_weights(&args.weights, &device, &options)
        .with_context(|| format!("loading the backbone {}", args.weights.display()))?;
    println!("backbone: {}", backbone.config.describe());
    println!("input:    {}", backbone.normalization.describe());
    let normalize = data_normalize(&backbone.normalization);
    let config = TrainConfig::new()
        .with_epochs(args.epochs)
        .with_batch_size(args.batch_size)
        .with_lr(args.lr)
        .with_seed(args.seed)
        .with_augment(!args.no_augment)
        .with_bn_mode(match args.bn_mode {
            BnArg::Frozen => BnMode::Frozen,
            BnArg::Lesson => BnMode::Lesson,
        });
    let outcome = train(backbone, &args.data, &args.out, &config, &device)?;
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
    let eval = Pipeline::eval(normalize);
    let model = &outcome.model;
    let mut figure = Vec::new();
    for p in &picks {
        let img = decode_rgb8(p)?;
        let x = Tensor::<4>::from_data(
            TensorData::new(
                eval.apply(&img, &mut Rng::for_item(0, 0, 0)),
                [1, 3, 224, 224],
            ),
            &device,
        );
        let probs = model
            .probabilities(x)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let title: Vec<String> = outcome
            .classes
            .iter()
            .zip(&probs)
            .map(|(c, p)| format!("{:.0}% {}", p * 100.0, capitalize(c)))
            .collect();
        println!("{}: {}", p.display(), title.join(", "));
        figure.push((img, title.join(", ")));
    }
    let predictions = outcome.out_dir.join("predictions.png");
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
            outcome.out_dir.join(file).display()
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
