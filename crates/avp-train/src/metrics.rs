//! Epoch metrics, in one place: computed per batch by burn-train's metric
//! machinery (`LessonMetric`, registered with the `Learner`), handed to
//! the epoch logger at the end of each phase, and kept in `metrics.csv`:
//! one row per epoch and phase, appended as epochs end, read back for
//! resuming and for the curves, truncated to the epoch a resumed run
//! restarts after. A leaf: it imports nothing else of this crate but the
//! error type.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::tensor::TensorReadError;
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use burn::train::{ClassificationOutput, Interrupter};
use serde::{Deserialize, Serialize};

use crate::error::{TrainError, write_err};

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

/// Appends one epoch (both phases) to `metrics.csv`, with its header
/// when the file is new.
pub(crate) fn append_csv(
    path: &Path,
    m: &EpochMetrics,
    (ts, vs): (f64, f64),
) -> std::io::Result<()> {
    let new = !path.exists();
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
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

/// Reads the epochs of `metrics.csv` (both phases of each).
pub fn read_metrics_csv(path: &Path) -> Vec<EpochMetrics> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut out: Vec<EpochMetrics> = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let [epoch, phase, loss, acc, secs] = f[..] else {
            continue;
        };
        let (Ok(epoch), Ok(loss), Ok(acc), Ok(secs)) = (
            epoch.parse::<usize>(),
            loss.parse::<f64>(),
            acc.parse::<f64>(),
            secs.parse::<f64>(),
        ) else {
            continue;
        };
        if out.last().map(|m| m.epoch) != Some(epoch) {
            out.push(EpochMetrics {
                epoch,
                train_loss: f64::NAN,
                train_acc: f64::NAN,
                valid_loss: f64::NAN,
                valid_acc: f64::NAN,
                seconds: 0.0,
            });
        }
        if let Some(m) = out.last_mut() {
            if phase == "train" {
                (m.train_loss, m.train_acc) = (loss, acc);
            } else {
                (m.valid_loss, m.valid_acc) = (loss, acc);
            }
            m.seconds += secs;
        }
    }
    out.retain(|m| !m.train_loss.is_nan() && !m.valid_loss.is_nan());
    out
}

/// Keeps the header and the rows of epochs up to `epoch`; returns them.
pub(crate) fn truncate_metrics(path: &Path, epoch: usize) -> Result<Vec<EpochMetrics>, TrainError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, l)| {
            *i == 0
                || l.split(',')
                    .next()
                    .and_then(|e| e.parse::<usize>().ok())
                    .is_some_and(|e| e <= epoch)
        })
        .map(|(_, l)| l)
        .collect();
    std::fs::write(path, kept.join("\n") + "\n").map_err(|e| write_err(path, e))?;
    Ok(read_metrics_csv(path))
}

/// Totals of one phase (training or validation) of one epoch.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct PhaseTotals {
    /// Sum of per-image losses.
    pub loss_sum: f64,
    /// Correct predictions.
    pub correct: usize,
    /// Images seen.
    pub seen: usize,
}

impl PhaseTotals {
    /// Mean per-image loss (the lesson's `running_loss / len(dataset)`).
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.seen.max(1) as f64
    }

    /// Fraction of correct predictions.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
}

