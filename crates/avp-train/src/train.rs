//! Training a head on a frozen backbone through burn-train's
//! `SupervisedTraining` and `Learner`: Adam, cross-entropy, per-epoch loss
//! and accuracy for both phases, printed as the lesson prints them and
//! written to `metrics.csv`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use avp_data::{ImageDataset, ImageFolder, OpenOptions, OrderedLoader, Pipeline, Split};
use avp_model::Backbone;
use burn::config::Config;
use burn::data::dataloader::DataLoader;
use burn::tensor::Device;
use burn::train::logger::TrainingProgressLogger;
use burn::train::{
    ClassificationOutput, ExecutionStrategy, InferenceStep, Learner, LearnerModel,
    SupervisedTraining, TrainStep, TrainingStrategy,
};

use crate::artifacts::TrainedModel;
use crate::bridge::{data_normalize, eval_pipeline};
use crate::cache::{CacheOrigin, FeatureJob, FeatureLoader};
use crate::checkpoint::Background;
use crate::classifier::{BnMode, CachedHead, CachedStages, Classifier, HeadConfig};
use crate::error::{TrainError, write_err};
use crate::finetune::OptimizerKind;
use crate::metrics::{
    EpochMetrics, EpochRecord, LessonMetric, Phase, append_csv, lesson_lines, read_metrics_csv,
    truncate_metrics,
};
use crate::render::PlainRenderer;
use avp_model::report;

/// The training recipe; the defaults are the lesson's.
#[derive(Config, Debug)]
pub struct TrainConfig {
    /// Epochs (the lesson: 5).
    #[config(default = 5)]
    pub epochs: usize,
    /// Batch size (the lesson: 32).
    #[config(default = 32)]
    pub batch_size: usize,
    /// Learning rate of the head (Adam's default in PyTorch, 1e-3).
    #[config(default = 1e-3)]
    pub lr: f64,
    /// Seed of the head's initialisation, the shuffling and the augmentation.
    #[config(default = 0)]
    pub seed: u64,
    /// BatchNorm behaviour of the frozen backbone.
    #[config(default = "BnMode::Frozen")]
    pub bn_mode: BnMode,
    /// The lesson's augmentation (RandomAffine + RandomHorizontalFlip) on
    /// the training split.
    #[config(default = true)]
    pub augment: bool,
    /// The head.
    #[config(default = "HeadConfig::new()")]
    pub head: HeadConfig,
    /// Train the head on cached backbone features (see [`crate::cache`]):
    /// without augmentation one view per image, with augmentation
    /// `cache_views` augmented views per image, one drawn per epoch.
    /// Needs `bn_mode` frozen.
    #[config(default = false)]
    pub feature_cache: bool,
    /// Augmented views per training image in the feature cache.
    #[config(default = 1)]
    pub cache_views: usize,
    /// Folder of the feature cache; `None`: `features/` under
    /// [`avp_model::cache_root`].
    #[config(default = "None")]
    pub cache_dir: Option<PathBuf>,
    /// The largest feature table (in GB, 1e9 bytes) the cache may compute
    /// and hold; a larger one is refused before the backbone runs.
    #[config(default = 8.0)]
    pub cache_max_gb: f64,
    /// Follow links to folders inside the class folders (see
    /// [`avp_data::OpenOptions::follow_links`]).
    #[config(default = false)]
    pub follow_links: bool,
    /// How much of each image is checked when the folders are opened
    /// ([`avp_data::Verify`]: by default a full decode up to
    /// [`avp_data::FULL_VERIFY_LIMIT`] images, the header above).
    #[config(default = "avp_data::Verify::Auto")]
    pub verify: avp_data::Verify,
    /// Which augmentation, when `augment` is on.
    #[config(default = "Augmentation::Lesson")]
    pub augmentation: Augmentation,
    /// The validation (and prediction) transform.
    #[config(default = "EvalTransform::Auto")]
    pub eval_transform: EvalTransform,
    /// Backbone stages trained with the head (fine-tuning), ending with
    /// `layer4` (see [`crate::finetune::parse_stages`]); empty: the whole
    /// backbone stays frozen, as in the lesson.
    #[config(default = "Vec::new()")]
    pub finetune: Vec<avp_model::Stage>,
    /// Learning rate of the fine-tuned stages (`None`:
    /// [`crate::finetune::DEFAULT_BACKBONE_LR`]); only with `finetune`.
    #[config(default = "None")]
    pub backbone_lr: Option<f64>,
    /// The optimiser (the lesson: Adam).
    #[config(default = "OptimizerKind::Adam")]
    pub optimizer: OptimizerKind,
    /// SGD's momentum (PyTorch's, dampening 0); 0 for plain SGD.
    #[config(default = 0.0)]
    pub momentum: f64,
    /// L2 weight decay, added to the gradients as PyTorch's Adam and SGD
    /// do.
    #[config(default = 0.0)]
    pub weight_decay: f64,
    /// Multiply the learning rates by `lr_gamma` every `lr_step` epochs
    /// (PyTorch's `StepLR`); `None`: constant rates.
    #[config(default = "None")]
    pub lr_step: Option<usize>,
    /// The factor of the step schedule.
    #[config(default = 0.1)]
    pub lr_gamma: f64,
    /// Keep the frozen prefix's output on the validation images from the
    /// first epoch for the later ones ([`crate::classifier::ValidMemo`]):
    /// the same numbers, computed once. Applies with `bn_mode` frozen and
    /// without the feature cache (which keeps them on disk); `false`
    /// recomputes them in every epoch, as the PyTorch lesson does.
    #[config(default = true)]
    pub valid_reuse: bool,
}

/// The training augmentation (with `augment` on).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum Augmentation {
    /// The lesson's `Resize((224,224))` + `RandomAffine(0, shear=10,
    /// scale=(0.8,1.2))` + `RandomHorizontalFlip()`.
    Lesson,
    /// torchvision's transfer-learning tutorial: `RandomResizedCrop(224)` +
    /// `RandomHorizontalFlip()`.
    Tutorial,
}

/// The transform of the validation split and of predictions.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum EvalTransform {
    /// The weights' own when they name one (torchvision's and timm's
    /// `Resize(256)` + `CenterCrop(224)`), else the lesson's squash.
    Auto,
    /// The lesson's `Resize((224, 224))`.
    Squash,
    /// `Resize(256)` + `CenterCrop(224)` (or the weights' own sizes).
    CenterCrop,
}

impl EvalTransform {
    /// `normalization` with its evaluation crop set as this choice says.
    pub fn resolve(self, normalization: &avp_model::Normalization) -> avp_model::Normalization {
        let crop = match self {
            EvalTransform::Auto => normalization.eval_crop,
            EvalTransform::Squash => None,
            EvalTransform::CenterCrop => Some(
                normalization
                    .eval_crop
                    .unwrap_or_else(avp_model::EvalCrop::torchvision),
            ),
        };
        normalization.clone().with_eval_crop(crop)
    }
}

/// What a run may do with what is already in its output folder (see
/// [`crate::output`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputPolicy {
    /// Remove a finished run in the folder before training, instead of
    /// keeping it until the new run has finished.
    pub overwrite: bool,
    /// Start afresh even when the folder holds an interrupted run that
    /// could resume (or one whose checkpoint is damaged).
    pub restart: bool,
}

