#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite stage by stage:
# lint → unit → distributed → workflow → metric-envs → slurm. Stops at the first failing stage.
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
stage metric-envs bash -c 'set -e
  bash envs/metric-env.sh hpsv3 && bash envs/metric-env.sh imagereward
  .venv-hpsv3/bin/python -m pytest -q tests/metric_envs/test_hpsv3.py
  .venv-imagereward/bin/python -m pytest -q tests/metric_envs/test_imagereward.py
  SRPO_REQUIRE_METRIC_ENVS=1 .venv/bin/python -m pytest -q tests/metric_envs/test_all_metrics.py'
slurm_stage() {
  bash tests/slurm/start-cluster.sh
  trap 'bash tests/slurm/stop-cluster.sh' EXIT
  SLURM_CONF=${SRPO_SLURM_DIR:-/tmp/srpo-slurm}/slurm.conf SRPO_REQUIRE_SLURM=1 \
    .venv/bin/python -m pytest -q tests/slurm
}
stage slurm slurm_stage
echo "=== all stages passed in $SECONDS s"
