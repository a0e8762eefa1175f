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
//! A cache file carries the SHA-256 of its contents: a file that is
//! truncated, was written for another key, has a flipped byte, a class
//! index out of range or a value that is not finite is computed again,
//! never used. The size of a table is checked against
//! [`FeatureJob::max_bytes`] before anything is allocated or computed, and
//! the cache folder is checked to be writable before the backbone runs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use avp_data::{ImageDataset, ImageFolder, OrderedLoader, Pipeline, Rng, epoch_order};
use avp_model::{Backbone, BatchNormUse, Normalization, ResNetConfig, Stage, report, sha256_hex};
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;
use sha2::Digest;

use crate::error::TrainError;

const MAGIC: &[u8; 8] = b"AVPFEAT2";
/// Bytes of the trailing SHA-256.
const DIGEST: usize = 32;
/// Salt that separates the view choice from the shuffling stream.
const VIEW_SALT: u64 = 0x5EED_F1E5_0000_0001;

/// Features of every image of a split, for one or more views.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureTable {
    /// Images.
    pub len: usize,
    /// Views per image.
    pub views: usize,
    /// Features per image.
    pub width: usize,
    /// Class index of every image.
    pub targets: Vec<usize>,
    /// `[views][len][width]`, row-major.
    pub values: Vec<f32>,
}

impl FeatureTable {
    /// The features of image `index` in view `view`.
    pub fn row(&self, view: usize, index: usize) -> &[f32] {
        let start = (view * self.len + index) * self.width;
        &self.values[start..start + self.width]
    }

