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
mkdir -p "$OUT/r"
if [ "$tests_limit" != 0 ]; then
  QUANTBENCH_REQUIRE_NVRTC=1 timeout "$tests_limit" target/release/cuda-tests --nocapture --test-threads=1 \
    >"$OUT/cuda-tests.txt" 2>&1
  echo "cuda-tests exit $?"; grep -E "^test |test result|panicked|skipped" "$OUT/cuda-tests.txt" | tail -30
fi
if [ "${KERNELS:-1}" != 0 ]; then
  timeout 240 target/release/cuda-kernels --json "$OUT/cuda-kernels.json" >"$OUT/cuda-kernels.txt" 2>&1
  echo "cuda-kernels exit $?"; cat "$OUT/cuda-kernels.txt"
fi
for suite in "$@"; do
  name=$(basename "$suite" .yaml)
  timeout "$suite_limit" target/release/bench run "$suite" --out "$OUT/r/$name" >"$OUT/$name.txt" 2>&1
  echo "$name exit $?"; tail -5 "$OUT/$name.txt"
done
tar -C "$OUT/r" -czf "$OUT/reports.tgz" . && rm -rf "$OUT/r"
ls -la "$OUT"
