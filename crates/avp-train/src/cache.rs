//! The feature cache: the frozen backbone runs once per image (or once per
//! precomputed augmented view) and the epochs train the head on the stored
//! features.
//!
//! With [`BnMode::Frozen`](crate::BnMode::Frozen) the backbone is a fixed
//! function, so the features of an image under a given transform never
//! change: computing them once instead of once per epoch is exact. Without
//! augmentation each training image has one view (the evaluation
//! transform); with augmentation, `views` augmented copies of each image are
//! computed (view `v` is the augmentation the uncached run would draw in
//! epoch `v`) and every epoch samples one of them per image.
//!
//! Features are kept on disk, keyed by the SHA-256 of everything they
//! depend on: the weights' SHA-256, the backbone's architecture and input
//! normalization, the transform pipeline, the number of views (and the
//! seed, for augmented views), and the file list (relative path, class,
//! size and modification time of every image). A second run over the same
//! images with the same weights reads them back and skips the backbone.
//!
//! Fine-tuning caches the frozen prefix instead: the feature map entering
//! the first trained stage (`256 x 14 x 14` floats per image before the
//! committed ResNet18's `layer4`), keyed as above plus that stage, with
//! the same views; the trained stages and the head then train on it
//! ([`FeatureJob::prefix`]).
//!
//! Feature files are safetensors files ([`crate::featfile`]) that
//! training reads memory-mapped. A split can also be computed in shards
//! by separate processes ([`extract_shard`], one file per shard, the split
//! cut into whole backbone batches); a complete set of shards is merged
//! ([`merge_dir`], or by [`features`] when it finds one) into the very
//! bytes one process writes.
//!
//! A cache file carries the SHA-256 of its contents: a file that is
//! truncated, was written for another key, has a flipped byte, a class
//! index out of range or a value that is not finite is computed again,
//! never used. The size of a table is checked against
//! [`FeatureJob::max_bytes`] before anything is allocated or computed, and
//! the cache folder is checked to be writable before the backbone runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use avp_data::{EpochPlan, ImageDataset, ImageFolder, OrderedLoader, Pipeline, Rng};
use avp_model::{Backbone, BatchNormUse, Normalization, ResNetConfig, Stage, report, sha256_hex};
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;

use crate::error::TrainError;
use crate::featfile::{self, Header, Mapped, ShardPart};

/// Salt that separates the view choice from the shuffling stream.
const VIEW_SALT: u64 = 0x5EED_F1E5_0000_0001;

/// Features of every image of a split, for one or more views: held in
/// memory (just computed) or read in place from a memory-mapped feature
/// file ([`crate::featfile`]).
#[derive(Clone)]
pub struct FeatureTable {
    /// Images.
    pub len: usize,
    /// Views per image.
    pub views: usize,
    /// Features per image.
    pub width: usize,
    /// Class index of every image.
    pub targets: Vec<usize>,
    values: Values,
}

#[derive(Clone)]
enum Values {
    Owned(Arc<Vec<f32>>),
    Mapped(Mapped),
}

impl std::fmt::Debug for FeatureTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureTable")
            .field("len", &self.len)
            .field("views", &self.views)
            .field("width", &self.width)
            .field("mapped", &matches!(self.values, Values::Mapped(_)))
            .finish()
    }
}

impl PartialEq for FeatureTable {
    fn eq(&self, other: &Self) -> bool {
        (self.len, self.views, self.width) == (other.len, other.views, other.width)
            && self.targets == other.targets
            && self.values() == other.values()
    }
}

impl FeatureTable {
    /// A table held in memory; `None` when `values` is not
    /// `views x len x width` long or `targets` not `len`.
    pub fn new(
        len: usize,
        views: usize,
        width: usize,
        targets: Vec<usize>,
        values: Vec<f32>,
    ) -> Option<Self> {
        let n = views.checked_mul(len)?.checked_mul(width)?;
        (values.len() == n && targets.len() == len).then(|| Self {
            len,
            views,
            width,
            targets,
            values: Values::Owned(Arc::new(values)),
        })
    }

    /// All values, `[views][len][width]`, row-major.
    pub fn values(&self) -> &[f32] {
        match &self.values {
            Values::Owned(v) => v,
            Values::Mapped(m) => m.values(),
        }
    }

