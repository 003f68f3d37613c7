#!/usr/bin/env bash
# One device call's worth of GPU checks (see gpu-run.sh): the CUDA tests, then suites on
# the GPU, each bounded so the call ends inside its limit; reports come back as one
# archive (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT is not set: run this through the device tool}"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export QUANTBENCH_CUDA_LIB_DIR=${QUANTBENCH_CUDA_LIB_DIR:+$QUANTBENCH_CUDA_LIB_DIR:}$d
done
# Built-in models (bloom-560m-shapes is 2.2 GB) stay on the machine.
export QUANTBENCH_CACHE=/tmp/quantbench-cache
tests_limit=${TESTS_LIMIT:-180}
suite_limit=${SUITE_LIMIT:-360}
reports=/tmp/gpu-reports
rm -rf "$reports" && mkdir -p "$reports"
# The reports so far as one archive, rewritten after each suite: a call stopped at its
# limit still returns what finished.
pack() { tar -C "$reports" -czf "$OUT/reports.tgz" .; }
if [ "$tests_limit" != 0 ]; then
  QUANTBENCH_REQUIRE_NVRTC=1 timeout "$tests_limit" target/release/cuda-tests --nocapture --test-threads=1 \
    >"$OUT/cuda-tests.txt" 2>&1
  echo "cuda-tests exit $?"; grep -E "^test |test result|panicked|skipped" "$OUT/cuda-tests.txt" | tail -30
fi
if [ "${KERNELS:-1}" != 0 ]; then
  timeout "${KERNELS_LIMIT:-240}" target/release/cuda-kernels --samples "${KERNEL_SAMPLES:-30}" \
    --json "$OUT/cuda-kernels.json" >"$OUT/cuda-kernels.txt" 2>&1
  echo "cuda-kernels exit $?"; cat "$OUT/cuda-kernels.txt"
fi
# SUITE or SUITE@N: the suite at its own batch size, or at batch N (--batch-size N, reports
# under NAME-bN).
for entry in "$@"; do
  suite=${entry%@*}
  name=$(basename "$suite" .yaml)
  batch=()
  if [ "$entry" != "$suite" ]; then
    batch=(--batch-size "${entry##*@}")
    name="$name-b${entry##*@}"
  fi
  timeout "$suite_limit" target/release/bench run "$suite" "${batch[@]}" --out "$reports/$name" >"$OUT/$name.txt" 2>&1
  echo "$name exit $?"; tail -5 "$OUT/$name.txt"
  pack
done
# The PyTorch peers on the same GPU (scripts/peers/gpu_decode.py), when PEERS_BUDGET (seconds)
# is set; torchao comes from the wheels in .whl/ when they travelled.
if [ -n "${PEERS_BUDGET:-}" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site
  fi
  PYTHONUNBUFFERED=1 timeout $((PEERS_BUDGET + 60)) python3 scripts/peers/gpu_decode.py --budget-s "$PEERS_BUDGET" \
    ${PEERS_ARGS:-} --out "$reports/gpu-peers" >"$OUT/gpu-peers.txt" 2>&1
  echo "gpu-peers exit $?"; tail -15 "$OUT/gpu-peers.txt"
  pack
fi
pack
ls -la "$OUT"
