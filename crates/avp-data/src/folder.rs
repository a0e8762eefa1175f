//! torchvision's `ImageFolder`: `root/<split>/<class>/<file>`, classes
//! sorted by name (so class indices agree with torchvision's), files
//! filtered by torchvision's `IMG_EXTENSIONS` (case-insensitive) and walked
//! recursively in sorted order. Every file is decoded once, in parallel,
//! when the folder is opened; undecodable files are reported and left out
//! (or refused in `strict` mode), so indices never shift during a run.

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::decode::decode_rgb8;
use crate::error::DataError;

/// torchvision's `IMG_EXTENSIONS`.
pub const IMG_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// A dataset split, with the folder names accepted for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train` or `entrenamiento` (the lesson's name).
    Train,
    /// `val`, `validation` or `validacion` (the lesson's name).
    Validation,
}

impl Split {
    /// Folder names tried, in order.
    pub fn folder_names(self) -> &'static [&'static str] {
        match self {
            Split::Train => &["train", "entrenamiento"],
            Split::Validation => &["val", "validation", "validacion"],
        }
    }

    /// `train` or `validation`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }

    /// The existing folder of this split under `root`.
    pub fn resolve(self, root: &Path) -> Result<PathBuf, DataError> {
        if !root.is_dir() {
            return Err(DataError::MissingRoot {
                path: root.to_path_buf(),
            });
        }
        self.folder_names()
            .iter()
            .map(|n| root.join(n))
            .find(|p| p.is_dir())
            .ok_or_else(|| DataError::MissingSplit {
                root: root.to_path_buf(),
                split: self.name().into(),
                tried: self.folder_names().join(", "),
            })
    }
}

/// Options for [`ImageFolder::open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Refuse the whole folder if any file fails to decode.
    pub strict: bool,
}

/// One image of the folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The file.
    pub path: PathBuf,
    /// Class index (position in the sorted class list).
    pub class: usize,
    /// Original size (width, height).
    pub size: (u32, u32),
}

/// A file that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// The decoder's message.
    pub reason: String,
}

/// One split of an image folder, checked.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The split folder.
    pub dir: PathBuf,
    /// Class names, sorted.
    pub classes: Vec<String>,
    /// Readable images, in torchvision's order.
    pub samples: Vec<Sample>,
    /// Files with an image extension that failed to decode.
    pub skipped: Vec<Skipped>,
    /// Files ignored for their extension (e.g. a `.gif`).
    pub ignored: Vec<PathBuf>,
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMG_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::ReadDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|source| DataError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
        out.push(e.path());
    }
    // Python sorts str names by code point; so does Rust's byte order on
    // UTF-8 names.
    out.sort();
    Ok(out)
}

/// Files under `dir`, recursively, as `os.walk` + `sorted` lists them.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, depth: usize) -> Result<(), DataError> {
    let entries = read_dir_sorted(dir)?;
    let (dirs, plain): (Vec<PathBuf>, Vec<PathBuf>) = entries.into_iter().partition(|p| p.is_dir());
    files.extend(plain);
    if depth < 32 {
        for d in dirs {
            walk(&d, files, depth + 1)?;
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Opens `root`'s `split`, decoding every image once to check it.
    pub fn open(root: &Path, split: Split, options: OpenOptions) -> Result<Self, DataError> {
        let dir = split.resolve(root)?;
        Self::open_dir(&dir, options)
    }

    /// Opens a split folder directly (`dir/<class>/<file>`).
    pub fn open_dir(dir: &Path, options: OpenOptions) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::MissingRoot {
                path: dir.to_path_buf(),
            });
        }
        let class_dirs: Vec<PathBuf> = read_dir_sorted(dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses {
                path: dir.to_path_buf(),
            });
        }
        let mut classes = Vec::new();
        let mut candidates: Vec<(PathBuf, usize)> = Vec::new();
        let mut ignored = Vec::new();
        for (class, cdir) in class_dirs.iter().enumerate() {
            classes.push(
                cdir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            let mut files = Vec::new();
            walk(cdir, &mut files, 0)?;
            let before = candidates.len();
            for f in files {
                if has_image_extension(&f) {
                    candidates.push((f, class));
                } else {
                    ignored.push(f);
                }
            }
            if candidates.len() == before {
                return Err(DataError::EmptyClass {
                    path: cdir.clone(),
                    extensions: IMG_EXTENSIONS.join(", "),
                });
            }
        }
        let checked: Vec<Result<Sample, Skipped>> = candidates
            .into_par_iter()
            .map(|(path, class)| match decode_rgb8(&path) {
                Ok(img) => Ok(Sample {
                    size: img.dimensions(),
                    path,
                    class,
                }),
                Err(e) => Err(Skipped {
                    reason: match e {
                        DataError::Decode { reason, .. } => reason,
                        other => other.to_string(),
                    },
                    path,
                }),
            })
            .collect();
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        for c in checked {
            match c {
                Ok(s) => samples.push(s),
                Err(s) => skipped.push(s),
            }
        }
        if options.strict
            && let Some(s) = skipped.first()
        {
            return Err(DataError::Decode {
                path: s.path.clone(),
                reason: s.reason.clone(),
            });
        }
        for (class, name) in classes.iter().enumerate() {
            if !samples.iter().any(|s| s.class == class) {
                return Err(DataError::NoReadableImage {
                    class: name.clone(),
                    path: dir.to_path_buf(),
                    bad: skipped.len(),
                });
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            classes,
            samples,
            skipped,
            ignored,
        })
    }

    /// Number of readable images.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no image is readable (never true for an opened folder).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Images per class, in class order.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for s in &self.samples {
            c[s.class] += 1;
        }
        c
    }
}

impl fmt::Display for ImageFolder {
    /// A summary: images per class, skipped files with reasons, ignored files.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = self.counts();
        let per: Vec<String> = self
            .classes
            .iter()
            .zip(&counts)
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        write!(
            f,
            "{}: {} images ({})",
            self.dir.display(),
            self.len(),
            per.join(", ")
        )?;
        if !self.ignored.is_empty() {
            write!(
                f,
                "; {} file(s) ignored for their extension",
                self.ignored.len()
            )?;
        }
        for s in &self.skipped {
            write!(f, "\n  skipped {}: {}", s.path.display(), s.reason)?;
        }
        Ok(())
    }
}