    /// Whether the values are read in place from a file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.values, Values::Mapped(_))
    }

    /// The features of image `index` in view `view`.
    pub fn row(&self, view: usize, index: usize) -> &[f32] {
        let start = (view * self.len + index) * self.width;
        &self.values()[start..start + self.width]
    }

    /// Opens the feature file `path` written for `key_text` and checks it
    /// whole (see [`crate::featfile`]); `Err` says why it is not usable.
    pub fn open(path: &Path, key_text: &str, classes: usize) -> Result<Self, String> {
        let m = Mapped::open(path)?;
        if m.header.key_sha256 != sha256_hex(key_text.as_bytes()) {
            return Err("it was computed for other images, weights or transforms".into());
        }
        if m.header.shard.is_some() {
            return Err("it is one shard, not a whole table".into());
        }
        let targets = m.verify(classes)?;
        Ok(Self {
            len: m.header.len,
            views: m.header.views,
            width: m.header.width,
            targets,
            values: Values::Mapped(m),
        })
    }

    /// Writes the table as the feature file `path` for `key_text`,
    /// atomically (`shard`: the part of a split it is).
    pub fn save(
        &self,
        path: &Path,
        key_text: &str,
        shard: Option<ShardPart>,
    ) -> Result<(), TrainError> {
        let header = Header {
            len: self.len,
            views: self.views,
            width: self.width,
            key_sha256: sha256_hex(key_text.as_bytes()),
            data_sha256: featfile::data_sha256(self.values(), &self.targets),
            shard,
        };
        write_file_atomic(path, &header, |w| {
            featfile::for_le_bytes_f32(self.values(), |b| w.write_all(b))?;
            w.write_all(&featfile::targets_bytes(&self.targets))
        })
    }
}

/// Where a feature table came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOrigin {
    /// Computed by the backbone in this run (and stored, when a cache
    /// folder was given).
    Computed,
    /// Read from the cache folder.
    Disk,
}

#[derive(Serialize)]
struct KeyFile {
    path: String,
    class: usize,
    bytes: u64,
    modified_ns: u128,
}

#[derive(Serialize)]
struct Key<'a> {
    format: &'static str,
    weights_sha256: &'a str,
    backbone: &'a ResNetConfig,
    normalization: &'a Normalization,
    pipeline: &'a Pipeline,
    views: usize,
    seed: Option<u64>,
    classes: &'a [String],
    files: Vec<KeyFile>,
    /// The stage whose input map is cached (absent: pooled features, and
    /// the keys of caches written before prefixes existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_before: Option<Stage>,
}

/// The text the cache key hashes (JSON): everything the features depend on.
/// `prefix_before`: the stage whose input map is cached, `None` for pooled
/// features.
#[allow(clippy::too_many_arguments)] // each is part of the key
pub fn key_text(
    weights_sha256: &str,
    backbone: &ResNetConfig,
    normalization: &Normalization,
    folder: &ImageFolder,
    pipeline: &Pipeline,
    views: usize,
    seed: u64,
    prefix_before: Option<Stage>,
) -> String {
    let files = folder
        .samples
        .iter()
        .map(|s| {
            let meta = std::fs::metadata(&s.path).ok();
            let rel = s.path.strip_prefix(&folder.dir).unwrap_or(&s.path);
            KeyFile {
                path: rel.to_string_lossy().replace('\\', "/"),
                class: s.class,
                bytes: meta.as_ref().map_or(0, |m| m.len()),
                modified_ns: meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos()),
            }
        })
        .collect();
    let key = Key {
        format: "avp feature cache 1",
        weights_sha256,
        backbone,
        normalization,
        pipeline,
        views,
        // Augmented views depend on the seed; the evaluation transform does not.
        seed: pipeline.is_random().then_some(seed),
        classes: &folder.classes,
        files,
        prefix_before,
    };
    serde_json::to_string(&key).unwrap_or_default()
}

/// The file in `dir` that holds the features for `key_text`.
pub fn cache_file(dir: &Path, key_text: &str) -> PathBuf {
    dir.join(format!("{}.features.safetensors", key_stem(key_text)))
}

/// The file in `dir` that holds shard `shard` of the features for
/// `key_text`.
pub fn shard_file(dir: &Path, key_text: &str, shard: Shard) -> PathBuf {
    dir.join(shard_name(&key_stem(key_text), shard))
}

fn key_stem(key_text: &str) -> String {
    sha256_hex(key_text.as_bytes())[..32].to_string()
}

fn shard_name(stem: &str, shard: Shard) -> String {
    format!(
        "{stem}.features.shard-{:04}-of-{:04}.safetensors",
        shard.index, shard.count
    )
}

/// One part of a sharded feature extraction: shard `index` of `count`
/// (written `I/N` on command lines, as Slurm's array index and count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// `0..count`.
    pub index: usize,
    /// Number of shards, at least 1.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            TrainError::Config(format!(
                "--shard {s:?} is not I/N with 0 <= I < N (for example 0/4; Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count || count > 9999 {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The images `start..end` of a split of `len` images that this shard
    /// computes: the split cut into `count` contiguous parts whose
    /// boundaries fall on multiples of `batch` (so every backbone batch of
    /// a shard is the batch one process would run, and the features are
    /// the same to the bit). Some shards are empty when there are fewer
    /// batches than shards.
    pub fn range(&self, len: usize, batch: usize) -> (usize, usize) {
        let batch = batch.max(1);
        let blocks = len.div_ceil(batch);
        let cut = |i: usize| (blocks * i / self.count * batch).min(len);
        (cut(self.index), cut(self.index + 1))
    }
}

