#!/bin/bash
# Checkpoint averaging on a CPU node: no GPUs, one task; streamed one tensor at a time, so the memory it needs
# is about one output shard (--shard-mb, default 2048) plus three fp32 copies of the largest tensor (7B: ~9 GB,
# 72B: ~17 GB), not a model. The same command runs on a login node where that is allowed.
#
#   sbatch [SBATCH_OPTIONS] slurm/average.sh CKPT_OR_RUN... --out DIR [--weights W ...] [--steps A:B:S]
#
# e.g. the checkpoints 600, 650, ..., 900 of an RL run, uniformly:
#   sbatch --partition=cpu slurm/average.sh runs/qwen25vl_7b/rl --steps 600:900:50 --out runs/qwen25vl_7b/rl-avg
# Submit from the checkout (logs go to ./logs/, which must exist). Everything is checked (complete checkpoints,
# one architecture, the same tensors) before anything is written, and DIR appears only once complete: a job
# that dies is run again as it was. Keep the checkpoints to average with checkpoint.keep_every.
#SBATCH --job-name=ovr-average
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=48G
#SBATCH --time=06:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# sbatch runs a copy of this file: find the checkout through OVR_HPC_ROOT, this file's folder (run
# directly), the path the job was submitted with, or the submit directory.
submitted="$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2-)"
for root in "${OVR_HPC_ROOT:-}" "$(dirname "$0")/.." "$(dirname "${submitted:-.}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
  if [ -n "$root" ] && [ -f "$root/slurm/common.sh" ]; then
    root="$(cd "$root" && pwd)"
    # shellcheck source=slurm/common.sh
    . "$root/slurm/common.sh"
    py="$(ovr_python "$root")" || exit 1
    # torch's CPU threads: the job's CPUs, not every core of the node
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"
    ovr_say "job ${SLURM_JOB_ID:-none} on $(hostname), ${OMP_NUM_THREADS} threads, commit" \
      "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown): ovr-hpc average $*"
    # shellcheck disable=SC2086  # OVR_PYTHON may be a wrapper command with arguments
    exec $py -m ovr_hpc.cli average "$@"
  fi
done
echo "ovr-hpc: cannot find slurm/common.sh; set OVR_HPC_ROOT to the ovr-hpc checkout" >&2
exit 1
