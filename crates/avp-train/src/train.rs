//! Training a head on a frozen backbone through burn-train's
//! `SupervisedTraining` and `Learner`: Adam, cross-entropy, per-epoch loss
//! and accuracy for both phases, printed as the lesson prints them and
//! written to `metrics.csv`.

use std::fs::OpenOptions as FileOptions;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use avp_data::{ImageDataset, ImageFolder, OpenOptions, OrderedLoader, Pipeline, Split};
use avp_model::LoadedModel;
use burn::config::Config;
use burn::optim::AdamConfig;
use burn::tensor::Device;
use burn::train::logger::TrainingProgressLogger;
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{Learner, SupervisedTraining};
use serde::{Deserialize, Serialize};

use crate::bridge::data_normalize;
use crate::classifier::{BnMode, Classifier, EpochTotals, HeadConfig};
use crate::error::TrainError;
use crate::render::PlainRenderer;

/// The training recipe; the defaults are the lesson's.
#[derive(Config, Debug)]
pub struct TrainConfig {
    /// Epochs (the lesson: 5).
    #[config(default = 5)]
    pub epochs: usize,
    /// Batch size (the lesson: 32).
    #[config(default = 32)]
    pub batch_size: usize,
    /// Adam learning rate (PyTorch's default, 1e-3).
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
}

/// Loss and accuracy of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy.
    pub train_acc: f64,
    /// Mean validation loss.
    pub valid_loss: f64,
    /// Validation accuracy.
    pub valid_acc: f64,
    /// Wall time of the epoch (both phases).
    pub seconds: f64,
}

/// What a training run produced.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained classifier (head on the inner device).
    pub model: Classifier,
    /// Class names, in index order.
    pub classes: Vec<String>,
    /// Per-epoch metrics.
    pub epochs: Vec<EpochMetrics>,
    /// The output folder.
    pub out_dir: PathBuf,
    /// The backbone's architecture.
    pub backbone_config: avp_model::ResNetConfig,
    /// The backbone's input normalization.
    pub normalization: avp_model::Normalization,
}

/// Opens both splits, checking that they make a classification problem.
pub fn open_splits(root: &Path) -> Result<(ImageFolder, ImageFolder), TrainError> {
    let train = ImageFolder::open(root, Split::Train, OpenOptions::default())?;
    let valid = ImageFolder::open(root, Split::Validation, OpenOptions::default())?;
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
    totals: Arc<Mutex<EpochTotals>>,
    epochs: Arc<Mutex<Vec<EpochMetrics>>>,
    total_epochs: usize,
    csv: PathBuf,
    started: Instant,
    split: String,
    phase_started: Instant,
    phase_seconds: (f64, f64),
}

