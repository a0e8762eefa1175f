//! Sharded feature extraction: the expensive, embarrassingly parallel half
//! of transfer learning, one shard per process (a Slurm array task, a
//! Kubernetes indexed pod, or a loop in a shell).
//!
//! ```text
//! # shard I of N of both splits' features, written atomically into DIR
//! cargo run --example features -- --data DATA --no-augment --shard 0/4 --out DIR
//! # every complete set of shards in DIR merged into the single-process cache
//! cargo run --example features -- merge --out DIR
//! # the head trained on them (a complete set is also merged on the way)
//! cargo run --example alien_vs_predator -- --data DATA --no-augment --feature-cache --cache-dir DIR
//! ```
//!
//! The flags that shape the features (weights, preprocessing, augmentation
//! and `--cache-views`, the evaluation transform, `--finetune` for a prefix
//! cache, the seed) must be the ones training gets: they are part of the
//! cache key, so the merged files are found under the names training looks
//! for, and features of another recipe are never mixed in.

use std::path::PathBuf;

use anyhow::{Result, bail};
use avp::train::cache::{MergeOutcome, Shard, ShardOutcome, merge_dir};
use clap::{Parser, Subcommand};

mod common;
use common::{BackboneArgs, CacheArgs, DEFAULT_DATA, TrainArgs};

/// Compute one shard of the feature cache, or merge finished shards.
#[derive(Parser, Debug)]
#[command(
    name = "features",
    version,
    args_override_self = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Image folder with train/val (or entrenamiento/validacion) splits of
    /// one subfolder per class.
    #[arg(long, env = "AVP_DATA", default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// The shard to compute: I/N, 0 <= I < N (Slurm:
    /// $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; Kubernetes:
    /// $JOB_COMPLETION_INDEX/N). Each split is cut into N contiguous parts
    /// of whole backbone batches, the same for every run.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Folder of the shard files (shared by all shards; training reads it
    /// with --cache-dir).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Seed of the augmentation (for augmented views).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Merge every complete set of shards in --out into the feature files
    /// one process would have written (byte for byte); the shards stay.
    Merge {
        /// Folder of the shard files.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::print_library_messages();
    if let Some(Command::Merge { out }) = &args.command {
        return merge(out);
    }
    let Some(shard) = &args.shard else {
        bail!(
            "pass --shard I/N (for example --shard 0/4), or `merge --out DIR` to merge finished shards"
        );
    };
    let shard: Shard = shard.parse()?;
    let Some(out) = &args.out else {
        bail!("pass --out DIR: the folder the shard files go to (shared by all shards)");
    };
    if !args.data.is_dir() {
        bail!(
            "no dataset at {}: expected DIR/train (or entrenamiento) and DIR/val (or validation, validacion), \
             one subfolder per class; pass --data DIR",
            args.data.display()
        );
    }
    let mut cache = args.cache.clone();
    cache.feature_cache = true;
    let config = args.train.config(&cache, args.seed)?;
    let device = args.backbone.run.device()?;
    let backbone = args.backbone.load(&device)?;
    println!("backbone: {}", backbone.config().describe());
    println!("input:    {}", backbone.normalization().describe());
    println!("shard:    {shard} into {}", out.display());
    let outcomes = avp::train::extract_shard(backbone, &args.data, &config, shard, out, &device)?;
    for o in &outcomes {
        match o {
            ShardOutcome::Written(f) => println!("written:  {}", f.display()),
            ShardOutcome::AlreadyThere(f) => {
                println!("kept:     {} (complete already)", f.display())
            }
        }
    }
    println!(
        "when all {} shards are done: `features merge --out {}`, or train with --feature-cache --cache-dir {} \
         and the same recipe flags",
        shard.count,
        out.display(),
        out.display()
    );
    Ok(())
}

fn merge(out: &std::path::Path) -> Result<()> {
    let outcomes = merge_dir(out, None)?;
    if outcomes.is_empty() {
        bail!(
            "no feature shards in {}: run `features --shard I/N --out {}` first",
            out.display(),
            out.display()
        );
    }
    let mut incomplete = Vec::new();
    for o in &outcomes {
        match o {
            MergeOutcome::Merged { file, shards } => {
                println!("merged {shards} shards into {}", file.display())
            }
            MergeOutcome::Incomplete {
                stem,
                count,
                missing,
            } => {
                let list: Vec<String> = missing.iter().map(|i| format!("{i}/{count}")).collect();
                eprintln!("{stem}: shards {} of {count} are missing", list.join(", "));
                incomplete.push(list.join(" "));
            }
        }
    }
    if !incomplete.is_empty() {
        bail!(
            "{} set(s) of shards are incomplete: run the missing shards (features --shard I/N with the same flags), \
             then merge again",
            incomplete.len()
        );
    }
    Ok(())
}
