#!/usr/bin/env bash
# One command for a GPU machine: installs nothing, runs the GPU checks, prints what bench/RESULTS.md records.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default runs/gpu_check; needs torch with CUDA, and vLLM for
#                                             the vLLM part: pip install 'ovr-hpc[gpu]' beforehand)
#
# ---- Kernel part: the fused log-prob kernel (ovr_hpc/kernels), first: it needs nothing but triton ---------
#   the kernel tests on CUDA (odd shapes, TMA loads, Qwen size), then bench/logprob.py --tune (tile shapes,
#   pointer vs TMA loads, at T=8k) and the T=8k / 64k cases for both load variants against the 3 bare GEMMs.
#
# ---- vLLM part: the colocated rollout engine (ovr_hpc/rollout/vllm.py) -------------------------------------
#   1. the engine tests (tests/rollout/vllm) on CUDA: text/image prompts, log-probs vs transformers,
#      weight pushes, resume, external_launcher on 2 processes (these share one GPU here);
#   2. bench/vllm_gpu.py standalone vs colocated on the same GPU: weight-sync time per GiB, generation
#      throughput, sleep/wake time and memory released (sleep mode: CUDA only, untested on CPUs),
#      and the trainer/vLLM log-prob gap.
#
# ---- Megatron part: the megatron-core engine (ovr_hpc/engines/megatron), if megatron-core imports -----------
#   bench/megatron_gpu.py on every visible GPU (torchrun, TP = number of GPUs, at most 4) and on one:
#   HF vs megatron log-probs in bf16 with the vision tower (both against fp32), packed (THD with Transformer
#   Engine) vs one row per sample, three optimizer steps with NCCL; the spec that ran (TE or local).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
status=0

echo "== Fused log-prob kernel"
"$PY" -m pytest tests/kernels -m "not multiprocess" -p no:cacheprovider -q -ra 2>&1 | tee "$OUT/kernel_tests.log" | tail -8
[ "${PIPESTATUS[0]}" = 0 ] || status=1
"$PY" bench/logprob.py --gpu --tune 2>&1 | tee "$OUT/logprob_tune.log" || status=1
"$PY" bench/logprob.py --gpu --T 8192 65536 --reps 5 --methods ours-triton ours-triton-tma ours-triton+entropy \
    2>&1 | tee "$OUT/logprob_gpu.log" || status=1

echo "== vLLM: colocated rollout engine"
# the push's own preparation (rename, cast, bucket, copy to the GPU), measurable without vLLM
"$PY" bench/vllm_gpu.py staging | tee "$OUT/vllm_staging.json" || status=1
if ! "$PY" -c "import vllm" 2>/dev/null; then
    echo "gpu_check: vLLM is not importable by $PY: skipping the vLLM part (pip install 'ovr-hpc[gpu]')" >&2
    status=3
else
    "$PY" -c "import vllm; print('vllm', vllm.__version__)"
    # the engine tests, on this GPU (their allow_cpu flag is inert where CUDA exists)
    "$PY" -m pytest tests/rollout -m vllm -p no:cacheprovider -q -ra 2>&1 | tee "$OUT/vllm_tests.log" | tail -15
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    "$PY" bench/vllm_gpu.py standalone --out "$OUT/vllm_standalone.json" > "$OUT/vllm_standalone.log" 2>&1 \
        || { echo "standalone run failed: $OUT/vllm_standalone.log" >&2; tail -20 "$OUT/vllm_standalone.log"; status=1; }
    "$PY" bench/vllm_gpu.py colocated --out "$OUT/vllm_colocated.json" > "$OUT/vllm_colocated.log" 2>&1 \
        || { echo "colocated run failed: $OUT/vllm_colocated.log" >&2; tail -20 "$OUT/vllm_colocated.log"; status=1; }
    ls "$OUT"/vllm_*.json >/dev/null 2>&1 && "$PY" bench/vllm_gpu.py report "$OUT"/vllm_*.json | tee "$OUT/vllm_report.md"
fi

echo "== Megatron-core engine"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    echo "gpu_check: megatron-core is not importable by $PY: skipping (pip install 'ovr-hpc[megatron]')" >&2
    status=3
else
    "$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)"
    "$PY" -c "import transformer_engine as te; print('transformer-engine', te.__version__)" 2>/dev/null \
        || echo "transformer-engine: not importable (the local spec runs; packed rows use a dense mask)"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 bench/megatron_gpu.py --out "$OUT/megatron_tp1.json" \
        > "$OUT/megatron_tp1.log" 2>&1 || { echo "megatron TP 1 failed: $OUT/megatron_tp1.log" >&2; tail -20 "$OUT/megatron_tp1.log"; status=1; }
    ngpu=$("$PY" -c "import torch; print(min(4, torch.cuda.device_count()))")
    if [ "$ngpu" -ge 2 ]; then
        "$PY" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" bench/megatron_gpu.py --tp "$ngpu" \
            --out "$OUT/megatron_tp$ngpu.json" > "$OUT/megatron_tp$ngpu.log" 2>&1 \
            || { echo "megatron TP $ngpu failed: $OUT/megatron_tp$ngpu.log" >&2; tail -20 "$OUT/megatron_tp$ngpu.log"; status=1; }
    fi
    cat "$OUT"/megatron_tp*.json 2>/dev/null
fi

exit $status
