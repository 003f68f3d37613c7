#!/usr/bin/env bash
# Build the release binaries here, and run them on the GPU machine that the `device`
# tool (the `run` function of the agent tools) lends: it has the NVIDIA driver and the
# CUDA 13.0 libraries but no Rust toolchain and no network, so the binaries travel with
# the working tree (`carry`) and everything worth keeping is written under $OUT.
#
# Usage:
#   scripts/gpu-run.sh build               build target/release/{bench,cuda-kernels} here
#   scripts/gpu-run.sh print [SUITE]       print the device-tool calls for the steps below
#   scripts/gpu-run.sh remote-check        (on the GPU machine) driver, libraries, op tests
#   scripts/gpu-run.sh remote-kernels      (on the GPU machine) the kernel benchmark
#   scripts/gpu-run.sh remote-suite SUITE  (on the GPU machine) bench run SUITE
#
# The op tests need the test binary too: `build` copies it to target/release/cuda-tests.
# carry is limited to 64 MiB in all: the stripped binaries are a few MiB each.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

build() {
  cargo build --release --bin bench --bin cuda-kernels
  # The CUDA op tests as a standalone binary (the GPU machine cannot run cargo).
  local test_bin
  test_bin=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "cuda" and m.get("executable"):
        print(m["executable"])')
  # The binaries go where `carry` can take them: target/ is ignored by git.
  local target=${CARGO_TARGET_DIR:-$root/target}
  mkdir -p "$root/target/release"
  if [ "$target" != "$root/target" ]; then
    cp "$target/release/bench" "$target/release/cuda-kernels" "$root/target/release/"
  fi
  cp "$test_bin" "$root/target/release/cuda-tests"
  strip "$root/target/release/bench" "$root/target/release/cuda-kernels" "$root/target/release/cuda-tests" 2>/dev/null || true
  ls -la "$root/target/release/bench" "$root/target/release/cuda-kernels" "$root/target/release/cuda-tests"
}

print_calls() {
  local suite=${1:-suites/bloom.yaml}
  cat <<CALLS
# 1. driver, libraries and every CUDA op against its CPU reference:
run(kind="nvidia-h100-x1", carry=["target/release/bench", "target/release/cuda-kernels", "target/release/cuda-tests"],
    command="scripts/gpu-run.sh remote-check", timeout_s=600)
# 2. kernel benchmark (GB/s, TFLOP/s against the measured copy bandwidth and bf16 GEMM):
run(command="scripts/gpu-run.sh remote-kernels", timeout_s=600)
# 3. a suite (results.json, results.md, results.csv under \$OUT/reports):
run(command="scripts/gpu-run.sh remote-suite $suite", timeout_s=600)
# The files come back under files_at; commit the ones worth keeping under reports/.
CALLS
}

# Library folders of the CUDA toolkit, for NVRTC and cuBLAS (the crate also searches
# these itself; exporting them makes the choice visible in the log).
cuda_env() {
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13.0/lib64; do
    if [ -d "$d" ]; then
      export QUANTBENCH_CUDA_LIB_DIR=${QUANTBENCH_CUDA_LIB_DIR:+$QUANTBENCH_CUDA_LIB_DIR:}$d
    fi
  done
  # Built-in models (bloom-560m-shapes is 2.2 GB) and compiled PTX stay on the machine:
  # $OUT is for what comes back.
  export QUANTBENCH_CACHE=/tmp/quantbench-cache
}

remote_check() {
  : "${OUT:?OUT is not set: run this through the device tool}"
  cuda_env
  {
    nvidia-smi || true
    echo "QUANTBENCH_CUDA_LIB_DIR=${QUANTBENCH_CUDA_LIB_DIR:-}"
    ls /usr/local/cuda/lib64 2>/dev/null | grep -E 'nvrtc|cublas' || true
  } 2>&1 | tee "$OUT/environment.txt"
  QUANTBENCH_REQUIRE_NVRTC=1 target/release/cuda-tests --nocapture --test-threads=1 2>&1 | tee "$OUT/cuda-tests.txt"
}

remote_kernels() {
  : "${OUT:?OUT is not set: run this through the device tool}"
  cuda_env
  target/release/cuda-kernels --json "$OUT/cuda-kernels.json" 2>&1 | tee "$OUT/cuda-kernels.txt"
}

remote_suite() {
  : "${OUT:?OUT is not set: run this through the device tool}"
  local suite=${1:?usage: gpu-run.sh remote-suite SUITE}
  cuda_env
  target/release/bench run "$suite" --out "$OUT/reports/$(basename "$suite" .yaml)" 2>&1 | tee "$OUT/suite.txt"
}

case "${1:-}" in
  build) build ;;
  print) print_calls "${2:-}" ;;
  remote-check) remote_check ;;
  remote-kernels) remote_kernels ;;
  remote-suite) remote_suite "${2:-}" ;;
  *)
    echo "usage: scripts/gpu-run.sh build | print [SUITE] | remote-check | remote-kernels | remote-suite SUITE" >&2
    exit 1
    ;;
esac