/// What [`extract_shard`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOutcome {
    /// The shard was computed and written to this file.
    Written(PathBuf),
    /// A complete, intact file for this shard was there already.
    AlreadyThere(PathBuf),
}

/// What to compute: one split through one pipeline.
pub struct FeatureJob<'a> {
    /// A label for progress lines ("train", "validation").
    pub label: &'a str,
    /// The images.
    pub folder: &'a ImageFolder,
    /// The transform (augmenting or not).
    pub pipeline: Pipeline,
    /// Views per image (1 without augmentation).
    pub views: usize,
    /// Seed of the augmentation.
    pub seed: u64,
    /// Backbone batch size.
    pub batch_size: usize,
    /// The largest table (in bytes of stored features) this job may
    /// compute; a larger one is refused before anything is allocated.
    pub max_bytes: u64,
    /// Cache the frozen prefix for fine-tuning instead of the pooled
    /// features: the stage whose input map is stored, and that map's shape
    /// `[C, H, W]` (see [`prefix_shape`]).
    pub prefix: Option<(Stage, [usize; 3])>,
}

impl FeatureJob<'_> {
    /// Bytes of the table this job computes (`None` on overflow).
    pub fn table_bytes(&self, width: usize) -> Option<u64> {
        table_bytes(self.views, self.folder.len(), width)
    }

    /// Floats stored per image and view: the backbone's pooled width, or
    /// the prefix map's size.
    pub fn width(&self, backbone: &Backbone) -> usize {
        match self.prefix {
            Some((_, [c, h, w])) => c * h * w,
            None => backbone.num_features(),
        }
    }
}

/// The shape `[C, H, W]` of the map entering `stage` for `size`x`size`
/// images: one image through the frozen prefix.
pub fn prefix_shape(backbone: &Backbone, stage: Stage, size: usize, device: &Device) -> [usize; 3] {
    let x = Tensor::<4>::zeros([1, 3, size, size], &device.clone().without_autodiff());
    let [_, c, h, w] = backbone
        .feature_map_before(x, stage, BatchNormUse::Folded)
        .dims();
    [c, h, w]
}

fn table_bytes(views: usize, len: usize, width: usize) -> Option<u64> {
    (views as u64)
        .checked_mul(len as u64)?
        .checked_mul(width as u64)?
        .checked_mul(4)
}

/// Refuses a job whose table would exceed its `max_bytes`.
pub fn check_size(job: &FeatureJob<'_>, width: usize) -> Result<u64, TrainError> {
    check_table_size(job.label, job.views, job.folder.len(), width, job.max_bytes)
}

/// Refuses a table of `views` x `len` x `width` floats over `max_bytes`
/// (checked arithmetic: any count a user types is safe); returns its size.
pub fn check_table_size(
    label: &str,
    views: usize,
    len: usize,
    width: usize,
    max_bytes: u64,
) -> Result<u64, TrainError> {
    let gb = |b: u64| b as f64 / 1e9;
    match table_bytes(views, len, width) {
        Some(b) if b <= max_bytes => Ok(b),
        b => Err(TrainError::Config(format!(
            "the {label} features would take {} ({views} view(s) x {len} images x {width} floats), over the limit of {:.1} GB: \
             use fewer cache views (--cache-views) or raise the limit (--cache-max-gb)",
            b.map_or("more than 18 EB".into(), |b| format!("{:.1} GB", gb(b))),
            gb(max_bytes)
        ))),
    }
}

/// Checks that `dir` can hold cache files before the backbone runs:
/// creates it and writes (then removes) a probe file.
pub fn check_writable(dir: &Path) -> Result<(), TrainError> {
    let probe = dir.join(format!(".avp-write-probe-{}", std::process::id()));
    let result = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"probe"));
    let _ = std::fs::remove_file(&probe);
    result.map_err(|e| {
        TrainError::Config(format!(
            "the feature cache folder {} is not writable ({e}): pass --cache-dir DIR with a writable folder, \
             or set AVP_CACHE_DIR",
            dir.display()
        ))
    })
}