/// The lesson's per-epoch block:
///
/// ```text
/// Epoch 1/5
/// ----------
/// train loss: 0.4493, acc: 0.7550
/// validation loss: 0.3204, acc: 0.8450  (61.2 s)
/// ```
pub fn lesson_lines(m: &EpochMetrics, total_epochs: usize) -> String {
    format!(
        "Epoch {}/{total_epochs}\n----------\ntrain loss: {:.4}, acc: {:.4}\nvalidation loss: {:.4}, acc: {:.4}  ({:.1} s)",
        m.epoch, m.train_loss, m.train_acc, m.valid_loss, m.valid_acc, m.seconds
    )
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
            println!("resuming at epoch {starting_epoch}/{total_epochs}");
        }
    }

    fn update_epoch(&mut self, epoch: usize) {
        let Ok(mut t) = self.totals.lock() else {
            return;
        };
        let (tr, va) = (t.train, t.valid);
        *t = EpochTotals::default();
        drop(t);
        let m = EpochMetrics {
            epoch,
            train_loss: tr.loss_sum / tr.seen.max(1) as f64,
            train_acc: tr.correct as f64 / tr.seen.max(1) as f64,
            valid_loss: va.loss_sum / va.seen.max(1) as f64,
            valid_acc: va.correct as f64 / va.seen.max(1) as f64,
            seconds: self.phase_seconds.0 + self.phase_seconds.1,
        };
        if self.print {
            println!("{}", lesson_lines(&m, self.total_epochs));
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
        if self.print {
            println!(
                "training done in {:.1} s",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    // burn-train reports every iteration here; the renderer shows progress.
    fn log_event_training(&mut self, _event: String) {}
}

fn append_csv(path: &Path, m: &EpochMetrics, (ts, vs): (f64, f64)) -> std::io::Result<()> {
    let new = !path.exists();
    let mut f = FileOptions::new().create(true).append(true).open(path)?;
    if new {
        writeln!(f, "epoch,phase,loss,accuracy,seconds")?;
    }
    writeln!(
        f,
        "{},train,{:.6},{:.6},{:.3}",
        m.epoch, m.train_loss, m.train_acc, ts
    )?;
    writeln!(
        f,
        "{},validation,{:.6},{:.6},{:.3}",
        m.epoch, m.valid_loss, m.valid_acc, vs
    )?;
    Ok(())
}

/// Trains a head on `backbone` (frozen) over the image folder `root`,
/// writing checkpoints, `metrics.csv` and `config.json` into `out_dir`.
pub fn train(
    backbone: LoadedModel,
    root: &Path,
    out_dir: &Path,
    config: &TrainConfig,
    device: &Device,
) -> Result<TrainOutcome, TrainError> {
    if config.epochs == 0 || config.batch_size == 0 || config.lr.is_nan() || config.lr <= 0.0 {
        return Err(TrainError::Config(format!(
            "epochs, batch size and learning rate must be positive (got {}, {}, {})",
            config.epochs, config.batch_size, config.lr
        )));
    }
    let (train_folder, valid_folder) = open_splits(root)?;
    println!("{train_folder}");
    println!("{valid_folder}");
    backbone.model.check_input_size(224, 224)?;
    let classes = train_folder.classes.clone();
    std::fs::create_dir_all(out_dir).map_err(|e| TrainError::Write {
        path: out_dir.to_path_buf(),
        why: e.to_string(),
    })?;
    let normalize = data_normalize(&backbone.normalization);
    let backbone_config = backbone.config.clone().with_num_classes(None);
    let normalization = backbone.normalization.clone();
    let train_pipeline = if config.augment {
        Pipeline::lesson(normalize)
    } else {
        Pipeline::eval(normalize)
    };
    let train_ds = ImageDataset::new(train_folder, train_pipeline, config.seed);
    let valid_ds = ImageDataset::new(valid_folder, Pipeline::eval(normalize), config.seed);
    let inner = device.clone().without_autodiff();
    let ad = inner.clone().autodiff();
    inner.seed(config.seed);
    ad.seed(config.seed);
    let features = backbone.model.num_features();
    let head = config.head.init(features, classes.len(), &ad)?;
    let backbone_model = backbone.model.with_fc(None);
    let classifier = Classifier::new(backbone_model, head, config.bn_mode)?;
    let totals = Arc::clone(&classifier.totals);
    let train_loader = Arc::new(OrderedLoader::new(
        train_ds,
        config.batch_size,
        Some(config.seed),
        &ad,
    ));
    let valid_loader = Arc::new(OrderedLoader::new(
        valid_ds,
        config.batch_size,
        None,
        &inner,
    ));
    let csv = out_dir.join("metrics.csv");
    let _ = std::fs::remove_file(&csv);
    config
        .save(out_dir.join("config.json"))
        .map_err(|e| TrainError::Write {
            path: out_dir.join("config.json"),
            why: e.to_string(),
        })?;
    let epochs = Arc::new(Mutex::new(Vec::new()));
    let dashboard = std::io::stdout().is_terminal();
    let logger = LessonLogger {
        print: !dashboard,
        totals,
        epochs: Arc::clone(&epochs),
        total_epochs: config.epochs,
        csv,
        started: Instant::now(),
        split: String::new(),
        phase_started: Instant::now(),
        phase_seconds: (0.0, 0.0),
    };
    let learner = Learner::new(classifier, AdamConfig::new().init(), config.lr);
    let mut training = SupervisedTraining::new(out_dir, train_loader, valid_loader)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .num_epochs(config.epochs)
        .with_default_checkpointers()
        .with_progress_logger(logger);
    if !dashboard {
        training = training.renderer(Box::new(PlainRenderer::default()));
    }
    let result = training.launch(learner);
    let epochs = epochs.lock().map(|e| e.clone()).unwrap_or_default();
    if dashboard {
        // The dashboard owned the screen during training: the lesson's lines now.
        for m in &epochs {
            println!("{}", lesson_lines(m, config.epochs));
        }
    }
    let outcome = TrainOutcome {
        model: result.model,
        classes,
        epochs,
        out_dir: out_dir.to_path_buf(),
        backbone_config,
        normalization,
    };
    crate::artifacts::save_model(
        &outcome.model,
        &outcome.backbone_config,
        &outcome.classes,
        &outcome.normalization,
        &out_dir.join("model.bpk"),
    )?;
    crate::artifacts::plot_curves(&outcome.epochs, &out_dir.join("curves.png"))?;
    Ok(outcome)
}
