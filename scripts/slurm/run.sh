#!/usr/bin/env bash
# Submits the whole pipeline: the extraction array (one task per shard),
# then the merge + training job, which starts once every shard succeeded.
#   AVP_BIN=... AVP_FEATURES=... AVP_RUN=... AVP_ARGS="--data ... --no-augment" \
#   AVP_TRAIN_ARGS="--epochs 3" scripts/slurm/run.sh
# Environment: the variables of extract.sbatch and train.sbatch, and
#   AVP_SHARDS             number of shards / array tasks (default 4)
#   AVP_LOGS               folder for the jobs' output files (default: the
#                          current folder, Slurm's default)
#   AVP_SBATCH_ARGS        extra sbatch options for both jobs (word-split),
#                          e.g. "--partition=cpu --account=me"
#   AVP_TRAIN_SBATCH_ARGS  extra sbatch options for the training job,
#                          e.g. "-c 8" or "--gres=gpu:1"
# Prints what it submitted on stderr and "EXTRACT_JOB_ID TRAIN_JOB_ID" on
# stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

for v in AVP_BIN AVP_FEATURES AVP_RUN; do
  [ -n "${!v:-}" ] || { echo "run.sh: set $v (see scripts/slurm/README.md)" >&2; exit 2; }
done
n=${AVP_SHARDS:-4}
case $n in '' | *[!0-9]* | 0) echo "run.sh: AVP_SHARDS must be a positive number, not '$n'" >&2; exit 2 ;; esac
export AVP_SHARDS=$n
logs=()
if [ -n "${AVP_LOGS:-}" ]; then
  mkdir -p "$AVP_LOGS"
  logs=(--output "$AVP_LOGS/%x-%A_%a.out")
fi
set -f
# shellcheck disable=SC2086
jid=$(sbatch --parsable --array=0-$((n - 1)) "${logs[@]}" ${AVP_SBATCH_ARGS:-} "$here/extract.sbatch")
jid=${jid%%;*}
[ -n "${AVP_LOGS:-}" ] && logs=(--output "$AVP_LOGS/%x-%j.out")
# shellcheck disable=SC2086
tid=$(sbatch --parsable --dependency=afterok:"$jid" "${logs[@]}" ${AVP_SBATCH_ARGS:-} ${AVP_TRAIN_SBATCH_ARGS:-} \
    "$here/train.sbatch")
tid=${tid%%;*}
echo "run.sh: submitted extraction array $jid (tasks 0-$((n - 1)), $n shards into $AVP_FEATURES)" >&2
echo "run.sh: submitted training job $tid (after every task of $jid succeeds; into $AVP_RUN)" >&2
echo "$jid $tid"
