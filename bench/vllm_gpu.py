"""The colocated vLLM engine on one GPU: weight sync per GB, generation throughput colocated vs
standalone, sleep/wake time and memory released, the trainer/vLLM log-prob gap.

    python bench/vllm_gpu.py standalone --model DIR --out a.json   # the engine alone on the GPU
    python bench/vllm_gpu.py colocated  --model DIR --out b.json   # + a trainer's weights, grads, AdamW
    python bench/vllm_gpu.py report a.json b.json                  # the table for bench/RESULTS.md
    python bench/vllm_gpu.py staging                               # no vLLM needed: the bucketing alone

`bench/gpu_check.sh` runs all three (and the engine tests on CUDA). DIR defaults to a random-init
Qwen2.5-VL built here at ~1.2B parameters (no download); pass a real checkpoint with --model.
Both modes run the same prompts with the same sampling settings, one after the other on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 1 << 30


def build_model(out: str, layers: int) -> str:
    from ovr_hpc.models.tiny import build_tiny_model

    if not os.path.exists(os.path.join(out, "config.json")):
        # head_dim 32 is fixed by the tiny builder; ~43M parameters per layer at hidden 2048
        build_tiny_model(out, hidden_size=2048, num_heads=64, num_kv_heads=8, intermediate_size=5504,
                         num_layers=layers, vision_depth=4, vision_hidden=256, vision_heads=4,
                         vision_window_size=112, dtype="bfloat16")
    return out


def prompts(n: int):
    from ovr_hpc.data.prompts import Prompt

    words = ["triangle", "circle", "apple", "number", "answer", "square", "picture", "distance"]
    return [Prompt(f"Question {i}: what is the {words[i % len(words)]} of {i} and {i + 7}? Think step by step.")
            for i in range(n)]


def free_gib() -> float:
    import torch

    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / GiB


def run(args, colocated: bool) -> dict:
    import torch

    from ovr_hpc import dist
    from ovr_hpc.models.loading import load_vlm
    from ovr_hpc.rollout.base import SamplingParams
    from ovr_hpc.config import RolloutEngineConfig
    from ovr_hpc.rollout.vllm import VLLMRolloutEngine

    dist.init_distributed()
    result: dict = {"mode": "colocated" if colocated else "standalone", "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__}
    import vllm

    result["vllm"] = vllm.__version__
    free0 = free_gib()
    trainer = load_vlm(args.model, "bfloat16", "sdpa").cuda()
    n_bytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
    result["model_gib"] = n_bytes / GiB
    if colocated:  # what a ZeRO-1 trainer keeps beside the engine: grads + fp32 AdamW states
        for p in trainer.parameters():
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(trainer.parameters(), lr=1e-6)
        opt.step()
    free_trainer = free_gib()

    t0 = time.perf_counter()
    settings = RolloutEngineConfig(engine="vllm", gpu_memory_utilization=args.gpu_memory_utilization,
                                   max_model_len=args.max_model_len, max_num_batched_tokens=8192,
                                   max_num_seqs=args.max_num_seqs, enable_sleep_mode=colocated, seed_per_request=False)
    engine = VLLMRolloutEngine(args.model, settings, min_pixels=3136, max_pixels=1003520, dtype="bfloat16")
    result["engine_start_s"] = time.perf_counter() - t0
    free_engine = free_gib()
    result["engine_gib"] = free_trainer - free_engine

    # ---- weight sync: the trainer's bf16 tensors on the GPU, streamed through the buckets
    syncs = []
    for _ in range(3):
        stats = engine.load_weights(trainer.state_dict().items())
        syncs.append(stats.seconds)
    result["sync_s"] = min(syncs)
    result["sync_s_per_gib"] = min(syncs) / (stats.nbytes / GiB)
    result["sync_buckets"] = stats.buckets

    # ---- throughput (after one warm-up call)
    params = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    engine.generate(prompts(8), params)
    t0 = time.perf_counter()
    out = engine.generate(prompts(args.prompts), params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for g in out for c in g)
    result.update(generate_s=seconds, generated_tokens=tokens, tokens_per_s=tokens / seconds)

    # ---- the log-prob gap against the trainer's own forward (bf16, as the trainer computes it)
    gaps = []
    with torch.no_grad():
        for group in out[:16]:
            for c in group[:2]:
                ids = torch.tensor([c.prompt_ids + c.token_ids], device="cuda")
                logits = trainer(input_ids=ids).logits[0, len(c.prompt_ids) - 1 : -1].float()
                ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(c.prompt_ids):, None])[:, 0]
                gaps.append((torch.tensor(c.logprobs, device="cuda") - ref).abs())
    gap = torch.cat(gaps)
    result.update(logprob_gap_mean=float(gap.mean()), logprob_gap_max=float(gap.max()))

    # ---- sleep / wake (colocated: the engine was built with sleep mode)
    if colocated:
        before = free_gib()
        t0 = time.perf_counter()
        engine.sleep()
        result["sleep_s"] = time.perf_counter() - t0
        released = free_gib() - before
        result.update(released_gib=released, released_fraction=released / max(result["engine_gib"], 1e-9))
        t0 = time.perf_counter()
        engine.load_weights(trainer.state_dict().items())  # wakes the weights
        result["wake_weights_and_sync_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine._wake("kv_cache")
        result["wake_kv_s"] = time.perf_counter() - t0
        again = engine.generate(prompts(4), SamplingParams(n=1, temperature=0.0, max_new_tokens=16))
        result["after_wake_ok"] = all(len(g[0].token_ids) > 0 for g in again)
    result["free_gib_start"] = free0
    return result


def staging(gib: float = 4.0, bucket_mib: int = 512) -> dict:
    """The engine-side preparation of a push without vLLM: rename, cast to bf16 and place on the GPU in
    bounded buckets (`iter_buckets`), from fp32 GPU tensors (a ZeRO gather's output) and from CPU tensors."""
    import torch

    from ovr_hpc.rollout.vllm import iter_buckets

    n = int(gib * GiB / 4 / (64 << 20))  # fp32 tensors of 64 Mi elements (256 MiB each)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bucket_mib": bucket_mib}
    for where in ("cuda", "cpu"):
        src = [(f"model.language_model.layers.{i}.mlp.up_proj.weight",
                torch.randn(64 << 20, device=where, pin_memory=where == "cpu" and torch.cuda.is_available()))
               for i in range(n)]
        for _ in range(2):  # the first pass warms up the allocator
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out_bytes = 0
            for bucket in iter_buckets(src, bucket_mib << 20, torch.bfloat16, torch.device("cuda")):
                torch.cuda.current_stream().synchronize()
                out_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                bucket.clear()
            seconds = time.perf_counter() - t0
        result[f"from_{where}_s_per_gib_bf16"] = seconds / (out_bytes / GiB)
        del src
        torch.cuda.empty_cache()
    return result


def report(paths: list[str]) -> str:
    rows = {json.load(open(p))["mode"]: json.load(open(p)) for p in paths}
    s, c = rows.get("standalone"), rows.get("colocated")
    any_row = c or s
    lines = [f"GPU: {any_row['device']}, vLLM {any_row['vllm']}, torch {any_row['torch']}, "
             f"model {any_row['model_gib']:.2f} GiB bf16", "",
             "| measure | standalone | colocated |", "|---|---:|---:|"]

    def cell(r, k, fmt):
        return fmt.format(r[k]) if r and k in r else "-"

    for key, label, fmt in [("tokens_per_s", "generation, tokens/s", "{:.0f}"),
                            ("sync_s_per_gib", "weight sync, s per GiB", "{:.3f}"),
                            ("sync_s", "weight sync, s (whole model)", "{:.3f}"),
                            ("engine_gib", "engine memory, GiB", "{:.2f}"),
                            ("sleep_s", "sleep, s", "{:.3f}"),
                            ("released_fraction", "memory released by sleep", "{:.1%}"),
                            ("wake_weights_and_sync_s", "wake weights + sync, s", "{:.3f}"),
                            ("wake_kv_s", "wake KV cache, s", "{:.3f}"),
                            ("logprob_gap_mean", "log-prob gap vs bf16 trainer, mean", "{:.2e}"),
                            ("logprob_gap_max", "log-prob gap, max", "{:.2e}")]:
        lines.append(f"| {label} | {cell(s, key, fmt)} | {cell(c, key, fmt)} |")
    if s and c:
        lines += ["", f"colocated / standalone throughput: {c['tokens_per_s'] / s['tokens_per_s']:.3f} "
                  "(goal >= 0.95)",
                  f"7B (15.2 GiB bf16) sync estimate: {c['sync_s_per_gib'] * 15.2:.2f} s (goal <= 2 s)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["standalone", "colocated", "report", "staging"])
    ap.add_argument("files", nargs="*", help="report: the JSON files")
    ap.add_argument("--model", default=None, help="HF directory (default: build a ~1.2B random model)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--out", default=None)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = ap.parse_args()
    if args.mode == "report":
        print(report(args.files))
        return
    if args.mode == "staging":
        print(json.dumps(staging(), indent=1))
        return
    args.model = args.model or build_model(os.path.join(os.environ.get("TMPDIR", "/tmp"), "ovr-bench-model"),
                                           args.layers)
    result = run(args, colocated=args.mode == "colocated")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
