//! Trains the lesson's recipe over several seeds and prints the final
//! validation accuracies next to PyTorch's for the same recipe, backbone
//! and seeds (a JSON file written by `tests/fixtures/train/pytorch_lesson.py`).
//!
//! Each side's mean is printed with its 95% interval, and the difference
//! of the means with Welch's two-sample test (the two sides' random
//! streams are independent, so seeds are not paired). `--reference` may be
//! given several times (PyTorch with the backbone in onnxruntime, and in
//! torch).
//!
//! ```text
//! cargo run --features ndarray,wgpu --example compare_seeds -- \
//!     --data ../shared/data/alien_vs_predator_thumbnails/data --seeds 0..19 \
//!     --feature-cache --no-augment \
//!     --reference tests/fixtures/train/pytorch_reference_alien_vs_predator_torch_cache.json
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use avp::train::stats::{Summary, Welch};
use avp::train::{finished_run, train};
use clap::Parser;

mod common;
use common::{BackboneArgs, CacheArgs, TrainArgs};

/// Train the lesson's recipe for several seeds and compare the final
/// validation accuracies with PyTorch's (same recipe, backbone and seeds).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Image folder with train/val (or entrenamiento/validacion) splits.
    #[arg(long, env = "AVP_DATA")]
    data: PathBuf,
    /// PyTorch's results for the same recipe (JSON from
    /// tests/fixtures/train/pytorch_lesson.py); repeat for several.
    #[arg(long)]
    reference: Vec<PathBuf>,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Seeds: a list (`0,1,2`), a range with both ends included (`0..19`),
    /// or both (`0..4,10`).
    #[arg(long, default_value = "0..4", value_parser = parse_seeds)]
    seeds: Seeds,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    cache: CacheArgs,
    /// Output folder: one subfolder per seed, and results.json.
    #[arg(long, default_value = "runs/compare_seeds")]
    out: PathBuf,
    /// Keep the seeds whose run in --out finished with the same settings,
    /// backbone and data (their metrics are read back; their time is the
    /// recorded epochs'), and train only the others: a 20-seed comparison
    /// can be stopped and continued. Without it every seed trains afresh.
    #[arg(long)]
    resume: bool,
    /// Fail (exit 1) when any run's final validation accuracy is below this.
    #[arg(long)]
    floor: Option<f64>,
    /// Fail when the mean is below this.
    #[arg(long)]
    min_mean: Option<f64>,
    /// Fail when the mean is more than this below PyTorch's mean (the
    /// first --reference).
    #[arg(long)]
    max_gap: Option<f64>,
    /// Fail unless, for every --reference, |avp mean - PyTorch mean| is at
    /// most this or the 95% interval of the difference contains 0.
    #[arg(long)]
    max_abs_diff: Option<f64>,
}

/// The seeds to run, in order, each once.
#[derive(Debug, Clone)]
struct Seeds(Vec<u64>);

fn parse_seeds(text: &str) -> Result<Seeds, String> {
    let mut seeds = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("`{t}` is not a seed (a whole number)"))
        };
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b.trim_start_matches('='))?);
                if a > b {
                    return Err(format!(
                        "the range {part} is empty: write the smaller seed first"
                    ));
                }
                seeds.extend(a..=b);
            }
            None => seeds.push(num(part)?),
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = seeds.iter().find(|s| !seen.insert(**s)) {
        return Err(format!("seed {d} is given twice"));
    }
    if seeds.is_empty() {
        return Err("no seed given: e.g. --seeds 0,1,2 or --seeds 0..19".into());
    }
    Ok(Seeds(seeds))
}

#[derive(serde::Deserialize)]
struct Reference {
    runs: Vec<RefRun>,
    #[serde(default)]
    threads: Option<usize>,
    #[serde(default)]
    recipe: Option<RefRecipe>,
}

#[derive(serde::Deserialize)]
struct RefRecipe {
    #[serde(default)]
    engine: Option<String>,
}

impl Reference {
    /// "PyTorch (backbone in torch)" and the like.
    fn label(&self) -> String {
        let engine = self
            .recipe
            .as_ref()
            .and_then(|r| r.engine.clone())
            .unwrap_or_else(|| "onnxruntime".into());
        format!("PyTorch, backbone in {engine}")
    }
}

#[derive(serde::Deserialize)]
struct RefRun {
    seed: u64,
    final_valid_acc: f64,
    #[serde(default)]
    wall_seconds: Option<f64>,
    #[serde(default)]
    epochs: Vec<RefEpoch>,
}

