#!/usr/bin/env bash
# CI stage: the Slurm pipeline (scripts/slurm) on a private one-node
# cluster, against a single-process reference run.
#   AVP_BIN  folder holding the built `features` and `alien_vs_predator`
#            example binaries
#   SHARED   the shared data folder (../shared)
#   ROOT     the repository root (default: this script's parent)
# and optionally AVP_SLURM_CI_TIMEOUT (seconds for the jobs, 1200) and
# AVP_SLURM_FAULT_DELAY (seconds into task 1 before its requeue, 2).
# 1. installs Slurm and munge if missing, starts the cluster under
#    target/ci-slurm/cluster (stopped again on any exit);
# 2. reference: one process extracts the features and trains 3 epochs;
# 3. cluster: 4 extraction tasks, then merge + the same training, with a
#    fault: task 1 is requeued (cancelled mid-run, then run again);
# 4. checks: merged cache byte-identical to the reference's, 4 shards per
#    file and no temporary file left, metrics.csv equal but for wall time.
set -euo pipefail
ROOT=${ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
: "${AVP_BIN:?set AVP_BIN to the folder holding the built features and alien_vs_predator binaries}"
: "${SHARED:?set SHARED to the shared data folder}"
AVP_BIN=$(cd "$AVP_BIN" && pwd)
SLURM="$ROOT/scripts/slurm"
OUT="$ROOT/target/ci-slurm"
CLUSTER="$OUT/cluster"
LOGS="$OUT/logs"
DATA="$SHARED/data/alien_vs_predator_thumbnails/data"
SHARDS=4
# The committed ResNet18, by absolute path: the jobs run in another folder.
WEIGHTS="--weights $ROOT/weights/mlnet-resnet18/ResNet18.onnx --prep $ROOT/weights/mlnet-resnet18/ResNetPreprocess.onnx"
TIMEOUT=${AVP_SLURM_CI_TIMEOUT:-1200}
T0=$SECONDS
declare -a TIMES=()
lap() { TIMES+=("$(printf '  %-34s %5ds' "$1" $(( SECONDS - $2 )))"); }

for b in features alien_vs_predator; do
  [ -x "$AVP_BIN/$b" ] || { echo "slurm stage: $AVP_BIN/$b is missing (cargo build --examples)" >&2; exit 1; }
done
[ -d "$DATA" ] || { echo "slurm stage: missing shared data: $DATA" >&2; exit 1; }

dump() {
  echo "=== slurm stage failed: state, daemon logs and job outputs" >&2
  if [ -f "$CLUSTER/slurm.conf" ]; then
    SLURM_CONF="$CLUSTER/slurm.conf" squeue -a >&2 2>&1 || true
    SLURM_CONF="$CLUSTER/slurm.conf" scontrol show job >&2 2>&1 || true
  fi
  bash "$SLURM/cluster.sh" logs "$CLUSTER" >&2 || true
  local f
  for f in "$LOGS"/*.out; do
    [ -e "$f" ] || continue
    echo "----- $f (last 60 lines)" >&2
    tail -n 60 "$f" >&2
  done
}
finish() {
  local rc=$?
  trap - EXIT
  [ "$rc" -eq 0 ] || dump
  bash "$SLURM/cluster.sh" stop "$CLUSTER" || true
  exit "$rc"
}
die() { echo "slurm stage: $*" >&2; exit 1; }

# 1. The cluster.
t=$SECONDS
bash "$SLURM/cluster.sh" install
lap "install slurm + munge" $t
mkdir -p "$OUT"
trap finish EXIT
t=$SECONDS
bash "$SLURM/cluster.sh" start "$CLUSTER"
# shellcheck disable=SC1091
source "$CLUSTER/env.sh"
lap "start the cluster" $t

# 2. The reference: one process, its own cache.
t=$SECONDS
rm -rf "$OUT/ref-features" "$OUT/ref-run"
"$AVP_BIN/alien_vs_predator" $WEIGHTS --data "$DATA" --feature-cache --no-augment --epochs 3 --seed 0 \
    --cache-dir "$OUT/ref-features" --out "$OUT/ref-run" > "$OUT/ref-run.log" 2>&1 \
  || { tail -n 40 "$OUT/ref-run.log" >&2; die "the reference run failed"; }
lap "reference (one process)" $t

# 3. The pipeline on the cluster.
t=$SECONDS
export AVP_BIN AVP_FEATURES="$OUT/features" AVP_RUN="$OUT/run" AVP_LOGS="$LOGS" AVP_SHARDS=$SHARDS
export AVP_ARGS="$WEIGHTS --data $DATA --no-augment --seed 0" AVP_TRAIN_ARGS="--epochs 3"
rm -rf "$AVP_FEATURES" "$AVP_RUN" "$LOGS"
ids=$(cd "$OUT" && bash "$SLURM/run.sh")
read -r jid tid <<< "$ids"
{ [ -n "$jid" ] && [ -n "$tid" ]; } || die "run.sh printed no job ids: '$ids'"
echo "slurm stage: extraction array $jid, training job $tid"

# The fault: requeue task 1 while it runs (Slurm kills it, then runs it
# again from the start).
victim="${jid}_1"
state=
end=$(( SECONDS + TIMEOUT ))
while [ $SECONDS -lt $end ]; do
  # (a failed squeue, e.g. a busy controller, is simply asked again)
  state=$(squeue -h -j "$victim" -o %T 2>/dev/null) || { sleep 0.5; continue; }
  [ "$state" = RUNNING ] && break
  if [ -z "$state" ] || ! [[ $state =~ ^(PENDING|CONFIGURING)$ ]]; then
    die "task $victim reached '$(scontrol show job -o "$victim" 2>/dev/null | grep -o 'JobState=[A-Z_]*' || echo "$state")' before it could be requeued mid-run: the fault did not happen"
  fi
  sleep 0.2
done
[ "$state" = RUNNING ] || die "task $victim never started"
sleep "${AVP_SLURM_FAULT_DELAY:-2}"
state=$(squeue -h -j "$victim" -o %T 2>/dev/null || true)
[ "$state" = RUNNING ] || die "task $victim is '${state:-finished}' ${AVP_SLURM_FAULT_DELAY:-2} s after it started, no longer running: the fault did not happen"
scontrol requeue "$victim" || die "scontrol requeue $victim failed: the fault did not happen"
echo "slurm stage: fault: requeued task $victim ${AVP_SLURM_FAULT_DELAY:-2} s into its run (cancelled, back in the queue)"
# Slurm holds a requeued job for about 2 minutes (its EligibleTime):
# release it as soon as it is back in the queue.
released=
for _ in $(seq 150); do
  if [ "$(squeue -h -j "$victim" -o %T 2>/dev/null || true)" = PENDING ] \
      && scontrol update jobid="$victim" StartTime=now 2>/dev/null; then
    released=1
    break
  fi
  sleep 0.2
done
[ -n "$released" ] || echo "slurm stage: could not release $victim early; it starts after Slurm's requeue hold"

# Wait for both jobs.
while :; do
  if left=$(squeue -h -j "$jid,$tid" -o %i 2>/dev/null) && [ -z "$left" ]; then break; fi
  [ $SECONDS -lt $end ] || die "the jobs did not finish within ${TIMEOUT}s"
  if squeue -h -j "$tid" -o %r 2>/dev/null | grep -q DependencyNeverSatisfied; then
    die "training job $tid can never start: an extraction task failed"
  fi
  sleep 1
done
states=$(scontrol show job -o "$jid" | grep -o 'ArrayTaskId=[0-9]* .*JobState=[A-Z_]*' | sed 's/ .*JobState=/:/; s/ArrayTaskId=//' | sort -n | tr '\n' ' ')
echo "slurm stage: extraction tasks (id:state): $states"
[ "$states" = "0:COMPLETED 1:COMPLETED 2:COMPLETED 3:COMPLETED " ] || die "not every extraction task completed: $states"
restarts=$(scontrol show job -o "$victim" | sed -n 's/.* Restarts=\([0-9]*\).*/\1/p')
[ "${restarts:-0}" -ge 1 ] || die "task $victim shows Restarts=${restarts:-?}: it was not run again"
grep -q "DUE TO JOB REQUEUE" "$LOGS/avp-extract-${jid}_1.out" \
  || die "task $victim was rerun but not interrupted (no 'DUE TO JOB REQUEUE' in its log): it had finished before the requeue"
tstate=$(scontrol show job -o "$tid" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
[ "$tstate" = COMPLETED ] || die "training job $tid ended $tstate"
lap "cluster (submit to done)" $t

# 4. Checks.
t=$SECONDS
cd "$OUT"
mapfile -t merged < <(cd ref-features && find . -maxdepth 1 -type f -name '*.features.safetensors' | sed 's|^\./||' | sort)
[ ${#merged[@]} -gt 0 ] || die "the reference run wrote no *.features.safetensors into ref-features"
mapfile -t ours < <(cd features && find . -maxdepth 1 -type f -name '*.features.safetensors' | sed 's|^\./||' | sort)
[ "${merged[*]}" = "${ours[*]}" ] || die "merged files differ: reference has [${merged[*]}], the cluster [${ours[*]}]"
for f in "${merged[@]}"; do
  cmp "ref-features/$f" "features/$f" || die "features/$f differs from the single-process cache"
done
partial=$(find features -name '*.partial-*' | head -5)
[ -z "$partial" ] || die "temporary files left in the cache: $partial"
nshards=0
for f in "${merged[@]}"; do
  stem=${f%.features.safetensors}
  for i in $(seq 0 $(( SHARDS - 1 ))); do
    s=$(printf '%s.features.shard-%04d-of-%04d.safetensors' "$stem" "$i" "$SHARDS")
    [ -f "features/$s" ] || die "missing shard file features/$s"
  done
  nshards=$(( nshards + SHARDS ))
done
all=$(find features -maxdepth 1 -type f -name '*.shard-*' | wc -l)
[ "$all" -eq "$nshards" ] || die "features holds $all shard files, expected $nshards (${#merged[@]} x $SHARDS)"
if grep -q "through the backbone" "$LOGS/avp-train-$tid.out"; then
  die "the training job ran the backbone: it did not use the merged cache"
fi
# metrics.csv: every column but wall time.
for r in ref-run run; do [ -s "$r/metrics.csv" ] || die "$r/metrics.csv is missing"; done
[ "$(head -1 ref-run/metrics.csv)" = "$(head -1 run/metrics.csv)" ] || die "metrics.csv headers differ"
keep=$(head -1 ref-run/metrics.csv | tr -d '\r' | awk -F, '{ for (i = 1; i <= NF; i++) if (tolower($i) !~ /time|sec/) printf "%s%d", (n++ ? "," : ""), i }')
[ -n "$keep" ] || die "metrics.csv has no column to compare"
cut -d, -f"$keep" ref-run/metrics.csv > metrics.ref.cmp
cut -d, -f"$keep" run/metrics.csv > metrics.run.cmp
rows=$(( $(wc -l < metrics.ref.cmp) - 1 ))
[ "$rows" -gt 0 ] || die "ref-run/metrics.csv has no rows"
if ! cmp -s metrics.ref.cmp metrics.run.cmp; then
  diff metrics.ref.cmp metrics.run.cmp >&2 || true
  die "metrics.csv of the cluster run differs from the reference's"
fi
lap "checks" $t
echo "slurm stage: ${#merged[@]} merged cache file(s) byte-identical to the single-process cache, $nshards shard files" \
  "(${#merged[@]} x $SHARDS), no temporary file; task 1 requeued mid-run and rerun (Restarts=$restarts);" \
  "metrics.csv equal on [$(head -1 metrics.ref.cmp)] over $rows rows (wall time ignored)"
lap "slurm stage total" $T0
echo "=== slurm stage times"
printf '%s\n' "${TIMES[@]}"
