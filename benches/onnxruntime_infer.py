#!/usr/bin/env python3
"""ONNX Runtime's side of the inference rows in benches/compare_pytorch.py.

Runs an ONNX backbone (the same file avp reads) on random [BATCH,3,224,224]
input with onnxruntime's CPU provider: `intra_op_num_threads` = --threads,
one inter-op thread, sequential execution, every graph optimisation (which
folds BatchNorm into the convolutions, as avp's fused path does). One
warm-up batch, then --iters timed batches; prints one JSON line and writes
it to --out. Imports only onnxruntime and numpy, so that the peak RSS the
runner reads is ONNX Runtime's own.

    .venv/bin/python benches/onnxruntime_infer.py --model resnet50.onnx --batch 8 --threads 2
"""

import argparse
import json
import resource
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="ONNX file with a dynamic or matching batch dimension")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", help="also write the JSON line here")
    args = ap.parse_args()
    if args.batch < 1 or args.iters < 1 or args.threads < 1:
        sys.exit("--batch, --iters and --threads must be at least 1")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        sys.exit(f"onnxruntime cannot open {args.model}: {e}")
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    session.run(None, {name: x})  # warm-up: allocations, kernel choice
    start = time.perf_counter()
    for _ in range(args.iters):
        session.run(None, {name: x})
    seconds = time.perf_counter() - start
    result = {"engine": "onnxruntime", "version": ort.__version__, "batch": args.batch,
              "iters": args.iters, "threads": args.threads, "seconds": seconds,
              "images_per_second": args.batch * args.iters / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
