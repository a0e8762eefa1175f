#!/usr/bin/env python3
"""avp (Burn) against its peers on the lesson's workloads, side by side, in one run.

For each row, every side runs as a child process on the same machine, one
after the other, with the same thread count (RAYON_NUM_THREADS for Burn and
candle, torch.set_num_threads for PyTorch, intra_op_num_threads for ONNX
Runtime); the runner times their wall clock and reads their peak resident
memory (RSS) from the kernel (wait4), then prints tables with the ratios.

Every row also gives its achieved GFLOP/s and the fraction of this machine's
measured peak: `examples/peak_flops.rs` (built with the other examples)
measures the float32 FMA throughput of the AVX-512 and the AVX2 paths on
--threads threads, and the best is the peak. FLOPs are counted from the
networks' shapes, a multiply-add as two operations (ResNet50 forward at
224x224: 8.18 GFLOP an image, often quoted as "4.1 GFLOPs" counting
multiply-adds; the committed ResNet18: 4.09). A training row counts the
backbone's forward over every image it runs, plus twice the forward of the
stages that train (their backward), and ignores the head.

Rows (--rows, comma-separated; default: all but the EXTRA ones):
  infer50-b1, infer50-b8, infer50-b32
              ResNet50 backbone forward on random 224x224 input, images/s.
              The same ONNX file (torchvision's ResNet50, random weights,
              without fc, exported by the runner) runs in avp
              (examples/speed.rs: the fused path on flex, what frozen training
              and the feature cache run; the JSON also has Burn's own
              kernels) and in ONNX Runtime (benches/onnxruntime_infer.py);
              PyTorch runs torchvision's module eagerly
              (pytorch_lesson.py --bench-inference); candle runs its own
              ResNet50 (benches/candle-resnet50, a program outside the
              workspace that the runner builds in release mode on first use).
              --peers chooses among pytorch, onnxruntime, candle; candle runs
              batches up to --candle-max-batch (8: its CPU convolutions held
              17.9 GB at batch 32). --rounds (3) alternating rounds of all
              sides; each side's median images/s is kept, with its highest
              peak RSS. avp's images/s and RSS are the fused path's alone;
              Burn's own kernels run in a second process.
  infer50-b8-ndarray
              avp at batch 8 on another Burn backend (the peers' numbers are
              the infer50-b8 ones).
  lesson18    the lesson with the real ResNet18 (BatchNorm frozen, augmented,
              5 epochs, batch 32) on the lesson's photos, against PyTorch with
              the backbone in onnxruntime (it is an ONNX file) and with the
              backbone loaded into torch itself (pytorch_lesson.py --engine
              torch: what a PyTorch user runs). PyTorch runs the backbone over
              the validation split in every epoch, as the lesson's code does
              (pytorch_lesson.py --no-valid-reuse); avp keeps the frozen
              backbone's validation outputs from the first epoch (its
              default; the same numbers). With --valid-reuse-sides the row
              adds avp with --no-valid-reuse (the before/after of that lever
              in one run) and PyTorch-native keeping them too (the
              reference script's default), so both ways are compared like
              for like.
  cache18     the same without augmentation, with the feature cache; its
              ratio is also given against PyTorch-native's lesson18 time.
  lesson50    the lesson's workload: ResNet50 (random weights: speed does not
              depend on their values), BatchNorm frozen, augmented, 5 epochs.
  lesson50bn  the same with the lesson's BatchNorm mode (PyTorch's model.train()).
  cache50     ResNet50 with the feature cache (no augmentation); its ratio is
              also given against PyTorch's lesson50 time (the target: <= 0.2x).
  finetune18  fine-tuning layer4 of the real ResNet18 (Adam, head 1e-3,
              layer4 1e-4), augmented, 5 epochs; PyTorch runs the same recipe
              with the ResNet18 in torch.
  finetune18-cache
              the same on avp's prefix cache (no augmentation: the frozen
              prefix runs once); against PyTorch's fine-tuning without
              augmentation, and also against its augmented finetune18 time.
  finetune50  fine-tuning layer4 of ResNet50 (random weights), augmented.
              With --burn-conv-side, each fine-tuning row also runs avp with
              AVP_TRAIN_CONV=burn (the trained stages' convolutions as Burn's
              flex modules, forward and backward), for the before/after of
              avp's batched convolutions in the same run; with
              --direct-conv-side, with AVP_TRAIN_CONV=direct (the batched
              products without Winograd), for Winograd's before/after. Each
              such side starts without the prefix cache, as the first does.
EXTRA rows (only on request):
  infer50-b8-wgpu
              avp at batch 8 on wgpu: time it on a machine with a GPU (here
              it would be lavapipe, Mesa's CPU emulation of Vulkan).

Usage (from the repository root, after `bash .ci/run` made .venv, or with
any Python that has torch, torchvision, onnx and onnxruntime):
  .venv/bin/python benches/compare_pytorch.py --data ../shared/data/alien_vs_predator_thumbnails/data
  .venv/bin/python benches/compare_pytorch.py --rows infer50-b8,lesson18 --out target/speed.json
  .venv/bin/python benches/compare_pytorch.py --rows infer50-b8 --peers onnxruntime
  .venv/bin/python benches/compare_pytorch.py --rows finetune18-cache --train-rounds 3

Training rows run each side once by default; on a machine whose speed
drifts between runs (this project's VM: PyTorch's fine-tuning took 130 to
157 s in three runs in a row), --train-rounds N alternates the sides N
times and reports medians.

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
ORT_INFER = os.path.join(HERE, "onnxruntime_infer.py")
CANDLE = os.path.join(HERE, "candle-resnet50")
CANDLE_TARGET = os.path.join(ROOT, "target", "candle-resnet50")
EXAMPLES = os.path.join(ROOT, "target", "debug", "examples")
ALL_ROWS = ["infer50-b1", "infer50-b8", "infer50-b32", "infer50-b8-ndarray",
            "lesson18", "cache18", "lesson50", "lesson50bn", "cache50",
            "finetune18", "finetune18-cache", "finetune50"]
EXTRA_ROWS = ["infer50-b8-wgpu"]
PEERS = ["pytorch", "onnxruntime", "candle"]
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------
# FLOPs from the networks' shapes (a multiply-add counts two)
# --------------------------------------------------------------------------

def conv_flops(cin, cout, k, out_hw):
    return 2 * cin * cout * k * k * out_hw * out_hw


def resnet_stage_flops(kind, blocks, size=224):
    """Forward FLOPs per image of each stage: {"stem": .., "layer1": .., ...}.
    kind "basic" (ResNet18/34-style blocks) or "bottleneck" (ResNet50,
    torchvision's v1.5: the stride on the 3x3)."""
    hw = size // 2  # stem: 7x7 stride 2, 3 -> 64 channels
    out = {"stem": conv_flops(3, 64, 7, hw)}
    hw //= 2  # 3x3 stride-2 max-pool
    cin = 64
    for i, (n, width) in enumerate(zip(blocks, [64, 128, 256, 512])):
        stride = 1 if i == 0 else 2
        total = 0
        for b in range(n):
            s = stride if b == 0 else 1
            ohw = hw // s
            if kind == "basic":
                cout = width
                total += conv_flops(cin, width, 3, ohw) + conv_flops(width, width, 3, ohw)
            else:
                cout = 4 * width
                total += (conv_flops(cin, width, 1, hw) + conv_flops(width, width, 3, ohw)
                          + conv_flops(width, cout, 1, ohw))
            if b == 0 and (s != 1 or cin != cout):
                total += conv_flops(cin, cout, 1, ohw)
            cin, hw = cout, ohw
        out[f"layer{i + 1}"] = total
    return out


NETS = {"resnet50": resnet_stage_flops("bottleneck", [3, 4, 6, 3]),
        # The committed ResNet18 (ML.NET's): basic blocks [2, 2, 2, 3].
        "mlnet": resnet_stage_flops("basic", [2, 2, 2, 3])}


def training_flops(net, n_train, n_valid, epochs, trained=(), cached=False, valid_reuse=False):
    """Useful FLOPs of a training run: the backbone's forward over every image
    it runs, plus the backward (twice the forward) of the trained stages.
    With valid_reuse the frozen part runs over the validation split once."""
    stages = NETS[net]
    full = sum(stages.values())
    tuned = sum(stages[s] for s in trained)
    if cached:  # the frozen part runs once over both splits; the trained stages every epoch
        return (full - tuned) * (n_train + n_valid) + epochs * (3 * tuned * n_train + tuned * n_valid)
    if valid_reuse:
        return epochs * (full + 2 * tuned) * n_train + ((full - tuned) + epochs * tuned) * n_valid
    return epochs * ((full + 2 * tuned) * n_train + full * n_valid)


def count_images(root):
    """Images in the two splits of an image folder: (train, validation)."""
    names = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    splits = []
    for options in (("train", "entrenamiento"), ("val", "validation", "validacion", "valid")):
        name = next((names[o] for o in options if o in names), None)
        if name is None:
            sys.exit(f"{root}: no {'/'.join(options)} split")
        splits.append(sum(f.lower().endswith(IMAGE_EXT)
                          for _, _, files in os.walk(os.path.join(root, name)) for f in files))
    return tuple(splits)


# --------------------------------------------------------------------------

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


def json_lines(text):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def final_acc(text):
    m = re.findall(r"final validation accuracy: ([0-9.]+)", text)
    return float(m[-1]) if m else None


def machine_peak(threads):
    """The best float32 FMA GFLOP/s of examples/peak_flops on `threads` threads."""
    _, _, text = run([os.path.join(EXAMPLES, "peak_flops"), "--threads", str(threads)])
    paths = {j["path"]: j["gflops"] for j in json_lines(text)}
    return max(paths.values()), paths


def processor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown processor"


def export_resnet50(work):
    """torchvision's ResNet50 with random weights: a .pth for the Burn
    training rows and, without fc, an ONNX file for the inference rows (avp
    and ONNX Runtime read the same file)."""
    pth = os.path.join(work, "resnet50-random.pth")
    onnx_path = os.path.join(work, "resnet50-random-headless.onnx")
    if not (os.path.exists(pth) and os.path.exists(onnx_path)):
        subprocess.run([sys.executable, "-c", """
import sys, torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet50(weights=None).eval()
torch.save(m.state_dict(), sys.argv[1])
m.fc = torch.nn.Identity()
x = torch.randn(1, 3, 224, 224)
tmp = sys.argv[2] + ".tmp"
torch.onnx.export(m, (x,), tmp, dynamo=False, opset_version=17, do_constant_folding=True,
                  input_names=["input"], output_names=["features"],
                  dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}})
import os; os.replace(tmp, sys.argv[2])
""", pth, onnx_path], check=True)
    return pth, onnx_path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "alien_vs_predator_thumbnails", "data"))
    ap.add_argument("--rows", default=",".join(ALL_ROWS))
    ap.add_argument("--peers", default=",".join(PEERS), help="inference peers: pytorch, onnxruntime, candle")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--candle-max-batch", type=int, default=8,
                    help="largest batch candle runs (its CPU convolutions held 17.9 GB at batch 32)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="inference rows: alternating rounds of every side; the median images/s is kept")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-rounds", type=int, default=1,
                    help="training rows: run every side this many times, alternating "
                         "(avp, PyTorch, avp, ...), each from a fresh cache and run folder, "
                         "and report each side's median wall time (every round's is kept "
                         "in the JSON as rounds_seconds)")
    ap.add_argument("--device", default="flex")
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "compare-pytorch"))
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--burn-conv-side", action="store_true",
                    help="fine-tuning rows also run avp with AVP_TRAIN_CONV=burn (Burn's own convolutions "
                         "in the trained stages): the before/after of avp's batched convolutions, in one run")
    ap.add_argument("--direct-conv-side", action="store_true",
                    help="fine-tuning rows also run avp with AVP_TRAIN_CONV=direct (the trained stages' "
                         "batched convolutions without Winograd): Winograd's before/after, in one run")
    ap.add_argument("--valid-reuse-sides", action="store_true",
                    help="lesson rows also run avp with --no-valid-reuse and PyTorch-native keeping the "
                         "frozen backbone's validation outputs (pytorch_lesson.py's default)")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ALL_ROWS + EXTRA_ROWS:
            sys.exit(f"unknown row {r}; rows: {', '.join(ALL_ROWS + EXTRA_ROWS)}")
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            sys.exit(f"unknown peer {p}; peers: {', '.join(PEERS)}")
    if not os.path.isdir(args.data):
        sys.exit(f"no dataset at {args.data} (--data)")
    if args.threads < 1 or args.rounds < 1:
        sys.exit("--threads and --rounds must be at least 1")
    n_train, n_valid = count_images(args.data)
    os.makedirs(args.work, exist_ok=True)
    infer_rows = [r for r in rows if r.startswith("infer50")]
    if not args.no_build:
        subprocess.run(["cargo", "build", "-q", "--features", "ndarray,wgpu", "--examples"], cwd=ROOT, check=True)
        if "candle" in peers and infer_rows:
            print("building candle's ResNet50 (release, outside the workspace) ...", flush=True)
            subprocess.run(["cargo", "build", "-q", "--release", "--manifest-path",
                            os.path.join(CANDLE, "Cargo.toml"), "--target-dir", CANDLE_TARGET], check=True)

    # The runner itself stays small and never imports torch: a child's peak
    # RSS as the kernel reports it includes the parent's at fork time.
    versions = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, torch, onnxruntime; "
         "print(json.dumps({'torch': torch.__version__, 'onnxruntime': onnxruntime.__version__}))"],
        capture_output=True, text=True, check=True).stdout)
    r50_pth, r50_onnx = export_resnet50(args.work)
    peak, peak_paths = machine_peak(args.threads)
    cpu = processor()
    print(f"{cpu}, {args.threads} threads: float32 FMA peak {peak:.0f} GFLOP/s "
          f"({', '.join(f'{k} {v:.0f}' for k, v in peak_paths.items())})", flush=True)

    threads = str(args.threads)
    burn_env = {"RAYON_NUM_THREADS": threads}
    py = [sys.executable, PYTORCH, "--threads", threads]
    avp = os.path.join(EXAMPLES, "alien_vs_predator")
    speed = os.path.join(EXAMPLES, "speed")
    lesson = ["--data", args.data, "--epochs", str(args.epochs), "--device", args.device]
    r50_flops = sum(NETS["resnet50"].values())
    results = []
    peer_cache = {}

    def log(name, side):
        return os.path.join(args.work, f"{name}.{side}.log")

    def side(engine, secs, rss, **extra):
        return dict({"engine": engine, "seconds": secs, "rss_mb": rss}, **extra)

    def infer_peer(peer, batch, round_):
        """One inference peer at one batch size in one round (run once per
        batch size and round)."""
        if (peer, batch, round_) in peer_cache:
            return peer_cache[(peer, batch, round_)]
        out = os.path.join(args.work, f"infer-b{batch}.{peer}.json")
        if peer == "pytorch":
            s, rss, _ = run(py + ["--backbone", "resnet50", "--bench-inference", str(batch), "--out", out],
                            None, log(f"infer-b{batch}", peer))
            ips = json.load(open(out))["images_per_second"]
            label = f"PyTorch {versions['torch']} eager"
        elif peer == "onnxruntime":
            s, rss, text = run([sys.executable, ORT_INFER, "--model", r50_onnx, "--batch", str(batch),
                                "--threads", threads], None, log(f"infer-b{batch}", peer))
            ips = json_lines(text)[-1]["images_per_second"]
            label = f"ONNX Runtime {versions['onnxruntime']}"
        else:
            exe = os.path.join(CANDLE_TARGET, "release", "candle-resnet50-bench")
            s, rss, text = run([exe, "--batch", str(batch)], burn_env, log(f"infer-b{batch}", peer))
            ips = json_lines(text)[-1]["images_per_second"]
            label = "candle (CPU)"
        r = side(label, s, rss, images_per_second=ips, gflops=ips * r50_flops / 1e9)
        peer_cache[(peer, batch, round_)] = r
        return r

    train_round = 0

    def median_side(runs, key="images_per_second"):
        """The run with the median `key` (images/s, or a training row's wall
        time), with every run's `key` as rounds_<key> and the highest peak
        RSS."""
        ranked = sorted(runs, key=lambda r: r[key])
        m = dict(ranked[len(ranked) // 2])
        m[f"rounds_{key}"] = [r[key] for r in runs]
        m["rss_mb"] = max(r["rss_mb"] for r in runs)
        return m

    def avp_inference(name, b, backend, round_):
        """avp at one batch size: the fused path alone where the device has
        one (its own images/s and peak RSS), Burn's kernels in a second
        process (informational)."""
        iters = ["--iters", "2"] if backend == "ndarray" else []
        base = [speed, "--weights", r50_onnx, "--batch-size", b, "--device", backend] + iters
        fused = backend == "flex"
        burn_s, burn_rss, text = run(base + ["--variants", "unfolded,folded"], burn_env, log(name, f"avp-burn.{round_}"))
        burn = {j["batchnorm"]: j["images_per_second"] for j in json_lines(text)}
        if fused:
            s, rss, text = run(base + ["--variants", "fused"], burn_env, log(name, f"avp.{round_}"))
            ips = json_lines(text)[-1]["images_per_second"]
        else:
            s, rss, ips = burn_s, burn_rss, burn["folded"]
        return side(f"avp ({'fused, ' if fused else ''}{backend})", s, rss, images_per_second=ips,
                    gflops=ips * r50_flops / 1e9, burn_kernels_folded=burn["folded"],
                    burn_kernels_unfolded=burn["unfolded"])

    def training_side(label, cmd, env, name, tag, flops, pytorch_json=None, valid_reuse=False):
        if train_round:
            tag = f"{tag}.{train_round}"
        s, rss, text = run(cmd, env, log(name, tag))
        acc = (json.load(open(pytorch_json))["runs"][0]["final_valid_acc"] if pytorch_json
               else final_acc(text))
        # GFLOP/s counts the FLOPs this side computes (the validation
        # split's frozen part once when it keeps its outputs).
        return side(label, s, rss, accuracy=acc, gflops=flops / s / 1e9, valid_reuse=valid_reuse)

    for name in rows:
        print(f"\n=== {name}", flush=True)
        if name.startswith("infer50"):
            b, _, backend = name.split("-b")[1].partition("-")
            backend = backend or args.device
            # Alternating rounds: avp, then each peer, then again.
            here = [p for p in peers if p != "candle" or int(b) <= args.candle_max_batch]
            rounds = [[avp_inference(name, b, backend, i)] + [infer_peer(p, int(b), i) for p in here]
                      for i in range(args.rounds)]
            sides = [median_side([rnd[j] for rnd in rounds]) for j in range(len(rounds[0]))]
            what = f"ResNet50 forward, batch {b}" + (f", {backend}" if backend != args.device else "")
            results.append({"row": name, "what": what, "kind": "inference", "batch": int(b), "sides": sides})
        else:
            cache = "cache" in name
            r50 = "50" in name
            net = "resnet50" if r50 else "mlnet"
            trained = ("layer4",) if name.startswith("finetune") else ()
            flops = training_flops(net, n_train, n_valid, args.epochs, trained, cached=cache)
            cache_dir = os.path.join(args.work, f"{name}-features")
            run_dir = os.path.join(args.work, f"{name}.run")
            for d in (cache_dir, run_dir):  # a fresh run, not a resumed one
                shutil.rmtree(d, ignore_errors=True)
            burn_cmd = [avp] + lesson + ["--out", run_dir]
            torch_cmd = py + ["--data", args.data, "--epochs", str(args.epochs), "--seeds", "0"]
            if r50:
                bn = "lesson" if name == "lesson50bn" else "frozen"
                burn_cmd += ["--weights", r50_pth, "--bn-mode", bn]
                torch_cmd += ["--backbone", "resnet50", "--bn-mode", bn]
            else:
                torch_cmd += ["--backbone", "mlnet"]
            if trained:
                burn_cmd += ["--finetune", ",".join(trained)]
                torch_cmd += ["--finetune", ",".join(trained)]
            if cache:
                burn_cmd += ["--feature-cache", "--no-augment", "--cache-dir", cache_dir]
                # PyTorch's fine-tuning has no prefix cache: it runs the same
                # recipe without augmentation.
                torch_cmd += ["--no-augment"] + ([] if trained else ["--feature-cache"])
            else:
                torch_cmd += ["--no-valid-reuse"]
            bn_what = f", BatchNorm {'lesson' if name == 'lesson50bn' else 'frozen'}" if r50 else ""
            what = (f"{'fine-tuning layer4' if trained else 'lesson'}, "
                    f"{'ResNet50' if r50 else 'real ResNet18'}{bn_what}, "
                    f"{'cache, no augmentation' if cache else 'augmented'}")
            # avp keeps the validation outputs of a frozen BatchNorm's
            # backbone (not in the lesson's BatchNorm mode; the cache rows
            # keep both splits on disk anyway).
            reuse = not cache and name != "lesson50bn"
            reuse_flops = training_flops(net, n_train, n_valid, args.epochs, trained, valid_reuse=True)
            rounds = []
            for train_round in range(args.train_rounds):
                if train_round:
                    for d in (cache_dir, run_dir):  # every round a fresh run
                        shutil.rmtree(d, ignore_errors=True)
                sides = [training_side(f"avp ({args.device})", burn_cmd, burn_env, name, "avp",
                                       reuse_flops if reuse else flops, valid_reuse=reuse)]
                if reuse and args.valid_reuse_sides:
                    shutil.rmtree(run_dir, ignore_errors=True)
                    sides.append(training_side(f"avp ({args.device}), validation recomputed every epoch",
                                               burn_cmd + ["--no-valid-reuse"], burn_env, name, "avp-no-reuse", flops))
                conv_sides = [("burn", "Burn's convolutions in the trained stages", args.burn_conv_side),
                              ("direct", "the trained stages' convolutions without Winograd", args.direct_conv_side)]
                for conv, label, wanted in conv_sides:
                    if not (trained and wanted):
                        continue
                    for d in (cache_dir, run_dir):  # as fresh as the first side's run
                        shutil.rmtree(d, ignore_errors=True)
                    sides.append(training_side(f"avp ({args.device}), {label}",
                                               burn_cmd, dict(burn_env, AVP_TRAIN_CONV=conv), name,
                                               f"avp-{conv}-conv", flops))
                engines = ["torch"] if (r50 or trained) else ["onnxruntime", "torch"]
                for engine in engines:
                    pj = os.path.join(args.work, f"{name}.pytorch-{engine}.json")
                    cmd = torch_cmd + ["--out", pj] + (["--engine", engine] if net == "mlnet" and not trained else [])
                    label = (f"PyTorch {versions['torch']}" if r50 else
                             f"PyTorch {versions['torch']}, backbone in {'torch' if engine == 'torch' else 'onnxruntime'}")
                    sides.append(training_side(label, cmd, None, name, f"pytorch-{engine}", flops, pj))
                if args.valid_reuse_sides and not (cache or trained or r50):
                    # The reference script keeps a frozen mlnet's validation
                    # outputs unless told not to.
                    pj = os.path.join(args.work, f"{name}.pytorch-torch-reuse.json")
                    cmd = [c for c in torch_cmd if c != "--no-valid-reuse"] + ["--out", pj, "--engine", "torch"]
                    sides.append(training_side(f"PyTorch {versions['torch']}, backbone in torch, validation outputs kept",
                                               cmd, None, name, "pytorch-torch-reuse", reuse_flops, pj, valid_reuse=True))
                rounds.append(sides)
            train_round = 0
            sides = [median_side([rnd[j] for rnd in rounds], "seconds") for j in range(len(rounds[0]))]
            results.append({"row": name, "what": what, "kind": "training", "flops": flops, "sides": sides})
        for sd in results[-1]["sides"]:
            sd["fraction_of_peak"] = sd["gflops"] / peak
        r = results[-1]
        own = r["sides"][0]
        for sd in r["sides"]:
            if r["kind"] == "inference":
                sd["avp_ratio"] = own["images_per_second"] / sd["images_per_second"]
                print(f"  {sd['engine']}: {sd['images_per_second']:.2f} img/s, {sd['gflops']:.0f} GFLOP/s "
                      f"({100 * sd['fraction_of_peak']:.0f}% of peak), RSS {sd['rss_mb']:.0f} MB", flush=True)
            else:
                sd["avp_ratio"] = own["seconds"] / sd["seconds"]
                print(f"  {sd['engine']}: {sd['seconds']:.0f} s (accuracy {sd['accuracy']}), "
                      f"{sd['gflops']:.0f} GFLOP/s ({100 * sd['fraction_of_peak']:.0f}% of peak), "
                      f"RSS {sd['rss_mb']:.0f} MB", flush=True)

    print(f"\n{cpu}; {threads} threads, {os.cpu_count()} logical processors; float32 FMA peak "
          f"{peak:.0f} GFLOP/s; {args.epochs} epochs, data {os.path.relpath(args.data, ROOT)} "
          f"({n_train} training, {n_valid} validation images)")
    inference = [r for r in results if r["kind"] == "inference"]
    if inference:
        print("\n| row | engine | images/s | GFLOP/s | of peak | avp / engine (throughput) | peak RSS |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in inference:
            for sd in r["sides"]:
                print(f"| {r['what']} | {sd['engine']} | {sd['images_per_second']:.2f} | {sd['gflops']:.0f} | "
                      f"{100 * sd['fraction_of_peak']:.0f}% | {sd['avp_ratio']:.2f}x | {sd['rss_mb']:.0f} MB |")
    training = [r for r in results if r["kind"] == "training"]
    if training:
        print("\n| row | engine | wall time | accuracy | GFLOP/s | of peak | avp / engine (time) | peak RSS |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in training:
            for sd in r["sides"]:
                acc = f"{sd['accuracy']:.3f}" if sd["accuracy"] is not None else "-"
                print(f"| {r['what']} | {sd['engine']} | {sd['seconds']:.0f} s | {acc} | {sd['gflops']:.0f} | "
                      f"{100 * sd['fraction_of_peak']:.0f}% | {sd['avp_ratio']:.2f}x | {sd['rss_mb']:.0f} MB |")
    by = {r["row"]: r for r in results}
    for cached, full in (("cache18", "lesson18"), ("cache50", "lesson50"), ("finetune18-cache", "finetune18")):
        if cached in by and full in by:
            # PyTorch-native as the lesson's code runs it (no reuse).
            native = [sd for sd in by[full]["sides"]
                      if sd["engine"].startswith("PyTorch") and not sd.get("valid_reuse")][-1]
            c = by[cached]["sides"][0]["seconds"] / native["seconds"]
            print(f"\navp's {by[cached]['what']} run takes {c:.2f}x the wall time of "
                  f"{native['engine']}'s {by[full]['what']} run")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"processor": cpu, "threads": args.threads, "logical_processors": os.cpu_count(),
                       "peak_gflops": peak, "peak_paths": peak_paths, "device": args.device,
                       "epochs": args.epochs, "versions": versions, "images": [n_train, n_valid],
                       "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
