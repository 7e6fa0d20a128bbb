#!/bin/bash
# Cold start (SFT) on Slurm: one task per GPU; requeues itself before the time limit and on preemption.
#
#   sbatch [SBATCH_OPTIONS] slurm/coldstart.sh CONFIG [key=value ...]
#   slurm/coldstart.sh [SBATCH_OPTIONS --] CONFIG [key=value ...]   # check the config here, then sbatch
#
# The defaults below are for 8-GPU nodes; sbatch options on the command line override them, e.g.
#   sbatch --nodes=4 --time=2-00:00:00 --partition=gpu slurm/coldstart.sh configs/qwen25vl_7b/coldstart.yaml
# Submit from the checkout (logs go to ./logs/, which must exist). The rest is in slurm/common.sh.
#
# Defaults, in order: one task per GPU on 8-GPU nodes; data loading and tokenization CPUs per task; all of
# each node's memory; the warning signal (USR1 to the tasks, not to this shell) 10 min before the
# time limit, which Slurm sends 600-630 s ahead; requeue allowed; requeued runs append to one log.
#SBATCH --job-name=ovr-coldstart
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
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
    ovr_main coldstart "$root" "$0" "$@"
  fi
done
echo "ovr-hpc: cannot find slurm/common.sh; set OVR_HPC_ROOT to the ovr-hpc checkout" >&2
exit 1