    fn to_bytes(&self, key_text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + key_text.len() + self.values.len() * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(key_text.len() as u64).to_le_bytes());
        out.extend_from_slice(key_text.as_bytes());
        for v in [self.len, self.views, self.width] {
            out.extend_from_slice(&(v as u64).to_le_bytes());
        }
        for &t in &self.targets {
            out.extend_from_slice(&(t as u64).to_le_bytes());
        }
        for &v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let digest = sha2::Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Parses a cache file; `None` when it is not one, is truncated, was
    /// written for another key, does not match its checksum, names a class
    /// outside `0..classes` or holds a value that is not finite.
    pub fn from_bytes(bytes: &[u8], key_text: &str, classes: usize) -> Option<Self> {
        let body_len = bytes.len().checked_sub(DIGEST)?;
        let (body, digest) = bytes.split_at(body_len);
        if sha2::Sha256::digest(body).as_slice() != digest {
            return None;
        }
        let mut r = body;
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).ok()?;
        if &magic != MAGIC {
            return None;
        }
        let u64_at = |r: &mut &[u8]| -> Option<u64> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).ok()?;
            Some(u64::from_le_bytes(b))
        };
        let key_len = usize::try_from(u64_at(&mut r)?).ok()?;
        if key_len != key_text.len() || r.len() < key_len || &r[..key_len] != key_text.as_bytes() {
            return None;
        }
        r = &r[key_len..];
        let len = usize::try_from(u64_at(&mut r)?).ok()?;
        let views = usize::try_from(u64_at(&mut r)?).ok()?;
        let width = usize::try_from(u64_at(&mut r)?).ok()?;
        let values_len = len.checked_mul(views)?.checked_mul(width)?;
        if r.len()
            != len
                .checked_mul(8)?
                .checked_add(values_len.checked_mul(4)?)?
        {
            return None;
        }
        let targets = r[..len * 8]
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                usize::try_from(u64::from_le_bytes(b))
                    .ok()
                    .filter(|&t| t < classes)
            })
            .collect::<Option<Vec<usize>>>()?;
        let values: Vec<f32> = r[len * 8..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        Some(Self {
            len,
            views,
            width,
            targets,
            values,
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
    let hash = sha256_hex(key_text.as_bytes());
    dir.join(format!("{}.features", &hash[..32]))
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
    if job.views == 0 {
        return Err(TrainError::Config(
            "the feature cache needs at least one view per image".into(),
        ));
    }
    let key = key_text(
        &backbone.provenance().sha256,
        backbone.config(),
        normalization,
        job.folder,
        &job.pipeline,
        job.views,
        job.seed,
        job.prefix.map(|(stage, _)| stage),
    );
    let width = job.width(backbone);
    check_size(job, width)?;
    let file = dir.map(|d| cache_file(d, &key));
    if let Some(file) = &file
        && let Ok(bytes) = std::fs::read(file)
    {
        match FeatureTable::from_bytes(&bytes, &key, job.folder.classes.len()) {
            Some(t) if t.len == job.folder.len() && t.width == width => {
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
            _ => report::info(format!(
                "feature cache: {} is damaged or stale; computing it again",
                file.display()
            )),
        }
    }
    if let Some(dir) = dir {
        check_writable(dir)?;
    }
    let table = compute(backbone, job, device)?;
    if let (Some(dir), Some(file)) = (dir, &file) {
        write_atomic(dir, file, &table.to_bytes(&key))?;
        report::info(format!(
            "feature cache: {} features stored in {}",
            job.label,
            file.display()
        ));
    }
    Ok((table, CacheOrigin::Computed))
}

fn write_atomic(dir: &Path, file: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Write {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    // One atomic-write helper for the workspace (`.partial` + fsync + rename).
    avp_model::atomic::write(file, bytes).map_err(|e| TrainError::Write {
        path: file.to_path_buf(),
        why: e.to_string(),
    })
}

/// Runs the backbone over every view of every image of `job`.
fn compute(
    model: &Backbone,
    job: &FeatureJob<'_>,
    device: &Device,
) -> Result<FeatureTable, TrainError> {
    let inner = device.clone().without_autodiff();
    let dataset = ImageDataset::new(job.folder.clone(), job.pipeline.clone(), job.seed);
    let width = job.width(model);
    let len = job.folder.len();
    let size = check_size(job, width)?;
    let mut values = Vec::new();
    values
        .try_reserve_exact((size / 4) as usize)
        .map_err(|e| TrainError::Config(format!("cannot hold the {} features: {e}", job.label)))?;
    values.resize((size / 4) as usize, 0f32);
    let targets: Vec<usize> = job.folder.samples.iter().map(|s| s.class).collect();
    let total = job.views * len;
    let mut progress = report::Progress::new(
        format!("feature cache: {}", job.label),
        report::Unit::Images,
        Some(total as u64),
    );
    for view in 0..job.views {
        dataset.set_epoch(view as u64);
        let loader = OrderedLoader::new(dataset.clone(), job.batch_size, None, &inner);
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
                let start = (view * len + index) * width;
                values[start..start + width].copy_from_slice(row);
            }
            progress.advance(batch.indices.len() as u64);
        }
    }
    progress.finish();
    Ok(FeatureTable {
        len,
        views: job.views,
        width,
        targets,
        values,
    })
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
/// [`OrderedLoader`], one view drawn per image and epoch.
pub struct FeatureLoader {
    table: Arc<FeatureTable>,
    batch_size: usize,
    shuffle: Option<u64>,
    device: Device,
    range: (usize, usize),
    epoch: Arc<AtomicU64>,
}

impl FeatureLoader {
    /// Batches of `batch_size` rows on `device`.
    pub fn new(
        table: FeatureTable,
        batch_size: usize,
        shuffle: Option<u64>,
        device: &Device,
    ) -> Self {
        let len = table.len;
        Self {
            table: Arc::new(table),
            batch_size: batch_size.max(1),
            shuffle,
            device: device.clone(),
            range: (0, len),
            epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sets the epoch the next `iter()` starts (for resumed runs).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// The view of image `index` in `epoch`.
    pub fn view(&self, epoch: u64, index: usize) -> usize {
        if self.table.views <= 1 {
            return 0;
        }
        let seed = self.shuffle.unwrap_or(0) ^ VIEW_SALT;
        (Rng::for_item(seed, epoch, index as u64).next_u64() % self.table.views as u64) as usize
    }

    fn with(&self, device: &Device, range: (usize, usize)) -> Self {
        Self {
            table: Arc::clone(&self.table),
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            device: device.clone(),
            range,
            epoch: Arc::clone(&self.epoch),
        }
    }
}

struct FeatureIter {
    batches: std::vec::IntoIter<FeatureBatch>,
    done: usize,
    total: usize,
}

impl Iterator for FeatureIter {
    type Item = Result<FeatureBatch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.batches.next()?;
        self.done += b.indices.len();
        Some(Ok(b))
    }
}

impl DataLoaderIterator<FeatureBatch> for FeatureIter {
    fn progress(&self) -> Progress {
        Progress::new(self.done, self.total, None)
    }
}

impl DataLoader<FeatureBatch> for FeatureLoader {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<FeatureBatch> + 'a> {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst);
        let order = epoch_order(self.range, self.shuffle, epoch);
        let w = self.table.width;
        let batches: Vec<FeatureBatch> = order
            .chunks(self.batch_size)
            .map(|chunk| {
                let mut rows = Vec::with_capacity(chunk.len() * w);
                for &i in chunk {
                    rows.extend_from_slice(self.table.row(self.view(epoch, i), i));
                }
                let targets: Vec<i64> = chunk
                    .iter()
                    .map(|&i| self.table.targets[i] as i64)
                    .collect();
                FeatureBatch {
                    features: Tensor::from_data(
                        TensorData::new(rows, [chunk.len(), w]),
                        &self.device,
                    ),
                    targets: Tensor::from_data(
                        TensorData::new(targets, [chunk.len()]),
                        &self.device,
                    ),
                    indices: chunk.to_vec(),
                }
            })
            .collect();
        Box::new(FeatureIter {
            batches: batches.into_iter(),
            done: 0,
            total: order.len(),
        })
    }

    fn num_items(&self) -> usize {
        self.range.1 - self.range.0
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<FeatureBatch>> {
        Arc::new(self.with(device, self.range))
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<FeatureBatch>> {
        let s = (self.range.0 + start).min(self.range.1);
        let e = (self.range.0 + end).min(self.range.1).max(s);
        Arc::new(self.with(&self.device, (s, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> FeatureTable {
        let (len, views, width) = (5, 2, 3);
        FeatureTable {
            len,
            views,
            width,
            targets: vec![0, 1, 1, 0, 1],
            values: (0..len * views * width)
                .map(|i| i as f32 * 0.25 - 1.0)
                .collect(),
        }
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
    fn a_cache_file_round_trips() {
        let t = table();
        assert_eq!(
            FeatureTable::from_bytes(&t.to_bytes("key"), "key", 2),
            Some(t)
        );
    }

    /// Every truncation and thousands of seeded byte flips: each is
    /// refused (the caller computes the features again), none panics and
    /// none is read as features.
    #[test]
    fn every_truncation_and_random_byte_flips_are_refused() {
        let t = table();
        let bytes = t.to_bytes("the key");
        for cut in 0..bytes.len() {
            assert_eq!(
                FeatureTable::from_bytes(&bytes[..cut], "the key", 2),
                None,
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(FeatureTable::from_bytes(&longer, "the key", 2), None);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..4000 {
            let mut b = bytes.clone();
            let at = (xorshift(&mut state) % b.len() as u64) as usize;
            let flip = (xorshift(&mut state) % 255 + 1) as u8;
            b[at] ^= flip;
            assert_eq!(
                FeatureTable::from_bytes(&b, "the key", 2),
                None,
                "byte {at} xor {flip:#04x} was accepted"
            );
        }
        assert_eq!(FeatureTable::from_bytes(&bytes, "another key", 2), None);
    }

    /// A file with a valid checksum is still refused when a class index is
    /// out of range (it used to panic inside burn-flex) or a value is not
    /// finite (it used to train a NaN model).
    #[test]
    fn out_of_range_classes_and_non_finite_values_are_refused() {
        let mut t = table();
        t.targets[2] = 2;
        assert_eq!(FeatureTable::from_bytes(&t.to_bytes("k"), "k", 2), None);
        assert!(FeatureTable::from_bytes(&t.to_bytes("k"), "k", 3).is_some());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut t = table();
            t.values[7] = bad;
            assert_eq!(FeatureTable::from_bytes(&t.to_bytes("k"), "k", 2), None);
        }
    }
}
