#!/usr/bin/env bash
# Build the image of each environment of config/containers.yaml (or --config) from
# containers/Dockerfile, optionally push it and write its digest back into that config.
#
# Usage: bash containers/build.sh [--variant cuda|cpu] [--push REGISTRY] [--config FILE] [ENV ...]
#   --variant cuda   (default) FROM the CUDA runtime pinned by digest in the Dockerfile: clusters.
#   --variant cpu    FROM the base containers/cpu-base.sh builds from Debian packages: CI, laptops.
#   --push REGISTRY  push REGISTRY/srpo-ENV:VERSION-VARIANT and write its digest reference
#                    (docker://REGISTRY/srpo-ENV@sha256:…) to the containers config's `images`.
#   --config FILE    the containers config to read the environments from and write the digests
#                    into (default config/containers.yaml; pass a copy to push without changing it).
#   ENV ...          environments to build (default: every one in the containers config).
# Engine: ENGINE=docker (default) or podman. Local tags: srpo-ENV:VARIANT.
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
engine=${ENGINE:-docker}
variant=cuda
registry=
config=config/containers.yaml
envs=()
while (($#)); do
  case $1 in
    --variant) variant=${2:?--variant needs cuda or cpu}; shift 2 ;;
    --push) registry=${2:?--push needs a registry, e.g. ghcr.io/my-lab}; shift 2 ;;
    --config) config=$(cd "$caller" && realpath -m -- "${2:?--config needs a file}"); shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "build: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) envs+=("$1"); shift ;;
  esac
done
[[ $variant == cuda || $variant == cpu ]] || { echo "build: --variant: expected cuda or cpu, got '$variant'" >&2; exit 2; }
python=${PYTHON:-.venv/bin/python}
[[ -f $config ]] || { echo "build: --config: $config is not a file" >&2; exit 2; }
known=$(CONFIG=$config "$python" -c 'import os, yaml; print(*yaml.safe_load(open(os.environ["CONFIG"]))["containers"]["images"])')
((${#envs[@]})) || read -r -a envs <<< "$known"
for env in "${envs[@]}"; do
  [[ " $known " == *" $env "* ]] || { echo "build: $config: no environment '$env' (known: $known)" >&2; exit 2; }
done

build_args=()
if [[ $variant == cpu ]]; then
  start=$SECONDS
  base=$(bash containers/cpu-base.sh)
  build_args+=(--build-arg "BASE=$base")
  echo "cpu base $base ready in $((SECONDS - start)) s"
fi
[[ $engine == podman ]] && build_args+=(--format docker)
# pip in the build trusts the host's CA bundle too (needed where a proxy re-signs TLS).
mkdir -p build/containers
if [[ -n ${PIP_CERT:-} && -f $PIP_CERT ]]; then cp "$PIP_CERT" build/containers/extra-ca.crt
else : > build/containers/extra-ca.crt; fi

version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[[ -z $(git status --porcelain -- envs srpo pyproject.toml containers 2>/dev/null) ]] || commit="$commit-dirty"
main_lock=$(sha256sum envs/main.lock.txt | cut -d' ' -f1)

for env in "${envs[@]}"; do
  tag=srpo-$env:$variant
  start=$SECONDS
  echo "=== build $tag"
  "$engine" build --quiet -f containers/Dockerfile "${build_args[@]}" \
    --build-arg "ENV_NAME=$env" --build-arg "VERSION=$version" --build-arg "GIT_COMMIT=$commit" \
    --build-arg "MAIN_LOCK_SHA256=$main_lock" \
    --build-arg "LOCK_SHA256=$(sha256sum "envs/$env.lock.txt" | cut -d' ' -f1)" \
    -t "$tag" . > /dev/null
  echo "built $tag ($("$engine" image inspect --format '{{.Id}}' "$tag")) in $((SECONDS - start)) s"
  if [[ -n $registry ]]; then
    remote=$registry/srpo-$env:$version-$variant
    start=$SECONDS
    "$engine" tag "$tag" "$remote"
    "$engine" push --quiet "$remote" > /dev/null
    digest=$("$engine" image inspect --format '{{index .RepoDigests 0}}' "$remote")
    ref="docker://$registry/srpo-$env@${digest##*@}"
    sed -i -E "s|^(    $env:).*|\1 $ref|" "$config"
    echo "pushed $ref in $((SECONDS - start)) s ($config)"
  fi
done
