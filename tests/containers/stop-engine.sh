#!/usr/bin/env bash
# Stop the registry and the Docker engine that start-engine.sh started (by their pid files).
set -uo pipefail
DIR=${SRPO_CONTAINERS_DIR:-/tmp/srpo-containers}
for name in registry dockerd; do
  pidfile=$DIR/$name.pid
  [[ -s $pidfile ]] || continue
  pid=$(cat "$pidfile")
  if kill -TERM "$pid" 2> /dev/null; then
    for _ in $(seq 60); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2> /dev/null && echo "stop-engine: $name (pid $pid) killed" \
      || echo "stop-engine: $name (pid $pid) stopped"
  fi
  rm -f "$pidfile"
done
