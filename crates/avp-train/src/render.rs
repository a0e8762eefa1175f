//! Progress without a terminal: burn-train's phases through
//! `avp_model::report::Progress` (a line per quarter of each phase),
//! instead of burn-train's debug dump. In a terminal, burn-train's
//! dashboard is used instead.

use avp_model::report;
use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::MetricDefinition;
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};

/// Plain-text progress for logs and CI.
#[derive(Debug, Default)]
pub struct PlainRenderer {
    epoch: usize,
    epochs: usize,
    phase: Option<report::Progress>,
}

impl MetricsRendererTraining for PlainRenderer {
    fn update_train(&mut self, _state: MetricState) {}
    fn update_valid(&mut self, _state: MetricState) {}
}

impl MetricsRendererEvaluation for PlainRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
}

impl TrainingProgressLogger for PlainRenderer {
    fn start(
        &mut self,
        total_epochs: usize,
        starting_epoch: usize,
        _items: Option<usize>,
        _label: Option<&str>,
    ) {
        self.epochs = total_epochs;
        self.epoch = starting_epoch.max(1);
    }

    fn update_epoch(&mut self, epoch: usize) {
        self.epoch = epoch + 1;
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        let split = if split.starts_with("train") {
            "train"
        } else {
            "validation"
        };
        let label = format!("  epoch {}/{} {split}", self.epoch, self.epochs);
        self.phase = Some(report::Progress::new(
            label,
            report::Unit::Items,
            Some(total_items as u64),
        ));
    }

    fn update_split(&mut self, items_processed: usize) {
        if let Some(p) = &mut self.phase {
            p.set(items_processed as u64);
        }
    }

    fn end_split(&mut self) {
        if let Some(p) = self.phase.take() {
            p.finish();
        }
    }
    fn end(&mut self) {}
    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for PlainRenderer {
    fn start_global_progress(&mut self, _total_tests: usize) {}
    fn start_test(&mut self, _name: &str, _total_items: usize) {}
    fn update_test_progress(&mut self, _items_processed: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for PlainRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: MetricDefinition) {}
}
