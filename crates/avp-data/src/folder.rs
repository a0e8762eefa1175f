//! torchvision's `ImageFolder`: `root/<split>/<class>/<file>`, classes
//! sorted by name (so class indices agree with torchvision's), files
//! filtered by torchvision's `IMG_EXTENSIONS` (case-insensitive) and walked
//! recursively in sorted order. By default every file is decoded once, in
//! parallel, when the folder is opened; undecodable files are reported and
//! left out (or refused in `strict` mode), so indices never shift during a
//! run. Folders of more than [`FULL_VERIFY_LIMIT`] images, or any folder
//! with [`Verify::Header`], are checked by reading each file's header only
//! (format and size): opening a million photos then costs a directory walk
//! and one small read per file, memory holds the file list and nothing
//! more, and a file whose body is broken is reported, with its path, when
//! it is first read.
//!
//! Links to folders inside a class folder are not followed, as torchvision's
//! `os.walk(followlinks=False)` does not follow them: a link such as
//! `alien/again -> .` would otherwise train every image many times, and
//! `alien/up -> ..` would label the other classes' photos `alien`. With
//! [`OpenOptions::follow_links`] they are followed, each folder is walked
//! once (a cycle is detected by device and inode), and a link whose target
//! lies outside its class folder is refused. Linked files are read as
//! torchvision reads them.

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::decode::{decode_rgb8, probe_size};
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
    /// Refuse the whole folder if any file fails its check.
    pub strict: bool,
    /// Follow links to folders inside class folders (see the module docs).
    pub follow_links: bool,
    /// How much of each file is read when the folder is opened.
    pub verify: Verify,
}

/// Folders up to this many images are fully decoded when opened with
/// [`Verify::Auto`]; larger ones get the header check.
pub const FULL_VERIFY_LIMIT: usize = 20_000;

/// How much of each image a folder reads when it is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// [`Verify::Full`] up to [`FULL_VERIFY_LIMIT`] images, [`Verify::Header`] above.
    #[default]
    Auto,
    /// Decode every image (a broken file is reported and left out now).
    Full,
    /// Read each file's header only: its format and size. A file whose
    /// body does not decode is reported, with its path, when it is first
    /// read.
    Header,
}

impl std::str::FromStr for Verify {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "full" => Ok(Self::Full),
            "header" => Ok(Self::Header),
            other => Err(format!(
                "unknown check `{other}`: expected auto, full or header"
            )),
        }
    }
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
    /// Links to folders that were not followed: all of them by default,
    /// only those that lead back to a folder already walked (a cycle)
    /// with [`OpenOptions::follow_links`].
    pub links_not_followed: Vec<PathBuf>,
    /// The check the images passed: [`Verify::Full`] (decoded) or
    /// [`Verify::Header`].
    pub verified: Verify,
}

/// A class this many times larger than the smallest one earns a warning.
pub const IMBALANCE_WARNING_RATIO: usize = 10;

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMG_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Checks every candidate file in parallel, by decoding it (`full`) or
/// by reading its header, to read its size and to know it is an image;
/// returns the readable ones and the skipped ones, each in the candidates'
/// order.
fn check_all(candidates: Vec<(PathBuf, usize)>, full: bool) -> (Vec<Sample>, Vec<Skipped>) {
    let check = |path: &Path| {
        if full {
            decode_rgb8(path).map(|img| img.dimensions())
        } else {
            probe_size(path)
        }
    };
    let checked: Vec<Result<Sample, Skipped>> = candidates
        .into_par_iter()
        .map(|(path, class)| match check(&path) {
            Ok(size) => Ok(Sample { size, path, class }),
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
    (samples, skipped)
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

/// A folder's identity, to walk each folder once: device and inode on
/// Unix, the canonical path elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DirId {
    #[cfg(unix)]
    Inode(u64, u64),
    #[cfg(not(unix))]
    Path(PathBuf),
}

fn dir_id(dir: &Path) -> Result<DirId, DataError> {
    let err = |source| DataError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir).map_err(err)?;
        Ok(DirId::Inode(m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        Ok(DirId::Path(std::fs::canonicalize(dir).map_err(err)?))
    }
}

/// State of one class folder's walk.
struct Walk<'a> {
    class_dir: &'a Path,
    /// The class folder, links resolved: linked folders must lie inside it.
    class_real: PathBuf,
    follow_links: bool,
    visited: std::collections::HashSet<DirId>,
    files: Vec<PathBuf>,
    links_not_followed: Vec<PathBuf>,
}

impl Walk<'_> {
    /// Files under `dir`, recursively, as `os.walk` + `sorted` lists them.
    fn walk(&mut self, dir: &Path, depth: usize) -> Result<(), DataError> {
        let entries = read_dir_sorted(dir)?;
        let mut dirs = Vec::new();
        for p in entries {
            if !p.is_dir() {
                self.files.push(p);
                continue;
            }
            let is_link = std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink());
            if !is_link {
                dirs.push(p);
                continue;
            }
            if !self.follow_links {
                self.links_not_followed.push(p);
                continue;
            }
            let target = std::fs::canonicalize(&p).map_err(|source| DataError::ReadDir {
                path: p.clone(),
                source,
            })?;
            if !target.starts_with(&self.class_real) {
                return Err(DataError::LinkOutsideClass {
                    link: p,
                    target,
                    class_dir: self.class_dir.to_path_buf(),
                });
            }
            dirs.push(p);
        }
        if depth < 32 {
            for d in dirs {
                if self.visited.insert(dir_id(&d)?) {
                    self.walk(&d, depth + 1)?;
                } else {
                    // A link back to a folder already walked (a cycle, or a
                    // second way to the same folder): its images are listed once.
                    self.links_not_followed.push(d);
                }
            }
        }
        Ok(())
    }
}

