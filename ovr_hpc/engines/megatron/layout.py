"""Model dimensions, pipeline-stage layer split and layout validation for the megatron-core engine.

No torch and no megatron import: `ovr_hpc.config` can call `validate_megatron_layout` while it checks a
YAML file, and the conversion (`convert.py`) takes its sizes from `TextDims`.

Pipeline split
--------------
``pipeline_layer_split(num_layers, pp)`` gives the number of decoder layers on each stage. When ``pp``
divides the layers every stage gets ``num_layers / pp``. Otherwise the middle stages get the larger
count and the first and last stages take fewer (when the numbers allow it): the first stage also carries
the vision tower and the token embedding, the last one the output layer and the loss over the whole
vocabulary. When the first and last stages share an odd count the last stage gets the fewer layers. The result is always expressible with
megatron-core's ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` (the
middle stages are equal), which `PipelineSplit.mcore_kwargs()` returns.
Example: 28 layers on 3 stages -> [9, 10, 9]; 80 layers on 3 stages -> [27, 27, 26].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ovr_hpc.config import ConfigError

__all__ = [
    "TextDims",
    "PipelineSplit",
    "pipeline_layer_split",
    "validate_megatron_layout",
    "padded_vocab_size",
]


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


@dataclass(frozen=True)
class TextDims:
    """The language model's sizes, as megatron-core needs them."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = True

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> "TextDims":
        """From a Qwen2.5-VL config: a `PretrainedConfig` (top level or `text_config`), or the dict of
        ``config.json`` (top level with a nested ``text_config``, or already merged as
        `ovr_hpc.config.model_text_config` returns it)."""
        top = config
        text = _get(config, "text_config", None) or config
        if isinstance(top, Mapping) and isinstance(text, Mapping) and text is not top:
            merged = {**top, **text}
        else:
            merged = text
        hidden = _get(merged, "hidden_size")
        heads = _get(merged, "num_attention_heads")
        kv = _get(merged, "num_key_value_heads", heads)
        head_dim = _get(merged, "head_dim", None) or hidden // heads
        tie = _get(merged, "tie_word_embeddings", None)
        if tie is None:
            tie = _get(top, "tie_word_embeddings", False)
        return cls(
            hidden_size=int(hidden),
            num_layers=int(_get(merged, "num_hidden_layers")),
            num_heads=int(heads),
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            ffn_hidden_size=int(_get(merged, "intermediate_size")),
            vocab_size=int(_get(merged, "vocab_size")),
            tie_word_embeddings=bool(tie),
        )


