# shellcheck shell=bash
# What every stage's sbatch script shares: slurm/coldstart.sh (and later rl.sh, eval.sh) keep only
# their #SBATCH defaults and source this file. Not run on its own.
#
# In a job (`sbatch slurm/STAGE.sh CONFIG [key=value ...]`), ovr_main:
#   1. prints a header: job, nodes, tasks, GPUs, rendezvous, git commit, then the resolved config;
#   2. runs every pre-run check (`ovr-hpc check`, ovr_hpc/preflight.py) for this job's ranks before
#      anything starts, so a run that would fail ends within seconds with a message naming the fix;
#   3. starts one task per GPU with srun, each running `ovr-hpc STAGE CONFIG ...` (rank, local rank
#      and world size come from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, see ovr_hpc/dist.py);
#   4. reads the tasks' exit status. 75 means a signal asked them to stop, all ranks agreed at a step
#      boundary and saved one checkpoint together. If the job is still RUNNING (the signal was the
#      time-limit warning or a preemption notice), the script requeues it, at most OVR_MAX_REQUEUES
#      times; the next run resumes from OUTPUT_DIR/checkpoints/latest by itself. If Slurm is already
#      ending the job (scancel, scontrol requeue, the time limit), Slurm decides what happens next.
#
# On a login node (`slurm/STAGE.sh [SBATCH_OPTIONS --] CONFIG [key=value ...]`): runs the same checks
# for the ranks the job will have (the #SBATCH defaults with SBATCH_OPTIONS applied), then submits the
# same script with sbatch, so a run that would fail never reaches the queue.
#
# Environment:
#   OVR_PYTHON        command running a Python that imports ovr_hpc (default: the first of python3,
#                     python, ROOT/.venv/bin/python that does); may be a container wrapper, e.g.
#                     OVR_PYTHON="apptainer exec --nv image.sif python"
#   OVR_MAX_REQUEUES  the most times a job requeues itself (default 20; Slurm's own requeues count too)
#   OVR_SRUN_WAIT     seconds srun lets the other tasks run after one has exited (default 300), so a
#                     crashed rank ends the step instead of leaving the others blocked in a collective

OVR_EXIT_REQUEUE=75 # ovr_hpc.dist.EXIT_REQUEUE

ovr_say() { echo "[ovr-hpc $(date +%H:%M:%S)] $*"; }

# ovr_python ROOT: the Python command to use
ovr_python() {
  if [ -n "${OVR_PYTHON:-}" ]; then
    echo "$OVR_PYTHON"
    return
  fi
  local py
  for py in python3 python "$1/.venv/bin/python"; do
    if command -v "$py" >/dev/null && "$py" -c "import ovr_hpc" 2>/dev/null; then
      echo "$py"
      return
    fi
  done
  echo "ovr-hpc: no Python that imports ovr_hpc (tried python3, python, $1/.venv/bin/python); activate" \
    "the environment before sbatch (sbatch passes the environment on) or set OVR_PYTHON" >&2
  return 1
}

# Runtime defaults for the ranks; a value already exported wins.
ovr_export_defaults() {
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    # srun no longer inherits sbatch's --cpus-per-task (Slurm >= 22.05); pass it on
    export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
  fi
  # one OpenMP pool per rank sized to its own CPUs, not to every core of the node
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  # the tokenizers library's thread pool deadlocks in forked data-loader workers
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
  # log lines reach the job log when they are printed, not when a buffer fills
  export PYTHONUNBUFFERED=1
  # a failed or timed-out NCCL collective aborts the rank (and srun the step) instead of hanging
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  # NCCL prints warnings only; NCCL_DEBUG=INFO when chasing a hang or a slow ring
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # fewer fragmentation OOMs when packed sequence lengths vary from step to step
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
}

# Rank 0 runs on the first node of the job; the port comes from the job id, so jobs sharing a node do not
# collide (the same rule as ovr_hpc.dist.slurm_master_port). Ranks come from SLURM_* in each task, never
# from variables the job inherited.
ovr_export_rendezvous() {
  # A per-process rank inherited from the submitting shell (sbatch passes the environment on; e.g. submitted
  # from inside a torchrun worker or a notebook that ran torch.distributed) would make every task rank 0.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK TORCHELASTIC_RUN_ID
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
  MASTER_PORT=$((20000 + ${SLURM_JOB_ID%%_*} % 40000))
  export MASTER_ADDR MASTER_PORT
}

ovr_usage() {
  echo "usage: sbatch [SBATCH_OPTIONS] slurm/$1.sh CONFIG [key=value ...]" >&2
  echo "       slurm/$1.sh [SBATCH_OPTIONS --] CONFIG [key=value ...]   (check, then submit)" >&2
  exit 2
}

# ovr_main STAGE ROOT SCRIPT [SBATCH_OPTIONS --] CONFIG [key=value ...]
ovr_main() {
  local stage="$1" root="$2" script="$3"
  shift 3
  local py
  py="$(ovr_python "$root")" || exit 1
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    ovr_submit "$stage" "$root" "$script" "$py" "$@"
  else
    ovr_job "$stage" "$root" "$py" "$@"
  fi
}

