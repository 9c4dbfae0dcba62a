#!/usr/bin/env bash
# slurm/cluster/start.sh - the project's local SLURM cluster for `make test-slurm` and CI.
# For Debian 12's slurm-wlm 22.05 and munge: 2 nodes n1, n2
# on 127.0.1.1/2, AuthInfo=cred_expire=10 so `scontrol requeue` restarts a job in ~11 s.
# Jobs run the repo's .venv python from the same filesystem, so nothing is installed on "nodes".
#
#   bash slurm/cluster/start.sh && export SLURM_CONF=/tmp/shardtrain-slurm/etc/slurm.conf
#
# Idempotent: installs slurm-wlm + munge if missing, (re)writes the config, starts munged,
# slurmctld and N slurmd instances (one per virtual node, Debian's build has MULTIPLE_SLURMD=Yes),
# and waits until `sinfo` shows every node idle. Re-running with an unchanged config and
# healthy daemons is a no-op; a changed config restarts the daemons (and wipes job state).
# Must run as root. Stop with slurm/cluster/stop.sh (kills only the PIDs recorded here).
#
# Knobs (environment):
#   SHARDTRAIN_SLURM_BASE       state/log/config dir           (default: /tmp/shardtrain-slurm)
#   SHARDTRAIN_SLURM_PORT       slurmctld port; slurmd ports are 17100+i (default: 6917, so a
#                               cluster on the default port 6817 can run beside it)
#   SLURM_LOCAL_NODES           number of virtual nodes        (default: 2)  -> n1..nN
#   SLURM_LOCAL_CPUS_PER_NODE   CPUs each node advertises      (default: nproc, at least 8, so that
#                               slurm/train.sbatch's default --cpus-per-task=8 fits). >nproc is
#                               allowed (oversubscription; task/none does no binding)
#   SLURM_LOCAL_FAKE_GPUS       fake "gpu" GRES per node (default: 0), backed by dummy device nodes.
#                               Lets jobs ask --gpus-per-node=K / --gres=gpu:K; sets SLURM_GPUS_ON_NODE
#                               and CUDA_VISIBLE_DEVICES=0..K-1 (do not use on a host with real GPUs).
#   SLURM_LOCAL_UTS             1 = run each slurmd in its own UTS namespace so `hostname` inside
#                               a job returns the node name (n1, n2..)  (default: 1)
#   SLURM_LOCAL_WAIT            seconds to wait for idle nodes (default: 60)
set -euo pipefail

BASE=${SHARDTRAIN_SLURM_BASE:-/tmp/shardtrain-slurm}
PORT=${SHARDTRAIN_SLURM_PORT:-6917}
NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS_PER_NODE:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
FAKE_GPUS=${SLURM_LOCAL_FAKE_GPUS:-0}
UTS=${SLURM_LOCAL_UTS:-1}
WAIT=${SLURM_LOCAL_WAIT:-60}
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state
CONF=$ETC/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[shardtrain-slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# pid_alive PIDFILE NAME -> true if the pid in PIDFILE is alive and its comm is NAME
pid_alive() {
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]
}

