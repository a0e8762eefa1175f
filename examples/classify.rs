//! Classify images with a trained `model.bpk` (the dataset's classes and
//! their probabilities) or with an ImageNet network that has a classifier
//! (the top-5 ImageNet classes).
//!
//! ```text
//! cargo run --example classify -- --model runs/alien_vs_predator/model.bpk \
//!     data/alien_vs_predator_thumbnails/data/validation/alien/11.jpg
//! cargo run --example classify -- --model resnet50.onnx photo.jpg --json
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use avp::data::{Rng, decode_rgb8};
use avp::model::{Backbone, BatchNormUse};
use avp::train::{EvalTransform, eval_pipeline, load_model};
use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;

mod common;
use common::RunArgs;

/// The 1000 ImageNet-1k class names, in index order
/// (`weights/make_imagenet_classes.py` writes them from torchvision).
const IMAGENET: &str = include_str!("../weights/imagenet_classes.txt");

/// Classify images with a trained model or an ImageNet network.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A model.bpk written by training, or any weights file with a classifier
    /// (.onnx, .pth, .safetensors, .bpk), or a known name downloaded once
    /// into the cache (torchvision-resnet50, torchvision-resnet18, ...).
    #[arg(long)]
    model: PathBuf,
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Preprocessing ONNX that defines the input normalization (ImageNet
    /// networks only; a trained model.bpk carries its own).
    #[arg(long)]
    prep: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// How many classes to list per image (ImageNet networks).
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print logits and probabilities as JSON.
    #[arg(long)]
    json: bool,
    /// The transform: `auto` is what the model's validation used (a
    /// trained model.bpk) or the weights' own (torchvision's
    /// Resize(256) + CenterCrop(224)), else the lesson's squash.
    #[arg(long, value_enum, default_value = "auto")]
    eval_transform: EvalArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum EvalArg {
    /// The model's or the weights' own.
    Auto,
    /// Resize((224, 224)).
    Squash,
    /// Resize(256) + CenterCrop(224).
    CenterCrop,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    common::print_library_messages();
    let device = args.run.device()?;
    // A training run's folder stands for its model.bpk.
    if args.model.is_dir() {
        let inside = args.model.join("model.bpk");
        if !inside.is_file() {
            bail!(
                "{} is a folder without a model.bpk: pass a trained model.bpk (or the run folder that holds one), \
                 or a weights file",
                args.model.display()
            );
        }
        args.model = inside;
    }
    // A trained classifier first; otherwise any ImageNet network.
    let (normalization, classes, run): (_, Vec<String>, Box<dyn Fn(Tensor<4>) -> Tensor<2>>) =
        match load_model(&args.model, &device) {
            Ok(trained) => {
                let trained = trained.with_kernels(args.run.kernels())?;
                let c = trained.classifier;
                (
                    trained.normalization,
                    trained.classes,
                    Box::new(move |x| c.forward(x)),
                )
            }
            Err(trained_err) => {
                let loaded = common::load_weights_file(&args.model, args.prep.clone(), &device)
                    .with_context(|| {
                        format!(
                            "{} is neither a trained model.bpk ({trained_err}) nor a weights file",
                            args.model.display()
                        )
                    })?;
                let Some(n) = loaded.config.num_classes else {
                    bail!(
                        "{} is a headless backbone ({} features): it has no classes to predict; train a head on it first \
                         (cargo run --example alien_vs_predator -- --weights {})",
                        args.model.display(),
                        loaded.config.num_features(),
                        args.model.display()
                    );
                };
                let names: Vec<String> = if n == 1000 {
                    IMAGENET.lines().map(str::to_string).collect()
                } else {
                    (0..n).map(|i| format!("class {i}")).collect()
                };
                let normalization = loaded.normalization.clone();
                let backbone = Backbone::from(loaded).with_kernels(args.run.kernels())?;
                (
                    normalization,
                    names,
                    Box::new(move |x| backbone.forward(x, BatchNormUse::Folded)),
                )
            }
        };
    let choice = match args.eval_transform {
        EvalArg::Auto => EvalTransform::Auto,
        EvalArg::Squash => EvalTransform::Squash,
        EvalArg::CenterCrop => EvalTransform::CenterCrop,
    };
    let eval = eval_pipeline(&choice.resolve(&normalization));
    let [c, h, w] = eval.output_shape();
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for path in &args.images {
        // A bad image is reported and the others are still classified.
        let img = match decode_rgb8(path) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("skipped {}: {e}", path.display());
                failed.push((path.clone(), e.to_string()));
                continue;
            }
        };
        let x = Tensor::<4>::from_data(
            TensorData::new(eval.apply(&img, &mut Rng::for_item(0, 0, 0)), [1, c, h, w]),
            &device,
        );
        let logits = run(x);
        let probs = softmax(logits.clone(), 1);
        let to_vec = |t: Tensor<2>| {
            t.into_data()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        };
        let (logits, probs) = (to_vec(logits)?, to_vec(probs)?);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        order.truncate(args.top.max(1).min(probs.len()));
        results.push((path.clone(), logits, probs, order));
    }
    if args.json {
        let out: Vec<_> = results
            .iter()
            .map(|(path, logits, probs, order)| {
                let mut entry = serde_json::json!({
                    "image": path.to_string_lossy(),
                    "logits": logits,
                    "probabilities": probs,
                    "top": order.iter().map(|&i| serde_json::json!({"class": classes.get(i), "index": i, "probability": probs[i]})).collect::<Vec<_>>(),
                });
                if let Some(raw) = raw_name(path) {
                    entry["image_raw"] = raw.into();
                }
                entry
            })
            .collect();
        let errors: Vec<_> = failed
            .iter()
            .map(|(path, why)| {
                let mut e = serde_json::json!({"image": path.to_string_lossy(), "error": why});
                if let Some(raw) = raw_name(path) {
                    e["image_raw"] = raw.into();
                }
                e
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": args.model.to_string_lossy(),
                "classes": classes.len(),
                "results": out,
                "errors": errors,
            }))?
        );
        return finish(&failed, args.images.len());
    }
    for (path, _, probs, order) in &results {
        let shown: Vec<String> = order
            .iter()
            .map(|&i| {
                format!(
                    "{:.1}% {}",
                    probs[i] * 100.0,
                    classes.get(i).map(String::as_str).unwrap_or("?")
                )
            })
            .collect();
        println!("{}: {}", path.display(), shown.join(", "));
    }
    finish(&failed, args.images.len())
}

/// Fails (non-zero exit) when some images could not be classified, after
/// the others were.
fn finish(failed: &[(PathBuf, String)], total: usize) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    bail!(
        "{} of {total} image(s) could not be read: {}",
        failed.len(),
        failed
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A file name that is not valid UTF-8, with each byte that is not part
/// of a valid character written as `\xNN` (`None` for valid names, whose
/// `image` field is exact).
fn raw_name(path: &std::path::Path) -> Option<String> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if std::str::from_utf8(bytes).is_ok() {
        return None;
    }
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    Some(out)
}
