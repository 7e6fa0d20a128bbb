"""What a run needs before it queues: memory per GPU and phase, disk, tokens and time per step.

    ovr-hpc plan CONFIG [key=value ...] --nodes N --gpus-per-node G --gpu h100|h200|a100|b200

Pure arithmetic from the config, the model's shapes (its config.json, or the released sizes in
`ovr_hpc.models.sizes`) and a GPU's datasheet (`GPUS`); no torch import. Every number is one small function
below, and every assumption behind it is printed with the report (`ASSUMPTIONS`).

Memory per GPU (bytes), for the most loaded rank:
    model states   parameters, gradients, optimizer states: DeepSpeed ZeRO-1/2/3 (bf16 weights and gradients,
                   fp32 master + AdamW m, v: 2 + 2 + 12 B/param), AutoTP, or megatron TP x PP (fp32 weights
                   and gradients per model-parallel rank, AdamW m, v sharded over data-parallel ranks: 4 + 4 + 8)
    activations    one micro-batch at the packed length, with or without gradient checkpointing: the bytes the
                   Hugging Face decoder layer saves for backward, measured by tensor accounting on the tiny
                   model (tests/test_plan.py) and written as a formula in the layer's sizes
    RL             policy + critic (+ reference when kl_coef > 0) resident while vLLM generates; vLLM's weights
                   and KV cache for the concurrent sequences at each curriculum stage's max response length
Time per step: training FLOPs at a stated MFU; generation as memory-bound decode (a roofline: the larger of
bytes read / (HBM bandwidth x efficiency) and FLOPs / (peak x MFU)).
"""

from __future__ import annotations

import heapq
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import yaml

from ovr_hpc.config import ConfigError, load_config, parse_overrides
from ovr_hpc.models.sizes import KNOWN_ARCHITECTURES

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float       # as nvidia-smi reports the total
    bf16_tflops: float      # dense (no sparsity)
    hbm_tbps: float         # HBM bandwidth, TB/s
    nvlink_gbps: float      # NVLink bandwidth per GPU, GB/s (all links, both directions)
    network_gbps: float     # inter-node bandwidth per GPU, GB/s (one NIC per GPU, one direction)


# Datasheet values (SXM parts); network: one 400 Gb/s NDR NIC per GPU (A100: 200 Gb/s HDR).
GPUS: dict[str, GPU] = {
    "a100": GPU("A100 80GB SXM", 80.0, 312.0, 2.039, 600.0, 25.0),
    "h100": GPU("H100 80GB SXM", 79.6, 989.0, 3.35, 900.0, 50.0),
    "h200": GPU("H200 141GB SXM", 140.4, 989.0, 4.8, 900.0, 50.0),
    "b200": GPU("B200 180GB SXM", 179.1, 2250.0, 8.0, 1800.0, 50.0),
}

