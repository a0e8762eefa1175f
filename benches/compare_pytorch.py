#!/usr/bin/env python3
"""Burn (avp) against PyTorch on the lesson's workloads, side by side, in one run.

For each row, both sides run as child processes on the same machine, one
after the other, with the same thread count (RAYON_NUM_THREADS for Burn,
torch.set_num_threads / onnxruntime threads for PyTorch); the runner times
their wall clock and reads their peak resident memory (RSS) from the
kernel (wait4), then prints a table with the Burn/PyTorch ratio.

Rows (--rows, comma-separated; default: all):
  infer50-b1, infer50-b8, infer50-b32
              ResNet50 backbone forward on random 224x224 input, images/s
              (Burn: examples/speed.rs; PyTorch: pytorch_lesson.py --bench-inference).
              Burn's number is the fused path on flex (what frozen training
              and the feature cache run); the JSON also has Burn's own
              kernels, BatchNorm folded and not.
  infer50-b8-ndarray, infer50-b8-wgpu
              the same at batch 8 on another Burn backend (wgpu only on
              request: time it on a machine with a GPU).
  lesson18    the lesson with the real ResNet18 (BatchNorm frozen, augmented,
              5 epochs, batch 32) on the lesson's photos; PyTorch runs the
              backbone in onnxruntime (it is an ONNX file), the head in torch.
  cache18     the same without augmentation, with the feature cache.
  lesson50    the lesson's workload: ResNet50 (random weights: speed does not
              depend on their values), BatchNorm frozen, augmented, 5 epochs.
  lesson50bn  the same with the lesson's BatchNorm mode (PyTorch's model.train()).
  cache50     ResNet50 with the feature cache (no augmentation); its ratio is
              also given against PyTorch's lesson50 time (the target: <= 0.2x).

Usage (from the repository root, after `bash .ci/run` made .venv, or with
any Python that has torch, torchvision and onnxruntime):
  .venv/bin/python benches/compare_pytorch.py --data ../shared/data/alien_vs_predator_thumbnails/data
  .venv/bin/python benches/compare_pytorch.py --rows infer50-b8,lesson18 --out target/speed.json

The Burn binaries are built first with the project's single build profile
(`cargo build --features ndarray,wgpu --examples`, the profile of the tests
and of `cargo run --example alien_vs_predator`).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
PYTORCH = os.path.join(ROOT, "tests", "fixtures", "train", "pytorch_lesson.py")
EXAMPLES = os.path.join(ROOT, "target", "debug", "examples")
ALL_ROWS = ["infer50-b1", "infer50-b8", "infer50-b32", "infer50-b8-ndarray",
            "lesson18", "cache18", "lesson50", "lesson50bn", "cache50"]
# Not in the default set: wgpu is timed only on a real GPU (here it would be
# lavapipe, Mesa's CPU emulation of Vulkan, which tests correctness only).
EXTRA_ROWS = ["infer50-b8-wgpu"]


def run(cmd, env_extra=None, log=None):
    """Runs cmd as a child; returns (seconds, peak RSS in MB, stdout text)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    out = tempfile.TemporaryFile(mode="w+")
    t = time.monotonic()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read()
    if log:
        with open(log, "w") as f:
            f.write(text)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    return secs, usage.ru_maxrss / 1024.0, text


