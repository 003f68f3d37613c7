#!/usr/bin/env bash
# End-to-end test of the Slurm recipe on a single-node Slurm cluster on this machine:
# installs slurmctld, slurmd and munge from the distribution's packages (Debian/Ubuntu,
# as root), starts them with a private configuration, submits the quick-start suite as a
# 4-task array plus the merge job (scripts/slurm/submit.sh), runs the same suite on this
# machine alone, and checks the two agree on every figure but timings and memory
# (scripts/same_figures.py). Writes a report to REPORT (default
# reports/distributed/slurm-test.md).
#
#   scripts/slurm/test-local.sh [REPORT]
#
# The daemons stop when the script ends. Needs root (packages, munge key, daemons).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
report=${1:-reports/distributed/slurm-test.md}
suite=suites/quickstart.yaml
shards=4

if [ "$(id -u)" != 0 ]; then
  echo "run as root: it installs packages and starts munged, slurmctld and slurmd" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "== installing slurm-wlm and munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null
fi

echo "== building bench"
cargo build --release --quiet
bench=$repo/target/release/bench

work=$(mktemp -d /tmp/slurm-test.XXXXXX)
mkdir -p "$work/log"
daemons=()
cleanup() {
  for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== munge"
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --foreground >"$work/log/munged.out" 2>&1 &
  daemons+=($!)
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null

echo "== slurm (configuration in $work)"
node=$(hostname -s)
cpus=$(nproc)
mkdir -p "$work/state" "$work/spool" "$work/log"
cat >"$work/slurm.conf" <<CONF
ClusterName=quantbench-test
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=3600
MpiDefault=none
NodeName=$node CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$work/slurm.conf
/usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$work/log/slurmctld.out" 2>&1 &
daemons+=($!)
/usr/sbin/slurmd -D -f "$SLURM_CONF" >"$work/log/slurmd.out" 2>&1 &
daemons+=($!)
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)'; then break; fi
  sleep 1
done
sinfo -h -o %T | grep -qE '^(idle|mixed)' || {
  echo "the node did not come up; logs in $work/log" >&2
  tail -20 "$work/log/"*.log >&2
  exit 1
}

echo "== submitting $suite as a $shards-task array plus the merge"
root=$work/run
start=$(date +%s)
read -r array merge < <(scripts/slurm/submit.sh "$suite" "$shards" "$root")
echo "array job $array, merge job $merge"
state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | sort -u | cut -d= -f2 | paste -sd, -; }
for _ in $(seq 600); do
  s=$(state "$merge")
  case "$s" in
    COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) break ;;
  esac
  sleep 1
done
elapsed=$(($(date +%s) - start))
array_states=$(state "$array")
merge_state=$(state "$merge")
echo "array: $array_states; merge: $merge_state; ${elapsed}s"
if [ "$merge_state" != COMPLETED ]; then
  for f in "$root"/slurm-*.out; do echo "--- $f"; tail -20 "$f"; done >&2
  exit 1
fi

echo "== the same suite on this machine alone"
"$bench" run "$suite" --out "$work/single" >/dev/null 2>"$work/single.err"
check=$(python3 scripts/same_figures.py "$work/single/results.json" "$root/merged/results.json") || {
  echo "$check" >&2
  exit 1
}
echo "$check"

mkdir -p "$(dirname "$report")"
{
  echo "# Slurm: the quick start as a $shards-task array, merged"
  echo
  echo "Written by \`scripts/slurm/test-local.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ): a single-node Slurm"
  echo "($(sinfo --version)) on this machine ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $cpus CPUs),"
  echo "bench $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo -dirty)."
  echo
  echo "## Commands"
  echo
  echo '```'
  echo "scripts/slurm/submit.sh $suite $shards RUN_ROOT"
  echo "# = sbatch --array=1-$shards scripts/slurm/bench-array.sbatch $suite RUN_ROOT"
  echo "#   sbatch --dependency=afterok:$array scripts/slurm/merge.sbatch RUN_ROOT"
  echo '```'
  echo
  echo "## Jobs"
  echo
  echo "| job | state | node |"
  echo "|---|---|---|"
  for i in $(seq "$shards"); do
    echo "| ${array}_$i (shard $i/$shards) | $(state "${array}_$i") | $(scontrol show job "${array}_$i" | grep -o ' NodeList=[^ ]*' | cut -d= -f2) |"
  done
  echo "| $merge (merge, afterok:$array) | $merge_state | $(scontrol show job "$merge" | grep -o ' NodeList=[^ ]*' | cut -d= -f2) |"
  echo
  echo "Submission to merged results: ${elapsed} s."
  echo
  echo "## Shards"
  echo
  echo "| shard | cases | reference | case time s |"
  echo "|---|---:|---|---:|"
  for i in $(seq "$shards"); do
    python3 - "$root/shard-$i/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["shards"][0]
refs = [m["reference_cache"] for m in r["models"] if m.get("reference_cache")]
ref = ", ".join("reused" if c["reused"] else "computed" for c in refs) or "none"
total = sum(c["elapsed_s"] for c in r["cases"])
print(f"| {s['index']}/{s['count']} | {len(s['cases'])} | {ref} | {total:.1f} |")
PY
  done
  echo
  echo "The shards share \`RUN_ROOT/references/\`: a shard that starts after another stored the"
  echo "model's reference reuses it (checked against the model, tokenizer and workload hashes)."
  echo
  echo "## Shard logs"
  for i in $(seq "$shards"); do
    echo
    echo "### shard $i/$shards"
    echo
    echo '```'
    grep -E '^(shard|note|wrote)' "$root/slurm-shard-$i.out" | sed "s|$work|RUN|g"
    echo '```'
  done
  echo
  echo "## Merge"
  echo
  echo '```'
  sed "s|$work|RUN|g" "$root/slurm-merge.out"
  echo '```'
  echo
  echo "## Against one machine alone"
  echo
  echo "\`scripts/same_figures.py single/results.json merged/results.json\`:"
  echo
  echo '```'
  echo "$check"
  echo '```'
} >"$report"
echo "wrote $report"
