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
    """Where tokenized data is cached (default OUTPUT_DIR/data_cache); shared by requeued runs."""

    def validate(self, prefix: str) -> None:
        if not self.train_files:
            raise ConfigError(f"{prefix}.train_files is empty: give at least one JSONL or Parquet file")
        for i, path in enumerate(self.train_files):
            if not path.endswith((".jsonl", ".json", ".parquet")):
                raise ConfigError(f"{prefix}.train_files[{i}] = {path!r}: expected a .jsonl or .parquet file")
        _positive(prefix, "max_seq_len", self.max_seq_len)
        _positive(prefix, "min_pixels", self.min_pixels)
        if self.max_pixels < self.min_pixels:
            raise ConfigError(f"{prefix}.max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"{prefix}.max_bad_fraction ({self.max_bad_fraction}) must be in [0, 1]")


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
class ParallelConfig:
    engine: Literal["deepspeed"] = "deepspeed"
    """Training backend."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage: 1, 2 or 3 (AutoTP needs <= 2)."""
    autotp_size: int = 1
    """DeepSpeed AutoTP tensor-parallel size (ranks in a group see the same data)."""
    global_batch_size: int = 8
    """Rows (packed sequences) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Rows per forward/backward on one rank; gradient accumulation = global / (dp * micro)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO offload)."""

    def validate(self, prefix: str) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage ({self.zero_stage}) must be 1, 2 or 3")
        _positive(prefix, "autotp_size", self.autotp_size)
        _positive(prefix, "global_batch_size", self.global_batch_size)
        _positive(prefix, "micro_batch_size", self.micro_batch_size)
        if self.autotp_size > 1 and self.zero_stage > 2:
            raise ConfigError(
                f"{prefix}.autotp_size ({self.autotp_size}) needs {prefix}.zero_stage <= 2 "
                f"(DeepSpeed AutoTP does not combine with ZeRO-3); set {prefix}.zero_stage=2"
            )

    def validate_world(self, world_size: int, prefix: str = "parallel") -> None:
        """Checks that need the number of ranks (known at submit time from nodes x gpus)."""
        if world_size % self.autotp_size:
            raise ConfigError(
                f"{prefix}.autotp_size ({self.autotp_size}) must divide the world size ({world_size})"
            )
        dp = world_size // self.autotp_size
        if self.global_batch_size % (dp * self.micro_batch_size):
            raise ConfigError(
                f"{prefix}.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"data-parallel size ({dp}) x {prefix}.micro_batch_size ({self.micro_batch_size}) "
                f"= {dp * self.micro_batch_size}"
            )

    def grad_accum_steps(self, world_size: int) -> int:
        return self.global_batch_size // (world_size // self.autotp_size * self.micro_batch_size)


@dataclass
class CheckpointConfig:
    output_dir: str = ""
    """Run directory: checkpoints/, metrics.jsonl, tensorboard/, data_cache/."""
    every_steps: int = 500
    """Save every N optimizer steps (and always at the end and on preemption)."""
    keep_last: int = 3
    """Keep the newest K checkpoints; older ones are deleted after a save succeeds."""
    resume: bool = True
    """Resume from OUTPUT_DIR/checkpoints/latest when it exists."""
    save_hf_weights: bool = True
    """Write full Hugging Face weights into each checkpoint (what `ovr-hpc export` reads)."""

    def validate(self, prefix: str) -> None:
        if not self.output_dir:
            raise ConfigError(f"{prefix}.output_dir is required")
        _positive(prefix, "every_steps", self.every_steps)
        _positive(prefix, "keep_last", self.keep_last)


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
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        validate_tp_against_model(self.model.path, self.parallel.autotp_size, "parallel.autotp_size")


def model_text_config(path: str) -> dict | None:
    """The language model's config.json entries, when `path` is a local model directory (else None)."""
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return {**config, **config.get("text_config", {})}


def validate_tp_against_model(path: str, tp: int, key: str) -> None:
    text = model_text_config(path)
    if tp <= 1 or text is None:
        return
    for name in ("num_attention_heads", "num_key_value_heads"):
        if name in text and text[name] % tp:
            raise ConfigError(
                f"{key} ({tp}) must divide the model's {name} ({text[name]}, {path}/config.json): "
                "each tensor-parallel rank holds whole heads"
            )


STAGES: dict[str, type] = {"coldstart": ColdStartConfig}


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
            where = f"section {prefix!r}" if prefix else "the top level"
            raise ConfigError(f"unknown key {full!r}: {where} has {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


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
                data = yaml.safe_load(f) or {}
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
