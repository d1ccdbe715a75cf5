#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite stage by stage:
# lint → unit → distributed. Stops at the first failing stage.
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
stage lint bash -c '.venv/bin/ruff check . && .venv/bin/ruff format --check .'
stage unit .venv/bin/python -m pytest -q -m "not distributed" tests/unit
stage distributed .venv/bin/python -m pytest -q tests/distributed
echo "=== all stages passed in $SECONDS s"