impl TrainConfig {
    /// Refuses settings that cannot train, before any work starts.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(TrainError::Config(format!(
                "epochs and batch size must be positive (got {} and {})",
                self.epochs, self.batch_size
            )));
        }
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return Err(TrainError::Config(format!(
                "the learning rate must be a finite number above 0 (got {}); the lesson uses 1e-3",
                self.lr
            )));
        }
        if self.feature_cache && self.bn_mode == BnMode::Lesson {
            return Err(TrainError::Config(
                "the feature cache needs BatchNorm `frozen`: in `lesson` mode the features depend on the batch".into(),
            ));
        }
        if self.feature_cache && self.cache_views == 0 {
            return Err(TrainError::Config("cache views must be at least 1".into()));
        }
        if self.feature_cache && !self.augment && self.cache_views > 1 {
            return Err(TrainError::Config(format!(
                "{} cache views without augmentation would be {} identical copies: turn augmentation on or use one view",
                self.cache_views, self.cache_views
            )));
        }
        if !self.cache_max_gb.is_finite() || self.cache_max_gb <= 0.0 {
            return Err(TrainError::Config(format!(
                "the cache size limit must be a finite number of GB above 0 (got {})",
                self.cache_max_gb
            )));
        }
        crate::finetune::validate(self)
    }
}

/// What a training run produced.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained model (head on the inner device), as `model.bpk` holds it.
    pub model: TrainedModel,
    /// Per-epoch metrics.
    pub epochs: Vec<EpochMetrics>,
    /// The output folder.
    pub out_dir: PathBuf,
    /// The epoch a resumed run restarted from (`None`: a fresh run).
    pub resumed_after: Option<usize>,
    /// Where the cached features came from (`None` without the cache).
    pub cache: Option<CacheOrigin>,
}

/// Opens both splits, checking that they make a classification problem.
pub fn open_splits(root: &Path) -> Result<(ImageFolder, ImageFolder), TrainError> {
    open_splits_with(root, OpenOptions::default())
}

/// [`open_splits`] with options (e.g. following links to folders).
pub fn open_splits_with(
    root: &Path,
    options: OpenOptions,
) -> Result<(ImageFolder, ImageFolder), TrainError> {
    let train = ImageFolder::open(root, Split::Train, options)?;
    let valid = ImageFolder::open(root, Split::Validation, options)?;
    if train.classes != valid.classes {
        return Err(TrainError::ClassMismatch {
            train: train.classes.clone(),
            valid: valid.classes.clone(),
        });
    }
    if train.classes.len() < 2 {
        return Err(TrainError::Config(format!(
            "{} has {} class ({}); a classifier needs at least two class folders",
            train.dir.display(),
            train.classes.len(),
            train.classes.join(", ")
        )));
    }
    Ok((train, valid))
}

/// Prints the lesson's per-epoch lines (unless a dashboard owns the
/// terminal) and appends them to `metrics.csv`.
struct LessonLogger {
    print: bool,
    record: Arc<Mutex<EpochRecord>>,
    epochs: Arc<Mutex<Vec<EpochMetrics>>>,
    total_epochs: usize,
    csv: PathBuf,
    started: Instant,
    split: String,
    phase_started: Instant,
    phase_seconds: (f64, f64),
}

impl TrainingProgressLogger for LessonLogger {
    fn start(
        &mut self,
        total_epochs: usize,
        starting_epoch: usize,
        _total_items: Option<usize>,
        _label: Option<&str>,
    ) {
        self.total_epochs = total_epochs;
        self.started = Instant::now();
        if starting_epoch > 1 {
            report::info(format!("resuming at epoch {starting_epoch}/{total_epochs}"));
        }
    }

    fn update_epoch(&mut self, epoch: usize) {
        // The phases' totals, as burn-train's metrics computed them.
        let Ok(mut r) = self.record.lock() else {
            return;
        };
        let [tr, va] = std::mem::take(&mut r.phases);
        drop(r);
        let m = EpochMetrics {
            epoch,
            train_loss: tr.loss(),
            train_acc: tr.accuracy(),
            valid_loss: va.loss(),
            valid_acc: va.accuracy(),
            seconds: self.phase_seconds.0 + self.phase_seconds.1,
        };
        if self.print {
            report::info(lesson_lines(&m, self.total_epochs));
        }
        let _ = append_csv(&self.csv, &m, self.phase_seconds);
        if let Ok(mut e) = self.epochs.lock() {
            e.push(m);
        }
        self.phase_seconds = (0.0, 0.0);
    }

    fn start_split(&mut self, split: &str, _total_items: usize) {
        self.split = split.to_string();
        self.phase_started = Instant::now();
    }

    fn update_split(&mut self, _items_processed: usize) {}

    fn end_split(&mut self) {
        let dt = self.phase_started.elapsed().as_secs_f64();
        if self.split.to_ascii_lowercase().starts_with("train") {
            self.phase_seconds.0 += dt;
        } else {
            self.phase_seconds.1 += dt;
        }
    }

    fn end(&mut self) {
        // burn-train also ends here when it stopped early: that is no
        // "training done" (the caller reports why it stopped).
        let finished = self
            .epochs
            .lock()
            .is_ok_and(|e| e.len() >= self.total_epochs);
        if self.print && finished {
            report::info(format!(
                "training done in {:.1} s",
                self.started.elapsed().as_secs_f64()
            ));
        }
    }

    // burn-train reports every iteration here; the renderer shows progress.
    fn log_event_training(&mut self, _event: String) {}
}

fn checkpoint_complete(out_dir: &Path, epoch: usize) -> bool {
    ["model", "optim", "scheduler"].iter().all(|k| {
        out_dir
            .join("checkpoint")
            .join(format!("{k}-{epoch}.bpk"))
            .is_file()
    })
}

/// When burn-train writes checkpoints: after every epoch but the last,
/// the two latest kept (Burn's default keeps them after the last epoch too,
/// and the epoch with the lowest validation loss). A run resumes only from
/// an epoch before its last ([`resume_point`]), and a finished run writes
/// `model.bpk` itself, so the last epoch's checkpoint was never read: for
/// fine-tuning a ResNet18 `layer4` it is 158 MB, and writing a checkpoint
/// took 0.3–0.4 s of an epoch on 2 cores (two cached epochs 14.3 s without
/// checkpoints against 15.0 s with them, alternating runs).
///
/// The older checkpoint is deleted before the new one is written, so the
/// pages the kernel frees with it are the ones the new file's writes take.
/// On a virtual machine that hands pages the kernel leaves free for a few
/// seconds back to its host, a write into such a page waits for the host to
/// back it again: the 105 MB optimiser checkpoint of that fine-tuning took
/// 0.20–0.34 s of its thread's CPU into fresh pages and 0.03 s into the
/// just-freed ones of its predecessor (the runs' own timings, on this
/// project's 2-core Xeon runner). A kill between the deletion and the end
/// of the write still leaves the checkpoint of the epoch before.
struct EveryEpochButTheLast {
    epochs: usize,
}

impl burn::train::checkpoint::CheckpointingStrategy for EveryEpochButTheLast {
    fn checkpointing(
        &mut self,
        epoch: usize,
        _: &burn::train::metric::store::EventStoreClient,
    ) -> Vec<burn::train::checkpoint::CheckpointingAction> {
        checkpoint_actions(epoch, self.epochs)
    }
}

