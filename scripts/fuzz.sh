#!/usr/bin/env bash
# Run one coverage-guided fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for a while.
#
#   scripts/fuzz.sh TARGET [SECONDS]
#
# TARGET: suite, safetensors, gguf, reference or results (fuzz/fuzz_targets/TARGET.rs).
# SECONDS: how long to fuzz (default 60). Extra libFuzzer flags: FUZZ_ARGS="-max_len=8192".
#
# What it does:
# - installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when it is missing;
# - seeds fuzz/corpus/TARGET from fuzz/seeds/TARGET (small valid inputs, committed) and,
#   where cheap, from the repository: suites/*.yaml for `suite`, the report fixtures'
#   results.json for `results`;
# - runs the target with one worker (no -jobs/-workers: the build machine is shared),
#   printing libFuzzer's final statistics (stat::number_of_executed_units is the number
#   of executions). A crash stops the run and leaves its input in fuzz/artifacts/TARGET/;
#   replay it with `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none TARGET fuzz/artifacts/TARGET/FILE`
#   (from the repository root), and turn it into a regression test.
#
# Toolchain: only a stable toolchain is installed. cargo fuzz passes nightly-only rustc
# flags (-Z...; with a sanitizer also -Zsanitizer=...), which stable refuses unless
# RUSTC_BOOTSTRAP=1 is set; with it, stable rustc 1.95 builds and runs every target. The
# sanitizer defaults to none (FUZZ_SANITIZER=none): the readers are safe Rust, so
# AddressSanitizer finds nothing more there and halves the speed. FUZZ_SANITIZER=address
# also works on stable with RUSTC_BOOTSTRAP=1 (it rebuilds everything instrumented).
set -euo pipefail

target=${1:?usage: scripts/fuzz.sh TARGET [SECONDS]  (suite, safetensors, gguf, reference, results)}
seconds=${2:-60}
sanitizer=${FUZZ_SANITIZER:-none}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [[ ! -f fuzz/fuzz_targets/$target.rs ]]; then
    echo "error: no fuzz target $target; the targets are: $(ls fuzz/fuzz_targets | sed 's/\.rs$//' | tr '\n' ' ')" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

corpus=fuzz/corpus/$target
mkdir -p "$corpus"
if [[ -d fuzz/seeds/$target ]]; then
    cp -n fuzz/seeds/"$target"/* "$corpus"/ 2>/dev/null || true
fi
case $target in
    suite) for f in suites/*.yaml; do cp -n "$f" "$corpus/suite-$(basename "$f")"; done ;;
    results) for f in tests/fixtures/report/*/results.json; do
            cp -n "$f" "$corpus/results-$(basename "$(dirname "$f")").json"; done ;;
esac

export RUSTC_BOOTSTRAP=1
# shellcheck disable=SC2086
exec cargo fuzz run --fuzz-dir fuzz -s "$sanitizer" "$target" "$corpus" -- \
    -max_total_time="$seconds" -print_final_stats=1 ${FUZZ_ARGS:-}