/// Reads the features of `job` from `dir` when present, otherwise runs the
/// backbone (BatchNorm with running statistics) over every view and stores
/// them there. Without `dir` nothing is read or written.
pub fn features(
    backbone: &Backbone,
    normalization: &Normalization,
    job: &FeatureJob<'_>,
    dir: Option<&Path>,
    device: &Device,
) -> Result<(FeatureTable, CacheOrigin), TrainError> {
    let (key, width) = checked_job(backbone, normalization, job)?;
    let classes = job.folder.classes.len();
    let usable =
        |t: &FeatureTable| t.len == job.folder.len() && t.width == width && t.views == job.views;
    let file = dir.map(|d| cache_file(d, &key));
    if let Some(file) = &file
        && file.exists()
    {
        match FeatureTable::open(file, &key, classes) {
            Ok(t) if usable(&t) => {
                report::info(format!(
                    "feature cache: {} features read from {} ({} images x {} view{})",
                    job.label,
                    file.display(),
                    t.len,
                    t.views,
                    if t.views == 1 { "" } else { "s" }
                ));
                return Ok((t, CacheOrigin::Disk));
            }
            Ok(_) => report::info(format!(
                "feature cache: {} is damaged or stale (its shape is not this split's); computing it again",
                file.display()
            )),
            Err(why) => report::info(format!(
                "feature cache: {} is damaged or stale ({why}); computing it again",
                file.display()
            )),
        }
    }
    // A complete set of shards (a sharded extraction) is merged into the
    // table a single process would have written.
    if let (Some(dir), Some(file)) = (dir, &file)
        && let Some(count) = complete_shard_set(dir, &key)
    {
        merge_set(dir, &key_stem(&key), count, Some(&key), classes)?;
        if let Ok(t) = FeatureTable::open(file, &key, classes)
            && usable(&t)
        {
            report::info(format!(
                "feature cache: {} features merged from {count} shards into {} ({} images x {} view{})",
                job.label,
                file.display(),
                t.len,
                t.views,
                if t.views == 1 { "" } else { "s" }
            ));
            return Ok((t, CacheOrigin::Disk));
        }
    }
    if let Some(dir) = dir {
        check_writable(dir)?;
    }
    let table = compute(backbone, job, (0, job.folder.len()), device)?;
    if let (Some(dir), Some(file)) = (dir, &file) {
        create_dir(dir)?;
        table.save(file, &key, None)?;
        report::info(format!(
            "feature cache: {} features stored in {}",
            job.label,
            file.display()
        ));
    }
    Ok((table, CacheOrigin::Computed))
}

/// Computes shard `shard` of `job` (its images: [`Shard::range`]) and
/// writes it into `dir` atomically. A complete, intact file for the shard
/// already there is kept and nothing is computed (a rerun of a finished
/// shard costs nothing); a file a killed run left is a temporary file that
/// nothing reads, and an unusable shard file is computed again.
pub fn extract_shard(
    backbone: &Backbone,
    normalization: &Normalization,
    job: &FeatureJob<'_>,
    shard: Shard,
    dir: &Path,
    device: &Device,
) -> Result<ShardOutcome, TrainError> {
    let (key, width) = checked_job(backbone, normalization, job)?;
    let file = shard_file(dir, &key, shard);
    let range = shard.range(job.folder.len(), job.batch_size);
    let part = ShardPart {
        index: shard.index,
        count: shard.count,
        first: range.0,
        total: job.folder.len(),
    };
    if file.exists() {
        match check_shard(
            &file,
            &key,
            part,
            job.views,
            width,
            job.folder.classes.len(),
        ) {
            Ok(()) => {
                report::info(format!(
                    "features: {} shard {shard} is complete in {}: nothing to do",
                    job.label,
                    file.display()
                ));
                return Ok(ShardOutcome::AlreadyThere(file));
            }
            Err(why) => report::info(format!(
                "features: {} is damaged or stale ({why}); computing it again",
                file.display()
            )),
        }
    }
    check_writable(dir)?;
    remove_partials(&file);
    let table = compute(backbone, job, range, device)?;
    table.save(&file, &key, Some(part))?;
    report::info(format!(
        "features: {} shard {shard} ({} images from {}) stored in {}",
        job.label,
        range.1 - range.0,
        range.0,
        file.display()
    ));
    Ok(ShardOutcome::Written(file))
}

/// Removes what a killed run of this shard left: its temporary files
/// (`FILE.partial-PID`, never read by anything). A shard runs once at a
/// time (a scheduler requeues a task only after it has ended).
fn remove_partials(file: &Path) {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
        return;
    };
    let prefix = format!("{}.partial-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            report::info(format!(
                "features: removing {}, left by a run of this shard that did not finish",
                e.path().display()
            ));
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn check_shard(
    file: &Path,
    key_text: &str,
    part: ShardPart,
    views: usize,
    width: usize,
    classes: usize,
) -> Result<(), String> {
    let m = Mapped::open(file)?;
    let h = &m.header;
    if h.key_sha256 != sha256_hex(key_text.as_bytes()) {
        return Err("it was computed for other images, weights or transforms".into());
    }
    if h.shard != Some(part) || h.views != views || h.width != width {
        return Err("its shape is not this shard's".into());
    }
    m.verify(classes).map(|_| ())
}

/// The shard count of a complete set of shard files for `key_text` in
/// `dir`: every index of one count present (whether each is intact is
/// checked when they are merged).
fn complete_shard_set(dir: &Path, key_text: &str) -> Option<usize> {
    let stem = key_stem(key_text);
    shard_sets(dir)
        .into_iter()
        .find(|(s, count, indices)| *s == stem && indices.len() == *count)
        .map(|(_, count, _)| count)
}

