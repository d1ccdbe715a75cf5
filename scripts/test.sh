#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite stage by stage:
# lint → unit → distributed → torch-floor → bench → workflow → metric-envs → slurm → containers.
# Stops at the first failing stage. `bash scripts/test.sh STAGE...` runs only those stages (setup
# always runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONHASHSEED=0 HF_HUB_OFFLINE=1

only=" $* "
stage() {
  local name=$1; shift
  [[ $name == setup ]] || selected "$name" || return 0
  local start=$SECONDS
  echo "=== stage: $name"
  "$@"
  echo "=== stage $name passed in $((SECONDS - start)) s"
}

selected() { [[ $only == "  " || $only == *" $1 "* ]]; }

# The metric environments belong to setup: the tiny default scores HPSv3 in its own (workflow).
stage setup bash -c 'bash scripts/setup.sh && .venv/bin/pip install --quiet --no-deps --require-hashes -r envs/test-reference.lock.txt &&
  bash envs/metric-env.sh hpsv3 && bash envs/metric-env.sh imagereward'
export PATH="$PWD/.venv/bin:$PATH"
# Two long installs run in the background while the stages before theirs run (those leave a core
# free); the stage that needs one waits for it. A stage failing first ends the run: the installs
# stop with it (they start afresh next time).
# - .venv-torch-floor, the oldest supported torch, a download of several GB (torch-floor stage);
# - the CPU images (containers stage): the engine and the local registry start here (their
#   apt-get before any other stage's) at the lowest CPU priority, which dockerd's builds and
#   pushes inherit. The digests go into a copy of config/containers.yaml: the real one names no
#   image until the containers stage pushes again (cached: only the digests are written).
mkdir -p build
floor_log=build/torch-floor-env.log images_log=build/containers-build.log
floor_pid= images_pid= engine_started=
stop_background() {
  [[ -z $floor_pid ]] || kill "$floor_pid" 2> /dev/null || true
  [[ -z $images_pid ]] || kill -- "-$images_pid" 2> /dev/null || true
  [[ -z $engine_started ]] || bash tests/containers/stop-engine.sh
}
trap stop_background EXIT
# await_background PID_VARIABLE LOG WHAT: wait for that background job (its log and a line on
# failure), then clear the variable so that stop_background leaves it alone.
await_background() {
  local start=$SECONDS
  wait "${!1}" || { cat "$2"; echo "$3 failed (log: $2)" >&2; return 1; }
  printf -v "$1" ''
  echo "waited $((SECONDS - start)) s for $3"
}
if selected torch-floor; then
  bash envs/torch-floor-env.sh > "$floor_log" 2>&1 &
  floor_pid=$!
fi
if selected containers; then
  engine_started=1
  nice -n 19 bash tests/containers/start-engine.sh
  cp config/containers.yaml build/containers-background.yaml
  setsid -w nice -n 19 bash containers/build.sh --variant cpu --push 127.0.0.1:5000/srpo-workflow \
    --config build/containers-background.yaml > "$images_log" 2>&1 &
  images_pid=$!
fi
# `snakemake --lint` with published images runs in the containers stage, once they exist (the
# workflow stage checks its one notice before then).
stage lint bash -c 'ruff check . && ruff format --check . && snakefmt --check Snakefile workflow &&
  hadolint containers/Dockerfile && python containers/check.py dockerfile containers/Dockerfile &&
  bash envs/lock.sh --check'
