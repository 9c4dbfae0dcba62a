#!/usr/bin/env bash
# slurm/cluster/stop.sh - stop exactly the daemons slurm/cluster/start.sh started (PID files in $BASE/run).
# Idempotent: a second call finds no PID files and does nothing.
#   --keep-munge  leave munged running
#   --purge       also remove the /etc/hosts lines and /etc/slurm symlinks the start script added
set -uo pipefail
BASE=${SHARDTRAIN_SLURM_BASE:-/tmp/shardtrain-slurm}
RUN=$BASE/run
export SLURM_CONF=$BASE/etc/slurm.conf
keep_munge=0 purge=0
for a in "$@"; do case $a in --keep-munge) keep_munge=1;; --purge) purge=1;; esac; done
log() { echo "[shardtrain-slurm] $*" >&2; }

pid_of() {  # pid_of PIDFILE NAME -> echo pid if alive and comm matches
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] && echo "$pid"
}
stop_pids() {  # stop_pids NAME PIDFILE... : SIGTERM all (in parallel), wait up to 10 s, then SIGKILL
  local name=$1 f pid pids=""; shift
  for f in "$@"; do
    [ -e "$f" ] || continue
    if pid=$(pid_of "$f" "$name"); then log "stopping $name pid $pid ($(basename "$f"))"; kill -TERM "$pid" 2>/dev/null; pids="$pids $pid"; fi
    rm -f "$f"
  done
  for _ in $(seq 1 100); do
    local alive=""; for pid in $pids; do [ -d "/proc/$pid" ] && alive="$alive $pid"; done
    pids=$alive; [ -z "$pids" ] && return 0; sleep 0.1
  done
  for pid in $pids; do log "$name pid $pid still alive, SIGKILL"; kill -KILL "$pid" 2>/dev/null; done
}

# 1. cancel jobs on our cluster so no slurmstepd/job processes are orphaned
if pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null && ids=$(squeue -h -o %i 2>/dev/null) && [ -n "$ids" ]; then
  log "cancelling jobs: $(echo $ids)"
  scancel $ids 2>/dev/null || true
  for _ in $(seq 1 30); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi
# 2. slurmd instances, then slurmctld, then munged (only if we started it)
stop_pids slurmd "$RUN"/slurmd-*.pid
stop_pids slurmctld "$RUN/slurmctld.pid"
[ $keep_munge = 1 ] || stop_pids munged "$RUN/munged.pid"

if [ $purge = 1 ]; then
  sed -i '/# shardtrain-slurm$/d' /etc/hosts
  for f in slurm.conf gres.conf; do
    [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$BASE/etc/$f" ] && rm -f "/etc/slurm/$f"
  done
  log "purged /etc/hosts entries and /etc/slurm symlinks"
fi
exit 0