def final_acc(text):
    m = re.findall(r"final validation accuracy: ([0-9.]+)", text)
    return float(m[-1]) if m else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "alien_vs_predator_thumbnails", "data"))
    ap.add_argument("--rows", default=",".join(ALL_ROWS))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="flex")
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "compare-pytorch"))
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ALL_ROWS + EXTRA_ROWS:
            sys.exit(f"unknown row {r}; rows: {', '.join(ALL_ROWS + EXTRA_ROWS)}")
    if not os.path.isdir(args.data):
        sys.exit(f"no dataset at {args.data} (--data)")
    os.makedirs(args.work, exist_ok=True)
    if not args.no_build:
        subprocess.run(["cargo", "build", "-q", "--features", "ndarray,wgpu", "--examples"], cwd=ROOT, check=True)

    # The runner itself stays small and never imports torch: a child's peak
    # RSS as the kernel reports it includes the parent's at fork time.
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    # Random ResNet50 weights (torchvision's architecture) for the Burn side.
    r50 = os.path.join(args.work, "resnet50-random.pth")
    if not os.path.exists(r50):
        subprocess.run([sys.executable, "-c",
                        "import sys, torch, torchvision; torch.manual_seed(0); "
                        "torch.save(torchvision.models.resnet50(weights=None).state_dict(), sys.argv[1])", r50],
                       check=True)

    threads = str(args.threads)
    burn_env = {"RAYON_NUM_THREADS": threads}
    py = [sys.executable, PYTORCH, "--threads", threads]
    avp = os.path.join(EXAMPLES, "alien_vs_predator")
    speed = os.path.join(EXAMPLES, "speed")
    lesson = ["--data", args.data, "--epochs", str(args.epochs), "--device", args.device]
    results = []

    def row(name, what, burn_cmd, torch_cmd, kind):
        print(f"\n=== {name}: {what}", flush=True)
        bs, brss, bout = run(burn_cmd, burn_env, os.path.join(args.work, f"{name}.burn.log"))
        ts, trss, tout = run(torch_cmd, None, os.path.join(args.work, f"{name}.pytorch.log"))
        r = {"row": name, "what": what, "kind": kind, "burn_seconds": bs, "pytorch_seconds": ts,
             "burn_rss_mb": brss, "pytorch_rss_mb": trss}
        if kind == "inference":
            burn = {(j["batchnorm"], j.get("kernels", "burn")): j["images_per_second"]
                    for j in map(json.loads, filter(lambda l: l.startswith("{"), bout.splitlines()))}
            # What frozen training runs: the fused path where the backend has one.
            r["burn_images_per_second"] = burn.get(("folded", "fused"), burn[("folded", "burn")])
            r["burn_folded_burn_kernels_images_per_second"] = burn[("folded", "burn")]
            r["burn_unfolded_images_per_second"] = burn[("unfolded", "burn")]
            r["pytorch_images_per_second"] = json.load(open(os.path.join(args.work, f"{name}.pytorch.json")))["images_per_second"]
            r["ratio"] = r["burn_images_per_second"] / r["pytorch_images_per_second"]
            print(f"  Burn {r['burn_images_per_second']:.2f} img/s (BatchNorm folded{', fused' if ('folded', 'fused') in burn else ''}; "
                  f"Burn kernels: {burn[('folded', 'burn')]:.2f} folded, {burn[('unfolded', 'burn')]:.2f} unfolded), PyTorch {r['pytorch_images_per_second']:.2f} img/s: "
                  f"{r['ratio']:.2f}x PyTorch's throughput", flush=True)
        else:
            r["burn_accuracy"] = final_acc(bout)
            pj = json.load(open(os.path.join(args.work, f"{name}.pytorch.json")))
            r["pytorch_accuracy"] = pj["runs"][0]["final_valid_acc"]
            r["ratio"] = bs / ts
            print(f"  Burn {bs:.0f} s (acc {r['burn_accuracy']}), PyTorch {ts:.0f} s (acc {r['pytorch_accuracy']}): "
                  f"{r['ratio']:.2f}x PyTorch's wall time", flush=True)
        results.append(r)

    for name in rows:
        if name.startswith("infer50"):
            b, _, backend = name.split("-b")[1].partition("-")
            backend = backend or args.device
            iters = ["--iters", "2"] if backend == "ndarray" else []
            row(name, f"ResNet50 forward, batch {b}" + (f", {backend}" if backend != args.device else ""),
                [speed, "--weights", r50, "--batch-size", b, "--device", backend] + iters,
                py + ["--backbone", "resnet50", "--bench-inference", b, "--out", os.path.join(args.work, f"{name}.pytorch.json")],
                "inference")
        elif name in ("lesson18", "cache18"):
            cache = name == "cache18"
            extra = ["--feature-cache", "--no-augment", "--cache-dir", os.path.join(args.work, f"{name}-features")] if cache else []
            shutil.rmtree(os.path.join(args.work, f"{name}-features"), ignore_errors=True)
            row(name, f"lesson, real ResNet18, {'feature cache, no augmentation' if cache else 'augmented'}",
                [avp] + lesson + ["--out", os.path.join(args.work, f"{name}.run")] + extra,
                py + ["--backbone", "mlnet", "--data", args.data, "--epochs", str(args.epochs), "--seeds", "0",
                      "--out", os.path.join(args.work, f"{name}.pytorch.json")]
                + (["--feature-cache", "--no-augment"] if cache else []),
                "training")
        else:
            cache = name == "cache50"
            bn = "lesson" if name == "lesson50bn" else "frozen"
            extra = ["--feature-cache", "--no-augment", "--cache-dir", os.path.join(args.work, f"{name}-features")] if cache else []
            shutil.rmtree(os.path.join(args.work, f"{name}-features"), ignore_errors=True)
            row(name, f"lesson, ResNet50, BatchNorm {bn}, {'feature cache, no augmentation' if cache else 'augmented'}",
                [avp] + lesson + ["--weights", r50, "--bn-mode", bn, "--out", os.path.join(args.work, f"{name}.run")] + extra,
                py + ["--backbone", "resnet50", "--bn-mode", bn, "--data", args.data, "--epochs", str(args.epochs),
                      "--seeds", "0", "--out", os.path.join(args.work, f"{name}.pytorch.json")]
                + (["--feature-cache", "--no-augment"] if cache else []),
                "training")

    print(f"\nBurn ({args.device}) vs PyTorch {torch_version}, {threads} threads, {os.cpu_count()} cores, "
          f"{args.epochs} epochs, data {os.path.relpath(args.data, ROOT)}")
    print("| row | Burn | PyTorch | Burn / PyTorch | Burn peak RSS | PyTorch peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    by = {r["row"]: r for r in results}
    for r in results:
        if r["kind"] == "inference":
            own = r["burn_folded_burn_kernels_images_per_second"]
            fused = r["burn_images_per_second"] != own
            cells = (f"{r['burn_images_per_second']:.2f} img/s" + (f" (Burn's kernels: {own:.2f})" if fused else ""),
                     f"{r['pytorch_images_per_second']:.2f} img/s",
                     f"{r['ratio']:.2f}x throughput")
        else:
            cells = (f"{r['burn_seconds']:.0f} s", f"{r['pytorch_seconds']:.0f} s", f"{r['ratio']:.2f}x time")
        print(f"| {r['what']} | {cells[0]} | {cells[1]} | {cells[2]} | {r['burn_rss_mb']:.0f} MB | {r['pytorch_rss_mb']:.0f} MB |")
    if "cache50" in by and "lesson50" in by:
        c = by["cache50"]["burn_seconds"] / by["lesson50"]["pytorch_seconds"]
        print(f"\nBurn's ResNet50 feature-cache run takes {c:.2f}x PyTorch's ResNet50 lesson wall time")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "device": args.device, "epochs": args.epochs,
                       "torch": torch_version, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