/// [`EveryEpochButTheLast`]'s actions after `epoch` (from 1) of `epochs`.
fn checkpoint_actions(
    epoch: usize,
    epochs: usize,
) -> Vec<burn::train::checkpoint::CheckpointingAction> {
    use burn::train::checkpoint::CheckpointingAction::{Delete, Save};
    if epoch >= epochs {
        return Vec::new();
    }
    match epoch.checked_sub(2).filter(|&e| e > 0) {
        Some(old) => vec![Delete(old), Save],
        None => vec![Save],
    }
}

/// Why the checkpoint of `epoch` cannot be restored, if it cannot: each of
/// its three files is read back as burn-train will read it (a truncated
/// file used to make burn-train panic on every rerun).
fn checkpoint_damage(out_dir: &Path, epoch: usize) -> Option<String> {
    use burn::train::checkpoint::{Checkpointer, FileCheckpointer};
    let dir = out_dir.join("checkpoint");
    let file = |k: &str| dir.join(format!("{k}-{epoch}.bpk")).display().to_string();
    let model: Result<burn::store::ModuleRecord, _> =
        FileCheckpointer::new(&dir, "model").restore(epoch);
    if let Err(e) = model {
        return Some(format!("{}: {e}", file("model")));
    }
    let optim: Result<burn::optim::OptimizerRecord, _> =
        FileCheckpointer::new(&dir, "optim").restore(epoch);
    if let Err(e) = optim {
        return Some(format!("{}: {e}", file("optim")));
    }
    let scheduler: Result<burn::lr_scheduler::LrSchedulerRecord, _> =
        FileCheckpointer::new(&dir, "scheduler").restore(epoch);
    if let Err(e) = scheduler {
        return Some(format!("{}: {e}", file("scheduler")));
    }
    None
}

/// What a run trains on besides its configuration: the backbone's
/// SHA-256 and the data folder, as written to `run.json`.
fn run_identity(weights_sha256: &str, root: &Path) -> serde_json::Value {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    serde_json::json!({ "weights_sha256": weights_sha256, "data": root })
}

/// Whether the run in `out_dir` was started with `config`, the backbone
/// `weights_sha256` and the data folder `root` (its `config.json` and
/// `run.json`); `None` when either file is missing or unreadable.
fn same_run(
    out_dir: &Path,
    config: &TrainConfig,
    weights_sha256: &str,
    root: &Path,
) -> Option<bool> {
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(out_dir.join(f)).ok()?).ok()
    };
    let (saved, identity) = (read("config.json")?, read("run.json")?);
    Some(
        saved == serde_json::to_value(config).ok()?
            && identity == run_identity(weights_sha256, root),
    )
}

/// The epoch an interrupted run in `out_dir` can resume after: the run
/// did not finish (no `model.bpk`), was started with the same
/// configuration, backbone (`weights_sha256`) and data folder, and left a
/// complete checkpoint and its metrics for that epoch.
pub fn resume_point(
    out_dir: &Path,
    config: &TrainConfig,
    weights_sha256: &str,
    root: &Path,
) -> Option<usize> {
    if out_dir.join("model.bpk").exists() {
        return None;
    }
    if !same_run(out_dir, config, weights_sha256, root)? {
        report::info(format!(
            "{} holds an unfinished run with another configuration, backbone or data folder; starting afresh",
            out_dir.display()
        ));
        return None;
    }
    let done = read_metrics_csv(&out_dir.join("metrics.csv"));
    done.iter()
        .map(|m| m.epoch)
        .filter(|&e| e < config.epochs && checkpoint_complete(out_dir, e))
        .max()
}

/// The epochs of a finished run in `out_dir` (its `model.bpk` written)
/// that was started with the same configuration, backbone
/// (`weights_sha256`) and data folder and recorded all `config.epochs`
/// epochs; `None` otherwise. What a driver of many runs (`compare_seeds
/// --resume`) keeps instead of training again.
pub fn finished_run(
    out_dir: &Path,
    config: &TrainConfig,
    weights_sha256: &str,
    root: &Path,
) -> Option<Vec<EpochMetrics>> {
    if !out_dir.join("model.bpk").is_file() || !same_run(out_dir, config, weights_sha256, root)? {
        return None;
    }
    let epochs = read_metrics_csv(&out_dir.join("metrics.csv"));
    let numbered = epochs.iter().map(|m| m.epoch).eq(1..=config.epochs);
    numbered.then_some(epochs)
}

/// [`resume_point`], with each candidate checkpoint read back: a damaged
/// one falls back to the one before it; when every one is damaged the run
/// stops with what to do.
fn plan_resume(
    out_dir: &Path,
    config: &TrainConfig,
    weights_sha256: &str,
    root: &Path,
) -> Result<Option<usize>, TrainError> {
    let Some(last) = resume_point(out_dir, config, weights_sha256, root) else {
        return Ok(None);
    };
    let mut first_damage = None;
    for epoch in (1..=last).rev() {
        if !checkpoint_complete(out_dir, epoch) {
            continue;
        }
        match checkpoint_damage(out_dir, epoch) {
            None => {
                if let Some(why) = &first_damage {
                    report::warn(format!(
                        "damaged checkpoint ({why}); resuming from epoch {epoch} instead"
                    ));
                }
                return Ok(Some(epoch));
            }
            Some(why) => {
                first_damage.get_or_insert(why);
            }
        }
    }
    Err(TrainError::Config(format!(
        "{} holds an interrupted run whose checkpoint is damaged ({}): it cannot resume; \
         run the same command with --restart to start that run afresh",
        out_dir.display(),
        first_damage.unwrap_or_default()
    )))
}

/// Everything [`launch`] needs besides the model and its loaders.
struct Run<'a> {
    out_dir: &'a Path,
    config: &'a TrainConfig,
    strategy: ExecutionStrategy,
    resume: Option<usize>,
    done: Vec<EpochMetrics>,
    /// Optimiser steps per epoch (for the step schedule).
    batches: usize,
}

/// Why a run that burn-train returned from did not finish, if it did not:
/// an error inside its loop (a checkpoint that could not be written, a
/// metric, the data), a loss that was not finite, or a stop.
fn unfinished(
    error: Option<Arc<burn::train::TrainingError>>,
    interrupted: Option<burn::train::Interruption>,
    record: &Mutex<EpochRecord>,
    epochs: &[EpochMetrics],
    config: &TrainConfig,
    out_dir: &Path,
) -> Option<TrainError> {
    let non_finite = record.lock().ok().and_then(|r| r.non_finite);
    if let Some((phase, loss)) = non_finite {
        return Some(TrainError::Diverged(format!(
            "the {phase} loss became {loss} in epoch {} of {}: training stopped and no model was written. \
             Lower the learning rate (now {:e}), or check the data and the weights",
            epochs.len() + 1,
            config.epochs,
            config.lr
        )));
    }
    if let Some(e) = error {
        return Some(TrainError::Stopped(format!(
            "training stopped by an error after epoch {} of {}: {e}. \
             Nothing was lost: fix the cause and run the same command again to resume \
             (details in {})",
            epochs.len(),
            config.epochs,
            out_dir.join("experiment.log").display()
        )));
    }
    if epochs.len() < config.epochs {
        return Some(TrainError::Stopped(format!(
            "training stopped after epoch {} of {}{}; run the same command again to resume",
            epochs.len(),
            config.epochs,
            interrupted.map(|i| format!(" ({i:?})")).unwrap_or_default()
        )));
    }
    None
}

