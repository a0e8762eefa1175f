//! This machine's float32 multiply-add peak: the ceiling that
//! `benches/compare_pytorch.py` divides every row's GFLOP/s by.
//!
//! Each thread runs chains of independent fused multiply-adds on registers
//! only (no memory traffic), enough chains to hide the FMA latency, for a
//! fixed wall time; the AVX-512 and the AVX2 paths are measured separately
//! (a processor may run 512-bit FMAs at half the rate, as AMD's Zen 4 does,
//! or with two units, as many Xeons do). One multiply-add counts as two
//! floating-point operations, as the runner counts a convolution's.
//!
//! ```text
//! cargo run --example peak_flops -- --threads 2
//! ```
//!
//! Prints one JSON line per path: `{"path":"avx512","threads":2,"gflops":...}`.
//!
//! The workspace denies `unsafe`; this probe allows it for the one thing
//! it cannot do without: calling a function compiled for an instruction set
//! after checking at run time that the processor has it.
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;

/// Measure the float32 FMA throughput of this machine.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Threads running at once (default: every logical processor).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds per measurement (the best of three is kept).
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
}

/// Independent accumulators per thread: latency (4 cycles) times the FMA
/// units (2) is 8; 12 leaves room on every x86 processor measured.
const CHAINS: usize = 12;
/// FMAs per chain between two clock readings.
const INNER: usize = 1 << 16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{CHAINS, INNER};

    /// Runs `rounds * INNER * CHAINS` 512-bit FMAs; returns a value that
    /// depends on all of them, so that nothing is optimised away.
    ///
    /// # Safety
    /// The processor must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(rounds: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); CHAINS];
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        for _ in 0..rounds {
            for _ in 0..INNER {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
        }
        let mut sum = _mm512_set1_ps(0.0);
        for v in acc {
            sum = _mm512_add_ps(sum, v);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// The same with 256-bit FMAs.
    ///
    /// # Safety
    /// The processor must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(rounds: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); CHAINS];
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        for _ in 0..rounds {
            for _ in 0..INNER {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
        }
        let mut sum = _mm256_set1_ps(0.0);
        for v in acc {
            sum = _mm256_add_ps(sum, v);
        }
        let pairs = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
        let pairs = _mm_hadd_ps(pairs, pairs);
        _mm_cvtss_f32(_mm_hadd_ps(pairs, pairs))
    }
}

/// Lanes per register and the kernel of one path.
type Path = (&'static str, usize, fn(usize) -> f32);

fn paths() -> Vec<Path> {
    #[allow(unused_mut)]
    let mut out: Vec<Path> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected on this processor just above.
            out.push(("avx512", 16, |r| unsafe { x86::avx512(r) }));
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected on this processor just above.
            out.push(("avx2", 8, |r| unsafe { x86::avx2(r) }));
        }
    }
    out
}

/// GFLOP/s of `threads` threads running `kernel` together for about `secs`.
fn measure(kernel: fn(usize) -> f32, lanes: usize, threads: usize, secs: f64) -> f64 {
    // Calibrate the rounds on one thread so that a run lasts about `secs`.
    let t = Instant::now();
    std::hint::black_box(kernel(1));
    let one = t.elapsed().max(Duration::from_micros(1)).as_secs_f64();
    let rounds = ((secs / one) as usize).max(1);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || std::hint::black_box(kernel(rounds)));
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let flops = (threads * rounds * INNER * CHAINS * lanes * 2) as f64;
    flops / wall / 1e9
}

fn main() -> Result<()> {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        bail!("--seconds must be a positive number, not {}", args.seconds);
    }
    let paths = paths();
    if paths.is_empty() {
        bail!("no AVX2/FMA or AVX-512 on this processor: the probe has nothing to measure");
    }
    for (name, lanes, kernel) in paths {
        let best = (0..3)
            .map(|_| measure(kernel, lanes, threads, args.seconds))
            .fold(0.0, f64::max);
        println!(
            "{}",
            serde_json::json!({"path": name, "threads": threads, "gflops": best})
        );
    }
    Ok(())
}
