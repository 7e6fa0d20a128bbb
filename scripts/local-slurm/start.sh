#!/usr/bin/env bash
# Start a real Slurm cluster (Debian's Slurm 22.05) on this one machine, to try slurm/*.sh and
# `ovr-hpc submit` without a cluster and to run tests/cluster/. Needs root and apt (Debian/Ubuntu).
#
#   sudo scripts/local-slurm/start.sh      # ~30 s the first time (apt), a few seconds later on
#   sudo scripts/local-slurm/stop.sh
#
# What it runs, without systemd: munged, mariadbd + slurmdbd (accounting: submitit reads job states
# from sacct), slurmctld, and one slurmd per node. Debian builds slurmd with multiple-slurmd support,
# so node1..nodeN are slurmd processes on this machine, each at its own loopback address
# (nodeI = 127.0.0.(10+I), added to /etc/hosts) and, by default, in its own UTS namespace so that
# `hostname` in a job says nodeI. Nothing listens beyond 127.0.0.0/8.
#
# Idempotent: installs what is missing, rewrites the configs, restarts the daemons only when a
# config changed or a daemon is not running, then waits until every node is idle.
#
# Knobs (environment):
#   OVR_SLURM_NODES=2   number of nodes
#   OVR_SLURM_GPUS=8    GPUs each node declares. Fake GPUs (plain files standing in for the device
#                       files, since Slurm 22.05 drops file-less GPUs): jobs asking for --gpus-per-node
#                       are scheduled as on a GPU cluster but see no GPU (torch falls back to CPU and
#                       gloo). 0 = declare none.
#   OVR_SLURM_UTS=1     0 = every node reports this machine's hostname
#   OVR_SLURM_CLEAN=0   1 = wipe controller state and the accounting database (job ids restart at 1)
#
# Partitions: `debug` (the default; its jobs can be preempted: PreemptMode=REQUEUE, GraceTime=60)
# and `urgent` (a higher PriorityTier: a job there preempts debug jobs). Requeue and scheduling
# latencies are cut from ~2 min to ~10 s (cred_expire, sched_interval).
set -euo pipefail

NODES="${OVR_SLURM_NODES:-2}"
GPUS="${OVR_SLURM_GPUS:-8}"
UTS="${OVR_SLURM_UTS:-1}"
CLEAN="${OVR_SLURM_CLEAN:-0}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ETC=/etc/slurm
LOGDIR=/var/log/slurm

