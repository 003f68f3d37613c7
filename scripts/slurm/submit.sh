#!/usr/bin/env bash
# Submit a suite as an N-task Slurm array plus the merge job that waits for it:
#
#   scripts/slurm/submit.sh SUITE N RUN_ROOT [bench run options]
#
# Prints the two job ids ("ARRAY_ID MERGE_ID"). Extra sbatch options (a partition, an
# account, a time limit) go in SBATCH_* environment variables, which sbatch reads itself:
# SBATCH_PARTITION=gpu SBATCH_TIMELIMIT=2:00:00 scripts/slurm/submit.sh ...
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ $# -lt 3 ]; then
  echo "usage: $0 SUITE N RUN_ROOT [bench run options]" >&2
  exit 64
fi
suite=$1
count=$2
root=$3
shift 3
mkdir -p "$root"
array=$(sbatch --parsable --array="1-$count" --output="$root/slurm-shard-%a.out" \
  scripts/slurm/bench-array.sbatch "$suite" "$root" "$@")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --output="$root/slurm-merge.out" \
  scripts/slurm/merge.sbatch "$root")
merge=${merge%%;*}
echo "$array $merge"
