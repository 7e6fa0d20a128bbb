#!/bin/bash
# RL prompt pass rates on Slurm: k responses per record with the current model, graded by the RL reward
# (`ovr-hpc data passrate`, ovr_hpc/data/curation.py). One task per GPU, the ranks split the records; answers
# are appended per batch, so it requeues itself before the time limit and on preemption and goes on where it
# stopped. CONFIG is an eval config whose benchmarks are records (configs/qwen25vl_7b/passrate.yaml).
#
#   sbatch [SBATCH_OPTIONS] slurm/passrate.sh CONFIG [key=value ...]
#   slurm/passrate.sh [SBATCH_OPTIONS --] CONFIG [key=value ...]   # check the config here, then sbatch
#
# e.g. the cold-start model's pass rates on the RL prompts, 8 samples each, on two 8-GPU nodes:
#   sbatch --nodes=2 slurm/passrate.sh configs/qwen25vl_7b/passrate.yaml model.path=runs/qwen25vl_7b/coldstart_model
# then `ovr-hpc data filter RL.jsonl --pass-rates OUTPUT_DIR/records/passrates.jsonl --drop-unsolved
# --drop-solved --drop-proofs --out RL.kept.jsonl`. Submit from the checkout (logs go to ./logs/, which must
# exist). The checks are the eval stage's (`ovr-hpc check eval CONFIG`); the rest is in slurm/common.sh.
#
# Defaults, in order: one 8-GPU node; CPUs per task for image decoding and scoring; all of the node's
# memory; the warning signal (USR1 to the tasks) 5 min before the time limit (the ranks stop after the
# batch in flight); requeue allowed; requeued runs append to one log.
#SBATCH --job-name=ovr-passrate
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
    # checked as the eval stage (the same config), run as `ovr-hpc data passrate` on every rank
    # shellcheck disable=SC2034  # read by ovr_job in common.sh
    OVR_COMMAND="data passrate"
    ovr_main eval "$root" "$0" "$@"
  fi
done
echo "ovr-hpc: cannot find slurm/common.sh; set OVR_HPC_ROOT to the ovr-hpc checkout" >&2
exit 1
