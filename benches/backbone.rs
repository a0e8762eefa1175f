#![allow(missing_docs)] // criterion_group! generates undocumented items
//! ResNet50 forward throughput per compiled backend, batch 1 and 8 (and
//! any batch sizes in `AVP_BENCH_BATCHES`): Burn's modules (`batchN`), and
//! on flex also the fused path of the folded network (`fused_batchN`, what
//! frozen training and the feature cache run).
//! Criterion's `thrpt` column is images per second.
//!
//! ```text
//! cargo bench --bench backbone                      # flex
//! cargo bench --features ndarray,wgpu --bench backbone
//! ```
//! wgpu on Mesa's lavapipe (no GPU) is a correctness device, not a speed
//! one: its numbers here say nothing about a real GPU.

use std::time::Duration;

use avp::model::{Backbone, BatchNormUse, ResNetConfig, compiled_backends, parse_device};
use burn::tensor::{Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn forward(c: &mut Criterion) {
    let only = std::env::var("AVP_BENCH_BACKENDS").ok();
    for backend in compiled_backends() {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|b| b == backend))
        {
            continue;
        }
        let Ok(device) = parse_device(backend) else {
            continue;
        };
        let model = ResNetConfig::resnet50().init(&device);
        let backbone = Backbone::in_memory(model.clone(), ResNetConfig::resnet50()).headless();
        let fused =
            (backbone.kernels_for(&device, BatchNormUse::Folded) == "fused").then_some(backbone);
        let mut group = c.benchmark_group(format!("{backend}/resnet50_forward"));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(20))
            .warm_up_time(Duration::from_secs(3));
        for batch in batches() {
            let x = Tensor::<4>::random(
                [batch, 3, 224, 224],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(format!("batch{batch}"), |b| {
                b.iter(|| {
                    let y = model.forward(x.clone());
                    sync(&y.device(), y)
                })
            });
            if let Some(fused) = &fused {
                group.bench_function(format!("fused_batch{batch}"), |b| {
                    b.iter(|| {
                        let y = fused.features(x.clone(), BatchNormUse::Folded);
                        sync(&y.device(), y)
                    })
                });
            }
        }
        group.finish();
    }
}

/// Batch sizes: 1 and 8, plus those in `AVP_BENCH_BATCHES` (e.g. `32`).
fn batches() -> Vec<usize> {
    let mut b = vec![1usize, 8];
    if let Ok(extra) = std::env::var("AVP_BENCH_BATCHES") {
        b.extend(
            extra
                .split(',')
                .filter_map(|x| x.trim().parse::<usize>().ok()),
        );
    }
    b
}

/// Waits for the device (wgpu is asynchronous) inside the timed region.
fn sync(device: &Device, y: Tensor<2>) -> usize {
    let n = y.dims()[0];
    let _ = y.into_data();
    let _ = device.sync();
    n
}

criterion_group!(benches, forward);
criterion_main!(benches);
