#!/usr/bin/env bash
# Check one CUDA machine with no package access, from the repository root, in one command:
#
#   bash benchmarks/gpu.sh WHEELS_DIR OUT_DIR [--part kernels|cli|bench|precision] [--variant V]
#
# WHEELS_DIR is made on a connected machine by `python -m benchmarks.offline_wheels` for this
# machine's Python (what it lacks beside its own CUDA torch). The wheels are installed offline
# into a folder layered over this Python (PYTHON, default python3) through PYTHONPATH, which
# every worker process inherits; then `python -m benchmarks.gpu_check OUT_DIR` probes the fused
# attention kernels, runs the tiny default's CLI path in every precision policy and with LoRA,
# `python -m benchmarks --suite gpu --size full` and the precision comparison, and writes every output,
# log and OUT_DIR/summary.json. Copy OUT_DIR/bench/gpu-latest.* and OUT_DIR/precision/* into
# benchmarks/results to commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: bash benchmarks/gpu.sh WHEELS_DIR OUT_DIR [--part NAME ...]" >&2
  exit 2
fi
wheels=$1 out=$2
shift 2
python=${PYTHON:-python3}
site=${SRPO_GPU_SITE:-${TMPDIR:-/tmp}/srpo-gpu-site}
mkdir -p "$out"
start=$SECONDS
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
echo "offline install: $((SECONDS - start)) s ($(find "$wheels" -name '*.whl' | wc -l) wheels)"
"$python" -m pip list --format=freeze >"$out/pip-freeze.txt" 2>/dev/null || true
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
"$python" -m benchmarks.gpu_check "$out" "$@" 2>&1 | tee "$out/gpu-check.log"
echo "gpu.sh: $((SECONDS - start)) s in all"
