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
#   replay it with `RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s none TARGET
#   fuzz/artifacts/TARGET/FILE`, fix it with a unit test, and copy the input to
#   fuzz/regressions/TARGET/ (tests/mutation.rs replays every file there).
#
# Toolchain: only a stable toolchain is installed here (rustc 1.95). What was checked:
# with the sanitizer off (`-s none`, the default here) cargo fuzz passes only stable
# rustc flags (-Cpasses=sancov-module, -Cllvm-args=-sanitizer-coverage-*, --cfg fuzzing,
# -Cdebug-assertions), so stable builds and runs every target; RUSTC_BOOTSTRAP=1 is set
# anyway, because a sanitizer (FUZZ_SANITIZER=address) adds -Zsanitizer=..., which stable
# accepts only with it (that combination was not run here: it rebuilds every crate
# instrumented, and the readers are safe Rust, where AddressSanitizer adds little).
# The first build of the instrumented targets takes about 7 minutes on 2 cores. In a git
# worktree build.rs watches a .git/HEAD that does not exist, so every run rebuilds the
# quantbench crate (about 2 minutes); to fuzz again without that, run the binary directly:
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/corpus/TARGET -max_total_time=SECONDS
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
