//! # avp-train
//!
//! Frozen-backbone transfer learning through burn-train's `Learner`: a
//! [`Classifier`] made of a frozen ResNet (kept off the autodiff tape) and
//! a trainable head, trained on an image folder with the lesson's recipe.
#![warn(missing_docs)]

pub mod artifacts;
pub mod bridge;
pub mod cache;
pub mod classifier;
mod error;
pub mod output;
pub mod render;
pub mod train;

pub use artifacts::{
    Prediction, TrainedModel, load_model, plot_curves, plot_predictions, predict_paths, save_model,
};
pub use bridge::{data_normalize, eval_pipeline};
pub use burn::train::ExecutionStrategy;
pub use cache::{CacheOrigin, FeatureBatch, FeatureLoader, FeatureTable};
pub use classifier::{BnMode, CachedHead, Classifier, Head, HeadConfig};
pub use error::TrainError;
pub use train::{
    Augmentation, EpochMetrics, EvalTransform, OutputPolicy, TrainConfig, TrainOutcome,
    lesson_lines, open_splits, open_splits_with, read_metrics_csv, resume_point, train, train_with,
    train_with_policy,
};
