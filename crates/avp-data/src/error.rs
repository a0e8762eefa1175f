//! Errors of the data crate; each names the path and the reason.

use std::path::PathBuf;

/// Everything that can go wrong while opening or reading an image folder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The dataset root does not exist or is not a folder.
    #[error(
        "dataset folder {path} does not exist; expected ROOT/<split>/<class>/<image> with splits \
         train (or entrenamiento) and val (or validation, validacion)"
    )]
    MissingRoot {
        /// The root.
        path: PathBuf,
    },
    /// A folder could not be listed.
    #[error("cannot read folder {path}: {source}")]
    ReadDir {
        /// The folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// None of a split's accepted folder names exists.
    #[error("{root} has no {split} split: looked for {tried}")]
    MissingSplit {
        /// Dataset root.
        root: PathBuf,
        /// `train` or `validation`.
        split: String,
        /// Folder names tried.
        tried: String,
    },
    /// A split folder without class subfolders.
    #[error("{path} has no class folders (expected one subfolder per class)")]
    NoClasses {
        /// The split folder.
        path: PathBuf,
    },
    /// A class folder without any image file.
    #[error("class folder {path} holds no image (accepted extensions: {extensions})")]
    EmptyClass {
        /// The class folder.
        path: PathBuf,
        /// Accepted extensions.
        extensions: String,
    },
    /// An image that could not be decoded (only an error in `strict` mode;
    /// otherwise it is reported in the summary and skipped).
    #[error("cannot decode {path}: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// Every image of a class failed to decode.
    #[error("class `{class}` in {path} has no readable image ({bad} files failed to decode)")]
    NoReadableImage {
        /// Class name.
        class: String,
        /// Split folder.
        path: PathBuf,
        /// Number of undecodable files.
        bad: usize,
    },
    /// A link inside a class folder leads outside it (with
    /// `follow_links`): following it would label other images with this
    /// class.
    #[error(
        "{link} links to {target}, outside its class folder {class_dir}: its images would be labelled with the wrong class; \
         replace the link by the files it should add, or remove it"
    )]
    LinkOutsideClass {
        /// The link.
        link: PathBuf,
        /// Where it leads.
        target: PathBuf,
        /// The class folder it sits in.
        class_dir: PathBuf,
    },
    /// Index outside the dataset.
    #[error("index {index} is outside the dataset ({len} images)")]
    Index {
        /// Requested index.
        index: usize,
        /// Dataset size.
        len: usize,
    },
    /// Writing an output file failed.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}
