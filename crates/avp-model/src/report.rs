//! What the library has to say while it works, and who hears it.
//!
//! Library code never prints. It emits `tracing` events (target `avp`;
//! during training burn-train's experiment logger writes them into
//! `experiment.log`) and hands the same sentence to the listener an
//! application installed with [`set_listener`] (the examples print them).
//! Without a listener nothing reaches the terminal.
//!
//! Long work reports through [`Progress`], the one progress facility: an
//! indicatif bar on stderr when stderr is a terminal and a listener is
//! installed, otherwise a line through the listener at each quarter and at
//! the end.

use std::fmt::Display;
use std::io::IsTerminal;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// How much a message matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Level {
    /// What the program is doing (the examples print these on stdout).
    Info,
    /// Something the user should look at: a file ignored, a fallback taken
    /// (the examples print these on stderr).
    Warn,
}

type Listener = Arc<dyn Fn(Level, &str) + Send + Sync>;

static LISTENER: RwLock<Option<Listener>> = RwLock::new(None);

/// Installs the function that hears every message of the library (one per
/// process; a second call replaces the first).
pub fn set_listener(listener: impl Fn(Level, &str) + Send + Sync + 'static) {
    let mut slot = LISTENER.write().unwrap_or_else(|e| e.into_inner());
    *slot = Some(Arc::new(listener));
}

fn listener() -> Option<Listener> {
    LISTENER.read().ok().and_then(|l| l.clone())
}

/// Reports what the program is doing.
pub fn info(message: impl Display) {
    let text = message.to_string();
    tracing::info!(target: "avp", "{text}");
    if let Some(l) = listener() {
        l(Level::Info, &text);
    }
}

/// Reports something the user should look at.
pub fn warn(message: impl Display) {
    let text = message.to_string();
    tracing::warn!(target: "avp", "{text}");
    if let Some(l) = listener() {
        l(Level::Warn, &text);
    }
}

/// What a [`Progress`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Images (or other items), with a rate in items per second.
    Images,
    /// Bytes, shown in MB with a rate in MB/s.
    Bytes,
    /// Items of a phase (training batches' images), shown as a percentage.
    Items,
}

/// Progress of one long piece of work (see the module header).
pub struct Progress {
    label: String,
    unit: Unit,
    total: Option<u64>,
    done: u64,
    next_quarter: u64,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("label", &self.label)
            .field("done", &self.done)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// Starts counting `total` units (unknown: `None`) of the work named
    /// `label` ("feature cache: train", "downloading resnet50.pth").
    pub fn new(label: impl Into<String>, unit: Unit, total: Option<u64>) -> Self {
        let label = label.into();
        let bar = (listener().is_some() && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let template = match unit {
                Unit::Images => "{msg} [{bar:30}] {pos}/{len} images ({per_sec}, {eta} left)",
                Unit::Bytes => {
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)"
                }
                Unit::Items => "{msg} [{bar:30}] {pos}/{len} ({eta} left)",
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_message(label.clone());
            bar
        });
        Self {
            label,
            unit,
            total,
            done: 0,
            next_quarter: 1,
            started: Instant::now(),
            bar,
        }
    }

    /// Counts `n` more units done.
    pub fn advance(&mut self, n: u64) {
        self.set(self.done + n);
    }

    /// Sets the units done so far.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            return;
        }
        let Some(total) = self.total.filter(|&t| t > 0) else {
            return;
        };
        if self.next_quarter < 4 && self.done * 4 >= self.next_quarter * total {
            info(self.line());
            self.next_quarter = self.done * 4 / total + 1;
        }
    }

    /// Units done so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Ends the work: the final line (the bar is cleared and the line
    /// reported in its place).
    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        info(self.line());
    }

    /// The progress in words.
    pub fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        match self.unit {
            Unit::Images => format!(
                "{} {}/{} images through the backbone ({:.1} img/s)",
                self.label,
                self.done,
                self.total.unwrap_or(self.done),
                self.done as f64 / secs
            ),
            Unit::Items => {
                let total = self.total.unwrap_or(self.done);
                let pct = 100 * self.done / total.max(1);
                format!("{} {pct:>3}% ({}/{total})", self.label, self.done)
            }
            Unit::Bytes => {
                let mb = |b: u64| b as f64 / 1e6;
                let rate = mb(self.done) / secs;
                match self.total {
                    Some(t) => format!(
                        "{}: {:.1}/{:.1} MB ({:.0}%, {rate:.1} MB/s)",
                        self.label,
                        mb(self.done),
                        mb(t),
                        100.0 * self.done as f64 / t.max(1) as f64
                    ),
                    None => format!("{}: {:.1} MB ({rate:.1} MB/s)", self.label, mb(self.done)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn messages_and_quarter_lines_reach_the_listener() {
        let heard = Arc::new(Mutex::new(Vec::<(Level, String)>::new()));
        let h = Arc::clone(&heard);
        set_listener(move |level, text| {
            if let Ok(mut v) = h.lock() {
                v.push((level, text.to_string()));
            }
        });
        info("hello");
        warn("careful");
        // Not a terminal under the test harness: one line per quarter.
        let mut p = Progress::new("report test", Unit::Images, Some(8));
        for _ in 0..8 {
            p.advance(1);
        }
        p.finish();
        // (Other tests of this binary may report at the same time.)
        let v = heard.lock().map(|v| v.clone()).unwrap_or_default();
        assert!(v.contains(&(Level::Info, "hello".into())), "{v:?}");
        assert!(v.contains(&(Level::Warn, "careful".into())), "{v:?}");
        let lines: Vec<&String> = v
            .iter()
            .map(|(_, t)| t)
            .filter(|t| t.starts_with("report test"))
            .collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with("report test 2/8 images"), "{lines:?}");
        assert!(lines[3].starts_with("report test 8/8 images"), "{lines:?}");
    }
}
