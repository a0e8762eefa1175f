#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Images per second of the lesson's training transform (decode, resize,
//! random affine, flip, normalize), 32 images decoded in parallel, on the
//! lesson's photos (`$AVP_SHARED/data/...` when set, else the committed copy).
//!
//! ```text
//! cargo bench --bench data
//! ```

use std::path::PathBuf;
use std::time::Duration;

use avp::data::{ImageDataset, ImageFolder, Normalize, OpenOptions, Pipeline, Split};
use burn::data::dataset::Dataset;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;

fn root() -> PathBuf {
    let rel = "data/alien_vs_predator_thumbnails/data";
    match std::env::var("AVP_SHARED") {
        Ok(shared) => PathBuf::from(shared).join(rel),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel),
    }
}

fn transform(c: &mut Criterion) {
    let folder = ImageFolder::open(&root(), Split::Train, OpenOptions::default())
        .expect("the lesson's photos");
    let ds = ImageDataset::new(folder, Pipeline::lesson(Normalize::imagenet()), 0);
    let mut group = c.benchmark_group(format!(
        "data/lesson_train_transform_{}threads",
        rayon::current_num_threads()
    ));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(32));
    let mut start = 0usize;
    group.bench_function("batch32", |b| {
        b.iter(|| {
            let idx: Vec<usize> = (start..start + 32).map(|i| i % ds.len()).collect();
            start += 32;
            let items: Vec<_> = idx.par_iter().map(|&i| ds.get(i).expect("item")).collect();
            items.len()
        })
    });
    group.finish();
}

criterion_group!(benches, transform);
criterion_main!(benches);