say() { echo "[local-slurm] $*" >&2; }
die() { say "error: $*"; exit 1; }
running() { # running PIDFILE: the pid file names a live, non-zombie process
  local pid
  [ -s "$1" ] && pid="$(cat "$1")" && kill -0 "$pid" 2>/dev/null && ! ps -o stat= -p "$pid" | grep -q '^Z'
}
retry() { # retry SECONDS CMD...: run CMD every 0.2 s until it succeeds
  local tries=$(($1 * 5)) i
  shift
  for ((i = 0; i < tries; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
write_if_changed() { # write_if_changed FILE MODE < CONTENT: succeeds when FILE changed
  local new
  new="$(mktemp)"
  cat >"$new"
  if cmp -s "$new" "$1"; then rm -f "$new"; return 1; fi
  install -m "$2" "$new" "$1"
  rm -f "$new"
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
command -v apt-get >/dev/null || die "needs apt-get (Debian or Ubuntu)"

# --------------------------------------------------------------------------- packages
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --------------------------------------------------------------------------- configs
mkdir -p "$ETC" /var/spool/slurmctld "$LOGDIR"
for i in $(seq 1 "$NODES"); do
  mkdir -p "/var/spool/slurmd/node$i"
  grep -qE "^127\.0\.0\.$((10 + i))[[:space:]]+node$i([[:space:]]|$)" /etc/hosts \
    || echo "127.0.0.$((10 + i)) node$i" >>/etc/hosts
done

HOST="$(hostname -s)"
# this machine's CPU layout as slurmd detects it, e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1"
CPU_LAYOUT="$(slurmd -C | head -n1 | tr ' ' '\n' \
  | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)"
NODE_MEM_MB=$((MEM_MB * 8 / 10 / NODES)) # 80% of the RAM, split between the nodes
NODE_GRES=""
[ "$GPUS" -gt 0 ] && NODE_GRES="Gres=gpu:$GPUS "

node_lines() {
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.$((10 + i)) Port=$((17000 + i))" \
      "${CPU_LAYOUT}RealMemory=$NODE_MEM_MB ${NODE_GRES}State=UNKNOWN"
  done
}

CHANGED=0
write_if_changed "$ETC/slurm.conf" 644 <<CONF && CHANGED=1
# written by ovr-hpc scripts/local-slurm/start.sh (nodes=$NODES gpus=$GPUS uts=$UTS)
ClusterName=ovrlocal
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
# no cgroups in a container: track processes through /proc, no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
# schedule every 2 s instead of every 60 s, so freed and requeued jobs start quickly
SchedulerParameters=sched_interval=2,bf_interval=1
# a job in a higher PriorityTier partition preempts lower ones; the preempted job's steps get
# SIGTERM, GraceTime seconds to save, then the job is requeued
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF

FAKE_GPU_DIR=/var/spool/slurmd/fake-gpus
if [ "$GPUS" -gt 0 ]; then
  mkdir -p "$FAKE_GPU_DIR"
  for g in $(seq 0 $((GPUS - 1))); do touch "$FAKE_GPU_DIR/nvidia$g"; done
fi
write_if_changed "$ETC/gres.conf" 644 <<CONF && CHANGED=1
# fake GPUs: plain files named like device files (without any File=, Slurm 22.05 drops the GPUs)
$([ "$GPUS" -gt 0 ] && echo "NodeName=node[1-$NODES] Name=gpu File=$FAKE_GPU_DIR/nvidia[0-$((GPUS - 1))]")
CONF

write_if_changed "$ETC/slurmdbd.conf" 600 <<CONF && CHANGED=1
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=ovrlocal
StorageLoc=slurm_acct_db
CONF

slurm_daemons_up() { running /run/slurmctld.pid || running /run/slurmdbd.pid || ls /run/slurmd-node*.pid >/dev/null 2>&1; }
if [ "$CLEAN" = 1 ]; then
  say "clean start: stopping the Slurm daemons, wiping job state and accounting"
  OVR_SLURM_KEEP_MUNGE=1 bash "$HERE/stop.sh"
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/node*/*
elif [ "$CHANGED" = 1 ] && slurm_daemons_up; then
  say "config changed: restarting the Slurm daemons"
  OVR_SLURM_KEEP_MUNGE=1 OVR_SLURM_KEEP_DB=1 bash "$HERE/stop.sh"
fi

# --------------------------------------------------------------------------- munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! running /run/munge/munged.pid; then
  say "starting munged"
  rm -f /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
fi
retry 10 bash -c 'munge -n | unmunge' || die "munge does not work"

# --------------------------------------------------------------------------- accounting
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if ! running /run/mysqld/mysqld.pid; then
  say "starting mariadbd"
  setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 >>/var/log/mariadbd.log 2>&1 </dev/null &
  disown || true
fi
retry 60 mysqladmin ping || die "mariadb did not start, see /var/log/mariadbd.log"
[ "$CLEAN" = 1 ] && mysql -e "DROP DATABASE IF EXISTS slurm_acct_db;"
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ovrlocal';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
if ! running /run/slurmdbd.pid; then
  say "starting slurmdbd"
  slurmdbd
fi
retry 30 sacctmgr -n show cluster || die "slurmdbd does not answer, see $LOGDIR/slurmdbd.log"

# --------------------------------------------------------------------------- controller and nodes
if ! running /run/slurmctld.pid; then
  say "starting slurmctld"
  slurmctld
fi
retry 30 scontrol ping || die "slurmctld does not answer, see $LOGDIR/slurmctld.log"
for i in $(seq 1 "$NODES"); do
  running "/run/slurmd-node$i.pid" && continue
  say "starting slurmd node$i"
  if [ "$UTS" = 1 ]; then
    unshare --uts sh -c "hostname node$i && exec slurmd -N node$i"
  else
    slurmd -N "node$i"
  fi
done

# nodes an earlier run left down or drained come back
sleep 0.5
for i in $(seq 1 "$NODES"); do
  case "$(sinfo -h -n "node$i" -o %T 2>/dev/null || true)" in
    down* | drain*) scontrol update nodename="node$i" state=resume || true ;;
  esac
done
nodes_ready() {
  local states
  states="$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null)" || return 1
  [ "$(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states")" -eq "$NODES" ]
}
retry 60 nodes_ready || { sinfo -N -l >&2; die "nodes did not become idle, see $LOGDIR/slurmd-node*.log"; }
sinfo >&2
say "cluster up: $NODES nodes, $GPUS GPUs (fake) each"
