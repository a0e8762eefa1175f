//! Errors of the training crate.

/// Everything that can go wrong while setting up or running training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The data folder is unusable.
    #[error(transparent)]
    Data(#[from] avp_data::DataError),
    /// The weights are unusable.
    #[error(transparent)]
    Model(#[from] avp_model::ModelError),
    /// A configuration that cannot train.
    #[error("{0}")]
    Config(String),
    /// The training and validation splits disagree on their classes.
    #[error(
        "the training classes {train:?} differ from the validation classes {valid:?}; both splits need the same class folders"
    )]
    ClassMismatch {
        /// Training classes.
        train: Vec<String>,
        /// Validation classes.
        valid: Vec<String>,
    },
    /// Training stopped before its last epoch (an error inside burn-train's
    /// loop, such as a checkpoint that could not be written, or a stop).
    #[error("{0}")]
    Stopped(String),
    /// A loss became NaN or infinite.
    #[error("{0}")]
    Diverged(String),
    /// Writing an artifact failed.
    #[error("cannot write {path}: {why}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
}

/// A file or folder that could not be written, and why.
pub(crate) fn write_err(path: &std::path::Path, why: impl std::fmt::Display) -> TrainError {
    TrainError::Write {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}