/// The shard files in `dir`, by key stem and count: `(stem, count, the
/// indices present)`.
fn shard_sets(dir: &Path) -> Vec<(String, usize, Vec<usize>)> {
    let mut sets: std::collections::BTreeMap<(String, usize), Vec<usize>> = Default::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    for name in entries.filter_map(|e| e.ok()).map(|e| e.file_name()) {
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_suffix(".safetensors") else {
            continue;
        };
        let Some((stem, part)) = rest.split_once(".features.shard-") else {
            continue;
        };
        let Some((i, n)) = part.split_once("-of-") else {
            continue;
        };
        if let (Ok(i), Ok(n)) = (i.parse::<usize>(), n.parse::<usize>())
            && i < n
            && format!("{stem}.features.shard-{i:04}-of-{n:04}.safetensors") == name
        {
            sets.entry((stem.to_string(), n)).or_default().push(i);
        }
    }
    sets.into_iter()
        .map(|((stem, n), mut v)| {
            v.sort_unstable();
            v.dedup();
            (stem, n, v)
        })
        .collect()
}

/// What [`merge_dir`] found and did, per set of shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    /// All shards were there and intact: merged into this file.
    Merged {
        /// The merged feature file.
        file: PathBuf,
        /// Shards merged.
        shards: usize,
    },
    /// Some shards are missing: nothing was written for this set.
    Incomplete {
        /// The key stem of the set (the file names' first part).
        stem: String,
        /// Shard count.
        count: usize,
        /// The shard indices not (yet) there.
        missing: Vec<usize>,
    },
}

