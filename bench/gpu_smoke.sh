#!/usr/bin/env bash
# The tiny cold start and RL on one CUDA GPU (bf16, NCCL, DeepSpeed ZeRO-3 / ZeRO-2): the GPU paths of the
# trainers, which CI (CPU only) never runs. Installs nothing from the network: packages missing on the
# machine come from wheels carried in WHEELS (default .gpuwheels). Results (metrics, timings) go to OUT.
#   bash bench/gpu_smoke.sh [OUT]
set -euo pipefail
OUT="${1:-${OUT:-runs/gpu_smoke}}"
WHEELS="${WHEELS:-.gpuwheels}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if [ -d "$WHEELS" ]; then
  DS_BUILD_OPS=0 $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl "$WHEELS"/*.tar.gz
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself: no build step, no network
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
W=runs/gpu_smoke_work
rm -rf "$W" && mkdir -p "$W"
ovr() { $PY -m ovr_hpc.cli "$@"; }
ovr tiny-model "$W/model"
ovr synth-data sft "$W/data/sft.jsonl" --n 600
ovr synth-data rl-color "$W/data/rl.jsonl" --n 64
export MASTER_PORT=29512
t0=$(date +%s)
ovr coldstart configs/tiny/coldstart.yaml model.path="$W/model" data.train_files="[$W/data/sft.jsonl]" \
  checkpoint.output_dir="$W/cs" model.dtype=bfloat16 schedule.max_steps=20 checkpoint.every_steps=10 logging.progress_bar=false
t1=$(date +%s)
ovr export "$W/cs" "$W/cs_model"
ovr rl configs/tiny/rl.yaml model.path="$W/cs_model" data.train_files="[$W/data/rl.jsonl]" checkpoint.output_dir="$W/rl" \
  model.dtype=bfloat16 schedule.max_steps=3 algorithm.reward_workers=2 logging.progress_bar=false
t2=$(date +%s)
cp "$W/cs/metrics.jsonl" "$OUT/coldstart_metrics.jsonl"; cp "$W/rl/metrics.jsonl" "$OUT/rl_metrics.jsonl"
echo "coldstart 20 steps: $((t1 - t0)) s (process start included); rl 3 steps: $((t2 - t1)) s" | tee "$OUT/times.txt"
