#!/usr/bin/env bash
# Stop what scripts/local-slurm/start.sh started: cancel the jobs, then stop the slurmd(s),
# slurmctld, slurmdbd, mariadbd and munged, each by the pid in its pid file (never by name).
#   OVR_SLURM_KEEP_MUNGE=1   leave munged running
#   OVR_SLURM_KEEP_DB=1      leave mariadbd and slurmdbd running
set -uo pipefail

say() { echo "[local-slurm] $*" >&2; }
alive() { kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q '^Z'; }
running() { [ -s "$1" ] && alive "$(cat "$1")"; }
stop_pidfiles() { # SIGTERM every live pid named in the files, wait up to 20 s, SIGKILL what is left
  local f pid i left pids=()
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid="$(cat "$f")"
    if alive "$pid"; then
      say "stopping $(basename "$f" .pid) (pid $pid)"
      kill "$pid" 2>/dev/null
      pids+=("$pid")
    fi
  done
  for ((i = 0; i < 100; i++)); do
    left=0
    for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    alive "$pid" && { say "pid $pid still running: SIGKILL"; kill -9 "$pid"; }
  done
  rm -f "$@"
}

# jobs first, so that no job process outlives its slurmd
if running /run/slurmctld.pid && command -v squeue >/dev/null; then
  jobs="$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for ((i = 0; i < 150; i++)); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

stop_pidfiles /run/slurmd-node*.pid
stop_pidfiles /run/slurmctld.pid
if [ "${OVR_SLURM_KEEP_DB:-0}" != 1 ]; then
  stop_pidfiles /run/slurmdbd.pid
  stop_pidfiles /run/mysqld/mysqld.pid
fi
[ "${OVR_SLURM_KEEP_MUNGE:-0}" != 1 ] && stop_pidfiles /run/munge/munged.pid
say "stopped"
exit 0