/// Merges every complete set of shard files in `dir` into the feature
/// file one process would have written (byte for byte), atomically; the
/// shard files stay. A set with missing shards is reported, not merged; a
/// damaged shard, or shards that do not fit together, are an error that
/// names the file. A merged file already there is written again only when
/// it is missing or differs in its header.
pub fn merge_dir(dir: &Path, classes_hint: Option<usize>) -> Result<Vec<MergeOutcome>, TrainError> {
    if !dir.is_dir() {
        return Err(TrainError::Config(format!(
            "{} is not a folder of feature shards",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    for (stem, count, present) in shard_sets(dir) {
        if present.len() < count {
            let missing = (0..count).filter(|i| !present.contains(i)).collect();
            out.push(MergeOutcome::Incomplete {
                stem,
                count,
                missing,
            });
            continue;
        }
        let file = merge_set(dir, &stem, count, None, classes_hint.unwrap_or(usize::MAX))?;
        out.push(MergeOutcome::Merged {
            file,
            shards: count,
        });
    }
    Ok(out)
}

/// Merges the `count` shards of `stem` in `dir` into
/// `stem.features.safetensors`: checks that each is intact, that they were
/// computed for one key (`key_text`'s, when given) and cover the split
/// once in order, then streams view by view, shard by shard, so the merge
/// never holds more than one shard's view.
fn merge_set(
    dir: &Path,
    stem: &str,
    count: usize,
    key_text: Option<&str>,
    classes: usize,
) -> Result<PathBuf, TrainError> {
    let bad = |file: &Path, why: String| {
        TrainError::Config(format!(
            "cannot merge the feature shards: {} {why}; run its shard again (features --shard I/N), \
             which recomputes a damaged shard",
            file.display()
        ))
    };
    let mut parts = Vec::with_capacity(count);
    for index in 0..count {
        let file = dir.join(shard_name(stem, Shard { index, count }));
        let m = Mapped::open(&file).map_err(|why| bad(&file, format!("is not usable ({why})")))?;
        m.verify(classes)
            .map_err(|why| bad(&file, format!("is damaged ({why})")))?;
        parts.push((file, m));
    }
    let (first_file, first) = &parts[0];
    let h0 = first.header.clone();
    if let Some(key) = key_text
        && h0.key_sha256 != sha256_hex(key.as_bytes())
    {
        return Err(bad(first_file, "was computed for another key".into()));
    }
    let total = h0.shard.map_or(0, |s| s.total);
    let mut next = 0;
    for (index, (file, m)) in parts.iter().enumerate() {
        let h = &m.header;
        let expected = ShardPart {
            index,
            count,
            first: next,
            total,
        };
        if h.key_sha256 != h0.key_sha256 {
            return Err(bad(
                file,
                "was computed for other images, weights or transforms than shard 0".into(),
            ));
        }
        if h.shard != Some(expected) || h.views != h0.views || h.width != h0.width {
            return Err(bad(
                file,
                format!(
                    "does not continue shard {} (expected images from {next} of {total})",
                    index.saturating_sub(1)
                ),
            ));
        }
        next += h.len;
    }
    if next != total {
        return Err(bad(
            first_file,
            format!("and its set cover {next} of {total} images"),
        ));
    }
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    for view in 0..h0.views {
        for (_, m) in &parts {
            sha2::Digest::update(&mut hash, m.view_bytes(view));
        }
    }
    for (_, m) in &parts {
        sha2::Digest::update(&mut hash, m.targets_bytes());
    }
    let header = Header {
        len: total,
        views: h0.views,
        width: h0.width,
        key_sha256: h0.key_sha256.clone(),
        data_sha256: featfile::hex(&sha2::Digest::finalize(hash)),
        shard: None,
    };
    let file = dir.join(format!("{stem}.features.safetensors"));
    if let Ok(m) = Mapped::open(&file)
        && m.header == header
    {
        return Ok(file);
    }
    write_file_atomic(&file, &header, |w| {
        for view in 0..h0.views {
            for (_, m) in &parts {
                w.write_all(m.view_bytes(view))?;
            }
        }
        for (_, m) in &parts {
            w.write_all(m.targets_bytes())?;
        }
        Ok(())
    })?;
    Ok(file)
}

/// The key text and the row width of `job`, once it is checked to have a
/// view and to fit its size limit: what [`features`] and
/// [`extract_shard`] check before anything is read or computed.
fn checked_job(
    backbone: &Backbone,
    normalization: &Normalization,
    job: &FeatureJob<'_>,
) -> Result<(String, usize), TrainError> {
    if job.views == 0 {
        return Err(TrainError::Config(
            "the feature cache needs at least one view per image".into(),
        ));
    }
    let width = job.width(backbone);
    check_size(job, width)?;
    Ok((job_key(backbone, normalization, job), width))
}

fn job_key(backbone: &Backbone, normalization: &Normalization, job: &FeatureJob<'_>) -> String {
    key_text(
        &backbone.provenance().sha256,
        backbone.config(),
        normalization,
        job.folder,
        &job.pipeline,
        job.views,
        job.seed,
        job.prefix.map(|(stage, _)| stage),
    )
}

fn create_dir(dir: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Write {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })
}

/// A feature file written whole or not at all (the workspace's one
/// `.partial`-then-rename).
fn write_file_atomic(
    file: &Path,
    header: &Header,
    data: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), TrainError> {
    avp_model::atomic::write_with(file, |tmp| {
        featfile::write_file(tmp, header, data).map_err(|source| avp_model::ModelError::Io {
            path: file.to_path_buf(),
            source,
        })
    })
    .map_err(|e| TrainError::Write {
        path: file.to_path_buf(),
        why: e.to_string(),
    })
}

/// Runs the backbone over every view of the images `range` of `job`
/// (checked by [`checked_job`]).
fn compute(
    model: &Backbone,
    job: &FeatureJob<'_>,
    range: (usize, usize),
    device: &Device,
) -> Result<FeatureTable, TrainError> {
    let inner = device.clone().without_autodiff();
    let dataset = ImageDataset::new(job.folder.clone(), job.pipeline.clone(), job.seed);
    let width = job.width(model);
    let (first, len) = (range.0, range.1 - range.0);
    let size = table_bytes(job.views, len, width).unwrap_or(u64::MAX);
    let mut values = Vec::new();
    values
        .try_reserve_exact((size / 4) as usize)
        .map_err(|e| TrainError::Config(format!("cannot hold the {} features: {e}", job.label)))?;
    values.resize((size / 4) as usize, 0f32);
    let targets: Vec<usize> = job.folder.samples[first..range.1]
        .iter()
        .map(|s| s.class)
        .collect();
    let total = job.views * len;
    let mut progress = report::Progress::new(
        format!("feature cache: {}", job.label),
        report::Unit::Images,
        Some(total as u64),
    );
    for view in 0..job.views {
        dataset.set_epoch(view as u64);
        let loader =
            OrderedLoader::new(dataset.clone(), job.batch_size, None, &inner).slice(first, range.1);
        for batch in loader.iter() {
            let batch =
                batch.map_err(|e| TrainError::Config(format!("cannot read an image: {e}")))?;
            // Running statistics, folded: the backbone's folded form.
            let n = batch.indices.len();
            let f = match job.prefix {
                Some((stage, _)) => model
                    .feature_map_before(batch.images, stage, BatchNormUse::Folded)
                    .reshape([n, width]),
                None => model.features(batch.images, BatchNormUse::Folded),
            };
            let data = f
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| TrainError::Config(format!("backbone output: {e:?}")))?;
            if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
                let image = batch
                    .indices
                    .get(bad / width)
                    .and_then(|&i| job.folder.samples.get(i));
                return Err(TrainError::Config(format!(
                    "the backbone gave a value that is not finite ({}) for {}: the weights or the normalization are broken",
                    data[bad],
                    image.map_or("an image".into(), |s| s.path.display().to_string())
                )));
            }
            for (row, &index) in data.chunks_exact(width).zip(&batch.indices) {
                let start = (view * len + index - first) * width;
                values[start..start + width].copy_from_slice(row);
            }
            progress.advance(batch.indices.len() as u64);
        }
    }
    progress.finish();
    FeatureTable::new(len, job.views, width, targets, values)
        .ok_or_else(|| TrainError::Config("the feature table has the wrong size".into()))
}

/// A batch of cached features.
#[derive(Debug, Clone)]
pub struct FeatureBatch {
    /// `[N, F]`.
    pub features: Tensor<2>,
    /// `[N]` class indices.
    pub targets: Tensor<1, Int>,
    /// Dataset index of each row.
    pub indices: Vec<usize>,
}

/// Batches of cached features: shuffled per epoch from the seed like
/// [`OrderedLoader`] (and sharded over devices as it is: see
/// [`EpochPlan`]), one view drawn per image and epoch. Each batch is
/// copied out of the table when it is asked for, so an epoch over a
/// memory-mapped table holds one batch in memory, not the table.
pub struct FeatureLoader {
    table: Arc<FeatureTable>,
    batch_size: usize,
    shuffle: Option<u64>,
    device: Device,
    plan: EpochPlan,
}

impl FeatureLoader {
    /// Batches of `batch_size` rows on `device`.
    pub fn new(
        table: FeatureTable,
        batch_size: usize,
        shuffle: Option<u64>,
        device: &Device,
    ) -> Self {
        let plan = EpochPlan::new(table.len, shuffle);
        Self {
            table: Arc::new(table),
            batch_size: batch_size.max(1),
            shuffle,
            device: device.clone(),
            plan,
        }
    }

    /// Sets the epoch the next `iter()` starts (for resumed runs).
    pub fn set_epoch(&self, epoch: u64) {
        self.plan.set_epoch(epoch);
    }

    /// The view of image `index` in `epoch`.
    pub fn view(&self, epoch: u64, index: usize) -> usize {
        view_of(&self.table, self.shuffle, epoch, index)
    }

    fn with(&self, device: &Device, plan: EpochPlan) -> Self {
        Self {
            table: Arc::clone(&self.table),
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            device: device.clone(),
            plan,
        }
    }
}

fn view_of(table: &FeatureTable, shuffle: Option<u64>, epoch: u64, index: usize) -> usize {
    if table.views <= 1 {
        return 0;
    }
    let seed = shuffle.unwrap_or(0) ^ VIEW_SALT;
    (Rng::for_item(seed, epoch, index as u64).next_u64() % table.views as u64) as usize
}

struct FeatureIter {
    table: Arc<FeatureTable>,
    shuffle: Option<u64>,
    device: Device,
    epoch: u64,
    order: Vec<usize>,
    batch_size: usize,
    done: usize,
}

impl Iterator for FeatureIter {
    type Item = Result<FeatureBatch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = (self.done + self.batch_size).min(self.order.len());
        let chunk = self.order.get(self.done..end).filter(|c| !c.is_empty())?;
        let t = &self.table;
        let mut rows = Vec::with_capacity(chunk.len() * t.width);
        for &i in chunk {
            rows.extend_from_slice(t.row(view_of(t, self.shuffle, self.epoch, i), i));
        }
        let targets: Vec<i64> = chunk.iter().map(|&i| t.targets[i] as i64).collect();
        let batch = FeatureBatch {
            features: Tensor::from_data(
                TensorData::new(rows, [chunk.len(), t.width]),
                &self.device,
            ),
            targets: Tensor::from_data(TensorData::new(targets, [chunk.len()]), &self.device),
            indices: chunk.to_vec(),
        };
        self.done = end;
        Some(Ok(batch))
    }
}

