#![allow(missing_docs)] // criterion_group! generates undocumented items
//! One training step of the head per compiled CPU backend: the lesson's
//! head (`Linear(2048,128) → ReLU → Linear(128,2)`, ResNet50's width) on a
//! batch of 32 feature rows, forward + cross-entropy + backward + Adam —
//! what every step costs once the backbone's features are cached. The
//! `thrpt` column is rows per second.
//!
//! ```text
//! cargo bench --profile dev --features ndarray,wgpu --bench head
//! ```

use std::time::Duration;

use avp::model::{compiled_backends, parse_device};
use avp::train::{CachedHead, FeatureBatch, HeadConfig};
use burn::optim::AdamConfig;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use burn::train::TrainStep;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn head_step(c: &mut Criterion) {
    for backend in compiled_backends() {
        // The head is tiny: a GPU launch-bound device says nothing here.
        if backend != "flex" && backend != "ndarray" {
            continue;
        }
        let Ok(inner) = parse_device(backend) else {
            continue;
        };
        let device = inner.clone().autodiff();
        let Ok(head) = HeadConfig::new().init(2048, 2, &device) else {
            continue;
        };
        let mut model = CachedHead::new(head);
        let mut optim = AdamConfig::new().init();
        let batch = 32;
        let features = Tensor::<2>::random([batch, 2048], Distribution::Uniform(0.0, 2.0), &device);
        let targets: Vec<i64> = (0..batch as i64).map(|i| i % 2).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [batch]), &device);
        let mut group = c.benchmark_group(format!("{backend}/head_train_step"));
        group
            .sample_size(30)
            .measurement_time(Duration::from_secs(5))
            .warm_up_time(Duration::from_secs(1));
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function("batch32_2048", |b| {
            b.iter(|| {
                let out = model.step(FeatureBatch {
                    features: features.clone(),
                    targets: targets.clone(),
                    indices: Vec::new(),
                });
                model = optim.step(1e-3, model.clone(), out.grads);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, head_step);
criterion_main!(benches);
