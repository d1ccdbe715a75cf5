#!/usr/bin/env bash
# Start what the container tests need: the Docker engine (dockerd) and a local registry
# (Debian's docker-registry on 127.0.0.1:5000), installing them first when missing.
#
#   tests/containers/start-engine.sh     # state in /tmp/srpo-containers (or $SRPO_CONTAINERS_DIR)
#   tests/containers/stop-engine.sh      # stops what this script started, by pid
#
# Idempotent: an engine or registry already answering is used as it is (and not stopped later).
# Must run as root (apt-get, dockerd).
set -euo pipefail
DIR=${SRPO_CONTAINERS_DIR:-/tmp/srpo-containers}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DIR"
log() { echo "start-engine: $*"; }

missing=()
command -v dockerd > /dev/null || missing+=(docker.io)
command -v debootstrap > /dev/null || missing+=(debootstrap)
command -v docker-registry > /dev/null || missing+=(docker-registry)
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q > "$DIR/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >> "$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; exit 1; }
fi

wait_for() {  # wait_for WHAT COMMAND...: up to 30 s
  for _ in $(seq 60); do "${@:2}" > /dev/null 2>&1 && return 0; sleep 0.5; done
  echo "start-engine: $1 did not come up; see $DIR/$1.log" >&2
  exit 1
}

if docker info > /dev/null 2>&1; then log "docker engine already running"
else
  dockerd > "$DIR/dockerd.log" 2>&1 &
  echo $! > "$DIR/dockerd.pid"
  wait_for dockerd docker info
  log "dockerd started (pid $(cat "$DIR/dockerd.pid"))"
fi

if curl -fsS http://127.0.0.1:5000/v2/ > /dev/null 2>&1; then log "registry already running"
else
  sed "s|/tmp/srpo-containers|$DIR|" "$HERE/registry.yml" > "$DIR/registry.yml"
  docker-registry serve "$DIR/registry.yml" > "$DIR/registry.log" 2>&1 &
  echo $! > "$DIR/registry.pid"
  wait_for registry curl -fsS http://127.0.0.1:5000/v2/
  log "registry started on 127.0.0.1:5000 (pid $(cat "$DIR/registry.pid"))"
fi