mkdir -p "$BASE"
# ---------------------------------------------------------------- 1. install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm + munge"
  # never let the packages' maintainer scripts start services with their default config
  tmp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; tmp_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >"$BASE/apt.log" 2>&1 || {
    apt-get update -q >>"$BASE/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$BASE/apt.log" 2>&1 || {
      [ $tmp_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; tail -20 "$BASE/apt.log"; die "apt-get install failed"; }
  }
  [ $tmp_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld"
for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/d/n$i"; done

# ---------------------------------------------------------------- 2. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  pid_alive "$RUN/munged.pid" munged && log "munged already running (ours, pid $(cat "$RUN/munged.pid"))" \
                                     || log "munged already running (not started by us; reusing it)"
else
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not come up (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$RUN/munged.pid"
fi

# ---------------------------------------------------------------- 3. config
# Node names n1..nN must resolve (jobs use them as MASTER_ADDR): give each its own loopback address.
for i in $(seq 1 "$NODES"); do
  grep -qE "^127\.0\.1\.$i[[:space:]]+n$i([[:space:]]|$)" /etc/hosts \
    || echo "127.0.1.$i n$i # shardtrain-slurm" >> /etc/hosts
done

HOST=$(hostname -s)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2/1024*0.95}' /proc/meminfo)
GRES_NODE="" GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$FAKE_GPUS"; fi

new=$(mktemp)
cat > "$new" <<EOF
# generated by slurm/cluster/start.sh - do not edit
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs may not restart before the credential expires (default 120 s)
AuthInfo=cred_expire=10
SlurmctldPort=$PORT
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: plain process tracking, no task binding, no accounting DB
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# finished jobs stay visible to 'scontrol show job' / squeue -t all for 30 min (no sacct here)
MinJobAge=1800
KillWait=5
InactiveLimit=0
$GRES_TYPES
EOF
for i in $(seq 1 "$NODES"); do
  echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.1.$i Port=$((17100+i)) CPUs=$CPUS RealMemory=$MEM_MB $GRES_NODE State=UNKNOWN" >> "$new"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$new"

newgres=$(mktemp)
if [ "$FAKE_GPUS" -gt 0 ]; then
  # slurm 22.05 silently drops file-less GPUs ("Removing file-less GPU"), so give each fake GPU a
  # device node (a char device like /dev/null, 1:3). Only stat()ed by slurm; task/none => no device cgroup.
  mkdir -p "$BASE/dev"
  for g in $(seq 0 $((FAKE_GPUS-1))); do [ -c "$BASE/dev/fakegpu$g" ] || mknod -m 0666 "$BASE/dev/fakegpu$g" c 1 3; done
  echo "NodeName=n[1-$NODES] Name=gpu File=$BASE/dev/fakegpu[0-$((FAKE_GPUS-1))]" > "$newgres"
fi

changed=0
cmp -s "$new" "$CONF" || changed=1
if [ -s "$newgres" ]; then cmp -s "$newgres" "$ETC/gres.conf" || changed=1
else [ -e "$ETC/gres.conf" ] && changed=1; fi

if [ $changed = 1 ]; then
  if [ -e "$CONF" ]; then
    log "config changed: stopping old daemons and wiping job state"
    "$(dirname "$0")/stop.sh" --keep-munge || true
    rm -rf "$STATE/ctld"; mkdir -p "$STATE/ctld"
  fi
  mv "$new" "$CONF"; chmod 0644 "$CONF"
  if [ -s "$newgres" ]; then mv "$newgres" "$ETC/gres.conf"; chmod 0644 "$ETC/gres.conf"; else rm -f "$ETC/gres.conf" "$newgres"; fi
else
  rm -f "$new" "$newgres"
fi

# clients (sbatch/srun/squeue/scontrol) read /etc/slurm/slurm.conf unless SLURM_CONF is set
mkdir -p /etc/slurm
for f in slurm.conf gres.conf; do
  if [ -e "$ETC/$f" ]; then
    if [ -e "/etc/slurm/$f" ] || [ -L "/etc/slurm/$f" ]; then
      [ "$(readlink "/etc/slurm/$f")" = "$ETC/$f" ] \
        || log "NOTE: /etc/slurm/$f is not ours; clients need: export SLURM_CONF=$CONF"
    else ln -sfn "$ETC/$f" "/etc/slurm/$f"; fi
  elif [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$ETC/$f" ]; then rm -f "/etc/slurm/$f"
  fi
done

# ---------------------------------------------------------------- 4. daemons
if ! pid_alive "$RUN/slurmctld.pid" slurmctld; then
  log "starting slurmctld"
  slurmctld -i -f "$CONF"
fi
for _ in $(seq 1 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || { tail -20 "$LOG/slurmctld.log"; die "slurmctld not responding"; }

for i in $(seq 1 "$NODES"); do
  n=n$i
  pid_alive "$RUN/slurmd-$n.pid" slurmd && continue
  log "starting slurmd for node $n"
  if [ "$UTS" = 1 ] && unshare --uts -- true 2>/dev/null; then  # needs CAP_SYS_ADMIN; else plain slurmd
    # own UTS namespace => `hostname` in jobs on this node prints $n (network is still shared)
    unshare --uts -- sh -c "hostname $n && exec slurmd -f '$CONF' -N $n"
  else
    slurmd -f "$CONF" -N "$n"
  fi
done

# ---------------------------------------------------------------- 5. wait for idle
t0=$(date +%s)
while :; do
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
  bad=$(echo "$states" | awk '$2 != "idle" && $2 != "mixed" && $2 != "allocated"')
  [ -n "$states" ] && [ -z "$bad" ] && break
  # a node left DOWN/DRAINED from an earlier life: resume it once it responds
  echo "$bad" | awk '$2 ~ /^(down|drained|draining)$/ {print $1}' | while read -r n; do
    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done
  if [ $(( $(date +%s) - t0 )) -ge "$WAIT" ]; then
    echo "$states" >&2; tail -n 5 "$LOG"/slurmd-*.log >&2; die "nodes not idle after ${WAIT}s"
  fi
  sleep 0.5
done
log "ready: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')(config: $CONF)"