/// What the epoch metrics hand to the epoch logger: each phase's totals
/// when the phase ends, and the first loss that was not finite.
#[derive(Debug, Default)]
pub(crate) struct EpochRecord {
    /// Training and validation totals of the epoch that is ending.
    pub(crate) phases: [PhaseTotals; 2],
    /// The first non-finite loss, with its phase.
    pub(crate) non_finite: Option<(&'static str, f64)>,
}

/// One batch as the epoch metrics see it, read from burn-train's
/// `ClassificationOutput` (the mean loss, and the argmax against the
/// targets).
#[derive(Debug, Clone, Copy)]
pub struct BatchOutcome {
    /// Mean loss of the batch.
    pub loss: f64,
    /// Correct predictions.
    pub correct: usize,
    /// Images in the batch.
    pub seen: usize,
}

impl Adaptor<BatchOutcome> for ClassificationOutput {
    fn adapt(&self) -> BatchOutcome {
        let seen = self.targets.dims()[0];
        let pred = self.output.clone().argmax(1).reshape([seen]);
        let correct = pred
            .equal(self.targets.clone())
            .int()
            .sum()
            .try_into_scalar::<i64>()
            .map_or(0, |c| c.max(0) as usize);
        // A loss that cannot be read counts as not finite: the run stops.
        let loss = self
            .loss
            .clone()
            .try_into_scalar::<f32>()
            .map_or(f64::NAN, f64::from);
        BatchOutcome {
            loss,
            correct,
            seen,
        }
    }
}

/// Which phase a metric instance serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Train,
    Valid,
}

impl Phase {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Phase::Train => "training",
            Phase::Valid => "validation",
        }
    }
}

/// The lesson's epoch loss and accuracy as one burn-train metric pair:
/// the loss weighted per image (burn-train's `LossMetric` weights each
/// batch equally, which differs when the last batch is short), the
/// accuracy from integer counts. Registered once per phase; at the end of
/// each phase burn-train computes it and the totals go to the epoch
/// logger. A loss that is not finite stops the run through the
/// interrupter.
#[derive(Clone)]
pub(crate) struct LessonMetric {
    name: Arc<String>,
    accuracy: bool,
    phase: Phase,
    totals: PhaseTotals,
    record: Arc<Mutex<EpochRecord>>,
    stop: Interrupter,
}

impl LessonMetric {
    /// The loss (`accuracy = false`) or the accuracy metric of `phase`.
    pub(crate) fn new(
        accuracy: bool,
        phase: Phase,
        record: Arc<Mutex<EpochRecord>>,
        stop: Interrupter,
    ) -> Self {
        let name = if accuracy { "Accuracy" } else { "Loss" };
        Self {
            name: Arc::new(name.into()),
            accuracy,
            phase,
            totals: PhaseTotals::default(),
            record,
            stop,
        }
    }

    fn value_of(&self, t: &PhaseTotals) -> f64 {
        if self.accuracy {
            t.accuracy()
        } else {
            t.loss()
        }
    }

    fn entry(&self, value: f64) -> SerializedEntry {
        SerializedEntry::new(
            format!("{value:.4}"),
            NumericEntry::Value(value).serialize(),
        )
    }
}

impl Metric for LessonMetric {
    type Input = BatchOutcome;

    fn name(&self) -> MetricName {
        Arc::clone(&self.name)
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: self.accuracy,
        }
        .into()
    }

    fn update(
        &mut self,
        batch: &BatchOutcome,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        if !self.accuracy && !batch.loss.is_finite() {
            if let Ok(mut r) = self.record.lock()
                && r.non_finite.is_none()
            {
                r.non_finite = Some((self.phase.name(), batch.loss));
            }
            self.stop.stop(Some("the loss is not finite"));
        }
        self.totals.loss_sum += batch.loss * batch.seen as f64;
        self.totals.correct += batch.correct;
        self.totals.seen += batch.seen;
        let this_batch = PhaseTotals {
            loss_sum: batch.loss * batch.seen as f64,
            correct: batch.correct,
            seen: batch.seen,
        };
        Ok(self.entry(self.value_of(&this_batch)))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        if let Ok(mut r) = self.record.lock() {
            r.phases[self.phase.index()] = self.totals;
        }
        Ok(self.entry(self.value_of(&self.totals)))
    }

    fn clear(&mut self) {
        self.totals = PhaseTotals::default();
    }
}

impl Numeric for LessonMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(NumericEntry::Value(self.value_of(&self.totals)))
    }

    fn running_value(&self) -> Option<NumericEntry> {
        self.value()
    }

    fn final_value(&self) -> NumericEntry {
        NumericEntry::Final(self.value_of(&self.totals))
    }
}
