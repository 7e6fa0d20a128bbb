#!/bin/bash
# Evaluation on Slurm: one task per GPU, the ranks split the benchmarks' questions; resumable, so it
# requeues itself before the time limit and on preemption and goes on where it stopped.
#
#   sbatch [SBATCH_OPTIONS] slurm/eval.sh CONFIG [key=value ...]
#   slurm/eval.sh [SBATCH_OPTIONS --] CONFIG [key=value ...]   # check the config here, then sbatch
#
# The defaults below are for 8-GPU nodes; sbatch options on the command line override them, e.g.
#   sbatch --nodes=2 --partition=gpu slurm/eval.sh configs/qwen25vl_7b/eval.yaml model.path=runs/qwen25vl_7b/rl
# Submit from the checkout (logs go to ./logs/, which must exist). The rest is in slurm/common.sh.
#
# Defaults, in order: one 8-GPU node; CPUs per task for image decoding and scoring; all of the node's
# memory; the warning signal (USR1 to the tasks) 5 min before the time limit (an eval stops after the
# batch in flight); requeue allowed; requeued runs append to one log.
#SBATCH --job-name=ovr-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
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
    ovr_main eval "$root" "$0" "$@"
  fi
done
echo "ovr-hpc: cannot find slurm/common.sh; set OVR_HPC_ROOT to the ovr-hpc checkout" >&2
exit 1
