"""GPU checks of the megatron-core engine that the CPU tests cannot make (bench/gpu_check.sh runs this).

    torchrun --nproc_per_node=N bench/megatron_gpu.py [--model DIR] [--tp T] [--pp P] [--out FILE]

Without --model a small Qwen2.5-VL is built from a config (same architecture; hidden 512, 4 layers).
Prints one JSON object (and writes it to --out):

* ``logprobs_bf16``: HF (transformers, bf16) vs megatron-core (bf16 autocast) log-probs over a packed row
  with an image, both against an fp32 HF reference: the engine should be no further from fp32 than HF is.
* ``packed_vs_single``: the same samples packed in one row vs one row each, through the engine (THD with
  Transformer Engine, the block-causal mask otherwise): max difference of the per-sample log-probs.
* ``optimizer_step``: three AdamW steps on the row: losses, grad norms, seconds per step.
* ``spec``: which layer spec ran (Transformer Engine when it imports).

`run_checks` is importable: the CPU test suite calls it (fp32, local spec, CPU shims) so this script
cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def build_model(out_dir: str) -> str:
    from ovr_hpc.models.tiny import build_tiny_model

    return str(build_tiny_model(out_dir, seed=0, hidden_size=512, num_layers=4, num_heads=16, num_kv_heads=4,
                                intermediate_size=1536, vision_hidden=128, vision_heads=4))


def make_samples(model_dir: str, work_dir: str):
    from ovr_hpc.data.synthetic import engine_check_samples
    from ovr_hpc.models.loading import load_processor

    processor = load_processor(model_dir, 3136, 50176)
    return processor, engine_check_samples(processor.tokenizer, work_dir)


def run_checks(model_dir: str, work_dir: str, tp: int = 1, pp: int = 1, dtype: str = "bfloat16",
               spec: str = "auto") -> dict:
    """All ranks call (torch.distributed initialised); returns the results (the same on every rank)."""
    from ovr_hpc.config import ModelConfig, OptimizerConfig, RLParallelConfig, ScheduleConfig
    from ovr_hpc.data.dataset import Collator
    from ovr_hpc.engines.base import build_engine
    from ovr_hpc.models.loading import TokenLogprobs, load_vlm

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    processor, samples = make_samples(model_dir, work_dir)
    collator = Collator(processor, 3136, 50176, always_run_vision=True)
    packed = collator(samples, list(range(len(samples))))
    singles = [collator([s], [i]) for i, s in enumerate(samples)]
    results: dict = {"tp": tp, "pp": pp, "dtype": dtype}

    # ---- HF references: fp32 and the training dtype
    with torch.no_grad():
        ref32 = TokenLogprobs(load_vlm(model_dir, "float32", "sdpa").to(device))(**packed.to(device).model_inputs())[0]
        hf_low = TokenLogprobs(load_vlm(model_dir, dtype, "sdpa").to(device))(**packed.to(device).model_inputs())[0]

    model_cfg = ModelConfig(path=model_dir, dtype=dtype, attn_implementation="sdpa", freeze_vision=False)
    parallel = RLParallelConfig(engine="megatron", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                megatron_spec=spec)
    engine = build_engine("policy", model_cfg, parallel, OptimizerConfig(lr=1e-4), ScheduleConfig(kind="constant"),
                          10, torch.distributed.get_world_size())
    results["spec"] = "transformer_engine" if engine.use_te else "local"

    # ---- log-probs in the training dtype vs fp32
    (lp_packed, _), *lp_singles = engine.forward([packed] + singles)
    mask = packed.targets.to(device) != -100
    results["logprobs_bf16"] = {
        "hf_vs_fp32_max": float((hf_low - ref32)[mask].abs().max()),
        "megatron_vs_fp32_max": float((lp_packed - ref32)[mask].abs().max()),
        "megatron_vs_hf_max": float((lp_packed - hf_low)[mask].abs().max()),
        "megatron_vs_fp32_mean": float((lp_packed - ref32)[mask].abs().mean()),
    }

    # ---- packed vs one row per sample (same engine); a text-only row also carries the dummy image at its end
    offset, worst = 0, 0.0
    for sample, (lp_single, _) in zip(samples, lp_singles):
        n = len(sample.input_ids)
        loss_positions = mask[offset:offset + n]
        worst = max(worst, float((lp_packed[offset:offset + n] - lp_single[:n])[loss_positions].abs().max()))
        offset += n
    results["packed_vs_single"] = {"max_abs_diff": worst}

    # ---- three optimizer steps
    total = packed.num_loss_tokens
    losses, norms, seconds = [], [], []
    for _ in range(3):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = engine.forward_backward([packed], lambda j, out: (-out[0].sum() / total, {"loss_sum": -out[0].sum()}))
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(stats[0]["loss_sum"] / total)
        norms.append(engine.grad_norm())
    results["optimizer_step"] = {"losses": losses, "grad_norms": norms, "seconds": seconds}
    if torch.cuda.is_available():
        results["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Qwen2.5-VL directory (default: build a small one)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--spec", default="auto", choices=["auto", "local", "te"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("megatron_gpu.py: no CUDA GPU (the CPU tests cover the CPU paths)")
    from ovr_hpc import dist

    info = dist.init_distributed()
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model
        if model_dir is None:
            model_dir = os.path.join(work, "model")
            if info.rank == 0:
                build_model(model_dir)
            dist.barrier()
        results = run_checks(model_dir, work, args.tp, args.pp, args.dtype, args.spec)
    results["gpu"] = torch.cuda.get_device_name()
    if info.rank == 0:
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.shutdown()


if __name__ == "__main__":
    main()