/// Trains `model` through burn-train's `SupervisedTraining` and `Learner`
/// (Adam, accuracy and loss metrics, checkpoints every epoch), resuming
/// from `run.resume` when set.
fn launch<M>(
    model: M,
    train_loader: Arc<dyn DataLoader<<M as TrainStep>::Input>>,
    valid_loader: Arc<dyn DataLoader<<M as InferenceStep>::Input>>,
    run: Run<'_>,
) -> Result<(M, Vec<EpochMetrics>), TrainError>
where
    M: LearnerModel
        + TrainStep<Output = ClassificationOutput>
        + InferenceStep<Output = ClassificationOutput>,
{
    let interrupter = burn::train::Interrupter::new();
    let record = Arc::new(Mutex::new(EpochRecord::default()));
    let metric = |accuracy, phase| {
        LessonMetric::new(accuracy, phase, Arc::clone(&record), interrupter.clone())
    };
    let epochs = Arc::new(Mutex::new(run.done));
    let dashboard = std::io::stdout().is_terminal();
    let logger = LessonLogger {
        print: !dashboard,
        record: Arc::clone(&record),
        epochs: Arc::clone(&epochs),
        total_epochs: run.config.epochs,
        csv: run.out_dir.join("metrics.csv"),
        started: Instant::now(),
        split: String::new(),
        phase_started: Instant::now(),
        phase_seconds: (0.0, 0.0),
    };
    let schedule = crate::finetune::schedule(run.config, run.batches)?;
    let learner = Learner::new(model, crate::finetune::optimizer(run.config), schedule);
    // Where burn-train's default checkpointers would write, at idle priority.
    let checkpoints = run.out_dir.join("checkpoint");
    let mut training = SupervisedTraining::new(run.out_dir, train_loader, valid_loader)
        .metric_train_numeric(metric(true, Phase::Train))
        .metric_train_numeric(metric(false, Phase::Train))
        .metric_valid_numeric(metric(true, Phase::Valid))
        .metric_valid_numeric(metric(false, Phase::Valid))
        .num_epochs(run.config.epochs)
        .with_custom_checkpointers(
            Background::new(&checkpoints, "model"),
            Background::new(&checkpoints, "optim"),
            Background::new(&checkpoints, "scheduler"),
        )
        .with_checkpointing_strategy(EveryEpochButTheLast {
            epochs: run.config.epochs,
        })
        .with_training_strategy(TrainingStrategy::Default(run.strategy))
        .with_interrupter(interrupter)
        .with_progress_logger(logger);
    if let Some(epoch) = run.resume {
        training = training.checkpoint(epoch);
    }
    if !dashboard {
        training = training.renderer(Box::new(PlainRenderer::default()));
    }
    // A panic inside burn-train (it has `expect`s on checkpoint files)
    // becomes an error that says what to do.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| training.launch(learner)))
            .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                TrainError::Stopped(format!(
                    "training stopped inside burn-train: {why}. If {} holds a damaged checkpoint, \
                 run the same command with --restart to start afresh",
                    run.out_dir.display()
                ))
            });
    // The trained stages' scratch buffers and kept weight transforms are
    // freed when training ends, however it ends, and the allocator gives
    // the memory back.
    avp_model::train_conv::release_buffers();
    return_free_memory();
    let result = result?;
    let epochs = epochs.lock().map(|e| e.clone()).unwrap_or_default();
    if dashboard {
        // The dashboard owned the screen during training: the lesson's lines now.
        for m in &epochs {
            report::info(lesson_lines(m, run.config.epochs));
        }
    }
    if let Some(e) = unfinished(
        result.error,
        result.interrupted,
        &record,
        &epochs,
        run.config,
        run.out_dir,
    ) {
        return Err(e);
    }
    Ok((result.model, epochs))
}

/// Hands the memory the allocator keeps free back to the system: after a
/// cached `layer4` fine-tuning of the lesson, the freed buffers of
/// training stayed in glibc's heap, and the process held 834 MB where it
/// needed 530 MB (`VmRSS`, measured around this call).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_free_memory() {
    // SAFETY: `malloc_trim` takes no pointer and only returns free memory
    // of glibc's heaps to the system; pad 0 keeps nothing extra.
    let _ = unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_free_memory() {}

/// How several devices share one training run (see [`execution_strategy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parallel {
    /// DDP when every device is CUDA, burn-train's multi-device strategy
    /// otherwise.
    #[default]
    Auto,
    /// burn-train's `MultiDevice` strategy with the optimiser on the first
    /// device: one thread per device, each on its shard of every epoch;
    /// the gradients are moved to the first device and summed, and one
    /// optimiser step follows.
    Multi,
    /// burn-train's distributed data parallel: one model copy per device,
    /// gradients summed by an all-reduce through NCCL. CUDA devices only.
    Ddp,
}

impl std::str::FromStr for Parallel {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "multi" | "multi-device" => Ok(Self::Multi),
            "ddp" => Ok(Self::Ddp),
            other => Err(TrainError::Config(format!(
                "unknown parallel strategy `{other}`: expected auto, multi or ddp"
            ))),
        }
    }
}

/// Burn's execution strategy for the comma-separated device names
/// `devices` (`flex`, `flex,flex`, `cuda:0,cuda:1`): one device trains
/// alone (or, with [`Parallel::Ddp`], as a one-device DDP); several train
/// with `parallel` ([`Parallel::Auto`]: DDP when all are CUDA devices,
/// multi-device otherwise). Gradients are summed on every path. DDP on
/// anything but CUDA is refused here, before Burn would panic setting it
/// up.
pub fn execution_strategy(
    devices: &str,
    parallel: Parallel,
) -> Result<ExecutionStrategy, TrainError> {
    let names: Vec<&str> = devices.split(',').map(str::trim).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(TrainError::Config(format!(
            "--devices {devices:?}: expected device names separated by commas, e.g. flex,flex or cuda:0,cuda:1"
        )));
    }
    let parsed = names
        .iter()
        .map(|n| avp_model::parse_device(n).map(|d| d.without_autodiff()))
        .collect::<Result<Vec<_>, _>>()?;
    let all_cuda = names
        .iter()
        .all(|n| n.to_ascii_lowercase().starts_with("cuda"));
    match (parallel, all_cuda) {
        (Parallel::Ddp, false) => Err(TrainError::Config(format!(
            "DDP all-reduces gradients through NCCL, which needs CUDA devices (got {devices}); \
             use --parallel multi (burn-train's multi-device strategy) for {devices}"
        ))),
        // `ddp` is DDP even on one device (a smoke run on `cuda:0`).
        (Parallel::Ddp, true) | (Parallel::Auto, true)
            if parallel == Parallel::Ddp || parsed.len() > 1 =>
        {
            let config = burn::tensor::distributed::DistributedConfig {
                all_reduce_op: burn::tensor::distributed::ReduceOperation::Sum,
            };
            Ok(ExecutionStrategy::ddp(parsed, config))
        }
        _ if parsed.len() == 1 => Ok(ExecutionStrategy::SingleDevice(parsed[0].clone())),
        _ => Ok(ExecutionStrategy::MultiDevice(
            parsed,
            burn::train::MultiDeviceOptim::OptimMainDevice,
        )),
    }
}

