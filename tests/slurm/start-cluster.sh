#!/usr/bin/env bash
# Start a one-node local Slurm cluster (Debian's slurm-wlm 22.05 + munge) for tests and demos.
#
#   sudo tests/slurm/start-cluster.sh          # state in /tmp/srpo-slurm (or $SRPO_SLURM_DIR)
#   export SLURM_CONF=/tmp/srpo-slurm/slurm.conf   # (/etc/slurm/slurm.conf also links to it)
#   tests/slurm/stop-cluster.sh                # stops it again
#
# Idempotent: with the cluster already up it only reports it. Must run as root (apt-get, mknod,
# munged as user munge, SlurmUser=root). Accounting is off (no slurmdbd): see README.md.
set -euo pipefail

DIR="${SRPO_SLURM_DIR:-/tmp/srpo-slurm}"
CONF="$DIR/slurm.conf"
WAIT_S=60

die() { echo "start-cluster: $*" >&2; exit 1; }
log() { echo "start-cluster: $*"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, mknod, munged as user munge)"

# True if the pid in file $1 is alive and is the program $2 (a stale pid file can name a pid
# that the kernel has since given to an unrelated process).
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

# Client calls block ~10 s each when the controller is down: always wrap them in `timeout`.
sq() { SLURM_CONF="$CONF" timeout 10 "$@"; }

# Slurm names the node by the short host name (gethostname up to the first dot).
NODE="$(hostname -s)"

node_state() { sq sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 || true; }

report() {
    sq sinfo || true
    echo
    echo "Slurm is up (state in $DIR). Point clients at it with:"
    echo "  export SLURM_CONF=$CONF"
    echo "(or: source $DIR/env.sh)"
}

# ---- already running? -------------------------------------------------------------------
if pid_alive "$DIR/slurmctld.pid" slurmctld && pid_alive "$DIR/slurmd.pid" slurmd; then
    log "cluster already running (slurmctld pid $(cat "$DIR/slurmctld.pid"), slurmd pid $(cat "$DIR/slurmd.pid")); nothing to do"
    report
    exit 0
fi

# ---- packages ------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    }
    # A fresh image may have no package lists yet: update once and retry.
    apt_install || { apt-get update -qq >/dev/null && apt_install; } \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# ---- munge -------------------------------------------------------------------------------
# The package creates the munge user and usually a key, but no init system runs here, so
# nothing starts munged; and /run/munge (a tmpfs path) may be missing after a reboot.
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge

mkdir -p "$DIR"
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already answering; reusing it"
else
    # munged refuses to run as root unless forced; run it as its own user as packaged.
    runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n </dev/null | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
    # Remember that WE started it, so stop-cluster.sh stops only a munged of ours.
    cp /run/munge/munged.pid "$DIR/munged.pid"
fi

# ---- configuration -----------------------------------------------------------------------
CPUS="$(nproc --all)"
MEM_MB="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
# RealMemory above what slurmd measures drains the node ("Low RealMemory"): stay ~5% below.
REAL_MB=$(( MEM_MB * 95 / 100 ))

mkdir -p "$DIR/ctld-state" "$DIR/slurmd-spool"

# Fake GPUs. gres File= entries must be character devices: regular files (and count-only
# gres lines with AutoDetect=off) are rejected and drain the node. c 1 3 is /dev/null's.
for i in 0 1; do
    dev="$DIR/gpu$i"
    if [ ! -c "$dev" ]; then
        rm -f "$dev"
        mknod "$dev" c 1 3
    fi
done

