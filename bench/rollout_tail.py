"""The long tail of an RL step's generation: synchronous vs partial rollouts, measured in one run, and the
same through the planner's roofline for 7B on 64 H100 (the paper's length curves).

    python bench/rollout_tail.py [--engine hf|vllm] [--samples 32] [--budget 48] [--steps 6]

Measured part: the tiny Qwen2.5-VL (random weights) on the CPU, with the hf engine (transformers generate)
or the vllm engine (the vLLM CPU build: run with .venv-vllm/bin/python). Every response's length is forced
(drawn from a log-normal, capped; the end-of-turn tokens are never sampled: hf suppresses them, vllm's
min_tokens = the request's budget), so both modes generate the same length distribution:
  synchronous: each step generates its `samples` responses whole; the batch runs until the longest is done;
  partial:     each step generates at most `budget` tokens per sequence (ovr_hpc/rl/partial.py's rule),
               new sequences plus the carried ones; after a warm-up the buffer is in its steady state and
               the finished responses per step equal the new ones on average (equal samples per step).
Printed: generation time per step, finished responses per second, the tail (90% of a step's sequences
done -> the last), the idle fraction (1 - mean finish time / last finish time) and the staleness of the
finished responses' tokens; ratios partial / synchronous. The weights do not change between steps here:
generation cost only (the carried sequences' prompts and prefixes are prefilled again every step, as in
training, where the caches are reset after each weight push).

With --engine vllm the weight push is measured too: one collective RPC per push (the engine's bucketed
stream) against one RPC per tensor, on the same weights; printed as a ratio.

Roofline part: ovr_hpc/plan.py's decode model (memory-bound token steps, continuous batching) for
configs/qwen25vl_7b/rl.yaml on 8 x 8 H100: a synchronous step decodes for max(work / concurrency, the
longest response) token steps; a partial one for max(work / concurrency, budget) plus the re-prefill of the
carried sequences (prompt + prefix, at the planner's MFU). Response lengths: log-normal with the paper's
mean (~30% of the cap: 7.3k of 24k early, 12.6k of 48k late), capped at the curriculum's length.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lognormal_lengths(rng, n: int, mean: float, sigma: float, cap: int) -> list[int]:
    mu = math.log(mean) - sigma ** 2 / 2
    return [max(1, min(cap, int(round(rng.lognormvariate(mu, sigma))))) for _ in range(n)]


def step_stats(finish: list[float]) -> tuple[float, float]:
    from ovr_hpc.rl.partial import tail_seconds

    last = max(finish)
    return tail_seconds(finish), 1.0 - sum(finish) / len(finish) / last


def hf_engine(folder: str):
    from ovr_hpc.models.loading import load_processor, load_vlm
    from ovr_hpc.rollout.hf import HFRolloutEngine

    engine = HFRolloutEngine(load_vlm(folder, "float32", "sdpa"), load_processor(folder, 3136, 50176),
                             3136, 50176, batch_size=10 ** 6)   # one batch: every sequence decodes at once
    engine.suppress_ids = engine.suppress_ids + engine.end_ids   # forced lengths: never end a turn early
    return engine


def vllm_engine(folder: str, args):
    """The vLLM CPU build serving the tiny model's own weights, every sequence of a step in one batch,
    lengths forced: min_tokens = max_tokens keeps the end-of-turn ids out until the budget is spent."""
    from ovr_hpc.config import RolloutEngineConfig
    from ovr_hpc.rollout.vllm import VLLMRolloutEngine

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")   # the per-tensor pushes warn about the other tensors
    cfg = RolloutEngineConfig(engine="vllm", max_model_len=args.cap + 64, max_num_batched_tokens=8192,
                              max_num_seqs=4 * args.samples, kv_cache_mb=256, enforce_eager=True,
                              enable_sleep_mode=False, vllm_allow_cpu=True)
    engine = VLLMRolloutEngine(folder, cfg, min_pixels=3136, max_pixels=50176, dtype="float32", load_format="auto")
    unforced = engine._sampling_params

    def forced(params, prompt_index, *, n, max_tokens):
        sampling = unforced(params, prompt_index, n=n, max_tokens=max_tokens)
        sampling.min_tokens = max_tokens
        return sampling

    engine._sampling_params = forced
    return engine


def push_seconds(engine, state: list, repeats: int) -> tuple[float, float, int]:
    """(seconds per push as the engine does it: buckets streamed through one collective_rpc; seconds per
    push with one collective_rpc per tensor; tensors). The engine serves `state` afterwards."""
    def per_tensor():
        for name, tensor in state:
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter([(name, tensor)]),
                                                                "is_checkpoint_format": True})
        engine.reset_caches()

    timings = {}
    for label, push in (("per_tensor", per_tensor), ("bucketed", lambda: engine.load_weights(iter(state)))):
        push()   # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            push()
        timings[label] = (time.perf_counter() - t0) / repeats
    return timings["bucketed"], timings["per_tensor"], len(state)


def measure(args) -> dict:
    import random

    import torch

    from ovr_hpc.data.prompts import Prompt
    from ovr_hpc.models.tiny import build_tiny_model
    from ovr_hpc.rollout.base import SampleRequest, SamplingParams

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    folder = str(build_tiny_model(os.path.join(tempfile.mkdtemp(), "model"), seed=0))
    engine = vllm_engine(folder, args) if args.engine == "vllm" else hf_engine(folder)
    prompt = Prompt("Describe the long tail of response lengths.")
    rng = random.Random(0)
    params = SamplingParams(temperature=1.0, seed=0)
    engine.generate_samples([SampleRequest(prompt, [], 4)] * 4, params)   # warm-up
    draw = lambda: lognormal_lengths(rng, args.samples, args.mean, args.sigma, args.cap)  # noqa: E731

    sync = []
    for step in range(args.steps):
        lengths = draw()
        t0 = time.perf_counter()
        out = engine.generate_samples([SampleRequest(prompt, [], n) for n in lengths], params)
        sync.append(dict(seconds=time.perf_counter() - t0, finished=len(out), tail_idle=step_stats([c.finish_s for c in out])))
        assert [len(c.token_ids) for c in out] == lengths

    # partial: [target length, tokens so far, first step] per carried sequence
    carried, part, warmup = [], [], math.ceil(args.cap / args.budget)
    for step in range(warmup + args.steps):
        carried += [[n, [], step] for n in draw()]
        requests = [SampleRequest(prompt, toks, min(args.budget, n - len(toks))) for n, toks, _ in carried]
        t0 = time.perf_counter()
        out = engine.generate_samples(requests, params)
        seconds = time.perf_counter() - t0
        for seq, c in zip(carried, out):
            seq[1] = seq[1] + c.token_ids
        done = [seq for seq in carried if len(seq[1]) >= seq[0]]
        carried = [seq for seq in carried if len(seq[1]) < seq[0]]
        if step >= warmup:
            stale = [step - first for _, _, first in done]
            part.append(dict(seconds=seconds, finished=len(done), tail_idle=step_stats([c.finish_s for c in out]),
                             sequences=len(out), max_staleness=max(stale, default=0),
                             mean_staleness=sum(stale) / max(1, len(stale))))
    result = dict(sync=sync, partial=part)
    if args.engine == "vllm":
        from safetensors.torch import load_file

        state = list(load_file(os.path.join(folder, "model.safetensors")).items())
        result["push"] = push_seconds(engine, state, args.push_repeats)
    return result


def summarize(name: str, steps: list[dict]) -> dict:
    seconds = sum(s["seconds"] for s in steps)
    finished = sum(s["finished"] for s in steps)
    tail = sum(s["tail_idle"][0] for s in steps) / len(steps)
    idle = sum(s["tail_idle"][1] for s in steps) / len(steps)
    row = dict(step_s=seconds / len(steps), per_s=finished / seconds, finished=finished / len(steps), tail_s=tail,
               idle=idle)
    print(f"  {name:<12} {row['step_s']:7.2f} s/step  {row['finished']:6.1f} responses/step  "
          f"{row['per_s']:7.2f} responses/s  tail {tail:5.2f} s ({tail / row['step_s']:.0%} of the step)  "
          f"idle {idle:.0%}")
    return row


def roofline(budget_fraction: float, sigma: float, gpu_name: str = "h100") -> None:
    import random

    from ovr_hpc.plan import GPUS, MFU, RESPONSE_MEAN_FRACTION, load_plan_config, make_plan, resolve_shapes, total_params

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "qwen25vl_7b", "rl.yaml")
    stage, cfg = load_plan_config(path)
    shapes, _ = resolve_shapes("", model="Qwen/Qwen2.5-VL-7B-Instruct")
    gpu = GPUS[gpu_name]
    plan = make_plan(stage, cfg, shapes, 8, 8, gpu)
    engines = 64 // cfg.rollout.tensor_parallel_size
    per_engine = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt / engines
    flops_per_s = gpu.bf16_tflops * 1e12 * MFU
    rng = random.Random(0)
    print(f"\nroofline: {cfg.rollout.prompts_per_step} x {cfg.rollout.samples_per_prompt} responses per step, 64 {gpu.name}, "
          f"{engines} engines (TP {cfg.rollout.tensor_parallel_size}), {per_engine:g} responses each; partial budget "
          f"= {budget_fraction:.0%} of the cap per step; lengths log-normal (sigma {sigma}) with mean "
          f"{RESPONSE_MEAN_FRACTION:.0%} of the cap")
    for st in plan.values["stages"]:
        t, length = st["typical"], st["length"]
        lengths = lognormal_lengths(rng, 20000, RESPONSE_MEAN_FRACTION * length, sigma, length)
        mean = sum(lengths) / len(lengths)
        budget = int(budget_fraction * length)
        step_ms = t["token_step_ms"] / 1e3
        work = per_engine * mean / t["concurrent"]
        prefill = t["generation_s"] - max(per_engine * t["mean_len"] / t["concurrent"], length) * step_ms
        sync = max(work, max(lengths)) * step_ms + prefill
        # re-prefill per step: each response of length L is carried ceil(L / budget) - 1 times, with k * budget
        # tokens (+ the prompt) prefilled again at its k-th continuation
        reprefill_tokens = sum(k * budget + cfg.data.max_prompt_len
                               for n in lengths for k in range(1, math.ceil(n / budget))) / len(lengths) * per_engine
        reprefill = reprefill_tokens * 2 * total_params(shapes) / cfg.rollout.tensor_parallel_size / flops_per_s
        partial = max(work, budget) * step_ms + prefill + reprefill
        staleness = math.ceil(length / budget) - 1
        print(f"  cap {length:>6,}: generation {sync:7.0f} s synchronous, {partial:7.0f} s partial (re-prefill "
              f"{reprefill:4.0f} s) -> {sync / partial:.2f}x per step; staleness <= {staleness} steps "
              f"(mean response {mean:,.0f} tokens; {t['concurrent']:g} sequences at once: decode "
              f"{work:,.0f} token steps of work vs the longest {max(lengths):,})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32, help="new responses per step")
    ap.add_argument("--mean", type=float, default=32.0, help="mean forced response length (tokens)")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the lengths")
    ap.add_argument("--cap", type=int, default=192, help="longest response (max_response_len)")
    ap.add_argument("--budget", type=int, default=48, help="partial: tokens per sequence per step")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per mode")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="vllm: the CPU build (.venv-vllm)")
    ap.add_argument("--push-repeats", type=int, default=5, help="vllm: weight pushes timed per variant")
    ap.add_argument("--roofline-only", action="store_true")
    args = ap.parse_args()
    if not args.roofline_only:
        print(f"measured (CPU, {args.engine} engine, tiny model): {args.samples} new responses per step, lengths log-normal mean "
              f"{args.mean:g} sigma {args.sigma:g} capped at {args.cap}, partial budget {args.budget} tokens/step")
        result = measure(args)
        s = summarize("synchronous", result["sync"])
        p = summarize("partial", result["partial"])
        stale = max(r["max_staleness"] for r in result["partial"])
        mean_stale = sum(r["mean_staleness"] for r in result["partial"]) / len(result["partial"])
        print(f"  partial / synchronous: {p['per_s'] / s['per_s']:.2f}x responses per second "
              f"({p['finished']:.1f} vs {s['finished']:.1f} responses per step), generation time per step "
              f"{p['step_s'] / s['step_s']:.2f}x, tail {p['tail_s'] / max(s['tail_s'], 1e-9):.2f}x, idle "
              f"{p['idle']:.0%} vs {s['idle']:.0%}; staleness of finished responses: mean {mean_stale:.2f}, "
              f"max {stale} steps")
        if "push" in result:
            bucketed, per_tensor, tensors = result["push"]
            print(f"  weight push ({tensors} tensors): {bucketed * 1e3:.1f} ms with one RPC (buckets), "
                  f"{per_tensor * 1e3:.1f} ms with one RPC per tensor -> per-tensor / bucketed "
                  f"{per_tensor / bucketed:.1f}x")
    for gpu in ("h100", "h200"):
        roofline(0.25, args.sigma, gpu)


if __name__ == "__main__":
    main()
