#!/usr/bin/env bash
# Create .venv from the lock (idempotent: re-installs only when the lock changes) and install
# the srpo package into it. Used by the README's two commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.lock.sha256
want=$(sha256sum envs/main.lock.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install --quiet --require-hashes -r envs/main.lock.txt
  echo "$want" > "$stamp"
fi
.venv/bin/pip install --quiet --no-deps --no-build-isolation -e .
