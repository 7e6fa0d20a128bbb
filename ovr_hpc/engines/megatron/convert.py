"""Hugging Face Qwen2.5-VL <-> megatron-core GPTModel parameter conversion, in plain torch.

No megatron import: everything here is unit-tested on the CPU (``tests/engines/test_megatron_convert.py``).

Names
-----
Hugging Face names are accepted in both spellings and produced in either (``ConversionConfig.hf_naming``):

==========================================  =========================================  ============================
transformers 5 in memory ("memory")         checkpoint files ("checkpoint")            megatron-core (stage-local)
==========================================  =========================================  ============================
model.language_model.embed_tokens.weight    model.embed_tokens.weight                  embedding.word_embeddings.weight
model.language_model.layers.{i}.self_attn.  model.layers.{i}.self_attn.{q,k,v}_proj.*  decoder.layers.{j}.self_attention.
  {q,k,v}_proj.{weight,bias}                                                             linear_qkv.{weight,bias}
...layers.{i}.self_attn.o_proj.weight       model.layers.{i}.self_attn.o_proj.weight   ...self_attention.linear_proj.weight
...layers.{i}.mlp.{gate,up}_proj.weight     model.layers.{i}.mlp.{gate,up}_proj.weight ...mlp.linear_fc1.weight
...layers.{i}.mlp.down_proj.weight          model.layers.{i}.mlp.down_proj.weight      ...mlp.linear_fc2.weight
...layers.{i}.input_layernorm.weight        model.layers.{i}.input_layernorm.weight    local: ...input_layernorm.weight
                                                                                       TE: ...self_attention.linear_qkv.
                                                                                           layer_norm_weight
...layers.{i}.post_attention_layernorm.     model.layers.{i}.post_attention_layernorm. local: ...pre_mlp_layernorm.weight
  weight                                      weight                                   TE: ...mlp.linear_fc1.layer_norm_weight
model.language_model.norm.weight            model.norm.weight                          decoder.final_layernorm.weight
lm_head.weight                              lm_head.weight                             output_layer.weight
model.visual.*                              visual.*                                   model.visual.* (unchanged, stage 0)
==========================================  =========================================  ============================

``i`` is the global layer index, ``j`` the index within the pipeline stage (megatron-core's plain
``state_dict()`` numbers each stage's layers from 0). TE-spec state dicts also carry ``*._extra_state``
entries (Transformer Engine's FP8 metadata): they are not parameters and are skipped on the way back.

Layouts (per tensor-parallel rank ``r`` of ``tp``)
-------------------------------------------------
* ``linear_qkv`` (column-parallel, with bias): grouped per KV head. For each KV group ``g`` the rows are
  the group's ``num_heads / num_kv_heads`` query heads, then key head ``g``, then value head ``g`` (each
  ``head_dim`` rows). Rank ``r`` holds the contiguous groups ``[r * G / tp, (r + 1) * G / tp)``, so TP must
  divide the KV heads.
* ``linear_fc1`` (column-parallel): each rank's shard is ``[gate rows of r; up rows of r]``; the TP-1 tensor
  is ``[gate; up]``. Note that the full tensor at TP > 1 is therefore NOT ``[gate; up]``.
* ``linear_proj`` / ``linear_fc2`` (row-parallel): split on the input dimension (dim 1).
* ``word_embeddings`` / ``output_layer`` (vocab-parallel): rows split by vocabulary id, the vocabulary
  padded to `padded_vocab_size` (padding rows are zeros and are dropped on the way back).
* Norms and the vision tower: replicated over tensor-parallel ranks.
* Pipeline: embedding and vision tower on the first stage, final norm and output layer on the last one,
  decoder layers split by `layout.pipeline_layer_split`. Tied embeddings (Qwen2.5-VL-3B): the output layer
  is absent at PP 1 (megatron-core shares the embedding) and a copy of the embedding on the last stage at
  PP > 1; on the way back it is dropped.

Lazy reading
------------
`iter_hf_to_mcore_shard` takes a mapping from HF name to either a tensor or a lazy slice (anything with
``get_shape()`` or ``.shape`` and ``__getitem__`` taking slices, like ``safe_open(...).get_slice(name)``).
Each rank reads only its own rows / columns. `SafetensorsCheckpoint` is that mapping over a checkpoint
directory (``model.safetensors`` or ``model.safetensors.index.json`` shards) and counts what it reads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import torch

from .layout import PipelineSplit, TextDims, padded_vocab_size, pipeline_layer_split

__all__ = [
    "ConversionConfig",
    "SafetensorsCheckpoint",
    "canonical_hf_name",
    "checkpoint_hf_name",
    "qkv_to_mcore",
    "qkv_from_mcore",
    "gate_up_to_mcore",
    "gate_up_from_mcore",
    "tp_partition_dim",
    "iter_hf_to_mcore_shard",
    "mcore_param_to_hf",
]

LM_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
CKPT_LM_PREFIX = "model."
CKPT_VISION_PREFIX = "visual."

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

NormScheme = Literal["local", "te"]


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ConversionConfig:
    """What the conversion needs besides the TP / PP rank and size."""

    dims: TextDims
    norm_scheme: NormScheme = "local"
    """``local``: megatron-core's local layer spec (separate norm modules); ``te``: the Transformer Engine
    spec (the norms fused into linear_qkv / linear_fc1 as ``layer_norm_weight``)."""
    make_vocab_size_divisible_by: int = 1
    """See `layout.padded_vocab_size` (1 = pad only when TP does not divide the vocabulary)."""
    hf_naming: Literal["memory", "checkpoint"] = "memory"
    """Names produced on the way back: transformers 5 in-memory names or checkpoint-file names."""
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None

    def __post_init__(self):
        if self.norm_scheme not in ("local", "te"):
            raise ValueError(f"norm_scheme must be 'local' or 'te', got {self.norm_scheme!r}")
        if self.hf_naming not in ("memory", "checkpoint"):
            raise ValueError(f"hf_naming must be 'memory' or 'checkpoint', got {self.hf_naming!r}")

    @classmethod
    def from_hf_config(cls, config: Any, **kwargs) -> "ConversionConfig":
        return cls(dims=TextDims.from_hf_config(config), **kwargs)

    def split(self, pp_size: int) -> PipelineSplit:
        return pipeline_layer_split(
            self.dims.num_layers,
            pp_size,
            first_stage_layers=self.first_stage_layers,
            last_stage_layers=self.last_stage_layers,
        )

    def padded_vocab(self, tp_size: int) -> int:
        return padded_vocab_size(self.dims.vocab_size, tp_size, self.make_vocab_size_divisible_by)

    def input_norm_name(self, j: int) -> str:
        if self.norm_scheme == "te":
            return f"decoder.layers.{j}.self_attention.linear_qkv.layer_norm_weight"
        return f"decoder.layers.{j}.input_layernorm.weight"

    def pre_mlp_norm_name(self, j: int) -> str:
        if self.norm_scheme == "te":
            return f"decoder.layers.{j}.mlp.linear_fc1.layer_norm_weight"
        return f"decoder.layers.{j}.pre_mlp_layernorm.weight"


# ----------------------------------------------------------------------------------------- HF names

_CKPT_LM = re.compile(r"^model\.(embed_tokens|layers|norm)\.")


def canonical_hf_name(name: str) -> str:
    """transformers 5 in-memory name for either spelling (``model.layers.0...`` -> ``model.language_model
    .layers.0...``, ``visual.x`` -> ``model.visual.x``); other names unchanged."""
    if name.startswith(CKPT_VISION_PREFIX):
        return VISION_PREFIX + name[len(CKPT_VISION_PREFIX) :]
    if _CKPT_LM.match(name):
        return LM_PREFIX + name[len(CKPT_LM_PREFIX) :]
    return name


def checkpoint_hf_name(name: str) -> str:
    """Checkpoint-file spelling of a (canonical) HF name."""
    if name.startswith(VISION_PREFIX):
        return CKPT_VISION_PREFIX + name[len(VISION_PREFIX) :]
    if name.startswith(LM_PREFIX):
        return CKPT_LM_PREFIX + name[len(LM_PREFIX) :]
    return name


def _hf_layer(i: int, rest: str) -> str:
    return f"{LM_PREFIX}layers.{i}.{rest}"


_HF_EMBED = LM_PREFIX + "embed_tokens.weight"
_HF_NORM = LM_PREFIX + "norm.weight"
_HF_HEAD = "lm_head.weight"
_HF_LAYER_PARAMS = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_HF_LAYER_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")


def _check_hf_names(names: Iterable[str], config: ConversionConfig) -> None:
    """Every (canonical) name must be a language-model parameter we map, or a vision tower parameter."""
    unknown = []
    for n in names:
        if n.startswith(VISION_PREFIX) or n in (_HF_EMBED, _HF_NORM, _HF_HEAD):
            continue
        m = _HF_LAYER_RE.match(n)
        if m and m.group(2) in _HF_LAYER_PARAMS and int(m.group(1)) < config.dims.num_layers:
            continue
        unknown.append(n)
    if unknown:
        raise ValueError(
            f"{len(unknown)} Hugging Face parameter(s) have no megatron-core mapping, e.g. {unknown[:5]} "
            "(a bias the Qwen2.5 architecture does not have, or a layer beyond num_hidden_layers)"
        )


# ----------------------------------------------------------------------------------------- layouts


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Fuse q, k, v (weights ``[rows, hidden]`` or biases ``[rows]``) into megatron-core's grouped layout:
    for each of the `num_kv_heads` groups, its query heads' rows, then its key rows, then its value rows."""
    tail = q.shape[1:]
    qg = q.reshape(num_kv_heads, -1, *tail)  # [G, hpg * hd, ...]
    kg = k.reshape(num_kv_heads, head_dim, *tail)
    vg = v.reshape(num_kv_heads, head_dim, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def qkv_from_mcore(
    fused: torch.Tensor, num_kv_heads: int, heads_per_group: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_to_mcore` (for the full tensor, or one TP rank's shard with its local group count)."""
    tail = fused.shape[1:]
    g = fused.reshape(num_kv_heads, (heads_per_group + 2) * head_dim, *tail)
    qn = heads_per_group * head_dim
    q = g[:, :qn].reshape(-1, *tail)
    k = g[:, qn : qn + head_dim].reshape(-1, *tail)
    v = g[:, qn + head_dim :].reshape(-1, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def gate_up_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One TP rank's linear_fc1 shard from that rank's gate and up shards: ``[gate_r; up_r]``."""
    return torch.cat([gate, up], dim=0)


def gate_up_from_mcore(pieces: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Full gate and up weights from the linear_fc1 shards of all TP ranks (in rank order)."""
    gates, ups = [], []
    for p in pieces:
        half = p.shape[0] // 2
        gates.append(p[:half])
        ups.append(p[half:])
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)


_COLUMN_SUFFIXES = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight")
_ROW_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def tp_partition_dim(mcore_name: str) -> Optional[int]:
    """The dimension a megatron-core parameter is split on over TP ranks (0: column- or vocab-parallel,
    1: row-parallel), or None when it is replicated (norms, the vision tower)."""
    if mcore_name in (EMBEDDING, OUTPUT_LAYER) or mcore_name.endswith(_COLUMN_SUFFIXES):
        return 0
    if mcore_name.endswith(_ROW_SUFFIXES):
        return 1
    return None


# ----------------------------------------------------------------------------------------- reading


def _shape(src: Any) -> tuple[int, ...]:
    if isinstance(src, torch.Tensor):
        return tuple(src.shape)
    if hasattr(src, "get_shape"):
        return tuple(src.get_shape())
    return tuple(src.shape)


def _read(src: Any, rows: Optional[tuple[int, int]] = None, cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Rows [a, b) (dim 0) or columns [a, b) (dim 1) of a tensor or lazy slice; everything when neither."""
    if rows is not None:
        index: Any = slice(*rows)
    elif cols is not None:
        index = (slice(None), slice(*cols))
    else:
        index = slice(None)
    out = src[index]
    if isinstance(src, torch.Tensor):
        out = out.clone(memory_format=torch.contiguous_format)  # own storage, not a view of the caller's
    return out.contiguous()


class _CountingSlice:
    """A lazy safetensors tensor that counts the elements it hands out."""

    def __init__(self, checkpoint: "SafetensorsCheckpoint", file: str, name: str):
        self._ckpt, self._file, self._name = checkpoint, file, name

    def get_shape(self) -> list[int]:
        return list(self._ckpt._handle(self._file).get_slice(self._name).get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        out = self._ckpt._handle(self._file).get_slice(self._name)[index]
        self._ckpt.elements_read += out.numel()
        self._ckpt.bytes_read += out.numel() * out.element_size()
        self._ckpt.reads.append((self._name, tuple(out.shape)))
        return out


class SafetensorsCheckpoint(Mapping[str, Any]):
    """Read-only mapping name -> lazy slice over a Hugging Face checkpoint directory (or one file).

    Nothing is read until a slice is indexed; `elements_read`, `bytes_read` and `reads` (name, shape)
    record what was. Use as a context manager (or call `close`) to release the file handles.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isdir(path) and os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {k: os.path.join(path, v) for k, v in weight_map.items()}
        else:
            single = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
            if not os.path.isfile(single):
                raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
            with safe_open(single, "pt") as f:
                self._file_of = {k: single for k in f.keys()}
        self.files = sorted(set(self._file_of.values()))
        self._handles: dict[str, Any] = {}
        self.elements_read = 0
        self.bytes_read = 0
        self.reads: list[tuple[str, tuple[int, ...]]] = []

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            h = self._handles[file] = safe_open(file, "pt")
        return h

    def __getitem__(self, name: str) -> _CountingSlice:
        return _CountingSlice(self, self._file_of[name], name)

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------- HF -> mcore


def _vocab_shard(src: Any, vocab_size: int, padded: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    per = padded // tp_size
    start, end = tp_rank * per, (tp_rank + 1) * per
    rows = _shape(src)[0]
    if rows != vocab_size:
        raise ValueError(f"embedding / output layer has {rows} rows, the config says vocab_size={vocab_size}")
    real_end = min(end, rows)
    part = _read(src, rows=(start, real_end)) if start < real_end else None
    if part is not None and part.shape[0] == per:
        return part
    hidden = _shape(src)[1]
    ref = part if part is not None else _read(src, rows=(0, 0))  # zero rows: only the dtype
    out = torch.zeros(per, hidden, dtype=ref.dtype)
    if part is not None:
        out[: part.shape[0]] = part
    return out


def iter_hf_to_mcore_shard(
    hf_tensors: Mapping[str, Any],
    config: ConversionConfig,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron-core name, tensor) pairs of one (tp_rank, pp_rank)'s state dict, built from HF tensors or
    lazy slices, one parameter at a time (copy each into the model as it comes, so a rank holds at most one
    converted tensor besides its model).

    Only this rank's slices are read, and all names are checked before anything is: ValueError for HF names
    with no mapping, KeyError for missing ones. Vision tower parameters (``model.visual.*``) come through
    unchanged on the first pipeline stage. Names are megatron-core's plain ``state_dict()`` names
    (stage-local layer numbers), so the pairs load with ``model.load_state_dict(dict(...), strict=...)``
    (TE's ``_extra_state`` entries aside).
    """
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"rank (tp {tp_rank}, pp {pp_rank}) outside TP {tp_size} x PP {pp_size}")
    d = config.dims
    if d.num_kv_heads % tp_size or d.num_heads % tp_size or d.ffn_hidden_size % tp_size:
        raise ValueError(
            f"TP {tp_size} must divide the attention heads ({d.num_heads}), KV heads ({d.num_kv_heads}) and "
            f"intermediate size ({d.ffn_hidden_size}); see layout.validate_megatron_layout"
        )
    by_canonical = {canonical_hf_name(k): k for k in hf_tensors}
    _check_hf_names(by_canonical, config)

    def src(name: str) -> Any:
        try:
            return hf_tensors[by_canonical[name]]
        except KeyError:
            raise KeyError(f"Hugging Face parameter {name} (or {checkpoint_hf_name(name)}) is missing") from None

    split = config.split(pp_size)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    padded = config.padded_vocab(tp_size)

    required = [_HF_EMBED] if first else []
    for i in split.stage_layers(pp_rank):
        required += [_hf_layer(i, r) for r in _HF_LAYER_PARAMS if d.qkv_bias or not r.endswith("_proj.bias")]
    if last:
        required.append(_HF_NORM)
        if not d.tie_word_embeddings:
            required.append(_HF_HEAD)
        elif pp_size > 1:
            required.append(_HF_EMBED)
    missing = [n for n in required if n not in by_canonical]
    if missing:
        raise KeyError(
            f"{len(missing)} Hugging Face parameter(s) needed by rank (tp {tp_rank}, pp {pp_rank}) are missing, "
            f"e.g. {missing[:5]}"
        )

    if first:
        for name in by_canonical:
            if name.startswith(VISION_PREFIX):
                yield name, _read(src(name))
        yield EMBEDDING, _vocab_shard(src(_HF_EMBED), d.vocab_size, padded, tp_rank, tp_size)

    g_local = d.num_kv_heads // tp_size
    hpg, hd = d.heads_per_group, d.head_dim
    q_rows = g_local * hpg * hd
    kv_rows = g_local * hd
    f_local = d.ffn_hidden_size // tp_size
    for j, i in enumerate(split.stage_layers(pp_rank)):
        L = f"decoder.layers.{j}."
        qkv = {}
        for kind in ("weight", "bias") if d.qkv_bias else ("weight",):
            q = _read(src(_hf_layer(i, f"self_attn.q_proj.{kind}")), rows=(tp_rank * q_rows, (tp_rank + 1) * q_rows))
            k = _read(src(_hf_layer(i, f"self_attn.k_proj.{kind}")), rows=(tp_rank * kv_rows, (tp_rank + 1) * kv_rows))
            v = _read(src(_hf_layer(i, f"self_attn.v_proj.{kind}")), rows=(tp_rank * kv_rows, (tp_rank + 1) * kv_rows))
            qkv[kind] = qkv_to_mcore(q, k, v, g_local, hd)
        yield L + "self_attention.linear_qkv.weight", qkv["weight"]
        if d.qkv_bias:
            yield L + "self_attention.linear_qkv.bias", qkv["bias"]
        yield L + "self_attention.linear_proj.weight", _read(
            src(_hf_layer(i, "self_attn.o_proj.weight")), cols=(tp_rank * q_rows, (tp_rank + 1) * q_rows)
        )
        ff = (tp_rank * f_local, (tp_rank + 1) * f_local)
        yield L + "mlp.linear_fc1.weight", gate_up_to_mcore(
            _read(src(_hf_layer(i, "mlp.gate_proj.weight")), rows=ff),
            _read(src(_hf_layer(i, "mlp.up_proj.weight")), rows=ff),
        )
        yield L + "mlp.linear_fc2.weight", _read(src(_hf_layer(i, "mlp.down_proj.weight")), cols=ff)
        yield config.input_norm_name(j), _read(src(_hf_layer(i, "input_layernorm.weight")))
        yield config.pre_mlp_norm_name(j), _read(src(_hf_layer(i, "post_attention_layernorm.weight")))

    if last:
        yield FINAL_NORM, _read(src(_HF_NORM))
        if not d.tie_word_embeddings:
            yield OUTPUT_LAYER, _vocab_shard(src(_HF_HEAD), d.vocab_size, padded, tp_rank, tp_size)
        elif pp_size > 1:  # megatron-core keeps a copy on the last stage, synchronised with the embedding
            yield OUTPUT_LAYER, _vocab_shard(src(_HF_EMBED), d.vocab_size, padded, tp_rank, tp_size)


# ----------------------------------------------------------------------------------------- mcore -> HF

_MCORE_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _hf_out(name: str, config: ConversionConfig) -> str:
    return checkpoint_hf_name(name) if config.hf_naming == "checkpoint" else name


def not_a_parameter(name: str) -> bool:
    """State-dict entries of a megatron-core model that are not HF parameters: Transformer Engine's FP8
    metadata and the rotary inverse frequencies (recomputed from the config)."""
    return name.endswith("._extra_state") or name.endswith("inv_freq")


def mcore_param_to_hf(
    name: str,
    pieces: Sequence[torch.Tensor],
    config: ConversionConfig,
    pp_rank: int,
    pp_size: int,
) -> list[tuple[str, torch.Tensor]]:
    """HF (name, full tensor) pairs for one megatron-core parameter of stage `pp_rank`, given its pieces
    from every TP rank in rank order (one piece, or all equal pieces, for a replicated parameter).

    This is the building block of the streaming export: the distributed engine all-gathers a parameter's
    TP pieces (on dim `tp_partition_dim(name)`) and calls this. Returns [] for entries that are not HF
    parameters (``*._extra_state``, ``*inv_freq``, the tied output layer's copy).
    """
    d = config.dims
    if not_a_parameter(name):
        return []
    if name.startswith(VISION_PREFIX):
        return [(_hf_out(name, config), pieces[0])]
    if name == EMBEDDING:
        return [(_hf_out(_HF_EMBED, config), torch.cat(list(pieces), dim=0)[: d.vocab_size].contiguous())]
    if name == OUTPUT_LAYER:
        if d.tie_word_embeddings:
            return []
        return [(_hf_out(_HF_HEAD, config), torch.cat(list(pieces), dim=0)[: d.vocab_size].contiguous())]
    if name == FINAL_NORM:
        return [(_hf_out(_HF_NORM, config), pieces[0])]
    m = _MCORE_LAYER_RE.match(name)
    if not m:
        raise ValueError(f"megatron-core parameter {name} has no Hugging Face mapping")
    j, rest = int(m.group(1)), m.group(2)
    i = config.split(pp_size).to_global(pp_rank, j)

    def hf(rest_hf: str) -> str:
        return _hf_out(_hf_layer(i, rest_hf), config)

    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = qkv_from_mcore(torch.cat(list(pieces), dim=0), d.num_kv_heads, d.heads_per_group, d.head_dim)
        return [
            (hf(f"self_attn.q_proj.{kind}"), q),
            (hf(f"self_attn.k_proj.{kind}"), k),
            (hf(f"self_attn.v_proj.{kind}"), v),
        ]
    if rest == "self_attention.linear_proj.weight":
        return [(hf("self_attn.o_proj.weight"), torch.cat(list(pieces), dim=1))]
    if rest == "mlp.linear_fc1.weight":
        gate, up = gate_up_from_mcore(pieces)
        return [(hf("mlp.gate_proj.weight"), gate), (hf("mlp.up_proj.weight"), up)]
    if rest == "mlp.linear_fc2.weight":
        return [(hf("mlp.down_proj.weight"), torch.cat(list(pieces), dim=1))]
    if name == config.input_norm_name(j):
        return [(hf("input_layernorm.weight"), pieces[0])]
    if name == config.pre_mlp_norm_name(j):
        return [(hf("post_attention_layernorm.weight"), pieces[0])]
    raise ValueError(
        f"megatron-core parameter {name} has no Hugging Face mapping under the {config.norm_scheme!r} norm scheme"
    )

