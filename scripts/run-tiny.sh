#!/usr/bin/env bash
# The embedded tiny default, end to end on CPU: set up the environments, then run the whole
# Snakemake workflow (tiny models → HPD prompts → text embeddings → SRPO training with 2
# processes → sharded sampling of baseline and SRPO → HPSv2.1 / HPSv3 / Aesthetic / PickScore
# (and ImageReward once `scored_metrics` names it) → report). Outputs: results/tiny/, the report
# at results/tiny/report/report.md.
# Extra arguments go to snakemake (e.g. a target, or -n for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
bash scripts/setup.sh
# The metric environments that cannot share the main one (srpo-hpsv3, srpo-imagereward); each
# is re-built only when its lock changes.
for env in hpsv3 imagereward; do bash envs/metric-env.sh "$env"; done
export PATH="$PWD/.venv/bin:$PATH"
snakemake --cores 2 "$@"
echo "report: results/tiny/report/report.md"