RESERVE_GIB = 2.0           # CUDA context, NCCL buffers, allocator slack: never available to the run
MFU = 0.35                  # training: model FLOPs / (GPUs x bf16 peak)
DECODE_BW_EFFICIENCY = 0.6  # decode: share of HBM bandwidth vLLM reaches reading weights and KV cache
LOSS_CHUNK_BYTES = 2 * 512 * 2**20   # the fused log-prob's two fp32 [rows, V] chunk buffers (torch backend)
VLLM_GRAPHS_BYTES = 1 * GiB          # vLLM's CUDA graphs and sampler buffers
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def assumptions(mfu: float = MFU, decode_efficiency: float = DECODE_BW_EFFICIENCY) -> list[str]:
    return [
        "model states: DeepSpeed bf16 = 2 B/param weights + 2 B gradients + 12 B optimizer (fp32 master, AdamW "
        "m, v); float32 = 4 + 4 + 8. ZeRO-1 shards the optimizer, ZeRO-2 also gradients, ZeRO-3 also weights "
        "(frozen ones too) over the data-parallel ranks. Megatron: fp32 weights (the master) 4 B + fp32 "
        "gradients 4 B per model-parallel rank, AdamW m, v 8 B / data-parallel size. Frozen parameters "
        "(model.freeze_vision) have no gradients or optimizer states",
        "layouts: AutoTP / megatron TP split the decoder layers' matrices (megatron also the embedding and LM "
        "head); the vision tower is whole on every rank (megatron: on the first pipeline stage)",
        "activations per decoder layer and token, bytes (e = 2 for bf16, 4 for fp32): 2 x (4 + 2e) x hidden "
        "(the two RMSNorms: fp32 input, normed, output) + 2e x hidden + 2e x kv_dim + 4e x intermediate + 8 + "
        "4 x heads (attention as flash / SDPA: no seq x seq scores). Checkpointing keeps e x hidden per layer "
        "and token and recomputes one layer at a time. Peak = saved + (checkpointing: one recomputed layer) + "
        "4e x intermediate of gradients; megatron "
        "divides by TP (all of it with sequence_parallel) and the first stage holds PP micro-batches (1F1B)",
        "loss head: the fused log-prob kernel's fp32 [vocab, hidden] weight-gradient accumulator (/ TP) + "
        "1 GiB of chunk buffers, no [tokens, vocab] logits",
        f"usable memory: the GPU's total less {RESERVE_GIB:g} GiB (CUDA context, NCCL, allocator slack); vLLM "
        "takes rollout.gpu_memory_utilization x total while the trainer's states stay resident beside it",
        "vLLM: bf16 weights / rollout TP; KV cache bytes per token = 2 (K, V) x layers x kv_heads x head_dim x "
        "2 B (/ TP); activations max_num_batched_tokens x 3 x intermediate x 2 B / TP + 1 GiB; sequences at "
        "data.max_prompt_len + the stage's max response length (an upper bound: every response runs to the "
        "limit, the step waits for its longest)",
        f"RL time: typical = responses at {RESPONSE_MEAN_FRACTION:g} x the limit on average (the paper's curves), "
        "bound = "
        "every response at the limit; prompts at data.max_prompt_len in both",
        f"time: training at {mfu:.0%} MFU of the bf16 dense peak on model FLOPs (6 x trained params x tokens "
        "for forward + backward, 2 x for a forward; causal attention 4 x layers x hidden x context per token "
        "forward, over whole rows / sequences, an upper bound for packed samples); decode per step = max(bytes "
        f"(weights + KV read) / ({decode_efficiency:.0%} of HBM bandwidth), FLOPs / (peak x MFU)); weight sync = "
        "bf16 weights over the inter-node link per GPU",
    ]


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shapes:
    """The sizes a plan needs: the language model's and the vision tower's (None: not known)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    vision: Optional[dict] = None
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict, source: str = "") -> "Shapes":
        """From a Qwen2.5-VL config.json (top level merged with text_config) or a `KNOWN_ARCHITECTURES` entry."""
        text = {**config, **(config.get("text_config") or {})}
        return cls(hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                   kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
                   intermediate=text["intermediate_size"], vocab=text["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                   vision=config.get("vision_config"), source=source)


_SIZE_IN_NAME = re.compile(r"(?<![0-9.])(3|7|32|72)b(?![a-z0-9])", re.IGNORECASE)


def resolve_shapes(model_path: str, config_path: str = "", model: str = "") -> tuple[Shapes, str]:
    """(shapes, where they came from). `model` (--model) wins: a hub id of the table, a config.json or a
    model folder. Then model.path as a folder or a known hub id; then the size named in model.path or the
    config's path (the shipped RL configs name a cold-start export that exists only after that run)."""
    for candidate, how in ((model, "--model"), (model_path, "model.path")):
        if not candidate:
            continue
        if candidate in KNOWN_ARCHITECTURES:
            return Shapes.from_config(KNOWN_ARCHITECTURES[candidate], candidate), f"{how} {candidate} (shipped table)"
        config_json = os.path.join(candidate, "config.json") if os.path.isdir(candidate) else candidate
        if candidate.endswith(".json") or os.path.isdir(candidate):
            if not os.path.isfile(config_json):
                raise ConfigError(f"{how} = {candidate!r}: no config.json there")
            with open(config_json) as f:
                return Shapes.from_config(json.load(f), config_json), f"{how} {config_json}"
        if how == "--model":
            raise ConfigError(f"--model {candidate!r}: expected a config.json, a model folder or one of "
                              f"{', '.join(KNOWN_ARCHITECTURES)}")
    for text in (model_path, config_path):
        m = _SIZE_IN_NAME.search(text or "")
        if m:
            hub = f"Qwen/Qwen2.5-VL-{m.group(1)}B-Instruct"
            return (Shapes.from_config(KNOWN_ARCHITECTURES[hub], hub),
                    f"{hub} (shipped table), from '{m.group(0)}' in {text!r}: model.path is not here (--model to say)")
    raise ConfigError(f"model.path = {model_path!r} is neither a model folder here nor a known hub id: give "
                      f"--model (a config.json, a model folder, or one of {', '.join(KNOWN_ARCHITECTURES)})")


def decoder_layer_params(s: Shapes) -> int:
    """q, k, v (with biases), o, the SwiGLU MLP and two RMSNorm weights."""
    attention = s.hidden * s.hidden + s.hidden + 2 * (s.hidden * s.kv_dim + s.kv_dim) + s.hidden * s.hidden
    return attention + 3 * s.hidden * s.intermediate + 2 * s.hidden


def embedding_params(s: Shapes) -> int:
    return s.vocab * s.hidden


def lm_head_params(s: Shapes) -> int:
    return 0 if s.tied else s.vocab * s.hidden


def text_params(s: Shapes) -> int:
    """The language model with its LM head: embedding, layers, final norm, head (untied)."""
    return embedding_params(s) + s.layers * decoder_layer_params(s) + s.hidden + lm_head_params(s)


def vision_params(s: Shapes) -> int:
    """Qwen2.5-VL's vision tower: patch embedding (no bias), blocks (RMSNorms, fused qkv + proj with biases,
    a SwiGLU MLP with biases), the 2x2 patch merger (RMSNorm, two linears with biases)."""
    v = s.vision
    if not v:
        return 0
    h, i = v["hidden_size"], v["intermediate_size"]
    patch = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * h
    block = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (2 * (h * i + i) + i * h + h)
    merged = h * v.get("spatial_merge_size", 2) ** 2
    out = v.get("out_hidden_size", s.hidden)
    merger = h + (merged * merged + merged) + (merged * out + out)
    return patch + v["depth"] * block + merger