/// The main device of a strategy and how many devices train: several
/// only with the frozen backbone (a head alone, or the cached head), as
/// trained BatchNorm layers (`--bn-mode lesson`, `--finetune`) would keep
/// their batch statistics per device.
fn strategy_devices(
    strategy: &ExecutionStrategy,
    config: &TrainConfig,
) -> Result<(Device, usize), TrainError> {
    let devices: &[Device] = match strategy {
        ExecutionStrategy::SingleDevice(d) => std::slice::from_ref(d),
        ExecutionStrategy::MultiDevice(ds, _) => ds,
        ExecutionStrategy::DistributedDataParallel { devices, .. } => devices,
    };
    let Some(main) = devices.first() else {
        return Err(TrainError::Config(
            "the execution strategy names no device".into(),
        ));
    };
    let n = devices.len();
    if n > 1 && config.bn_mode == BnMode::Lesson {
        return Err(TrainError::Config(format!(
            "--bn-mode lesson with {n} devices: the backbone's BatchNorm would use each device's share of the batch \
             and update running statistics on copies that are thrown away; train on several devices with --bn-mode frozen, \
             or on one device"
        )));
    }
    if n > 1 && !config.finetune.is_empty() {
        return Err(TrainError::Config(format!(
            "--finetune with {n} devices: the fine-tuned stages' BatchNorm running statistics would be updated on each \
             device's copy and lost; fine-tune on one device (several devices train the head on the frozen backbone)"
        )));
    }
    Ok((main.clone(), n))
}

/// Optimiser steps per epoch when `len` items in batches of `batch` are
/// cut into `devices` shards as burn-train cuts them (equal parts, the
/// last one taking the rest): one step per round of one batch per device.
fn steps_per_epoch(len: usize, batch: usize, devices: usize) -> usize {
    let devices = devices.max(1);
    let last = len - (devices - 1) * (len / devices);
    last.div_ceil(batch.max(1))
}

/// Trains a head on `backbone` (frozen) over the image folder `root` on
/// one device, writing checkpoints, `metrics.csv`, `config.json`,
/// `model.bpk` and `curves.png` into `out_dir`. See [`train_with`].
pub fn train(
    backbone: impl Into<Backbone>,
    root: &Path,
    out_dir: &Path,
    config: &TrainConfig,
    device: &Device,
) -> Result<TrainOutcome, TrainError> {
    train_with(
        backbone,
        root,
        out_dir,
        config,
        ExecutionStrategy::SingleDevice(device.clone().without_autodiff()),
    )
}

/// [`train`] with Burn's `ExecutionStrategy`: one device, or several
/// (see [`execution_strategy`]: the frozen backbone only, each device
/// training on its shard of every epoch's shuffled order, gradients
/// summed), keeping a finished run in `out_dir` until the new one has
/// finished (see [`train_with_policy`]).
pub fn train_with(
    backbone: impl Into<Backbone>,
    root: &Path,
    out_dir: &Path,
    config: &TrainConfig,
    strategy: ExecutionStrategy,
) -> Result<TrainOutcome, TrainError> {
    train_with_policy(
        backbone,
        root,
        out_dir,
        config,
        strategy,
        OutputPolicy::default(),
    )
}

/// [`train_with`], with what may happen to what `out_dir` already holds.
///
/// When `out_dir` holds an unfinished run with the same configuration
/// (interrupted: checkpoints and metrics but no `model.bpk`), training
/// resumes after its last complete epoch whose checkpoint reads back; the
/// finished epochs keep their rows in `metrics.csv` (`policy.restart`
/// starts afresh instead). A finished run stays until the new one has
/// finished, unless `policy.overwrite`. Only files avp writes are ever
/// removed, and a lock keeps a second run out (see [`crate::output`]). An
/// error inside burn-train's loop, or a loss that is not finite, fails the
/// run and writes no `model.bpk`.
pub fn train_with_policy(
    backbone: impl Into<Backbone>,
    root: &Path,
    out_dir: &Path,
    config: &TrainConfig,
    strategy: ExecutionStrategy,
    policy: OutputPolicy,
) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    let backbone = Arc::new(backbone.into().headless());
    let (device, device_count) = strategy_devices(&strategy, config)?;
    let (train_folder, valid_folder) = check_inputs(&backbone, root, out_dir, config, &device)?;
    let classes = train_folder.classes.clone();
    // Nothing is written into `out_dir` before this lock is held.
    let _lock = crate::output::OutputLock::acquire(out_dir)?;
    let (work, resume, done) = prepare_output(&backbone, root, out_dir, config, policy)?;
    let out_dir_final = out_dir;
    let out_dir = work.as_path();
    // The validation transform is stored with the model: predictions
    // later see images as validation did.
    let (normalization, train_pipeline, eval) = pipelines(&backbone, config);
    if device_count > 1 {
        report::info(format!(
            "training on {device_count} devices: each runs its shard of every epoch's batches, and the {device_count} \
             gradients of a step are summed (an optimiser step sees {device_count} batches of {})",
            config.batch_size
        ));
    }
    let inner = device.clone().without_autodiff();
    let ad = inner.clone().autodiff();
    inner.seed(config.seed);
    ad.seed(config.seed);
    let head = config
        .head
        .init(backbone.num_features(), classes.len(), &ad)?;
    let job = Job {
        backbone: &backbone,
        config,
        normalization: &normalization,
        folders: (train_folder, valid_folder),
        pipelines: (train_pipeline, eval),
        head,
        devices: (inner, ad),
        start_epoch: resume.unwrap_or(0) as u64,
    };
    let run = Run {
        out_dir,
        config,
        strategy,
        resume,
        done,
        batches: steps_per_epoch(job.folders.0.len(), config.batch_size, device_count),
    };
    let (model, epochs, cache) = if config.feature_cache {
        train_cached(job, run)?
    } else {
        train_images(job, run)?
    };
    let outcome = TrainOutcome {
        model: TrainedModel {
            // Fine-tuned stages go back into the backbone: what model.bpk
            // holds and predictions run.
            classifier: model.merged()?,
            classes,
            normalization,
        },
        epochs,
        out_dir: out_dir_final.to_path_buf(),
        resumed_after: resume,
        cache,
    };
    crate::artifacts::save_model(&outcome.model, &out_dir.join("model.bpk"))?;
    crate::plot::plot_curves(&outcome.epochs, &out_dir.join("curves.png"))?;
    if out_dir != out_dir_final {
        crate::output::swap_in(out_dir, out_dir_final)?;
    }
    Ok(outcome)
}

/// The validation transform (stored with the model: predictions later see
/// images as validation did), the training pipeline, and the evaluation
/// pipeline of `config` on `backbone`.
fn pipelines(
    backbone: &Backbone,
    config: &TrainConfig,
) -> (avp_model::Normalization, Pipeline, Pipeline) {
    let normalization = config.eval_transform.resolve(backbone.normalization());
    let normalize = data_normalize(&normalization);
    let eval = eval_pipeline(&normalization);
    let train_pipeline = match (config.augment, config.augmentation) {
        (true, Augmentation::Lesson) => Pipeline::lesson(normalize),
        (true, Augmentation::Tutorial) => Pipeline::tutorial(normalize),
        (false, _) => eval.clone(),
    };
    (normalization, train_pipeline, eval)
}

