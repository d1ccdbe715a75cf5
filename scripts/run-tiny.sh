#!/usr/bin/env bash
# The embedded tiny default, end to end on CPU: set up the environment, then run the whole
# Snakemake workflow (tiny models → HPD prompts → text embeddings → SRPO training with 2
# processes → sharded 50-step-style sampling of baseline and SRPO → HPSv2.1 / Aesthetic /
# PickScore → report). Outputs: results/tiny/, the report at results/tiny/report/report.md.
# Extra arguments go to snakemake (e.g. a target, or -n for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
snakemake --cores 2 "$@"
echo "report: results/tiny/report/report.md"
