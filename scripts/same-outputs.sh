#!/usr/bin/env bash
# Whether two commits write the same tiny-default outputs (a redesign must not change a byte):
# each commit in turn is checked out as a git worktree at the same path (outputs record absolute
# paths), build/same-outputs/tree, run through the whole workflow with this checkout's
# environments (the worktree's code first on PYTHONPATH), and its results/ kept beside; the two
# are compared by scripts/compare_outputs.py.
# Usage: bash scripts/same-outputs.sh BASE [OTHER]   (OTHER defaults to HEAD; run setup first:
# bash scripts/run-tiny.sh -n)
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bash scripts/same-outputs.sh BASE [OTHER]} other=${2:-HEAD}
repo=$PWD root=$PWD/build/same-outputs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONHASHSEED=0 HF_HUB_OFFLINE=1
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1767225600} PATH="$repo/.venv/bin:$PATH"

tree=$root/tree
run_at() {  # COMMIT NAME: the tiny default at COMMIT; its results in $root/NAME
  local start=$SECONDS
  git worktree remove --force "$tree" 2> /dev/null || rm -rf "$tree"
  git worktree add --quiet --detach "$tree" "$1"
  (cd "$tree" && PYTHONPATH=$tree snakemake --cores 2 --quiet > "$root/$2.log" 2>&1) ||
    { tail -n 30 "$root/$2.log"; echo "same-outputs: the tiny default failed at $1" >&2; exit 1; }
  rm -rf "${root:?}/$2" && mv "$tree/results" "$root/$2"
  git worktree remove --force "$tree"
  echo "$2 ($(git rev-parse --short "$1")): tiny default in $((SECONDS - start)) s"
}

mkdir -p "$root"
run_at "$base" base
run_at "$other" other
python scripts/compare_outputs.py "$root/base" "$root/other"
