//! Backbone inference speed on random input, measured one after the other
//! in the same process: BatchNorm as stored, BatchNorm folded into the
//! convolutions (Burn's kernels), and, on flex, the folded network's fused
//! NHWC path (`avp_model::fused`, what frozen training and the feature
//! cache run). JSON lines, keys `batchnorm` and `kernels`: the Burn side
//! of `benches/compare_pytorch.py` (criterion's `benches/backbone.rs`
//! measures the same thing with statistics, for humans).
//!
//! ```text
//! cargo run --example speed -- --weights resnet50.pth --batch-size 1,8,32
//! ```

use std::time::Instant;

use anyhow::{Result, bail};
use avp::model::{Backbone, BatchNormUse, Kernels};
use burn::tensor::{Distribution, Tensor};
use clap::Parser;

mod common;
use common::BackboneArgs;

/// Time a backbone's forward pass (pooled features) on random images.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Batch sizes, comma-separated (`--batch` is an alias).
    #[arg(
        long,
        visible_alias = "batch",
        value_delimiter = ',',
        default_value = "8"
    )]
    batch_size: Vec<usize>,
    /// Timed batches per size (after one warm-up batch).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Which variants run, comma-separated: `unfolded` (Burn's kernels,
    /// BatchNorm as stored), `folded` (Burn's kernels, BatchNorm folded),
    /// `fused` (the fused path, where the device has one). Run one alone
    /// for its own peak RSS: the process's peak covers every variant it ran.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "unfolded,folded,fused",
        value_parser = ["unfolded", "folded", "fused"]
    )]
    variants: Vec<String>,
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::print_library_messages();
    let device = args.backbone.run.device()?;
    let auto = args.backbone.load(&device)?.headless();
    let describe = auto.config().describe();
    let burn_only = Backbone::new(
        auto.network().clone(),
        auto.config().clone(),
        auto.provenance().clone(),
        auto.normalization().clone(),
    )
    .with_kernels(Kernels::Burn)?;
    let mut variants = vec![
        ("unfolded", "burn", &burn_only, BatchNormUse::Running),
        ("folded", "burn", &burn_only, BatchNormUse::Folded),
    ];
    if auto.kernels_for(&device, BatchNormUse::Folded) == "fused" {
        variants.push(("folded", "fused", &auto, BatchNormUse::Folded));
    } else if args.variants.iter().any(|v| v == "fused") && args.variants.len() == 1 {
        bail!(
            "--variants fused: {} has no fused path (flex has)",
            args.backbone.run.device
        );
    }
    let wanted = |(bn, kernels): (&str, &str)| {
        let name = if kernels == "fused" { "fused" } else { bn };
        args.variants.iter().any(|v| v == name)
    };
    variants.retain(|v| wanted((v.0, v.1)));
    for (&batch, &(bn_label, kernels, model, bn)) in args
        .batch_size
        .iter()
        .flat_map(|b| variants.iter().map(move |v| (b, v)))
    {
        let x = Tensor::<4>::random(
            [batch, 3, 224, 224],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        // Warm-up: allocations, kernel selection, caches.
        let _ = model.features(x.clone(), bn).into_data();
        let t = Instant::now();
        for _ in 0..args.iters {
            let _ = model.features(x.clone(), bn).into_data();
        }
        let secs = t.elapsed().as_secs_f64();
        let line = serde_json::json!({
            "mode": "inference",
            "backbone": describe,
            "device": args.backbone.run.device,
            "batch": batch,
            "batchnorm": bn_label,
            "kernels": kernels,
            "iters": args.iters,
            "images_per_second": (batch * args.iters) as f64 / secs,
            "peak_rss_mb": peak_rss_mb(),
        });
        println!("{line}");
    }
    Ok(())
}