impl DataLoaderIterator<FeatureBatch> for FeatureIter {
    fn progress(&self) -> Progress {
        Progress::new(self.done, self.order.len(), None)
    }
}

impl DataLoader<FeatureBatch> for FeatureLoader {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<FeatureBatch> + 'a> {
        let (epoch, order) = self.plan.next_epoch();
        Box::new(FeatureIter {
            table: Arc::clone(&self.table),
            shuffle: self.shuffle,
            device: self.device.clone(),
            epoch,
            order,
            batch_size: self.batch_size,
            done: 0,
        })
    }

    fn num_items(&self) -> usize {
        self.plan.len()
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<FeatureBatch>> {
        Arc::new(self.with(device, self.plan.clone()))
    }

    /// Positions `start..end` of every epoch's order (see [`EpochPlan::shard`]).
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<FeatureBatch>> {
        Arc::new(self.with(&self.device, self.plan.shard(start, end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> FeatureTable {
        let (len, views, width) = (5, 2, 3);
        FeatureTable::new(
            len,
            views,
            width,
            vec![0, 1, 1, 0, 1],
            (0..len * views * width)
                .map(|i| i as f32 * 0.25 - 1.0)
                .collect(),
        )
        .unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("avp-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tiny xorshift: the corruption test is seeded, so a failure is
    /// reproducible.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn a_cache_file_round_trips_memory_mapped() {
        let dir = scratch("roundtrip");
        let t = table();
        let f = dir.join("t.features.safetensors");
        t.save(&f, "key", None).unwrap();
        let back = FeatureTable::open(&f, "key", 2).unwrap();
        assert!(back.is_mapped());
        assert_eq!(back, t);
        assert_eq!(back.row(1, 2), t.row(1, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every truncation and thousands of seeded byte flips: each is
    /// refused (the caller computes the features again), none panics and
    /// none is read as features.
    #[test]
    fn every_truncation_and_random_byte_flips_are_refused() {
        let dir = scratch("flips");
        let t = table();
        let good = dir.join("good");
        t.save(&good, "the key", None).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let f = dir.join("bad");
        let refused = |b: &[u8]| {
            std::fs::write(&f, b).unwrap();
            FeatureTable::open(&f, "the key", 2).is_err()
        };
        for cut in 0..bytes.len() {
            assert!(refused(&bytes[..cut]), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(refused(&longer));
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1500 {
            let mut b = bytes.clone();
            let at = (xorshift(&mut state) % b.len() as u64) as usize;
            let flip = (xorshift(&mut state) % 255 + 1) as u8;
            b[at] ^= flip;
            // A flip inside the header's padding (spaces) or a JSON
            // formatting byte may leave an equivalent header: the table
            // read must then be the same table.
            std::fs::write(&f, &b).unwrap();
            if let Ok(read) = FeatureTable::open(&f, "the key", 2) {
                assert_eq!(read, t, "byte {at} xor {flip:#04x} changed the table");
            }
        }
        assert!(FeatureTable::open(&good, "another key", 2).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file with a valid checksum is still refused when a class index is
    /// out of range (it used to panic inside burn-flex) or a value is not
    /// finite (it used to train a NaN model).
    #[test]
    fn out_of_range_classes_and_non_finite_values_are_refused() {
        let dir = scratch("range");
        let f = dir.join("t");
        let mut t = table();
        t.targets[2] = 2;
        t.save(&f, "k", None).unwrap();
        assert!(FeatureTable::open(&f, "k", 2).is_err());
        assert!(FeatureTable::open(&f, "k", 3).is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = table().values().to_vec();
            v[7] = bad;
            let t = FeatureTable::new(5, 2, 3, vec![0, 1, 1, 0, 1], v).unwrap();
            t.save(&f, "k", None).unwrap();
            assert!(FeatureTable::open(&f, "k", 2).is_err());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shards_parse_and_cut_on_batch_boundaries() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        for bad in ["4/4", "1", "a/2", "0/0", "-1/3", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        for (len, batch, count) in [(694, 8, 4), (200, 8, 4), (5, 8, 3), (0, 8, 2), (33, 1, 7)] {
            let mut next = 0;
            for index in 0..count {
                let (s, e) = Shard { index, count }.range(len, batch);
                assert_eq!(s, next, "{len} {batch} {count}");
                assert!(s % batch == 0 && e >= s);
                next = e;
            }
            assert_eq!(next, len);
        }
    }

    /// Shards written in pieces merge into the bytes of the whole table,
    /// a set with a missing shard is reported and not merged, and a
    /// damaged shard stops the merge with its name.
    #[test]
    fn shards_merge_into_the_whole_tables_bytes() {
        let dir = scratch("merge");
        let (len, views, width) = (10, 2, 3);
        let values: Vec<f32> = (0..len * views * width).map(|i| i as f32 - 7.5).collect();
        let targets: Vec<usize> = (0..len).map(|i| i % 2).collect();
        let whole = FeatureTable::new(len, views, width, targets.clone(), values.clone()).unwrap();
        let reference = dir.join("reference");
        whole.save(&reference, "key", None).unwrap();
        let count = 3;
        let write_shard = |index: usize| {
            let shard = Shard { index, count };
            let (s, e) = shard.range(len, 4);
            let mut v = Vec::new();
            for view in 0..views {
                for i in s..e {
                    v.extend_from_slice(whole.row(view, i));
                }
            }
            let part = FeatureTable::new(e - s, views, width, targets[s..e].to_vec(), v).unwrap();
            let p = ShardPart {
                index,
                count,
                first: s,
                total: len,
            };
            part.save(&shard_file(&dir, "key", shard), "key", Some(p))
                .unwrap();
        };
        write_shard(0);
        write_shard(2);
        let out = merge_dir(&dir, Some(2)).unwrap();
        assert!(
            matches!(&out[..], [MergeOutcome::Incomplete { missing, count: 3, .. }] if missing == &[1]),
            "{out:?}"
        );
        assert!(!cache_file(&dir, "key").exists());
        write_shard(1);
        let out = merge_dir(&dir, Some(2)).unwrap();
        assert!(
            matches!(&out[..], [MergeOutcome::Merged { shards: 3, .. }]),
            "{out:?}"
        );
        assert_eq!(
            std::fs::read(cache_file(&dir, "key")).unwrap(),
            std::fs::read(&reference).unwrap()
        );
        // A damaged shard: named, and the merged file is not replaced by it.
        let s1 = shard_file(&dir, "key", Shard { index: 1, count });
        let mut b = std::fs::read(&s1).unwrap();
        let at = b.len() - 20;
        b[at] ^= 1;
        std::fs::write(&s1, b).unwrap();
        std::fs::remove_file(cache_file(&dir, "key")).unwrap();
        let err = merge_dir(&dir, Some(2)).unwrap_err().to_string();
        assert!(
            err.contains("shard-0001-of-0003") && err.contains("damaged"),
            "{err}"
        );
        assert!(!cache_file(&dir, "key").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