def total_params(s: Shapes) -> int:
    return text_params(s) + vision_params(s)


def kv_bytes_per_token(s: Shapes, dtype_bytes: int = 2, tp: int = 1) -> int:
    """2 (K and V) x layers x KV heads x head_dim x bytes; a TP rank holds KV heads / TP (at least one)."""
    return 2 * s.layers * math.ceil(s.kv_heads / tp) * s.head_dim * dtype_bytes


# ----------------------------------------------------------------------------- memory per component


def state_bytes_per_param(engine: str, dtype: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes per parameter, see ASSUMPTIONS."""
    if engine == "megatron":
        return 4, 4, 8
    return (2, 2, 12) if DTYPE_BYTES[dtype] == 2 else (4, 4, 8)


@dataclass(frozen=True)
class RankParams:
    """Parameters on the most loaded model-parallel rank: all of them, and those trained."""

    total: int
    trainable: int


def rank_params(s: Shapes, engine: str, tp: int = 1, pp: int = 1, freeze_vision: bool = False,
                critic: bool = False) -> RankParams:
    """The most loaded rank of a model replica under AutoTP (engine deepspeed, tp = autotp_size) or megatron
    TP x PP. A critic has no LM head and a value head (hidden x 1)."""
    vision = vision_params(s)
    head = s.hidden if critic else lm_head_params(s)
    layers = s.layers * decoder_layer_params(s) / tp
    if engine == "megatron":
        per_stage = math.ceil(s.layers / pp) * decoder_layer_params(s) / tp
        first = per_stage + embedding_params(s) / tp + vision + ((head / tp + s.hidden) if pp == 1 else 0)
        last = per_stage + head / tp + s.hidden
        total = max(first, last)
        frozen = vision if freeze_vision else 0
        return RankParams(int(total), int(total - frozen))
    total = embedding_params(s) + layers + s.hidden + head + vision
    return RankParams(int(total), int(total - (vision if freeze_vision else 0)))


def model_state_bytes(params: RankParams, engine: str, dtype: str, zero_stage: int, dp: int,
                      offload_optimizer: bool = False) -> dict[str, float]:
    """Per GPU: {"params", "grads", "optimizer"} for one model (see ASSUMPTIONS)."""
    w, g, o = state_bytes_per_param(engine, dtype)
    n, t = params.total, params.trainable
    if engine == "megatron":
        out = {"params": w * n, "grads": g * t, "optimizer": o * t / dp}
    else:
        out = {"params": w * n / (dp if zero_stage >= 3 else 1), "grads": g * t / (dp if zero_stage >= 2 else 1),
               "optimizer": o * t / dp}
    if offload_optimizer:
        out["optimizer"] = 0.0
    return out


def layer_activation_bytes_per_token(s: Shapes, e: int = 2) -> int:
    """What one Hugging Face Qwen2.5-VL decoder layer saves for backward per token (measured: tests)."""
    return 2 * (4 + 2 * e) * s.hidden + 2 * e * s.hidden + 2 * e * s.kv_dim + 4 * e * s.intermediate + 8 + 4 * s.heads


def activation_bytes(s: Shapes, tokens: int, layers: int, checkpointing: bool, e: int = 2, tp: int = 1,
                     sequence_parallel: bool = False, in_flight: int = 1) -> float:
    """Peak activation bytes of one rank for a micro-batch of `tokens` over its `layers` decoder layers."""
    full = layer_activation_bytes_per_token(s, e)
    norms = 2 * (4 + 2 * e) * s.hidden
    per_layer = full / tp if sequence_parallel or tp == 1 else (full - norms) / tp + norms
    kept = (e * s.hidden / (tp if sequence_parallel else 1)) if checkpointing else per_layer
    grads = 4 * e * s.intermediate / tp     # the MLP's activation gradients while a layer runs backward
    return tokens * (in_flight * layers * kept + (per_layer if checkpointing else 0) + grads)


def loss_head_bytes(s: Shapes, tp: int = 1) -> float:
    return 4 * s.vocab * s.hidden / tp + LOSS_CHUNK_BYTES


# ----------------------------------------------------------------------------- the plan


@dataclass
class Phase:
    name: str
    items: list[tuple[str, float]]       # (what, bytes per GPU)
    limit: float                          # bytes this phase may use per GPU

    @property
    def total(self) -> float:
        return sum(b for _, b in self.items)

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


@dataclass
class Plan:
    stage: str
    lines: list[str] = field(default_factory=list)       # the report's body, in order
    phases: list[Phase] = field(default_factory=list)
    first_change: Optional[str] = None
    values: dict = field(default_factory=dict)            # the numbers, by name (tests, other callers)

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases) and self.first_change is None


def stage_of_yaml(path: str) -> str:
    """rl when the YAML has a rollout section, else coldstart."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return "rl" if isinstance(data, dict) and "rollout" in data else "coldstart"


def load_plan_config(path: str, overrides: list[str] = ()):
    """(stage, config). A plan is made on a login node: vLLM need not be installed to plan a vLLM rollout,
    so its install check is skipped (the config is validated as `rollout.engine=hf`, then set back)."""
    stage = stage_of_yaml(path)
    overrides = list(overrides)
    if stage == "rl" and importlib.util.find_spec("vllm") is None:
        with open(path) as f:
            engine = ((yaml.safe_load(f) or {}).get("rollout") or {}).get("engine", "hf")
        engine = (parse_overrides(overrides).get("rollout") or {}).get("engine", engine)
        config = load_config(stage, path, overrides + ["rollout.engine=hf"])
        config.rollout.engine = engine
        return stage, config
    return stage, load_config(stage, path, overrides)


def make_plan(stage: str, cfg, shapes: Shapes, nodes: int, gpus_per_node: int, gpu: GPU, *, mfu: float = MFU,
              decode_efficiency: float = DECODE_BW_EFFICIENCY, source: str = "") -> Plan:
    world = nodes * gpus_per_node
    par = cfg.parallel
    mp = par.model_parallel_size
    if world % mp:
        raise ConfigError(f"the model-parallel size ({mp}) must divide the {world} GPUs ({nodes} x {gpus_per_node})")
    dp = world // mp
    tp = par.tensor_parallel_size if par.engine == "megatron" else par.autotp_size
    pp = par.pipeline_parallel_size if par.engine == "megatron" else 1
    e = DTYPE_BYTES[cfg.model.dtype]
    mem = gpu.memory_gib * GiB
    usable = mem - RESERVE_GIB * GiB
    plan = Plan(stage)
    v = plan.values
    L = plan.lines
    n_all, n_vision = total_params(shapes), vision_params(shapes)
    v.update(world=world, dp=dp, total_params=n_all, vision_params=n_vision)

    L.append(f"ovr-hpc plan {stage}: {nodes} nodes x {gpus_per_node} {gpu.name} = {world} GPUs "
             f"({gpu.memory_gib:g} GiB, {gpu.bf16_tflops:g} bf16 TFLOP/s, HBM {gpu.hbm_tbps:g} TB/s, NVLink "
             f"{gpu.nvlink_gbps:g} GB/s, network {gpu.network_gbps:g} GB/s per GPU)")
    L.append(f"model       {source}: {n_all / 1e9:.2f} B parameters ({n_vision / 1e9:.2f} B vision), {shapes.layers} "
             f"layers, hidden {shapes.hidden}, {shapes.heads} heads / {shapes.kv_heads} KV, vocab {shapes.vocab}")
    layout = (f"megatron TP {tp} x PP {pp} x DP {dp}" if par.engine == "megatron" else
              f"DeepSpeed ZeRO-{par.zero_stage}" + (f" x AutoTP {tp}" if tp > 1 else "") + f", DP {dp}"
              + (", optimizer offloaded to CPU" if par.offload_optimizer else ""))
    L.append(f"layout      {layout}; {cfg.model.dtype}")

    policy = rank_params(shapes, par.engine, tp, pp, freeze_vision=cfg.model.freeze_vision)
    pol = model_state_bytes(policy, par.engine, cfg.model.dtype, par.zero_stage, dp, par.offload_optimizer)
    v["policy_states"] = pol
    if par.engine == "megatron":
        layers_here = math.ceil(shapes.layers / pp)
    else:
        layers_here = shapes.layers
    in_flight = pp
    ckpt = cfg.model.gradient_checkpointing
    sp = par.engine == "megatron" and par.sequence_parallel

    def acts(tokens: int, checkpointing: bool) -> float:
        return activation_bytes(shapes, tokens, layers_here, checkpointing, e, tp, sp, in_flight)

    zero3_working = (2 * e * max(decoder_layer_params(shapes), lm_head_params(shapes))
                     if par.engine == "deepspeed" and par.zero_stage >= 3 else 0)
    head = loss_head_bytes(shapes, tp)

    def states_items(prefix: str, st: dict) -> list[tuple[str, float]]:
        return [(f"{prefix} weights", st["params"]), (f"{prefix} gradients", st["grads"]),
                (f"{prefix} optimizer", st["optimizer"])]

    if stage == "coldstart":
        tokens = cfg.data.max_seq_len * par.micro_batch_size
        a_on, a_off = acts(tokens, True), acts(tokens, False)
        v.update(activations_ckpt=a_on, activations_no_ckpt=a_off, micro_tokens=tokens)
        items = states_items("policy", pol) + [
            (f"activations ({tokens:,} tokens, checkpointing {'on' if ckpt else 'off'})", a_on if ckpt else a_off),
            ("loss head", head)] + ([("ZeRO-3 gathered layers", zero3_working)] if zero3_working else [])
        plan.phases.append(Phase("training", items, usable))
        L.append(f"activations {tokens:,} tokens per micro-batch: {a_on / GiB:.1f} GiB with gradient checkpointing, "
                 f"{a_off / GiB:.1f} GiB without (model.gradient_checkpointing={str(ckpt).lower()})")
        rows = par.global_batch_size
        step_tokens = rows * cfg.data.max_seq_len
        accum = rows // (dp * par.micro_batch_size) if rows % (dp * par.micro_batch_size) == 0 else None
        flops = step_tokens * train_flops_per_token(shapes, policy_trained_params(shapes, cfg.model.freeze_vision),
                                                     cfg.data.max_seq_len, passes=(1, 0))
        seconds = flops / (world * gpu.bf16_tflops * 1e12 * mfu)
        v.update(step_tokens=step_tokens, step_seconds=seconds)
        L.append(f"tokens      {rows} rows x {cfg.data.max_seq_len:,} = {step_tokens:,} per step (<=, packed); "
                 + (f"accumulation {accum} x micro-batch {par.micro_batch_size} per rank" if accum else
                    f"global_batch_size {rows} is not divisible by DP {dp} x micro-batch {par.micro_batch_size}"))
        L.append(f"time        ~{seconds:,.0f} s per step ({flops / 1e18:.1f} EFLOP at {mfu:.0%} MFU)"
                 + _zero3_comm(par, shapes, e, gpu, tokens, world, mfu))
        if not accum:
            plan.first_change = (f"parallel.global_batch_size ({rows}) must be divisible by DP {dp} x micro-batch "
                                 f"{par.micro_batch_size}: change --nodes or the batch")
    else:
        _rl_plan(plan, cfg, shapes, gpu, world, dp, tp, pp, e, usable, mem, policy, pol, acts, head,
                 zero3_working, states_items, mfu, decode_efficiency)

    for ph in plan.phases:
        L.append(f"memory      {ph.name}: {ph.total / GiB:.1f} of {ph.limit / GiB:.1f} GiB "
                 f"{'fits' if ph.fits else 'DOES NOT FIT'}")
        for what, b in ph.items:
            L.append(f"              {b / GiB:8.1f} GiB  {what}")
    _disk(plan, cfg, shapes, stage, policy, tp, pp)
    if plan.first_change is None:
        plan.first_change = first_change(plan, cfg, shapes, stage, gpu, nodes, gpus_per_node)
    L.append("verdict     " + ("fits" if plan.fits else f"does not fit: first change {plan.first_change}"))
    return plan


def policy_trained_params(s: Shapes, freeze_vision: bool) -> int:
    return total_params(s) - (vision_params(s) if freeze_vision else 0)


def train_flops_per_token(s: Shapes, trained: int, context: int, passes: tuple[float, float]) -> float:
    """FLOPs per token for (forward + backward passes, forward-only passes) over sequences of `context`
    tokens: 6 (or 2) x parameters + causal attention 4 x layers x hidden x context / 2 per forward (x 3
    with backward). Frozen parameters still cost their forward (2 x) in a backward pass."""
    fb, fwd = passes
    total = total_params(s)
    attention = 4 * s.layers * s.hidden * context / 2
    return fb * (6 * trained + 2 * (total - trained) + 3 * attention) + fwd * (2 * total + attention)


def _zero3_comm(par, s: Shapes, e: int, gpu: GPU, tokens: int, world: int, mfu: float) -> str:
    if par.engine != "deepspeed" or par.zero_stage < 3 or world == 1:
        return ""
    traffic = 3 * e * total_params(s)          # all-gather forward + backward, reduce-scatter gradients
    comm = traffic / (gpu.network_gbps * 1e9)
    compute = tokens * 6 * total_params(s) / (gpu.bf16_tflops * 1e12 * mfu)
    return (f"; ZeRO-3 moves {traffic / 1e9:.0f} GB per GPU per micro-batch: {comm:.1f} s on the network vs "
            f"{compute:.1f} s of compute ({'hidden when overlapped' if comm < compute else 'NETWORK-BOUND'})")


def _rl_plan(plan, cfg, shapes, gpu, world, dp, tp, pp, e, usable, mem, policy, pol, acts, head, zero3_working,
             states_items, mfu, decode_efficiency) -> None:
    L, v, par, ro, alg = plan.lines, plan.values, cfg.parallel, cfg.rollout, cfg.algorithm
    resident = states_items("policy", pol)
    critic_on = alg.advantage == "gae"
    if critic_on:
        critic = rank_params(shapes, par.engine, tp, pp, freeze_vision=cfg.model.freeze_vision, critic=True)
        cst = model_state_bytes(critic, par.engine, cfg.model.dtype, par.zero_stage, dp, par.offload_optimizer)
        resident += states_items("critic", cst)
        v["critic_states"] = cst
    if alg.kl_coef > 0:
        resident.append(("reference (frozen bf16 copy, whole)", e * total_params(shapes)))
    tokens = alg.max_tokens_per_microbatch
    a_on, a_off = acts(tokens, True), acts(tokens, False)
    v.update(activations_ckpt=a_on, activations_no_ckpt=a_off, micro_tokens=tokens)
    ckpt = cfg.model.gradient_checkpointing
    L.append(f"activations {tokens:,} tokens per micro-batch: {a_on / GiB:.1f} GiB with gradient checkpointing, "
             f"{a_off / GiB:.1f} GiB without (model.gradient_checkpointing={str(ckpt).lower()})")
    asleep = ([] if ro.enable_sleep_mode else
              [("vLLM (no sleep mode: stays allocated)", ro.gpu_memory_utilization * mem)])
    train_items = resident + asleep + [
        (f"activations ({tokens:,} tokens, checkpointing {'on' if ckpt else 'off'})", a_on if ckpt else a_off),
        ("loss head", head)] + ([("ZeRO-3 gathered layers", zero3_working)] if zero3_working else [])

    # vLLM, colocated: its share of the GPU while the trainer's states stay resident
    rtp = ro.tensor_parallel_size
    engines = world // rtp
    per_engine = ro.prompts_per_step * ro.samples_per_prompt / engines
    weights = 2 * total_params(shapes) / rtp
    kv_tok = kv_bytes_per_token(shapes, 2, rtp)
    vllm_acts = ro.max_num_batched_tokens * 3 * shapes.intermediate * 2 / rtp + VLLM_GRAPHS_BYTES
    share = ro.gpu_memory_utilization * mem
    kv_space = (ro.kv_cache_mb * 2**20) if ro.kv_cache_mb else share - weights - vllm_acts
    longest = max(length for _, length in ro.max_response_len)
    max_model_len = ro.max_model_len or cfg.data.max_prompt_len + longest
    v.update(vllm_weights=weights, kv_bytes_per_token=kv_tok, kv_space=kv_space, responses_per_engine=per_engine)
    L.append(f"rollout     {engines} vLLM engines (TP {rtp}), {per_engine:g} responses each per step; per GPU: bf16 "
             f"weights {weights / GiB:.1f} GiB, activations {vllm_acts / GiB:.1f} GiB, KV cache "
             f"{kv_space / GiB:.1f} GiB ({ro.gpu_memory_utilization:g} x {gpu.memory_gib:g} GiB less those) at "
             f"{kv_tok:,} B per token")
    gen_items = resident + [("vLLM (rollout.gpu_memory_utilization x total)", share)]
    plan.phases.append(Phase("generation", gen_items, usable))
    plan.phases.append(Phase("training", train_items, usable))
    if kv_space < max_model_len * kv_tok:
        plan.first_change = (f"the KV cache ({kv_space / GiB:.1f} GiB) cannot hold one sequence of max_model_len "
                             f"{max_model_len:,} tokens ({max_model_len * kv_tok / GiB:.1f} GiB): raise "
                             f"rollout.gpu_memory_utilization or rollout.tensor_parallel_size")

    # per curriculum stage: concurrency, decode time, training time
    total_time = []
    stages = ro.max_response_len
    steps = cfg.schedule.max_steps or 0
    for k, (start, length) in enumerate(stages):
        end = stages[k + 1][0] if k + 1 < len(stages) else (steps or start)
        seq = cfg.data.max_prompt_len + length
        wanted = min(per_engine, ro.max_num_seqs)
        fit = max(0, int(kv_space // (seq * kv_tok)))
        bound = _rl_step_time(cfg, shapes, gpu, world, rtp, per_engine, kv_space, kv_tok, weights, length, length,
                              mfu, decode_efficiency)
        typical = _rl_step_time(cfg, shapes, gpu, world, rtp, per_engine, kv_space, kv_tok, weights, length,
                                RESPONSE_MEAN_FRACTION * length, mfu, decode_efficiency)
        total_time.append(typical["step_s"] * max(0, end - start))
        v.setdefault("stages", []).append(dict(start=start, length=length, seq=seq, kv_needed=wanted * seq * kv_tok,
                                               room=fit, bound=bound, typical=typical))
        L.append(f"stage {k + 1}     from step {start}: responses <= {length:,} (+ prompt <= "
                 f"{cfg.data.max_prompt_len:,}); KV for {wanted:g} concurrent sequences at the limit "
                 f"{wanted * seq * kv_tok / GiB:.1f} GiB per engine, "
                 f"room for {fit}: {bound['concurrent']:g} at once, {bound['waves']} wave(s)")
        for name, t in (("typical", typical), ("bound", bound)):
            L.append(f"  {name:<10}  responses {t['mean_len']:,.0f} tokens on average: <= {t['step_tokens']:,.0f} "
                     f"tokens per step; ~{t['step_s']:,.0f} s = generation {t['generation_s']:,.0f} s "
                     f"({t['concurrent']:g} sequences at "
                     f"once, {t['token_step_ms']:.1f} ms per token step, {t['bound_by']}-bound) + training "
                     f"{t['training_s']:,.0f} s + weight sync {t['sync_s']:.1f} s")
    if steps:
        L.append(f"run         ~{sum(total_time) / 3600:,.0f} h for {steps} steps (schedule.max_steps), at the "
                 "typical times")


RESPONSE_MEAN_FRACTION = 0.3  # mean response / max length: the paper's curves, ~7.3k of 24k early, ~12.6k of 48k late


def _rl_step_time(cfg, s: Shapes, gpu: GPU, world: int, rtp: int, per_engine: float, kv_space: float, kv_tok: int,
                  weights: float, length: int, mean_len: float, mfu: float, decode_efficiency: float) -> dict:
    """One RL step's time with responses of `mean_len` on average, the longest at `length`: continuous
    batching keeps as many sequences decoding as the KV cache holds (at prompt + mean length); the decode
    runs for max(all tokens / concurrency, the longest response) token steps."""
    ro, alg, prompt = cfg.rollout, cfg.algorithm, cfg.data.max_prompt_len
    n_params = total_params(s)
    peak = gpu.bf16_tflops * 1e12
    conc = max(1, min(per_engine, ro.max_num_seqs, int(kv_space // ((prompt + mean_len) * kv_tok))))
    token_steps = max(per_engine * mean_len / conc, length)
    t_mem, t_flops = decode_step_seconds(conc, prompt + mean_len / 2, weights, kv_tok, n_params, rtp, gpu, mfu,
                                         decode_efficiency)
    prefill = prefill_seconds(per_engine * prompt, n_params, rtp, gpu, mfu)
    generation = token_steps * max(t_mem, t_flops) + prefill
    n = ro.prompts_per_step * ro.samples_per_prompt
    seq = prompt + mean_len
    trained = policy_trained_params(s, cfg.model.freeze_vision)
    per_token = (train_flops_per_token(s, trained, seq, (alg.policy_updates_per_step, 1))
                 + (train_flops_per_token(s, trained, seq, (1, 1)) if alg.advantage == "gae" else 0)
                 + (train_flops_per_token(s, trained, seq, (0, 1)) if alg.kl_coef > 0 else 0))
    training = n * seq * per_token / (world * peak * mfu)
    sync = 2 * n_params / (gpu.network_gbps * 1e9)
    waves = math.ceil(per_engine / conc)
    return dict(mean_len=mean_len, concurrent=conc, waves=waves, step_tokens=n * seq,
                token_step_ms=max(t_mem, t_flops) * 1e3,
                bound_by="memory" if t_mem >= t_flops else "compute", generation_s=generation, training_s=training,
                sync_s=sync, step_s=generation + training + sync)


def decode_step_seconds(active: float, context: float, weights: float, kv_tok: int, n_params: int, rtp: int,
                        gpu: GPU, mfu: float, decode_efficiency: float) -> tuple[float, float]:
    """(memory, compute) seconds of one token step of an engine decoding `active` sequences of `context`
    tokens on average: it reads its weights and their KV cache once, and does 2 x params FLOPs per sequence;
    the step takes the larger."""
    t_mem = (weights + active * context * kv_tok) / (gpu.hbm_tbps * 1e12 * decode_efficiency)
    return t_mem, 2 * n_params * active / rtp / (gpu.bf16_tflops * 1e12 * mfu)


def prefill_seconds(tokens: float, n_params: int, rtp: int, gpu: GPU, mfu: float) -> float:
    """Prefill is compute-bound: 2 x params FLOPs per token, at `mfu`."""
    return tokens * 2 * n_params / rtp / (gpu.bf16_tflops * 1e12 * mfu)


def fifo_decode_profile(tokens: list[int], slots: int) -> list[tuple[int, int]]:
    """[(token steps, sequences decoding)] from the first token to the last of these sequences, when `slots`
    of them decode at a time and each waiting one takes the first free slot in arrival order (continuous
    batching, vLLM's first-come first-served scheduler): a long response admitted late ends the step long
    after the others, with few sequences decoding."""
    free = [0] * max(1, min(slots, len(tokens)))
    change: dict[int, int] = {}   # token step -> change in the number decoding
    for n in tokens:
        start = heapq.heappop(free)
        heapq.heappush(free, start + n)
        change[start] = change.get(start, 0) + 1
        change[start + n] = change.get(start + n, 0) - 1
    profile, active, times = [], 0, sorted(change)
    for t, t_next in zip(times, times[1:]):
        active += change[t]
        if profile and profile[-1][1] == active:
            profile[-1] = (profile[-1][0] + t_next - t, active)
        else:
            profile.append((t_next - t, active))
    return profile


def fifo_decode_steps(tokens: list[int], slots: int) -> int:
    """Token steps until the last of these sequences is decoded (fifo_decode_profile)."""
    return sum(n for n, _ in fifo_decode_profile(tokens, slots))


@dataclass
class PartialStep:
    profile: list[tuple[int, int]]   # fifo_decode_profile of the step's requests
    finished: int           # responses that ended in the step
    continued: int          # carried sequences continued in the step (their prompt is prefilled again)
    prefix_tokens: int      # and their response tokens so far (prefilled again: the weights changed)
    staleness: list[int]    # per finished response: steps since it started


def partial_decode_steps(new_lengths: list[list[int]], slots: int, budget: int) -> list[PartialStep]:
    """Steps of partial rollouts on one engine: step k admits the carried sequences first (they were queued
    before), then the responses of new_lengths[k]; every sequence decodes at most `budget` tokens per step
    (ovr_hpc/rl/partial.py) and a response is finished once it has its full length."""
    carried: list[list[int]] = []   # [full length, tokens so far, first step]
    steps = []
    for k, lengths in enumerate(new_lengths):
        continued, prefix_tokens = len(carried), sum(done for _, done, _ in carried)
        carried += [[n, 0, k] for n in lengths]
        requests = [min(budget, n - done) for n, done, _ in carried]
        profile = fifo_decode_profile(requests, slots)
        for c, r in zip(carried, requests):
            c[1] += r
        finished = [c for c in carried if c[1] >= c[0]]
        carried = [c for c in carried if c[1] < c[0]]
        steps.append(PartialStep(profile, len(finished), continued, prefix_tokens, [k - c[2] for c in finished]))
    return steps


def _disk(plan: Plan, cfg, s: Shapes, stage: str, policy: RankParams, tp: int, pp: int) -> None:
    """Per checkpoint: engine states (weights + optimizer), hf/ (bf16), the critic's engine states."""
    par, c = cfg.parallel, cfg.checkpoint
    n = total_params(s)
    trained = policy_trained_params(s, cfg.model.freeze_vision)

    def engine_bytes(total: int, trainable: int) -> float:
        if par.engine == "megatron":
            return 4 * total + 8 * trainable                   # fp32 weights, AdamW m, v
        w = 2 if DTYPE_BYTES[cfg.model.dtype] == 2 else 4
        return w * total + 12 * trainable                      # bf16 weights, fp32 master + m + v

    parts = [("engine state (weights + optimizer)", engine_bytes(n, trained))]
    if c.save_hf_weights:
        parts.append(("hf/ (bf16 weights)", 2 * n))
    if stage == "rl" and cfg.algorithm.advantage == "gae":
        critic_n = n - lm_head_params(s) + s.hidden
        frozen = vision_params(s) if cfg.model.freeze_vision else 0
        parts.append(("critic engine state", engine_bytes(critic_n, critic_n - frozen)))
    each = sum(b for _, b in parts)
    plan.values.update(disk_per_checkpoint=each, disk_keep_last=each * c.keep_last)
    listed = ", ".join(f"{w} {b / 1e9:,.0f} GB" for w, b in parts)
    plan.lines.append(f"disk        {each / 1e9:,.0f} GB per checkpoint ({listed}); keep_last {c.keep_last}: "
                      f"{each * c.keep_last / 1e12:.2f} TB, {each * (c.keep_last + 1) / 1e12:.2f} TB "
                      "while a save is written")


def first_change(plan: Plan, cfg, s: Shapes, stage: str, gpu: GPU, nodes: int, gpus_per_node: int) -> Optional[str]:
    """The first thing to change for the phase that does not fit (None when everything fits)."""
    failing = [p for p in plan.phases if not p.fits]
    if not failing:
        return None
    ph = failing[0]
    par = cfg.parallel
    items = dict(ph.items)
    over = (ph.total - ph.limit) / GiB
    acts = next((b for w, b in ph.items if w.startswith("activations")), 0)
    if ph.name == "generation":
        share = cfg.rollout.gpu_memory_utilization
        trainer = ph.total - items["vLLM (rollout.gpu_memory_utilization x total)"]
        room = (ph.limit - trainer) / (gpu.memory_gib * GiB)
        if room > 0.15:
            return (f"rollout.gpu_memory_utilization={room:.2f} (from {share:g}: the trainer's resident states "
                    f"leave {room * gpu.memory_gib:.0f} GiB)")
    if ph.name != "generation" and not cfg.model.gradient_checkpointing and acts > ph.limit / 4:
        return "model.gradient_checkpointing=true (activations " f"{acts / GiB:.0f} GiB)"
    if par.engine == "deepspeed" and par.zero_stage < 3 and par.autotp_size == 1:
        return f"parallel.zero_stage=3 (shards the weights and gradients too; {over:.1f} GiB over)"
    if par.engine == "deepspeed" and not par.offload_optimizer:
        opt = sum(b for w, b in ph.items if w.endswith("optimizer"))
        if opt > over * GiB:
            return f"parallel.offload_optimizer=true (frees {opt / GiB:.1f} GiB of optimizer states; slower steps)"
    if acts > over * GiB and ph.name == "training":
        key = "data.max_seq_len" if stage == "coldstart" else "algorithm.max_tokens_per_microbatch"
        return (f"a shorter micro-batch ({key}) or tensor / sequence parallelism (parallel.engine=megatron) for "
                "the activations")
    if par.engine == "megatron":
        return (f"parallel.pipeline_parallel_size={par.pipeline_parallel_size * 2} (halves each stage's layers; "
                f"{over:.1f} GiB over)")
    return f"more GPU memory (--gpu h200 / b200) or more nodes than {nodes} ({over:.1f} GiB over)"


def plan_command(args) -> int:
    """`ovr-hpc plan`: the report on stdout; exit 0 when it fits, 1 when not."""
    name = args.gpu.lower()
    if name not in GPUS:
        raise ConfigError(f"--gpu {args.gpu}: expected one of {', '.join(GPUS)}")
    stage, cfg = load_plan_config(args.config, args.overrides)
    shapes, source = resolve_shapes(cfg.model.path, args.config, args.model or "")
    plan = make_plan(stage, cfg, shapes, args.nodes, args.gpus_per_node, GPUS[name], mfu=args.mfu,
                     decode_efficiency=args.decode_efficiency, source=source)
    print(format_plan(plan, args.mfu, args.decode_efficiency))
    return 0 if plan.fits else 1


def format_plan(plan: Plan, mfu: float = MFU, decode_efficiency: float = DECODE_BW_EFFICIENCY) -> str:
    body = "\n".join(plan.lines)
    notes = "\n".join(f"  - {a}" for a in assumptions(mfu, decode_efficiency))
    return f"{body}\nassumptions\n{notes}"