stage unit .venv/bin/python -m pytest -q tests/unit
stage distributed .venv/bin/python -m pytest -q tests/distributed
# The bf16 / autocast training paths once more under the oldest torch pyproject.toml allows
# (envs/torch-floor.in): GPU machines often have an older torch than the main lock, and FSDP2's
# input cast under activation checkpointing differs there (GPU-FINDINGS bugs 2-3). Its bin/ goes
# first on PATH, so nothing started by name (torchrun) falls back to .venv; the workers of the
# tests and benchmarks run sys.executable, and the first line checks that it is this one.
torch_floor_stage() {
  await_background floor_pid "$floor_log" "the background install of .venv-torch-floor"
  tail -n 1 "$floor_log"
  torch_floor_tests
}
torch_floor_tests() (
  export PATH="$PWD/.venv-torch-floor/bin:$PATH"
  python -c 'import sys, torch; print(sys.prefix, "torch", torch.__version__)
assert sys.prefix.endswith(".venv-torch-floor") and torch.__version__.startswith("2.11."), torch.__version__'
  python -m pytest -q tests/unit/test_precision.py \
    tests/distributed/test_learning.py::test_bf16_precision_policies_train \
    tests/distributed/test_learning.py::test_fsdp2_gradients_equal_plain_autograd
  out=$(mktemp -d)
  python -m benchmarks --suite gpu --size smoke --out-dir "$out"
  python -m benchmarks.precision --size smoke --out-dir "$out"
)
stage torch-floor torch_floor_stage
# Both benchmark suites' and the precision comparison's code paths on the CPU (figures go to a
# temporary folder; no timing is asserted): the committed figures come from their full sizes.
# Then the GPU machine check's own path (benchmarks/gpu.sh, nothing to install) on its fp32
# variant: train, SIGTERM, resume, export, sample, score.
stage bench bash -c 'out=$(mktemp -d) && python -m benchmarks --suite cpu --size smoke --out-dir "$out" &&
  python -m benchmarks --suite gpu --size smoke --out-dir "$out" &&
  python -m benchmarks.precision --size smoke --out-dir "$out" &&
  mkdir "$out/no-wheels" && bash benchmarks/gpu.sh "$out/no-wheels" "$out/check" --part cli --variant fp32'
# Debian's Chromium for the HTML report's browser test (installed once; needs root).
stage workflow bash -c 'bash tests/workflow/install-browser.sh &&
  SRPO_REQUIRE_BROWSER=1 .venv/bin/python -m pytest -q tests/workflow'
stage metric-envs bash -c 'set -e
  .venv-hpsv3/bin/python -m pytest -q tests/metric_envs/test_hpsv3.py tests/metric_envs/test_hpsv3_reward.py \
    tests/metric_envs/test_hpsv3_training.py
  .venv-imagereward/bin/python -m pytest -q tests/metric_envs/test_imagereward.py
  SRPO_REQUIRE_METRIC_ENVS=1 .venv/bin/python -m pytest -q tests/metric_envs/test_all_metrics.py'
slurm_stage() (
  bash tests/slurm/start-cluster.sh
  trap 'bash tests/slurm/stop-cluster.sh' EXIT
  SLURM_CONF=${SRPO_SLURM_DIR:-/tmp/srpo-slurm}/slurm.conf SRPO_REQUIRE_SLURM=1 \
    .venv/bin/python -m pytest -q tests/slurm
)
stage slurm slurm_stage
# The CPU images of the three environments, pushed to a local registry: containers/build.sh
# (built and pushed in the background already) writes their digests into config/containers.yaml
# (restored afterwards), which the lint, the paper dry run and the in-container tiny workflow
# then use.
containers_stage() {
  await_background images_pid "$images_log" "the background build of the images"
  grep -E '^(cpu base|built|pushed) ' "$images_log"
  containers_tests
}
containers_tests() (  # the engine and registry were started with the background build
  saved=${SRPO_CONTAINERS_DIR:-/tmp/srpo-containers}/containers.yaml.orig
  cp config/containers.yaml "$saved"
  trap 'cp "$saved" config/containers.yaml; bash tests/containers/stop-engine.sh' EXIT
  bash containers/build.sh --variant cpu --push 127.0.0.1:5000/srpo-workflow
  snakemake --lint
  SRPO_REQUIRE_CONTAINERS=1 .venv/bin/python -m pytest -q tests/containers
)
stage containers containers_stage
echo "=== all stages passed in $SECONDS s"