#[derive(serde::Deserialize)]
struct RefEpoch {
    train_loss: f64,
    train_acc: f64,
    valid_loss: f64,
    valid_acc: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::print_library_messages();
    if !args.data.is_dir() {
        bail!(
            "no dataset at {}: pass --data DIR with train/val (or entrenamiento/validacion) splits",
            args.data.display()
        );
    }
    let references: Vec<Reference> = args
        .reference
        .iter()
        .map(|p| -> Result<Reference> {
            serde_json::from_str(
                &std::fs::read_to_string(p)
                    .with_context(|| format!("reading the reference {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a pytorch_lesson.py result", p.display()))
        })
        .collect::<Result<_>>()?;
    let reference = references.first();
    // Checked before the first run.
    args.train.config(&args.cache, 0)?;
    let device = args.backbone.run.device()?;
    let feature_cache = args.cache.enabled();
    let no_augment = !args.train.augmented();
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for &seed in &args.seeds.0 {
        println!("\n=== seed {seed}");
        let t = Instant::now();
        let backbone = args.backbone.load(&device)?;
        let config = args.train.config(&args.cache, seed)?;
        let out = args.out.join(format!("seed-{seed}"));
        let kept = args
            .resume
            .then(|| finished_run(&out, &config, &backbone.provenance().sha256, &args.data))
            .flatten();
        if let Some(epochs) = kept {
            let last = epochs.last().context("no epoch finished")?;
            println!(
                "--resume: keeping the finished run in {} (validation accuracy {:.4})",
                out.display(),
                last.valid_acc
            );
            rows.push((seed, last.valid_acc, epochs.iter().map(|m| m.seconds).sum()));
            curves.push(epochs);
            continue;
        }
        // A finished run in the folder would be started afresh anyway; an
        // interrupted one with the same settings resumes.
        let outcome = train(backbone, &args.data, &out, &config, &device)?;
        let acc = outcome
            .epochs
            .last()
            .context("no epoch finished")?
            .valid_acc;
        rows.push((seed, acc, t.elapsed().as_secs_f64()));
        curves.push(outcome.epochs);
    }
    let theirs = |seed: u64| reference.and_then(|r| r.runs.iter().find(|x| x.seed == seed));
    let mode = match (no_augment, feature_cache) {
        (true, true) => "no augmentation, feature cache".to_string(),
        (true, false) => "no augmentation".to_string(),
        (false, true) => format!(
            "augmented, feature cache with {} views",
            args.cache.cache_views.unwrap_or(1)
        ),
        (false, false) => "augmented".to_string(),
    };
    println!(
        "\nfinal-epoch validation accuracy, {} ({} epochs, {mode}), {} on {}",
        args.data.display(),
        args.train.epochs,
        args.backbone.run.device,
        std::env::consts::ARCH
    );
    println!("| seed | avp | PyTorch | avp time (s) | PyTorch time (s) |");
    println!("|---:|---:|---:|---:|---:|");
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
    for &(seed, acc, secs) in &rows {
        let r = theirs(seed);
        println!(
            "| {seed} | {acc:.3} | {} | {secs:.0} | {} |",
            fmt(r.map(|r| r.final_valid_acc), 3),
            fmt(r.and_then(|r| r.wall_seconds), 0)
        );
    }
    let n = rows.len().max(1) as f64;
    let mean = rows.iter().map(|r| r.1).sum::<f64>() / n;
    let ref_accs: Vec<f64> = rows
        .iter()
        .filter_map(|r| theirs(r.0).map(|x| x.final_valid_acc))
        .collect();
    let ref_mean = (ref_accs.len() == rows.len() && !rows.is_empty())
        .then(|| ref_accs.iter().sum::<f64>() / n);
    let time_mean = rows.iter().map(|r| r.2).sum::<f64>() / n;
    println!(
        "| mean | {mean:.3} | {} | {time_mean:.0} | {} |",
        fmt(ref_mean, 3),
        fmt(
            reference.map(
                |r| r.runs.iter().filter_map(|x| x.wall_seconds).sum::<f64>()
                    / r.runs.len().max(1) as f64
            ),
            0
        )
    );
    if let Some(t) = reference.and_then(|r| r.threads) {
        println!("(PyTorch ran with {t} threads)");
    }
    // The learning curves, averaged over the seeds, next to PyTorch's.
    let theirs_runs: Vec<&RefRun> = rows.iter().filter_map(|r| theirs(r.0)).collect();
    if theirs_runs.len() == rows.len() && !rows.is_empty() {
        println!("\nmean over the seeds, per epoch (PyTorch / avp):");
        println!("| epoch | train loss | train accuracy | validation loss | validation accuracy |");
        println!("|---:|---|---|---|---|");
        for e in 0..args.train.epochs {
            let ours = |f: fn(&avp::train::EpochMetrics) -> f64| {
                curves.iter().filter_map(|c| c.get(e)).map(f).sum::<f64>() / n
            };
            let pt = |f: fn(&RefEpoch) -> f64| {
                theirs_runs
                    .iter()
                    .filter_map(|r| r.epochs.get(e))
                    .map(f)
                    .sum::<f64>()
                    / n
            };
            println!(
                "| {} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} |",
                e + 1,
                pt(|m| m.train_loss),
                ours(|m| m.train_loss),
                pt(|m| m.train_acc),
                ours(|m| m.train_acc),
                pt(|m| m.valid_loss),
                ours(|m| m.valid_loss),
                pt(|m| m.valid_acc),
                ours(|m| m.valid_acc),
            );
        }
    }
    // Each side's mean with its interval, and Welch's test of the
    // difference, for every reference over the same seeds.
    let ours = Summary::of(&rows.iter().map(|r| r.1).collect::<Vec<_>>());
    let mut tests = Vec::new();
    let mut fidelity = Vec::new();
    println!(
        "\n{} seed(s); means with their 95% intervals; the difference with Welch's t-test:",
        rows.len()
    );
    println!(
        "| side | mean | sd | 95% interval | difference (avp - side) | 95% interval | t | df | p |"
    );
    println!("|---|---:|---:|---|---:|---|---:|---:|---:|");
    println!(
        "| avp | {:.3} | {:.3} | {:.3} .. {:.3} | | | | | |",
        ours.mean, ours.sd, ours.ci95[0], ours.ci95[1]
    );
    for (r, path) in references.iter().zip(&args.reference) {
        let accs: Vec<f64> = args
            .seeds
            .0
            .iter()
            .filter_map(|s| r.runs.iter().find(|x| x.seed == *s))
            .map(|x| x.final_valid_acc)
            .collect();
        let theirs = Summary::of(&accs);
        let welch = Welch::test(&ours, &theirs);
        let cell = |f: &dyn Fn(&Welch) -> String| welch.as_ref().map_or("-".into(), f);
        println!(
            "| {} ({} of the seeds) | {:.3} | {:.3} | {:.3} .. {:.3} | {} | {} | {} | {} | {} |",
            r.label(),
            theirs.n,
            theirs.mean,
            theirs.sd,
            theirs.ci95[0],
            theirs.ci95[1],
            cell(&|w| format!("{:+.3}", w.diff)),
            cell(&|w| format!("{:+.3} .. {:+.3}", w.ci95[0], w.ci95[1])),
            cell(&|w| format!("{:.2}", w.t)),
            cell(&|w| format!("{:.1}", w.df)),
            cell(&|w| format!("{:.3}", w.p)),
        );
        if let (Some(d), None) = (args.max_abs_diff, &welch) {
            let diff = ours.mean - theirs.mean;
            if ours.n < 2 || theirs.n < 2 {
                fidelity.push(format!(
                    "{}: --max-abs-diff needs at least two seeds on each side ({} and {})",
                    r.label(),
                    ours.n,
                    theirs.n
                ));
            } else if diff.abs() > d {
                // No spread on either side: the difference is exact.
                fidelity.push(format!(
                    "{}: the difference {diff:+.3} exceeds {d}",
                    r.label()
                ));
            }
        }
        if let (Some(d), Some(w)) = (args.max_abs_diff, &welch)
            && w.diff.abs() > d
            && !w.contains_zero()
        {
            fidelity.push(format!(
                "{}: the difference {:+.3} exceeds {d} and its interval {:+.3} .. {:+.3} excludes 0",
                r.label(),
                w.diff,
                w.ci95[0],
                w.ci95[1]
            ));
        }
        tests.push(serde_json::json!({
            "reference": path,
            "label": r.label(),
            "summary": theirs,
            "welch": welch,
        }));
    }
    let results = serde_json::json!({
        "data": args.data,
        "device": args.backbone.run.device,
        "epochs": args.train.epochs,
        "mode": mode,
        "runs": rows.iter().map(|(s, a, t)| serde_json::json!({"seed": s, "final_valid_acc": a, "wall_seconds": t})).collect::<Vec<_>>(),
        "mean_final_valid_acc": mean,
        "reference_mean_final_valid_acc": ref_mean,
        "summary": ours,
        "references": tests,
    });
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("results: {}", args.out.join("results.json").display());
    let mut failures = Vec::new();
    if let Some(floor) = args.floor {
        for &(seed, acc, _) in &rows {
            if acc < floor {
                failures.push(format!("seed {seed}: {acc:.3} < floor {floor}"));
            }
        }
    }
    if let Some(m) = args.min_mean
        && mean < m
    {
        failures.push(format!("mean {mean:.3} < {m}"));
    }
    if let (Some(gap), Some(r)) = (args.max_gap, ref_mean)
        && mean < r - gap
    {
        failures.push(format!(
            "mean {mean:.3} is more than {gap} below PyTorch's {r:.3}"
        ));
    }
    failures.extend(fidelity);
    if !failures.is_empty() {
        bail!("below the bar: {}", failures.join("; "));
    }
    Ok(())
}