cat >"$CONF" <<EOF
# Written by tests/slurm/start-cluster.sh; rewritten on every start.
ClusterName=srpo-local
# The controller listens on loopback; the name must be the short host name.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups needed (containers often lack a writable cgroup tree).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without DefMemPerCPU every job is given the whole node's memory and jobs run one at a time.
DefMemPerCPU=1000
# No slurmdbd: no accounting. Snakemake's slurm plugin must poll with squeue, not sacct.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# (No AccountingStorageTRES=gres/gpu: slurmctld exits "slurmdbd is required to run with TRES
# gres/gpu". "scontrol -d show job" still lists the GPUs: JOB_GRES=, TresPerJob=.)
JobCompType=jobcomp/none
# A node that was down (daemon restart) comes back by itself.
ReturnToService=2
MailProg=/bin/true
# Cancelled / timed-out jobs: SIGKILL 2 s after SIGTERM (default 30 s).
KillWait=2
# Schedule promptly: a periodic pass every 2 s besides the event-driven ones.
SchedulerParameters=sched_interval=2,sched_min_interval=100000
# Finished jobs stay visible to squeue for 300 s. The Snakemake slurm plugin falls back from
# squeue to sacct when MinJobAge < 3 x its first status interval (40 s): keep it >= 120.
MinJobAge=300
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
StateSaveLocation=$DIR/ctld-state
SlurmdSpoolDir=$DIR/slurmd-spool
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# gres.conf is read from the directory of slurm.conf.
cat >"$DIR/gres.conf" <<EOF
# Written by tests/slurm/start-cluster.sh: two fake GPUs (character devices, see above).
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/gpu[0-1]
EOF

echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"

# Clients also need the config at the default path /etc/slurm/slurm.conf: Snakemake's slurm
# jobstep plugin strips every SLURM_* variable (SLURM_CONF included) from the environment of
# the `srun` it runs inside each job, and that srun then fails with "Could not establish a
# configuration source". The canonical copy stays in $DIR; /etc/slurm gets a symlink to it.
# A real file there (a site's own config) is left alone, with a warning.
ETC_CONF=/etc/slurm/slurm.conf
if [ -e "$ETC_CONF" ] && [ ! -L "$ETC_CONF" ]; then
    echo "start-cluster: WARNING: $ETC_CONF is a real file, not replaced; jobs run by Snakemake" \
        "(nested srun without SLURM_CONF) will use it, not $CONF" >&2
else
    mkdir -p /etc/slurm
    ln -sfn "$CONF" "$ETC_CONF"
fi

# ---- daemons -----------------------------------------------------------------------------
# Both daemonise and write their pid files into $DIR. -f and SLURM_CONF name the config
# explicitly; gres.conf is read from the same directory.
export SLURM_CONF="$CONF"
if ! pid_alive "$DIR/slurmctld.pid" slurmctld; then
    rm -f "$DIR/slurmctld.pid"
    slurmctld -f "$CONF" || die "slurmctld failed to start (see $DIR/slurmctld.log)"
fi
if ! pid_alive "$DIR/slurmd.pid" slurmd; then
    rm -f "$DIR/slurmd.pid"
    slurmd -f "$CONF" || die "slurmd failed to start (see $DIR/slurmd.log)"
fi

# ---- wait for the node ---------------------------------------------------------------------
# Both daemons fork before reading all of their configuration, so a fatal config error (one
# met: AccountingStorageTRES=gres/gpu without slurmdbd) only shows as the daemon vanishing.
# Check that they are still alive rather than waiting out the full timeout.
daemons_alive() {
    local d line
    for d in slurmctld slurmd; do
        if ! pid_alive "$DIR/$d.pid" "$d"; then
            line="$(grep -E 'fatal|error' "$DIR/$d.log" 2>/dev/null | tail -n1 || true)"
            die "$d exited during start-up: ${line:-see $DIR/$d.log} (run stop-cluster.sh to clean up)"
        fi
    done
}
started=$SECONDS
deadline=$(( SECONDS + WAIT_S ))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    # Give the forked daemons a moment to write their pid files before checking them.
    [ $(( SECONDS - started )) -ge 2 ] && daemons_alive
    state="$(node_state)"
    case "$state" in
        idle | mixed | allocated) break ;;
        # Left drained/down by an earlier bad config or an unclean stop: resume it.
        *drain* | down* | fail*)
            sq scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle | mixed | allocated) ;;
    *)
        reason="$(sq scontrol show node "$NODE" 2>/dev/null | grep -o 'Reason=.*' || true)"
        die "node $NODE not idle after ${WAIT_S}s (state '${state:-unknown}'; ${reason:-no reason}; logs in $DIR)" ;;
esac

report
