#!/usr/bin/env bash
# The gpu suite on one CUDA GPU (H100/H200 class), as one command from the repository root:
# set up .venv (as the README's quick start), then `srpo bench --suite gpu --size full`, which
# writes benchmarks/results/gpu-latest.{json,md}, and the three precision policies side by side
# (benchmarks/results/precision-full-gpu.{json,md}). Commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh
.venv/bin/srpo bench --suite gpu --size full "$@"
.venv/bin/python -m benchmarks.precision --size full
