//! candle's ResNet50 (`candle_transformers::models::resnet`, without its
//! final layer: pooled 2048 features) on the CPU, random weights (speed does
//! not depend on their values), random [BATCH,3,224,224] input: one warm-up
//! batch, then ITERS timed ones. candle runs BatchNorm as a separate op (it
//! has no folding), as candle users run this model. Threads: candle's CPU
//! kernels read RAYON_NUM_THREADS, which the runner sets.
//!
//! ```text
//! cargo run --release -- --batch 8 --iters 5
//! ```
//!
//! Prints one JSON line: engine, batch, iters, seconds, images_per_second,
//! peak_rss_mb.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<()> {
    let mut batch = 8usize;
    let mut iters = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let n: usize = value
            .parse()
            .with_context(|| format!("{flag} takes a positive integer, not {value:?}"))?;
        match flag.as_str() {
            "--batch" => batch = n,
            "--iters" => iters = n,
            _ => bail!("unknown flag {flag}; flags: --batch N --iters N"),
        }
    }
    if batch == 0 || iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    let device = Device::Cpu;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
    let model = candle_transformers::models::resnet::resnet50_no_final_layer(vb)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, 224, 224), &device)?;
    let y = model.forward(&x)?;
    if y.dims() != [batch, 2048] {
        bail!("candle's ResNet50 gave {:?}, expected [{batch}, 2048]", y.dims());
    }
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(model.forward(&x)?);
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": "candle",
            "batch": batch,
            "iters": iters,
            "seconds": seconds,
            "images_per_second": (batch * iters) as f64 / seconds,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
