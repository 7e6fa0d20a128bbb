#!/bin/bash
# Multimodal RL on Slurm: one task per GPU (policy, critic and a colocated vLLM engine per rank);
# requeues itself before the time limit and on preemption.
#
#   sbatch [SBATCH_OPTIONS] slurm/rl.sh CONFIG [key=value ...]
#   slurm/rl.sh [SBATCH_OPTIONS --] CONFIG [key=value ...]   # check the config here, then sbatch
#
# The defaults below are for 8-GPU nodes; sbatch options on the command line override them, e.g.
#   sbatch --nodes=8 --time=3-00:00:00 --partition=gpu slurm/rl.sh configs/qwen25vl_7b/rl.yaml model.path=runs/qwen25vl_7b/coldstart_model
# Submit from the checkout (logs go to ./logs/, which must exist). The rest is in slurm/common.sh.
#
# Defaults, in order: 8 nodes x 8 GPUs (configs/qwen25vl_7b/rl.yaml is sized for 64 ranks); CPUs per task
# for the reward workers and data; all of each node's memory; the warning signal (USR1 to the tasks)
# 30 min before the time limit, because one RL step (rollouts of up to 48k tokens, critic and policy
# updates) plus a save of two engines can take that long; requeue allowed; requeued runs append to one log.
#SBATCH --job-name=ovr-rl
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@1800
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
    ovr_main rl "$root" "$0" "$@"
  fi
done
echo "ovr-hpc: cannot find slurm/common.sh; set OVR_HPC_ROOT to the ovr-hpc checkout" >&2
exit 1
