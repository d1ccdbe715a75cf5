#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite stage by stage:
# lint → unit → distributed → workflow. Stops at the first failing stage.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONHASHSEED=0 HF_HUB_OFFLINE=1

stage() {
  local name=$1; shift
  local start=$SECONDS
  echo "=== stage: $name"
  "$@"
  echo "=== stage $name passed in $((SECONDS - start)) s"
}

stage setup bash -c 'bash scripts/setup.sh && .venv/bin/pip install --quiet --no-deps -r envs/test-reference.txt'
export PATH="$PWD/.venv/bin:$PATH"
stage lint bash -c 'ruff check . && ruff format --check . && snakefmt --check Snakefile workflow && snakemake --lint'
stage unit .venv/bin/python -m pytest -q tests/unit
stage distributed .venv/bin/python -m pytest -q tests/distributed
stage workflow .venv/bin/python -m pytest -q tests/workflow
echo "=== all stages passed in $SECONDS s"
