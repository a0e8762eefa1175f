#!/usr/bin/env bash
# Two builds of examples/speed side by side, alternating, in one run: the
# before/after ratio of a change to the fused path (and ONNX Runtime beside
# them with ORT=1).
#
#   cp target/debug/examples/speed /tmp/speed-before     # before the change
#   ... change, cargo build --features ndarray,wgpu --examples ...
#   ORT=1 bash benches/speed_ab.sh /tmp/speed-before target/debug/examples/speed "1 8 32" 2
#
# Arguments: BEFORE AFTER [BATCHES ("1 8 32")] [ROUNDS (2)]. The model is
# the runner's random ResNet50 ONNX file (MODEL= to change it; make it with
# `benches/compare_pytorch.py --rows infer50-b1`); THREADS= (2) threads each.
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=$2 batches=${3:-1 8 32} rounds=${4:-2}
model=${MODEL:-target/compare-pytorch/resnet50-random-headless.onnx}
threads=${THREADS:-2}
[ -f "$model" ] || { echo "no model at $model (MODEL=)" >&2; exit 1; }
py=${PYTHON:-.venv/bin/python}
summary() { "$py" -c 'import json, sys
j = json.loads(sys.stdin.read().splitlines()[-1])
print("%.2f img/s, peak RSS %.0f MB" % (j["images_per_second"], j["peak_rss_mb"]))'; }
for r in $(seq 1 "$rounds"); do
  for b in $batches; do
    for bin in "$before" "$after"; do
      echo "round $r, batch $b, $bin: $(RAYON_NUM_THREADS=$threads "$bin" --weights "$model" --batch-size "$b" \
          --iters "${ITERS:-5}" --variants fused 2>/dev/null | summary)"
    done
    if [ -n "${ORT:-}" ]; then
      echo "round $r, batch $b, ONNX Runtime: $("$py" benches/onnxruntime_infer.py --model "$model" --batch "$b" \
          --threads "$threads" | summary)"
    fi
  done
done
