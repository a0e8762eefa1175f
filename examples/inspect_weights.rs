//! What the importer sees in a weights file: architecture, head,
//! parameter count, normalization and provenance; with `--input`, the
//! model's outputs for an already-normalized NCHW float32 `.npy` array.
//!
//! ```text
//! cargo run --example inspect_weights -- weights/mlnet-resnet18/ResNet18.onnx \
//!     --prep weights/mlnet-resnet18/ResNetPreprocess.onnx
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use avp::model::{LoadOptions, load_weights, npy};
use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;

mod common;
use common::RunArgs;

/// Inspect a ResNet weights file (ONNX, .pth, .safetensors or .bpk).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The weights file, or a known name downloaded once into the cache
    /// (torchvision-resnet50, ...).
    file: PathBuf,
    /// A preprocessing ONNX file that defines the input normalization
    /// (e.g. ML.NET's ResNetPreprocess.onnx).
    #[arg(long)]
    prep: Option<PathBuf>,
    /// Run the model on this NCHW float32 .npy array (already normalized)
    /// and print its outputs (logits, or features for a headless file).
    #[arg(long)]
    input: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Convert to Burn's native format (architecture, normalization and
    /// provenance included) and time its reload.
    #[arg(long, value_name = "OUT.bpk")]
    convert: Option<PathBuf>,
    /// Write the network as a PyTorch state dict (safetensors, torchvision's
    /// names and layouts), for torchvision's ResNet of the same blocks
    #[arg(long, value_name = "OUT.safetensors")]
    export_torchvision: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::print_library_messages();
    let device = args.run.device()?;
    let started = std::time::Instant::now();
    let loaded = common::load_weights_file(&args.file, args.prep.clone(), &device)?;
    let load_seconds = started.elapsed().as_secs_f64();
    if let Some(out) = &args.convert {
        avp::model::save_native(
            &loaded.model,
            &loaded.config,
            &loaded.normalization,
            &loaded.provenance,
            out,
        )?;
        let started = std::time::Instant::now();
        let again = load_weights(out, &device, &LoadOptions::default())?;
        let reload = started.elapsed().as_secs_f64();
        if again.config.layers != loaded.config.layers {
            bail!("the converted file reloads as another architecture");
        }
        eprintln!(
            "converted to {} ({:.0} MB): loaded the original in {load_seconds:.2} s, reloaded the native file in {reload:.2} s",
            out.display(),
            std::fs::metadata(out)
                .map(|m| m.len() as f64 / 1e6)
                .unwrap_or(0.0)
        );
    }
    if let Some(out) = &args.export_torchvision {
        avp::model::weights::save_torchvision(&loaded.model, out)?;
        let c = &loaded.config;
        let block = match c.block {
            avp::model::BlockKind::Basic => "BasicBlock",
            avp::model::BlockKind::Bottleneck => "Bottleneck",
        };
        eprintln!(
            "wrote {}: in PyTorch, torchvision.models.resnet.ResNet(torchvision.models.resnet.{block}, {:?}{})\
             .load_state_dict(safetensors.torch.load_file(...), strict=False)",
            out.display(),
            c.layers,
            c.num_classes
                .map(|n| format!(", num_classes={n}"))
                .unwrap_or_default()
        );
        if c.padding != avp::model::PaddingStyle::Symmetric || c.final_pool_window.is_some() {
            eprintln!(
                "note: this network pads begin-heavy or pools a fixed window; torchvision's ResNet computes the same at 224x224 \
                 (any multiple of 32) only"
            );
        }
        if c.block == avp::model::BlockKind::Bottleneck
            && c.stride_on == avp::model::StridePlacement::Conv1x1
        {
            eprintln!(
                "note: this network strides on the first 1x1 convolution; torchvision's Bottleneck strides on the 3x3"
            );
        }
        if (c.bn_epsilon - 1e-5).abs() > 1e-12 {
            eprintln!(
                "note: this network's BatchNorm epsilon is {}; set it on every BatchNorm2d (torchvision's is 1e-5)",
                c.bn_epsilon
            );
        }
    }
    let c = &loaded.config;
    let p = &loaded.provenance;
    let params = loaded.model.num_params();
    let outputs = match &args.input {
        Some(input) => {
            let (shape, values) = npy::read_f32(input)?;
            let [n, ch, h, w] = shape[..] else {
                bail!(
                    "{}: expected a 4-D NCHW array, found shape {shape:?}",
                    input.display()
                );
            };
            if ch != 3 {
                bail!("{}: expected 3 channels, found {ch}", input.display());
            }
            loaded.model.check_input_size(h, w)?;
            let x = Tensor::<4>::from_data(TensorData::new(values, [n, ch, h, w]), &device);
            let y = loaded.model.forward(x);
            let [rows, cols] = y.dims();
            let v = y
                .into_data()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("reading the output: {e:?}"))
                .context("model output")?;
            Some((rows, cols, v))
        }
        None => None,
    };
    if args.json {
        let out = serde_json::json!({
            "file": p.path,
            "format": p.format,
            "sha256": p.sha256,
            "producer": p.producer,
            "opset": p.opset,
            "known_as": p.known.as_ref().map(|k| &k.name),
            "architecture": c,
            "description": c.describe(),
            "head": match c.num_classes { Some(n) => format!("{n} classes"), None => "headless".into() },
            "features": c.num_features(),
            "values": params,
            "stored_values": p.stored_values,
            "folded_batchnorm": p.folded_batchnorm,
            "normalization": loaded.normalization,
            "outputs": outputs.as_ref().map(|(r, c, v)| serde_json::json!({"shape": [r, c], "values": v})),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("file           {}", p.path.display());
    println!(
        "format         {:?}{}",
        p.format,
        p.opset.map(|o| format!(", opset {o}")).unwrap_or_default()
    );
    if let Some(prod) = &p.producer {
        println!("producer       {prod}");
    }
    println!("sha256         {}", p.sha256);
    if let Some(k) = &p.known {
        println!("known as       {} ({})", k.name, k.licence);
    }
    println!(
        "architecture   {} blocks, blocks per stage {:?}",
        match c.block {
            avp::model::BlockKind::Basic => "basic",
            avp::model::BlockKind::Bottleneck => "bottleneck",
        },
        c.layers
    );
    println!("               {}", c.describe());
    match c.num_classes {
        Some(n) => println!("head           {n} classes"),
        None => println!("head           headless, {} features", c.num_features()),
    }
    println!("values         {params} (parameters and BatchNorm running statistics)");
    println!(
        "stored values  {} (weights plus BatchNorm statistics)",
        p.stored_values
    );
    println!(
        "batchnorm      {}",
        if p.folded_batchnorm {
            "folded into the convolutions in the file"
        } else {
            "separate layers"
        }
    );
    println!("normalization  {}", loaded.normalization.describe());
    if let Some((rows, cols, v)) = outputs {
        let what = if c.num_classes.is_some() {
            "logits"
        } else {
            "features"
        };
        println!("{what} [{rows}, {cols}]:");
        for r in 0..rows {
            let row = &v[r * cols..(r + 1) * cols];
            let shown: Vec<String> = row.iter().take(8).map(|x| format!("{x:.6}")).collect();
            let more = if cols > 8 {
                format!(" … ({} more)", cols - 8)
            } else {
                String::new()
            };
            println!("  [{r}] {}{more}", shown.join(" "));
        }
    }
    Ok(())
}
