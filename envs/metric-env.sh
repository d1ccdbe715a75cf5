#!/usr/bin/env bash
# Create .venv-NAME, the environment of a metric whose published package cannot share the main
# environment (NAME: hpsv3 or imagereward; see the comments in envs/NAME.in for the conflicts).
#
# Why layered: the metric packages clash with the main environment only in a few pure-Python
# packages (transformers 4 instead of 5, huggingface_hub, tokenizers, timm, ...), while both
# share torch 2.14.1 + torchvision 0.29.1 (about 6 GB). So .venv-NAME holds in its own
# site-packages only the pins of envs/NAME.lock.txt that the main .venv lacks or has at another
# version, and a .pth file appends the main .venv's site-packages AFTER its own: its pins win,
# everything else (torch, the editable srpo package) comes from the main .venv. Creating it takes
# seconds with a warm pip cache instead of a second 6 GB install. Packages that only the main
# .venv has stay importable here (open_clip, snakemake, ...); scoring does not use them.
#
# The metric's image (containers/Dockerfile, ENV_NAME=NAME) runs this same script over the main
# environment of the image, so the packages a metric runs with in its container are the very
# ones CI tests here; every pin is installed with its hashes from envs/NAME.lock.txt.
#
# Idempotent: the environment is re-built only when its lock or the main lock changes. Either
# way the commands `srpo-NAME` and `torchrun-NAME` (this environment's `srpo` and `torchrun`) are
# (re)written into the main .venv's bin/, so that the workflow's rules of this environment (its
# scoring; training with its reward) find them on the main PATH, here and in the image of NAME
# alike.
#
# Usage (from anywhere): bash envs/metric-env.sh NAME   (needs the main .venv first)
set -euo pipefail
name=${1:?usage: bash envs/metric-env.sh NAME}
root=$(cd "$(dirname "$0")/.." && pwd)
lock=$root/envs/$name.lock.txt
main=$root/.venv
venv=$root/.venv-$name
[[ -f $lock ]] || { echo "metric-env: no lock $lock (names: hpsv3, imagereward)" >&2; exit 1; }
[[ -x $main/bin/python ]] || { echo "metric-env: create the main environment $main first" >&2; exit 1; }

# `launcher FILE MODULE`: FILE runs `python -m MODULE` of this environment.
launcher() {
  printf '#!/bin/sh\nexec "%s" -m %s "$@"\n' "$venv/bin/python" "$2" > "$1"
  chmod +x "$1"
}
# This environment's srpo and torchrun on the main environment's PATH (torchrun's workers run
# the interpreter that runs it).
main_launchers() {
  launcher "$main/bin/srpo-$name" srpo
  launcher "$main/bin/torchrun-$name" torch.distributed.run
}
stamp=$venv/.locks.sha256
want=$(cat "$lock" "$root/envs/main.lock.txt" | sha256sum | cut -d' ' -f1)
if [[ -x $venv/bin/srpo && "$(cat "$stamp" 2> /dev/null)" == "$want" ]]; then
  main_launchers
  echo "$venv is up to date with its lock"
  exit 0
fi

rm -rf "$venv"
# Without pip or setuptools of its own: ensurepip's old setuptools would shadow the main one
# (torch needs setuptools >= 77). The main pip installs into it and serves `python -m pip`.
"$main/bin/python" -m venv --without-pip "$venv"
overlay=$venv/overlay.txt
# The lock's pins that the main environment does not satisfy at exactly that version.
"$main/bin/python" - "$lock" > "$overlay" <<'EOF'
import sys
from importlib import metadata

# A requirement of the lock is one logical line: `name==version \` and its `--hash=` lines.
text = open(sys.argv[1]).read().replace("\\\n", " ")
for line in text.splitlines():
    requirement = line.split("#")[0].strip()
    if not requirement:
        continue
    name, version = requirement.split()[0].split("==")
    try:
        present = metadata.version(name)
    except metadata.PackageNotFoundError:
        present = None
    if present != version:
        print(requirement)
EOF
if [[ -s $overlay ]]; then
  "$main/bin/pip" --python "$venv/bin/python" install --quiet --no-deps --require-hashes -r "$overlay"
fi

# Written last, so that pip above saw only this venv and never touched the main one. An `import`
# line (not a bare path) so that the main site-packages' own .pth files, srpo's editable finder
# among them, are processed too.
purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
main_site=$("$main/bin/python" -c "$purelib")
echo "import site; site.addsitedir('$main_site')" > "$("$venv/bin/python" -c "$purelib")/zz-main-venv.pth"
# The `srpo` command of this environment, also as `srpo-NAME` in the main one (score_<metric>
# rules run `srpo-NAME score`); the main .venv's console script would start the main interpreter.
launcher "$venv/bin/srpo" srpo
main_launchers
echo "$want" > "$stamp"
echo "created $venv: $(grep -c . "$overlay") packages of its own over $main"