impl ImageFolder {
    /// Opens `root`'s `split`, checking every image once (see [`Verify`]).
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
        let mut links_not_followed = Vec::new();
        for (class, cdir) in class_dirs.iter().enumerate() {
            classes.push(
                cdir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            let class_real = std::fs::canonicalize(cdir).map_err(|source| DataError::ReadDir {
                path: cdir.clone(),
                source,
            })?;
            let mut walk = Walk {
                class_dir: cdir,
                class_real,
                follow_links: options.follow_links,
                visited: [dir_id(cdir)?].into_iter().collect(),
                files: Vec::new(),
                links_not_followed: Vec::new(),
            };
            walk.walk(cdir, 0)?;
            links_not_followed.extend(walk.links_not_followed);
            let before = candidates.len();
            for f in walk.files {
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
        let full = match options.verify {
            Verify::Full => true,
            Verify::Header => false,
            Verify::Auto => candidates.len() <= FULL_VERIFY_LIMIT,
        };
        let (samples, skipped) = check_all(candidates, full);
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
            links_not_followed,
            verified: if full { Verify::Full } else { Verify::Header },
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

    /// The largest and the smallest class (name, images) when the largest
    /// holds at least [`IMBALANCE_WARNING_RATIO`] times as many images: a
    /// classifier trained on such a split tends to answer the large class.
    pub fn imbalance(&self) -> Option<((String, usize), (String, usize))> {
        let counts = self.counts();
        let (big, &nb) = counts.iter().enumerate().max_by_key(|(_, n)| **n)?;
        let (small, &ns) = counts.iter().enumerate().min_by_key(|(_, n)| **n)?;
        (nb >= ns.max(1).saturating_mul(IMBALANCE_WARNING_RATIO)).then(|| {
            (
                (self.classes[big].clone(), nb),
                (self.classes[small].clone(), ns),
            )
        })
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
        if self.verified == Verify::Header {
            write!(
                f,
                "; headers checked (a file whose image data is broken is reported when it is first read)"
            )?;
        }
        if !self.ignored.is_empty() {
            write!(
                f,
                "; {} file(s) ignored for their extension",
                self.ignored.len()
            )?;
        }
        if !self.links_not_followed.is_empty() {
            write!(
                f,
                "; {} link(s) to folders not followed ({})",
                self.links_not_followed.len(),
                self.links_not_followed
                    .iter()
                    .take(3)
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        for s in &self.skipped {
            write!(f, "\n  skipped {}: {}", s.path.display(), s.reason)?;
        }
        if let Some(((big, nb), (small, ns))) = self.imbalance() {
            write!(
                f,
                "\n  warning: the classes are unbalanced: `{big}` has {nb} images, `{small}` only {ns}; \
                 the classifier will lean towards `{big}` (add images of `{small}` or leave some of `{big}` out)"
            )?;
        }
        Ok(())
    }
}
