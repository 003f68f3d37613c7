#!/usr/bin/env bash
# Fetch NVRTC (the CUDA run-time compiler) through pip, so the kernel compile test runs
# on machines without CUDA: the wheel nvidia-cuda-nvrtc 13.0.88 (CUDA 13.0, the toolkit
# of the GPU machines: PTX from a newer NVRTC would not load on their driver), sha256
# pinned, unpacked once into $QUANTBENCH_CACHE (else ~/.cache/quantbench)/nvrtc/13.0.88.
# The library folder (nvidia/cu13/lib, holding libnvrtc.so.13) is printed on stdout;
# the crate also looks there by itself (src/backend/cuda/libs.rs).
#
# Exit codes: 0 ready; 3 the download is impossible here (no network, no pip); 1 anything
# else (a hash mismatch is an error, never a skip).
set -euo pipefail

version=13.0.88
sha=ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
cache="${QUANTBENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantbench}/nvrtc"
dest="$cache/$version"

if [ ! -f "$dest/.complete" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.fetch-$version.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching nvidia-cuda-nvrtc==$version (pip) into $dest" >&2
  if ! timeout 900 python3 -m pip download --quiet --no-deps --only-binary=:all: \
      "nvidia-cuda-nvrtc==$version" -d "$tmp/wheel" >&2; then
    echo "fetch_nvrtc.sh: pip could not download nvidia-cuda-nvrtc==$version (no network or no pip?)" >&2
    exit 3
  fi
  wheel=$(ls "$tmp"/wheel/*.whl)
  if ! echo "$sha  $wheel" | sha256sum --check --quiet >&2; then
    echo "fetch_nvrtc.sh: $wheel does not have the pinned sha256 $sha" >&2
    exit 1
  fi
  python3 -m zipfile -e "$wheel" "$tmp/unpacked"
  touch "$tmp/unpacked/.complete"
  rm -rf "${dest:?}"
  mv "$tmp/unpacked" "$dest"
fi
lib="$dest/nvidia/cu13/lib"
if [ ! -f "$lib/libnvrtc.so.13" ]; then
  echo "fetch_nvrtc.sh: $lib/libnvrtc.so.13 missing from the unpacked wheel" >&2
  exit 1
fi
echo "$lib"
