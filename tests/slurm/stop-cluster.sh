#!/usr/bin/env bash
# Stop the local Slurm cluster started by start-cluster.sh: slurmd, slurmctld, then munged
# (only a munged that start-cluster.sh started itself). Idempotent: stopping a stopped
# cluster does nothing. Processes are found only through the pid files in the state folder,
# never by name. Running jobs are killed with slurmd; the state folder (config, logs,
# saved controller state) is kept. Remove it by hand for a clean slate.
set -euo pipefail

DIR="${SRPO_SLURM_DIR:-/tmp/srpo-slurm}"

# stop NAME PIDFILE: SIGTERM the pid in PIDFILE if it is still NAME, wait up to 15 s, then
# SIGKILL. The comm check avoids killing an unrelated process that reused a stale pid.
stop() {
    local name="$1" pidfile="$2" pid
    if [ ! -s "$pidfile" ]; then
        echo "stop-cluster: $name: no pid file, not running"
        return 0
    fi
    pid="$(cat "$pidfile")"
    if [ ! -r "/proc/$pid/comm" ] || [ "$(cat "/proc/$pid/comm")" != "$name" ]; then
        echo "stop-cluster: $name: pid $pid not running (stale pid file removed)"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        echo "stop-cluster: $name: pid $pid ignored SIGTERM for 15 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while [ -d "/proc/$pid" ]; do sleep 0.1; done
    fi
    rm -f "$pidfile"
    echo "stop-cluster: $name (pid $pid) stopped"
}

# slurmd first (it kills its job steps), then the controller, then munge they both use.
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munged.pid"

# The /etc/slurm/slurm.conf link start-cluster.sh made, when it still points here: left behind,
# it sends every client to the stopped controller, and `scontrol` waits for it (Snakemake's
# slurm plugin runs one, with a 10 s timeout, each time it is imported).
ETC_CONF=/etc/slurm/slurm.conf
if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$DIR/slurm.conf" ]; then
    rm -f "$ETC_CONF"
    echo "stop-cluster: $ETC_CONF link removed"
fi
