//! Errors of the training crate.

/// Everything that can go wrong while setting up or running training.
#[derive(Debug, thiserror::Error)]
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
    /// Writing an artifact failed.
    #[error("cannot write {path}: {why}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
}