def padded_vocab_size(vocab_size: int, tp_size: int, make_vocab_size_divisible_by: int = 1) -> int:
    """The vocabulary size of the vocab-parallel embedding and output layer.

    megatron-core's ``VocabParallelEmbedding`` / ``ColumnParallelLinear`` need the vocabulary to split
    evenly over the tensor-parallel ranks. Megatron-LM's training script pads it to a multiple of
    ``make_vocab_size_divisible_by * tp`` (default 128). We default to 1, i.e. pad only when TP does not
    divide the vocabulary: Qwen2.5-VL's checkpoints already have 151936 / 152064 rows (multiples of 128 and
    of every TP size up to 128 / 512), so no padding happens for them, and an unpadded output layer keeps
    the log-probs identical to Hugging Face's. When padding does happen, the padded embedding rows are
    zeros (never looked up) and the padded output rows are zeros: the log-prob code must mask logits at
    ids >= the real vocabulary size to -inf (a zero logit would otherwise enter the softmax).
    """
    multiple = max(1, int(make_vocab_size_divisible_by)) * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class PipelineSplit:
    """Decoder layers per pipeline stage and the local <-> global layer index mapping."""

    layers_per_stage: tuple[int, ...]

    @property
    def pp_size(self) -> int:
        return len(self.layers_per_stage)

    @property
    def num_layers(self) -> int:
        return sum(self.layers_per_stage)

    @property
    def even(self) -> bool:
        return len(set(self.layers_per_stage)) == 1

    def offset(self, pp_rank: int) -> int:
        """Global index of the first layer of stage `pp_rank`."""
        return sum(self.layers_per_stage[:pp_rank])

    def stage_layers(self, pp_rank: int) -> range:
        """Global layer indices on stage `pp_rank`."""
        start = self.offset(pp_rank)
        return range(start, start + self.layers_per_stage[pp_rank])

    def to_global(self, pp_rank: int, local: int) -> int:
        if not 0 <= local < self.layers_per_stage[pp_rank]:
            raise IndexError(f"stage {pp_rank} has {self.layers_per_stage[pp_rank]} layers, no local layer {local}")
        return self.offset(pp_rank) + local

    def to_local(self, global_layer: int) -> tuple[int, int]:
        """(pp_rank, local index) of global layer `global_layer`."""
        if not 0 <= global_layer < self.num_layers:
            raise IndexError(f"layer {global_layer} out of range (the model has {self.num_layers})")
        start = 0
        for rank, n in enumerate(self.layers_per_stage):
            if global_layer < start + n:
                return rank, global_layer - start
            start += n
        raise AssertionError("unreachable")

    def mcore_kwargs(self) -> dict:
        """TransformerConfig keywords for this split (empty when even)."""
        if self.even or self.pp_size == 1:
            return {}
        return {
            "num_layers_in_first_pipeline_stage": self.layers_per_stage[0],
            "num_layers_in_last_pipeline_stage": self.layers_per_stage[-1],
        }

    def describe(self) -> str:
        per = ", ".join(str(n) for n in self.layers_per_stage)
        if self.even:
            return f"{self.num_layers} layers over {self.pp_size} pipeline stages: {self.layers_per_stage[0]} each"
        ends_fewer = max(self.layers_per_stage[0], self.layers_per_stage[-1]) <= min(self.layers_per_stage[1:-1] or [0])
        why = (
            " (first / last stage fewer: they also hold the vision tower + embedding / the output layer + loss)"
            if ends_fewer and self.pp_size > 2
            else ""
        )
        return (
            f"{self.num_layers} layers do not split evenly over {self.pp_size} pipeline stages: "
            f"layers per stage [{per}]{why}"
        )