/// The feature jobs of a cached run: the training split (one view
/// without augmentation, `cache_views` augmented views with it) and the
/// validation split (one view), with the prefix map when fine-tuning.
/// The one place the cached run's keys come from, shared by training and
/// by [`extract_shard`].
fn feature_jobs<'a>(
    backbone: &Backbone,
    config: &TrainConfig,
    folders: (&'a ImageFolder, &'a ImageFolder),
    pipelines: (Pipeline, Pipeline),
    device: &Device,
) -> [FeatureJob<'a>; 2] {
    let max_bytes = (config.cache_max_gb * 1e9) as u64;
    let views = if config.augment {
        config.cache_views
    } else {
        1
    };
    let prefix = config.finetune.first().map(|&stage| {
        (
            stage,
            crate::cache::prefix_shape(backbone, stage, 224, device),
        )
    });
    let job = |label, folder, pipeline, views| FeatureJob {
        label,
        folder,
        pipeline,
        views,
        seed: config.seed,
        batch_size: 8,
        max_bytes,
        prefix,
    };
    [
        job("train", folders.0, pipelines.0, views),
        job("validation", folders.1, pipelines.1, 1),
    ]
}

/// Computes shard `shard` of the cached features a run with `config` on
/// the image folder `root` would use (both splits: the images of each cut
/// as [`crate::cache::Shard::range`] says) and writes them into `dir`,
/// one shard file per split, atomically. A run of training with
/// `cache_dir` pointed at `dir` (or [`crate::cache::merge_dir`]) merges a
/// complete set into the features one process computes, byte for byte.
/// A finished shard is not computed again.
pub fn extract_shard(
    backbone: impl Into<Backbone>,
    root: &Path,
    config: &TrainConfig,
    shard: crate::cache::Shard,
    dir: &Path,
    device: &Device,
) -> Result<Vec<crate::cache::ShardOutcome>, TrainError> {
    let config = &config.clone().with_feature_cache(true);
    config.validate()?;
    let backbone = backbone.into().headless();
    let options = OpenOptions {
        follow_links: config.follow_links,
        verify: config.verify,
        ..OpenOptions::default()
    };
    let (train_folder, valid_folder) = open_splits_with(root, options)?;
    backbone.check_input_size(224, 224)?;
    let (normalization, train_pipeline, eval) = pipelines(&backbone, config);
    let inner = device.clone().without_autodiff();
    let jobs = feature_jobs(
        &backbone,
        config,
        (&train_folder, &valid_folder),
        (train_pipeline, eval),
        &inner,
    );
    crate::cache::check_writable(dir)?;
    jobs.iter()
        .map(|job| crate::cache::extract_shard(&backbone, &normalization, job, shard, dir, &inner))
        .collect()
}

/// Everything checked before anything is written: the output folder is
/// not a file, the cache folder is writable, both splits open and make a
/// classification problem, the input size fits the network, and the
/// feature table fits in memory. Returns the two splits.
fn check_inputs(
    backbone: &Backbone,
    root: &Path,
    out_dir: &Path,
    config: &TrainConfig,
    device: &Device,
) -> Result<(ImageFolder, ImageFolder), TrainError> {
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(TrainError::Config(format!(
            "the output folder {} is a file, not a folder: pass --out with a folder (it is created if missing)",
            out_dir.display()
        )));
    }
    if let Some(dir) = config.feature_cache.then(|| feature_dir(config)) {
        crate::cache::check_writable(&dir)?;
    }
    let options = OpenOptions {
        follow_links: config.follow_links,
        verify: config.verify,
        ..OpenOptions::default()
    };
    let (train_folder, valid_folder) = open_splits_with(root, options)?;
    report::info(&train_folder);
    report::info(&valid_folder);
    backbone.check_input_size(224, 224)?;
    if config.feature_cache {
        let views = if config.augment {
            config.cache_views
        } else {
            1
        };
        // Fine-tuning caches the map entering the first trained stage.
        let (label, width) = match config.finetune.first() {
            Some(&stage) => {
                let [c, h, w] = crate::cache::prefix_shape(backbone, stage, 224, device);
                (
                    format!("train (the {c}x{h}x{w} map before {stage})"),
                    c * h * w,
                )
            }
            None => ("train".to_string(), backbone.num_features()),
        };
        let bytes = crate::cache::check_table_size(
            &label,
            views,
            train_folder.len(),
            width,
            (config.cache_max_gb * 1e9) as u64,
        )?;
        report::info(format!(
            "feature cache: the {label} features take {:.2} GB ({views} view(s) x {} images)",
            bytes as f64 / 1e9,
            train_folder.len()
        ));
    }
    Ok((train_folder, valid_folder))
}

/// Readies the folder the run writes into (with the lock held): a
/// finished run is removed (`--overwrite`) or kept while this one trains
/// in the staging folder; an interrupted run with the same configuration
/// is resumed (unless `--restart`), else the folder is cleared of avp's
/// files and `config.json` and `run.json` are written. Returns the folder,
/// the epoch to resume after, and the epochs already done.
fn prepare_output(
    backbone: &Backbone,
    root: &Path,
    out_dir: &Path,
    config: &TrainConfig,
    policy: OutputPolicy,
) -> Result<(PathBuf, Option<usize>, Vec<EpochMetrics>), TrainError> {
    crate::output::remove_scratch(out_dir)?;
    let finished = out_dir.join("model.bpk").exists();
    if finished && policy.overwrite {
        report::info(format!(
            "--overwrite: removing the finished run in {}",
            out_dir.display()
        ));
        crate::output::remove_run(out_dir)?;
    }
    // A finished run stays where it is until this one has finished.
    let staging = out_dir.join(crate::output::STAGING);
    let work = if finished && !policy.overwrite {
        report::info(format!(
            "{} holds a finished run: it is kept until this run has finished (--overwrite replaces it now)",
            out_dir.display()
        ));
        std::fs::create_dir_all(&staging).map_err(|e| write_err(&staging, e))?;
        crate::output::remove_scratch(&staging)?;
        staging.clone()
    } else {
        out_dir.to_path_buf()
    };
    let identity = run_identity(&backbone.provenance().sha256, root);
    let resume = if policy.restart {
        None
    } else {
        plan_resume(&work, config, &backbone.provenance().sha256, root)?
    };
    let csv = work.join("metrics.csv");
    let done = match resume {
        Some(epoch) => {
            report::info(format!(
                "{} holds an interrupted run: resuming after epoch {epoch}/{}",
                work.display(),
                config.epochs
            ));
            truncate_metrics(&csv, epoch)?
        }
        None => {
            // Only what avp wrote goes; anything else in the folder stays.
            crate::output::remove_run(&work)?;
            config
                .save(work.join("config.json"))
                .map_err(|e| write_err(&work.join("config.json"), e))?;
            std::fs::write(work.join("run.json"), identity.to_string())
                .map_err(|e| write_err(&work.join("run.json"), e))?;
            Vec::new()
        }
    };
    Ok((work, resume, done))
}

/// What the two training paths share.
struct Job<'a> {
    backbone: &'a Arc<Backbone>,
    config: &'a TrainConfig,
    normalization: &'a avp_model::Normalization,
    /// Training and validation splits.
    folders: (ImageFolder, ImageFolder),
    /// Training and validation transforms.
    pipelines: (Pipeline, Pipeline),
    head: crate::classifier::Head,
    /// The inner device and its autodiff twin.
    devices: (Device, Device),
    start_epoch: u64,
}

