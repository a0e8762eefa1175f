//! # avp-train
//!
//! Transfer learning through burn-train's `Learner`: a [`Classifier`] made
//! of a frozen ResNet (kept off the autodiff tape) and a trainable head,
//! trained on an image folder with the lesson's recipe; or, fine-tuning,
//! with the backbone's last stages trained too.
//!
//! Where things are: `classifier.rs` (the classifier, the head, and
//! [`BnMode`]: which `BatchNormUse` each phase asks of the backbone),
//! `train.rs` (the run: splits, resume, burn-train's `Learner`, the image
//! and the cached paths, on one device or several), `cache.rs` (feature
//! cache, shards and merge, and its loader), `featfile.rs` (the
//! safetensors feature files, memory-mapped),
//! `finetune.rs` (which stages train; the optimiser, learning rates and
//! step schedule), `artifacts.rs` ([`TrainedModel`], `model.bpk`, predictions), `metrics.rs`
//! (epoch metrics, `metrics.csv`), `plot.rs` (the figures), `output.rs`
//! (what a run may write and remove). The epoch metrics are computed in
//! one place, `metrics.rs`, by burn-train's metric machinery, and read by
//! the epoch logger in `train.rs`. Nothing here prints: messages go
//! through `avp_model::report`.
#![warn(missing_docs)]

pub mod artifacts;
pub mod bridge;
pub mod cache;
mod checkpoint;
pub mod classifier;
mod error;
pub mod featfile;
pub mod finetune;
pub mod metrics;
pub mod output;
pub mod plot;
pub mod render;
pub mod stats;
pub mod train;

pub use artifacts::{Prediction, TrainedModel, load_model, predict_paths, save_model};
pub use bridge::{data_normalize, eval_pipeline};
pub use burn::train::ExecutionStrategy;
pub use cache::{
    CacheOrigin, FeatureBatch, FeatureLoader, FeatureTable, MergeOutcome, Shard, ShardOutcome,
    merge_dir,
};
pub use classifier::{BnMode, CachedHead, Classifier, Head, HeadConfig, ValidMemo};
pub use error::TrainError;
pub use finetune::{OptimizerKind, parse_stages};
pub use metrics::{EpochMetrics, lesson_lines, read_metrics_csv};
pub use plot::{plot_curves, plot_predictions};
pub use train::{
    Augmentation, EvalTransform, OutputPolicy, Parallel, TrainConfig, TrainOutcome,
    execution_strategy, extract_shard, finished_run, open_splits, open_splits_with, resume_point,
    train, train_with, train_with_policy,
};