# On a login node: check the config, then sbatch this same script.
ovr_submit() {
  local stage="$1" root="$2" script="$3" py="$4"
  shift 4
  local sbatch_args=() i
  for ((i = 1; i <= $#; i++)); do
    if [ "${!i}" = "--" ]; then
      sbatch_args=("${@:1:i-1}")
      set -- "${@:i+1}"
      break
    fi
  done
  [ $# -ge 1 ] || ovr_usage "$stage"
  if [ ${#sbatch_args[@]} = 0 ] && [ "${1:0:1}" = "-" ]; then
    echo "ovr-hpc: '$1' is not a config: sbatch options go before '--', e.g." \
      "slurm/$stage.sh $1 -- CONFIG [key=value ...]" >&2
    exit 2
  fi
  # every pre-run check, for the ranks the job will have (the #SBATCH defaults with these options applied)
  # shellcheck disable=SC2086 # OVR_PYTHON may be a command with arguments
  $py -m ovr_hpc.cli check "$stage" "$@" --quiet --sbatch-script "$script" \
    --sbatch-args "${sbatch_args[*]@Q}" || exit $?
  mkdir -p logs # the default --output folder; Slurm does not create it
  export OVR_HPC_ROOT="$root"
  exec sbatch "${sbatch_args[@]}" "$script" "$@"
}

# Inside the job: header, check, srun, requeue.
ovr_job() {
  local stage="$1" root="$2" py="$3"
  shift 3
  [ $# -ge 1 ] || ovr_usage "$stage"
  if [ "${1:0:1}" = "-" ]; then
    echo "ovr-hpc: '$1' is not a config: sbatch options go before the script," \
      "sbatch $1 slurm/$stage.sh CONFIG [key=value ...]" >&2
    exit 2
  fi
  local restarts="${SLURM_RESTART_COUNT:-0}" max_requeues="${OVR_MAX_REQUEUES:-20}"

  ovr_export_defaults
  ovr_export_rendezvous

  local commit dirty=""
  commit="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
  git -C "$root" diff --quiet HEAD -- 2>/dev/null || dirty=" (with uncommitted changes)"
  echo "=================================================================================="
  ovr_say "$stage: job $SLURM_JOB_ID, run $((restarts + 1)) (requeued $restarts times, at most $max_requeues)"
  echo "nodes     ${SLURM_JOB_NUM_NODES:-?}: ${SLURM_JOB_NODELIST:-?}"
  echo "tasks     ${SLURM_NTASKS:-?} (${SLURM_NTASKS_PER_NODE:-?} per node), ${SLURM_CPUS_PER_TASK:-?} CPUs each"
  echo "gpus      ${SLURM_GPUS_ON_NODE:-0} per node${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}"
  echo "master    $MASTER_ADDR:$MASTER_PORT"
  echo "commit    $commit$dirty ($root)"
  echo "python    $py"
  echo "command   ovr-hpc ${OVR_COMMAND:-$stage} $*"
  echo "config    (resolved)"
  # every pre-run check on this node before srun starts anything (the job's ranks, GPUs per node, the
  # checkpoint it resumes from); exit 2 and the message if the run would fail
  local per_node="${SLURM_NTASKS_PER_NODE%%[!0-9]*}" gpus="${SLURM_GPUS_ON_NODE%%[!0-9]*}"
  # shellcheck disable=SC2086
  $py -m ovr_hpc.cli check "$stage" "$@" --world-size "${SLURM_NTASKS:-1}" \
    --tasks-per-node "${per_node:-0}" --gpus-per-node "${gpus:-0}" | sed 's/^/    /'
  local check_rc="${PIPESTATUS[0]}"
  if [ "$check_rc" != 0 ]; then
    ovr_say "config rejected (exit $check_rc); nothing was started"
    exit "$check_rc"
  fi
  echo "=================================================================================="

  # The tasks get the warning signal (--signal without B:) and preemption's SIGTERM themselves. The batch
  # shell only logs: SIGTERM means Slurm is ending the job (the tasks have KillWait seconds to save); a
  # USR1/USR2 sent to the shell (--signal=B:...) is passed on to the tasks.
  trap 'ovr_say "SIGTERM: Slurm is ending the job; waiting for the tasks to save and exit"' TERM
  trap 'ovr_say "SIGUSR1 to the batch shell: passing it to the tasks"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
  trap 'ovr_say "SIGUSR2 to the batch shell: passing it to the tasks"; scancel --signal=USR2 "$SLURM_JOB_ID"' USR2

  # OVR_COMMAND: set (not exported) by a script whose ranks run another subcommand on the stage's config
  # (passrate.sh: `data passrate` on an eval config); unquoted, as it may be two words
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=0 --wait="${OVR_SRUN_WAIT:-300}" $py -m ovr_hpc.cli ${OVR_COMMAND:-$stage} "$@" &
  local srun_pid=$!
  # `wait` returns early when a trapped signal arrives: wait until srun itself has exited
  while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
  wait "$srun_pid"
  local rc=$?

  if [ "$rc" = 0 ]; then
    ovr_say "$stage finished"
    exit 0
  fi
  if [ "$rc" != "$OVR_EXIT_REQUEUE" ]; then
    ovr_say "$stage failed (srun exit $rc)"
    exit "$rc"
  fi
  local state
  state="$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)"
  if [ "$state" != RUNNING ]; then
    ovr_say "checkpoint saved; the job is $state (cancelled, requeued or timed out by Slurm): not requeueing it"
    exit "$rc"
  fi
  if [ "$restarts" -ge "$max_requeues" ]; then
    ovr_say "checkpoint saved, but not requeued: requeued $restarts times already (OVR_MAX_REQUEUES=$max_requeues)"
    exit "$rc"
  fi
  ovr_say "checkpoint saved; requeueing the job (requeue $((restarts + 1)) of at most $max_requeues)"
  trap '' TERM # the requeue ends this job with SIGTERM: nothing left to do here
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    ovr_say "scontrol requeue failed: resubmit by hand, the run resumes from its latest checkpoint"
    exit "$rc"
  fi
  exit 0
}