/// What a training path returns: the classifier, the epochs, where the
/// features came from.
type Trained = (Classifier, Vec<EpochMetrics>, Option<CacheOrigin>);

/// The head trained on cached backbone features (computed once, or read
/// from the cache folder), then joined to the backbone.
fn train_cached(job: Job<'_>, run: Run<'_>) -> Result<Trained, TrainError> {
    let Job {
        backbone,
        config,
        normalization,
        folders: (train_folder, valid_folder),
        pipelines: (train_pipeline, eval),
        head,
        devices: (inner, ad),
        start_epoch,
    } = job;
    let dir = feature_dir(config);
    let [train_job, valid_job] = feature_jobs(
        backbone,
        config,
        (&train_folder, &valid_folder),
        (train_pipeline, eval),
        &inner,
    );
    let prefix = train_job.prefix;
    let (train_table, o1) =
        crate::cache::features(backbone, normalization, &train_job, Some(&dir), &inner)?;
    let (valid_table, o2) =
        crate::cache::features(backbone, normalization, &valid_job, Some(&dir), &inner)?;
    let origin = if o1 == CacheOrigin::Disk && o2 == CacheOrigin::Disk {
        CacheOrigin::Disk
    } else {
        CacheOrigin::Computed
    };
    let train_loader = FeatureLoader::new(train_table, config.batch_size, Some(config.seed), &ad);
    train_loader.set_epoch(start_epoch);
    let valid_loader = FeatureLoader::new(valid_table, config.batch_size, None, &inner);
    let (train_loader, valid_loader) = (Arc::new(train_loader), Arc::new(valid_loader));
    let model = match prefix {
        None => {
            let (trained, epochs) = launch(CachedHead::new(head), train_loader, valid_loader, run)?;
            let model = Classifier::new(Arc::clone(backbone), trained.head, config.bn_mode)?;
            return Ok((model, epochs, Some(origin)));
        }
        Some((stage, shape)) => CachedStages {
            head,
            trained_stages: crate::classifier::trainable_stages(backbone, stage, &inner),
            shape,
        },
    };
    let (trained, epochs) = launch(model, train_loader, valid_loader, run)?;
    let mut model = Classifier::new(Arc::clone(backbone), trained.head, config.bn_mode)?;
    model.trained_stages = Some(trained.trained_stages);
    Ok((model, epochs, Some(origin)))
}

/// The classifier trained on images: each batch decoded, transformed and
/// run through the frozen backbone.
fn train_images(job: Job<'_>, run: Run<'_>) -> Result<Trained, TrainError> {
    let Job {
        backbone,
        config,
        folders: (train_folder, valid_folder),
        pipelines: (train_pipeline, eval),
        head,
        devices: (inner, ad),
        start_epoch,
        ..
    } = job;
    let train_ds = ImageDataset::new(train_folder, train_pipeline, config.seed);
    let valid_ds = ImageDataset::new(valid_folder, eval.clone(), config.seed);
    train_ds.set_epoch(start_epoch);
    let mut model = Classifier::new(Arc::clone(backbone), head, config.bn_mode)?;
    if let Some(&first) = config.finetune.first() {
        model = model.with_trained_stages(first, &inner);
    }
    // (Fine-tuning the stem leaves no frozen part to keep.)
    let frozen_part = config.finetune.first() != Some(&avp_model::Stage::Stem);
    if config.valid_reuse && config.bn_mode == BnMode::Frozen && config.epochs > 1 && frozen_part {
        report::info(format!(
            "validation: the frozen backbone's outputs on the {} validation images are kept from \
             the first epoch for the later ones (up to 1 GiB; --no-valid-reuse recomputes them)",
            burn::data::dataset::Dataset::len(&valid_ds)
        ));
        model = model.with_valid_memo(crate::classifier::ValidMemo::new());
    }
    let train_loader = OrderedLoader::new(train_ds, config.batch_size, Some(config.seed), &ad);
    train_loader.set_epoch(start_epoch);
    let valid_loader = OrderedLoader::new(valid_ds, config.batch_size, None, &inner);
    let (mut model, epochs) = launch(model, Arc::new(train_loader), Arc::new(valid_loader), run)?;
    // The memo's keys are this validation split's indices: the classifier
    // handed back must not answer other images from it.
    model.valid_memo = None;
    Ok((model, epochs, None))
}