def pipeline_layer_split(
    num_layers: int,
    pp_size: int,
    *,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> PipelineSplit:
    """Layers per stage (see the module docstring). `first_stage_layers` / `last_stage_layers` pin the
    first / last stage as megatron-core's ``num_layers_in_{first,last}_pipeline_stage`` do; the middle
    stages must then split the rest evenly."""
    if pp_size < 1:
        raise ConfigError(f"pipeline parallel size must be >= 1, got {pp_size}")
    if num_layers < pp_size:
        raise ConfigError(f"pipeline parallel size ({pp_size}) exceeds the model's {num_layers} layers")
    if pp_size == 1:
        if first_stage_layers not in (None, num_layers) or last_stage_layers not in (None, num_layers):
            raise ConfigError("with one pipeline stage it holds all layers")
        return PipelineSplit((num_layers,))

    if first_stage_layers is not None or last_stage_layers is not None:
        mid_count = pp_size - 2
        first = first_stage_layers
        last = last_stage_layers
        if first is None or last is None:
            # one pinned: the others split the rest evenly
            pinned = first if first is not None else last
            rest = num_layers - pinned
            if rest % (pp_size - 1):
                raise ConfigError(
                    f"{rest} layers left after pinning one stage to {pinned} do not split over the other "
                    f"{pp_size - 1} stages"
                )
            each = rest // (pp_size - 1)
            first = first if first is not None else each
            last = last if last is not None else each
        rest = num_layers - first - last
        if first < 1 or last < 1 or rest < 0:
            raise ConfigError(f"invalid first/last stage layers ({first}, {last}) for {num_layers} layers")
        if mid_count == 0:
            if rest:
                raise ConfigError(f"first + last stage layers ({first} + {last}) must equal {num_layers}")
            return PipelineSplit((first, last))
        if rest % mid_count or rest // mid_count < 1:
            raise ConfigError(
                f"the {rest} layers between the first ({first}) and last ({last}) stage must split evenly "
                f"over the {mid_count} middle stages"
            )
        return PipelineSplit((first,) + (rest // mid_count,) * mid_count + (last,))

    if num_layers % pp_size == 0:
        return PipelineSplit((num_layers // pp_size,) * pp_size)
    if pp_size == 2:
        return PipelineSplit((num_layers - num_layers // 2, num_layers // 2))
    # middle stages get m layers each, first + last share the rest (last one fewer when it is odd); pick
    # the m with the smallest largest stage, preferring first / last stages no larger than the middle ones
    best = None
    for m in range(1, num_layers):
        rest = num_layers - m * (pp_size - 2)
        if rest < 2:
            break
        last = rest // 2
        first = rest - last
        key = (max(m, first), first > m)
        if best is None or key < best[0]:
            best = (key, (first,) + (m,) * (pp_size - 2) + (last,))
    if best is None:
        raise ConfigError(f"cannot split {num_layers} layers over {pp_size} pipeline stages")
    return PipelineSplit(best[1])


def validate_megatron_layout(
    text_config: Any,
    tp: int,
    pp: int,
    world_size: Optional[int] = None,
    *,
    tp_key: str = "parallel.tensor_parallel_size",
    pp_key: str = "parallel.pipeline_parallel_size",
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> PipelineSplit:
    """Check a tensor x pipeline layout against the language model; raise `ConfigError` with the reason.

    * TP must divide the KV heads (megatron-core gives each rank whole query groups: Qwen2.5-VL-7B has 4,
      so TP 8 is rejected), the attention heads and the MLP's intermediate size.
    * PP must not exceed the layers; when it does not divide them the uneven split is returned and stated
      by `PipelineSplit.describe()` (the caller logs it).
    * ``world_size`` (when given) must be TP x PP x DP for a whole DP.

    `text_config` is a `TextDims`, a HF config or the ``config.json`` dict (`ovr_hpc.config.model_text_config`).
    The messages name `tp_key` / `pp_key`. Returns the `PipelineSplit`.
    """
    dims = text_config if isinstance(text_config, TextDims) else TextDims.from_hf_config(text_config)
    if tp < 1:
        raise ConfigError(f"{tp_key} ({tp}) must be >= 1")
    if pp < 1:
        raise ConfigError(f"{pp_key} ({pp}) must be >= 1")
    if dims.num_heads % dims.num_kv_heads:
        raise ConfigError(
            f"the model has {dims.num_heads} attention heads and {dims.num_kv_heads} KV heads: not grouped-query"
        )
    reasons = []
    if dims.num_kv_heads % tp:
        divisors = [d for d in range(1, dims.num_kv_heads + 1) if dims.num_kv_heads % d == 0]
        reasons.append(
            f"it is not compatible with the model's {dims.num_kv_heads} KV heads ({dims.num_kv_heads} query groups "
            f"of {dims.heads_per_group} heads): megatron-core gives each tensor-parallel rank whole query groups, "
            f"so TP must divide {dims.num_kv_heads} (TP in {divisors}; add pipeline parallelism for more GPUs "
            "per model replica)"
        )
    if dims.num_heads % tp:
        reasons.append(
            f"it must divide the model's {dims.num_heads} attention heads (each tensor-parallel rank holds whole heads)"
        )
    if dims.ffn_hidden_size % tp:
        reasons.append(f"it must divide the MLP intermediate size {dims.ffn_hidden_size}")
    if reasons:
        raise ConfigError(f"{tp_key} ({tp}) is rejected: " + "; ".join(reasons))
    try:
        split = pipeline_layer_split(
            dims.num_layers, pp, first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers
        )
    except ConfigError as e:
        raise ConfigError(f"{pp_key} ({pp}): {e}") from None
    if world_size is not None and world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} must be TP x PP x DP: it is not a multiple of {tp_key} ({tp}) x "
            f"{pp_key} ({pp}) = {tp * pp}"
        )
    return split
