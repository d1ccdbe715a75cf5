#!/usr/bin/env bash
# Create .venv-torch-floor: the main environment with the OLDEST torch the code supports
# (pyproject.toml: torch>=2.11,<2.15) instead of the main lock's, for CI's torch-floor stage.
# GPU machines often come with an older torch than ours (the first one had 2.11.0), and a bug of
# that torch (FSDP2 under activation checkpointing, fixed in 2.13) hid behind the newest one.
#
# A venv of its own, not an overlay of .venv like envs/metric-env.sh's: torch, torchvision,
# triton and the CUDA libraries are exactly what differs (4.7 GB; 206 s here, ~8 min measured
# before with a colder pip cache).
#   1. envs/torch-floor.lock.txt: torch 2.11.0 + torchvision 0.26.0 and their own dependencies;
#   2. every other pin of envs/main.lock.txt, --no-deps (those packages were resolved against
#      torch 2.14; the floor stage is what tells whether they work on 2.11);
#   3. the srpo package, editable.
# Not the test-only packages of envs/test-reference.lock.txt: the stage's tests import none.
# Every install is --require-hashes.
#
# Idempotent: re-built only when one of those two locks changes (a stamp of their sha256, as
# scripts/setup.sh keeps for .venv); the editable install is cheap and always re-run.
#
# Usage (from anywhere): bash envs/torch-floor-env.sh      (PYTHON=python3.11 by default)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3.11}
venv=$root/.venv-torch-floor
locks=(envs/torch-floor.lock.txt envs/main.lock.txt)
stamp=$venv/.locks.sha256
want=$(cat "${locks[@]}" | sha256sum | cut -d' ' -f1)

if [[ -x $venv/bin/python && "$(cat "$stamp" 2> /dev/null)" == "$want" ]]; then
  echo "$venv is up to date with its locks"
else
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --quiet --require-hashes)
  "${pip[@]}" -r envs/torch-floor.lock.txt
  # The main lock's requirements (`name==version \` and its `--hash=` lines) whose name the
  # floor lock does not pin.
  rest=$venv/main-rest.txt
  "$venv/bin/python" - envs/torch-floor.lock.txt envs/main.lock.txt > "$rest" <<'EOF'
import re
import sys


def requirements(path):
    """{normalised name: the requirement's text with its --hash continuation lines}."""
    text = open(path).read().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name = requirement.split("==")[0]
            found[re.sub(r"[-_.]+", "-", name).lower()] = requirement
    return found


floor, main = requirements(sys.argv[1]), requirements(sys.argv[2])
for name, requirement in main.items():
    if name not in floor:
        print(requirement)
EOF
  "${pip[@]}" --no-deps -r "$rest"
  echo "$want" > "$stamp"
  echo "created $venv: $(grep -c '^[A-Za-z0-9]' envs/torch-floor.lock.txt) pins of the floor lock" \
    "+ $(grep -c . "$rest") of the main lock"
fi
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
"$venv/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