/// The feature cache folder of `config`.
fn feature_dir(config: &TrainConfig) -> PathBuf {
    config
        .cache_dir
        .clone()
        .unwrap_or_else(|| avp_model::cache_root().join("features"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::FeatureTable;
    use burn::data::dataloader::split::split_dataloader;

    /// Checkpoints after every epoch but the last, the two latest kept.
    #[test]
    fn checkpoints_every_epoch_but_the_last() {
        use burn::train::checkpoint::CheckpointingAction::{Delete, Save};
        let actions: Vec<_> = (1..=5).map(|e| checkpoint_actions(e, 5)).collect();
        assert_eq!(
            actions,
            [
                vec![Save],
                vec![Save],
                vec![Delete(1), Save],
                vec![Delete(2), Save],
                vec![],
            ]
        );
        assert!(checkpoint_actions(1, 1).is_empty());
    }

    /// A fixed table: `len` rows of `width` pseudo-random features, the
    /// class a function of the features (so the head has something to
    /// learn), rows in `order`.
    fn table(len: usize, width: usize, order: &[usize]) -> FeatureTable {
        let mut rng = avp_data::Rng::for_item(7, 0, 0);
        let rows: Vec<Vec<f32>> = (0..len)
            .map(|_| {
                (0..width)
                    .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
                    .collect()
            })
            .collect();
        let class = |r: &[f32]| usize::from(r[0] + r[1] > 0.0);
        let values = order.iter().flat_map(|&i| rows[i].clone()).collect();
        let targets = order.iter().map(|&i| class(&rows[i])).collect();
        FeatureTable::new(len, 1, width, targets, values).unwrap()
    }

    fn head_values(head: &crate::classifier::Head) -> Vec<f32> {
        let mut v = Vec::new();
        for l in &head.layers {
            v.extend(l.weight.val().into_data().try_to_vec::<f32>().unwrap());
            if let Some(b) = &l.bias {
                v.extend(b.val().into_data().try_to_vec::<f32>().unwrap());
            }
        }
        v
    }

    /// One epoch of the cached head over `table` (in its order, not
    /// shuffled) with `strategy`; the head after it.
    fn one_epoch(
        table: FeatureTable,
        batch: usize,
        config: &TrainConfig,
        strategy: ExecutionStrategy,
        head: crate::classifier::Head,
        tag: &str,
    ) -> Vec<f32> {
        let device = avp_model::parse_device("flex").unwrap();
        let (_, n) = strategy_devices(&strategy, config).unwrap();
        let out = std::env::temp_dir().join(format!("avp-multi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let len = table.len;
        let train = FeatureLoader::new(table.clone(), batch, None, &device.clone().autodiff());
        let valid = FeatureLoader::new(table, batch, None, &device);
        let run = Run {
            out_dir: &out,
            config,
            strategy,
            resume: None,
            done: Vec::new(),
            batches: steps_per_epoch(len, batch, n),
        };
        let (trained, epochs) =
            launch(CachedHead::new(head), Arc::new(train), Arc::new(valid), run).unwrap();
        assert_eq!(epochs.len(), 1);
        let _ = std::fs::remove_dir_all(&out);
        head_values(&trained.head)
    }

    /// `|a - b| / |b|` (L2 norms).
    fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let d = norm(&mut a.iter().zip(b).map(|(x, y)| f64::from(x - y)));
        d / norm(&mut b.iter().map(|&y| f64::from(y))).max(1e-30)
    }

    /// Two flex devices (burn-train's multi-device strategy: two threads,
    /// gradients moved to the first device and summed) give the head a
    /// single device gets from batches that are the two shards' batches
    /// concatenated: with Adam at the same learning rate (Adam hardly sees
    /// the doubled gradient), with SGD at twice the learning rate (the sum
    /// of two means is twice the mean of the concatenated batch). At the
    /// lesson's Adam rate (1e-3): Adam's epsilon (1e-8) meets a gradient
    /// twice as large, which moves a weight whose gradient is itself near
    /// 1e-6 by a part in a few hundred of its step, and the bar is 1e-5.
    /// How close Adam comes depends on the head's initial weights (how many
    /// gradients fall near epsilon): over initialisation seeds 0 to 15 the
    /// difference ranged from 2.7e-7 to 1.1e-5 (seed 13). The test runs
    /// seeds 0 to 4 (at most 1.2e-6 when measured), seeded, so it is the
    /// same run every time.
    #[test]
    fn two_devices_sum_gradients_of_their_shards() {
        let (len, width, batch) = (32, 6, 4);
        let flex = avp_model::parse_device("flex").unwrap();
        let two = || {
            ExecutionStrategy::MultiDevice(
                vec![flex.clone(), flex.clone()],
                burn::train::MultiDeviceOptim::OptimMainDevice,
            )
        };
        // Device 0 gets positions 0..16, device 1 positions 16..32; step k
        // sees batch k of each: the single device sees them side by side.
        let half = len / 2;
        let concat: Vec<usize> = (0..half / batch)
            .flat_map(|k| {
                (k * batch..(k + 1) * batch).chain(half + k * batch..half + (k + 1) * batch)
            })
            .collect();
        let natural: Vec<usize> = (0..len).collect();
        let cases = [
            (OptimizerKind::Adam, 1e-3, 1.0),
            (OptimizerKind::Sgd, 5e-2, 2.0),
        ];
        for (seed, (optimizer, lr, factor)) in (0..5u64).flat_map(|s| cases.map(|c| (s, c))) {
            let config = TrainConfig::new()
                .with_epochs(1)
                .with_batch_size(batch)
                .with_lr(lr)
                .with_optimizer(optimizer)
                .with_feature_cache(true);
            let ad = flex.clone().autodiff();
            ad.seed(seed);
            let head = config.head.init(width, 2, &ad).unwrap();
            let multi = one_epoch(
                table(len, width, &natural),
                batch,
                &config,
                two(),
                head.clone(),
                "two",
            );
            let single_config = config.clone().with_lr(lr * factor);
            let single = one_epoch(
                table(len, width, &concat),
                2 * batch,
                &single_config,
                ExecutionStrategy::SingleDevice(flex.clone()),
                head.clone(),
                "one",
            );
            let start = head_values(&head);
            let d = rel_diff(&multi, &single);
            eprintln!(
                "{optimizer:?}, seed {seed}: two devices vs concatenated batches, relative difference {d:.1e}"
            );
            assert!(
                d < 1e-5,
                "{optimizer:?}, seed {seed}: two devices vs concatenated batches: {d}"
            );
            assert!(
                rel_diff(&multi, &start) > 1e-3,
                "{optimizer:?}: the head did not train"
            );
            // Without the factor SGD's step is half as long: the test can fail.
            if factor != 1.0 {
                let half_lr = one_epoch(
                    table(len, width, &concat),
                    2 * batch,
                    &config,
                    ExecutionStrategy::SingleDevice(flex.clone()),
                    head,
                    "half",
                );
                assert!(rel_diff(&multi, &half_lr) > 1e-4);
            }
        }
    }

    /// burn-train's cut of a loader over several devices: each item once
    /// per epoch, every device sees both classes, one epoch counter.
    #[test]
    fn devices_see_every_item_once_per_epoch_with_mixed_classes() {
        let flex = avp_model::parse_device("flex").unwrap();
        let len = 40;
        // Sorted by class, as an image folder is.
        let order: Vec<usize> = (0..len).collect();
        let mut t = table(len, 3, &order);
        t.targets = (0..len).map(|i| usize::from(i >= len / 2)).collect();
        let loader: Arc<dyn DataLoader<crate::cache::FeatureBatch>> =
            Arc::new(FeatureLoader::new(t, 4, Some(3), &flex));
        let shards = split_dataloader(loader, &[flex.clone(), flex.clone(), flex.clone()]);
        let mut previous = Vec::new();
        for epoch in 0..3 {
            let mut seen = Vec::new();
            for shard in &shards {
                let mut classes = std::collections::BTreeSet::new();
                for b in shard.iter() {
                    let b = b.unwrap();
                    classes.extend(
                        b.targets
                            .into_data()
                            .convert::<i64>()
                            .try_to_vec::<i64>()
                            .unwrap(),
                    );
                    seen.extend(b.indices);
                }
                assert_eq!(classes.len(), 2, "epoch {epoch}: a device saw one class");
            }
            let mut sorted = seen.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..len).collect::<Vec<_>>(), "epoch {epoch}");
            assert_ne!(seen, previous, "epoch {epoch} repeated the last order");
            previous = seen;
        }
    }

    #[test]
    fn strategies_are_checked_before_burn_sees_them() {
        let e = execution_strategy("flex,flex", Parallel::Ddp)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("needs CUDA devices") && e.contains("--parallel multi"),
            "{e}"
        );
        assert!(matches!(
            execution_strategy("flex,flex", Parallel::Auto).unwrap(),
            ExecutionStrategy::MultiDevice(ref d, _) if d.len() == 2
        ));
        assert!(matches!(
            execution_strategy("flex", Parallel::Auto).unwrap(),
            ExecutionStrategy::SingleDevice(_)
        ));
        assert!(execution_strategy("flex,,flex", Parallel::Auto).is_err());
        assert!(execution_strategy("flex,gpu9", Parallel::Auto).is_err());
        assert!("bogus".parse::<Parallel>().is_err());
        let two = execution_strategy("flex,flex", Parallel::Multi).unwrap();
        let lesson = TrainConfig::new().with_bn_mode(BnMode::Lesson);
        let e = strategy_devices(&two, &lesson).unwrap_err().to_string();
        assert!(e.contains("--bn-mode lesson with 2 devices"), "{e}");
        let ft = TrainConfig::new().with_finetune(vec![avp_model::Stage::Layer4]);
        let e = strategy_devices(&two, &ft).unwrap_err().to_string();
        assert!(e.contains("--finetune with 2 devices"), "{e}");
        assert_eq!(steps_per_epoch(10, 3, 1), 4);
        assert_eq!(steps_per_epoch(10, 3, 2), 2);
        assert_eq!(steps_per_epoch(11, 3, 2), 2);
        assert_eq!(steps_per_epoch(13, 3, 2), 3);
    }
}
