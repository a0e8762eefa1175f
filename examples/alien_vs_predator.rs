//! The lesson: a frozen ImageNet ResNet, a new head, 5 epochs on the Alien
//! vs Predator photos, then the probabilities of three validation images.
//! With `--finetune layer4` the backbone's last stage trains too.
//!
//! ```text
//! cargo run --example alien_vs_predator                 # offline, on the committed defaults
//! cargo run --example alien_vs_predator -- --finetune layer4
//! cargo run --example alien_vs_predator -- --help
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use avp::data::decode_rgb8;
use avp::train::{OutputPolicy, train_with_policy};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

mod common;
use common::{BackboneArgs, CacheArgs, DEFAULT_DATA, TrainArgs};

/// Train a classifier head on a frozen ImageNet ResNet, as the PyTorch
/// transfer-learning lesson does with Alien vs Predator photos.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Image folder with train/val (or entrenamiento/validacion) splits of
    /// one subfolder per class.
    #[arg(long, env = "AVP_DATA", default_value = DEFAULT_DATA)]
    data: PathBuf,
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Seed of the head's initialisation, the shuffling and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for checkpoints, metrics.csv and config.json.
    #[arg(long, default_value = "runs/alien_vs_predator")]
    out: PathBuf,
    #[command(flatten)]
    cache: CacheArgs,
    /// Train on several devices, comma-separated (flex,flex; cuda:0,cuda:1;
    /// default: --device alone). Each device takes its shard of every
    /// epoch's shuffled batches and the gradients are summed: one optimiser
    /// step sees one batch per device. The frozen backbone only (no
    /// --finetune, no --bn-mode lesson).
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// How several devices train: auto (DDP when all are CUDA, Burn's
    /// multi-device strategy otherwise), multi, or ddp (CUDA only)
    #[arg(long, default_value = "auto", value_name = "STRATEGY")]
    parallel: String,
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
    let mut args = Args::from_arg_matches(&matches)?;
    common::print_library_messages();
    let (weights, prep) = (&args.backbone.weights, &args.backbone.prep);
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
        .any(|k| Path::new(&k.name) == weights.as_path())
        || weights.to_string_lossy().starts_with("hf:");
    if from_env("weights") && !weights.exists() && !known_name {
        bail!(
            "AVP_WEIGHTS={} does not exist: set AVP_WEIGHTS to a weights file or a known name, or unset it \
             to use the committed ResNet18",
            weights.display()
        );
    }
    if from_env("prep") && prep.as_ref().is_some_and(|p| !p.is_file()) {
        bail!(
            "AVP_PREP={} does not exist: set AVP_PREP to a preprocessing ONNX file, or unset it",
            prep.as_ref()
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
    // Refused here, before the backbone is loaded.
    let config = args.train.config(&args.cache, args.seed)?;
    let parallel: avp::train::Parallel = args.parallel.parse()?;
    if let Some(list) = &args.devices {
        // The backbone loads on the first (the main) device.
        let first = list
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        args.backbone.run.device = first;
    }
    let strategy = avp::train::execution_strategy(
        args.devices.as_deref().unwrap_or(&args.backbone.run.device),
        parallel,
    )?;
    let device = args.backbone.run.device()?;
    let backbone = args.backbone.load(&device)?;
    println!("backbone: {}", backbone.config().describe());
    println!("input:    {}", backbone.normalization().describe());
    println!("training: {}", avp::train::finetune::describe(&config));
    let policy = OutputPolicy {
        overwrite: args.overwrite,
        restart: args.restart,
    };
    let outcome = train_with_policy(backbone, &args.data, &args.out, &config, strategy, policy)?;
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
