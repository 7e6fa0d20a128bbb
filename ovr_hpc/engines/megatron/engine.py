"""Megatron-core training engine: tensor x pipeline (x data) parallel Qwen2.5-VL behind the engine surface of
`ovr_hpc.engines.base`, so the cold-start and RL loops run on it unchanged.

Layout: megatron-core's process groups (``initialize_model_parallel``: tensor-parallel ranks adjacent,
then data, then pipeline). Each rank builds only its own stage (`model.QwenVLStage`) and reads only its
own slices of the Hugging Face safetensors (`convert.iter_hf_to_mcore_shard`).

Micro-batches go through megatron-core's pipeline schedule (1F1B at PP > 1, a plain loop at PP 1). The
last stage computes the loss; what the loops need on every rank (old log-probs, values, loss statistics)
is broadcast from it over the pipeline group.

Optimizer: `optimizer.ShardedAdamW` (ours, plain torch: AdamW over the fp32 master parameters, its states
sharded over data-parallel ranks by whole parameters, ZeRO-1). It averages gradients over data-parallel
ranks; the engine then averages replicated parameters' gradients (vision tower, norms, value head) over
tensor-parallel ranks, sums tied embeddings across the first and last stage and clips the global norm over
the model-parallel group, before the optimizer's step.

Checkpoints: megatron-core distributed checkpointing (model and optimizer as sharded tensors, layout-free
on disk), the scheduler and the loop's state as common state.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ovr_hpc import dist
from ovr_hpc.engines.common import as_floats
from ovr_hpc.engines.megatron import model as mcore_model
from ovr_hpc.engines.megatron.convert import (
    FINAL_NORM,
    VISION_PREFIX,
    ConversionConfig,
    SafetensorsCheckpoint,
    iter_hf_to_mcore_shard,
    mcore_param_to_hf,
    not_a_parameter,
    tp_partition_dim,
)
from ovr_hpc.engines.megatron.layout import validate_megatron_layout
from ovr_hpc.engines.megatron.optimizer import ShardedAdamW, all_reduce_flat

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_spec(requested: str) -> bool:
    """True for the Transformer Engine layer spec. `auto` takes it when it imports on a GPU."""
    available = mcore_model.transformer_engine_available()
    if requested == "te" and not available:
        raise RuntimeError("parallel.megatron_spec=te but Transformer Engine does not import here (or no GPU)")
    return requested == "te" or (requested == "auto" and available)


def build_vision_tower(hf_config, attn_implementation: str) -> nn.Module:
    """The Hugging Face vision tower of Qwen2.5-VL, built from its config (weights are copied in after)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from ovr_hpc.models.loading import resolve_attn_implementation

    vision_config = hf_config.vision_config
    vision_config._attn_implementation = resolve_attn_implementation(attn_implementation)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, dtype=torch.float32)


class MegatronEngine:
    def __init__(self, role: str, model_path: str, model_cfg, parallel, optimizer, schedule, total_steps: int,
                 seed: int = 0):
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        if role not in ("policy", "critic"):
            raise ValueError(f"role must be 'policy' or 'critic', got {role!r}")
        self.role = role
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        if not torch.distributed.is_initialized():
            raise RuntimeError("the Megatron-core engine needs torch.distributed initialised (dist.init_distributed)")
        hf_config = AutoConfig.from_pretrained(model_path)
        self.split = validate_megatron_layout(hf_config, tp, pp, torch.distributed.get_world_size())
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            raise RuntimeError("megatron-core is already initialised with another tensor/pipeline layout")
        self.tp_size, self.pp_size = tp, pp
        self.model_parallel_size = tp * pp
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.mp_group = ps.get_model_parallel_group()
        self.is_first, self.is_last = self.pp_rank == 0, self.pp_rank == pp - 1
        self.last_stage_rank = torch.distributed.get_global_rank(self.pp_group, pp - 1)
        self.device = dist.device()
        self.compute_dtype = DTYPES[model_cfg.dtype]
        self.use_te = resolve_spec(parallel.megatron_spec)
        self.conversion = ConversionConfig.from_hf_config(hf_config, norm_scheme="te" if self.use_te else "local")
        if self.conversion.padded_vocab(tp) != self.conversion.dims.vocab_size:
            raise ValueError(f"parallel.tensor_parallel_size ({tp}) must divide the vocabulary "
                             f"({self.conversion.dims.vocab_size}): padded vocabulary rows would enter the softmax")
        if torch.distributed.get_rank() == 0:
            spec = "Transformer Engine (packed rows as THD)" if self.use_te else \
                "local (Transformer Engine not available: packed rows use a block-causal mask, O(T^2) memory)"
            print(f"[megatron] {role}: TP {tp} x PP {pp} x DP {self.dp_size}; {self.split.describe()}; "
                  f"layer spec: {spec}", flush=True)

        # ---- this rank's stage: fp32 parameters (the optimizer's master weights), weights from the checkpoint
        torch.manual_seed(seed)
        from megatron.core.tensor_parallel import random as mp_random

        # megatron-core forks a model-parallel CUDA generator around attention dropout (even at p = 0)
        mp_random.model_parallel_cuda_manual_seed(seed, te_rng_tracker=self.use_te)
        visual = build_vision_tower(hf_config, model_cfg.attn_implementation) if self.is_first else None
        self.stage = mcore_model.build_stage(
            hf_config, visual, tp, pp, self.pp_rank, self.split, torch.float32, self.use_te, self.tp_group,
            recompute=model_cfg.gradient_checkpointing, value_head=role == "critic", seed=seed,
            sequence_parallel=parallel.sequence_parallel)
        if self.compute_dtype != torch.float32 and torch.cuda.is_available():
            # bf16/fp16 compute, fp32 weights: the pipeline schedule enters autocast around each forward
            self.stage.config.enable_autocast = True
            self.stage.config.autocast_dtype = self.compute_dtype
            self.stage.config.pipeline_dtype = self.compute_dtype
        self.load_hf_weights(model_path)
        self.stage.to(self.device)
        if self.stage.visual is not None and model_cfg.freeze_vision:
            self.stage.visual.requires_grad_(False)
        if role == "critic" and self.is_last:
            # the critic never produces tokens: its output layer is not trained
            self.stage.language.output_layer.weight.requires_grad_(False)
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        # which parameters are split over tensor-parallel ranks, from the conversion's layout (megatron-core
        # only marks them when it initialises weights itself, which we skip)
        local = self.local_state_dict()
        self.tp_sharded = {id(t) for name, t in local.items()
                           if not name.startswith(VISION_PREFIX) and tp_partition_dim(name) is not None}
        # with sequence parallelism each TP rank normalises its own part of the sequence: the decoder norms'
        # gradients are partial sums over TP ranks (everything else replicated sees the whole sequence)
        self.sequence_partial = set()
        if self.stage.config.sequence_parallel:
            norms = {FINAL_NORM} | {n for j in range(self.split.layers_per_stage[self.pp_rank])
                                    for n in (self.conversion.input_norm_name(j), self.conversion.pre_mlp_norm_name(j))}
            self.sequence_partial = {id(t) for name, t in local.items() if name in norms}

        # AdamW states sharded over data-parallel ranks (ZeRO-1 by whole parameters)
        self.optimizer = ShardedAdamW(self.params, optimizer, schedule, total_steps, self.dp_group, self.device)
        self.grad_clip = optimizer.grad_clip
        self._grad_norm = float("nan")

    # ------------------------------------------------------------------ weights in

    def load_hf_weights(self, model_path: str) -> None:
        """Copy this rank's slices of the HF checkpoint into the stage, one tensor at a time."""
        targets = self.local_state_dict()
        filled = set()
        with SafetensorsCheckpoint(model_path) as checkpoint:
            for name, tensor in iter_hf_to_mcore_shard(checkpoint, self.conversion, self.tp_rank, self.tp_size,
                                                       self.pp_rank, self.pp_size):
                if name not in targets:
                    raise KeyError(f"converted parameter {name} has no place in the megatron-core stage")
                if targets[name].shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint slice {tuple(tensor.shape)} vs stage "
                                     f"{tuple(targets[name].shape)}")
                with torch.no_grad():
                    targets[name].copy_(tensor)
                filled.add(name)
        missing = [n for n in targets if n not in filled and not n.startswith("value_head.")]
        if missing:
            raise KeyError(f"{len(missing)} stage parameters were not in {model_path}, e.g. {missing[:5]}")

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """Stage parameters under the conversion's names (megatron-core names, HF names for the vision
        tower), without the non-parameter entries (rotary frequencies, TE extra state)."""
        out = {}
        for name, t in self.stage.language.state_dict(keep_vars=True).items():
            if not not_a_parameter(name):
                out[name] = t
        if self.stage.visual is not None:
            out.update({VISION_PREFIX + n: t for n, t in self.stage.visual.state_dict(keep_vars=True).items()})
        if self.stage.value_head is not None:
            out.update({"value_head." + n: t for n, t in self.stage.value_head.state_dict(keep_vars=True).items()})
        return out

    # ------------------------------------------------------------------ forward / backward

    def forward(self, micro_batches, **kwargs) -> list:
        """Without gradients; every rank gets each micro-batch's output."""
        outputs: dict[int, Any] = {}

        def collect(j, output):
            outputs[j] = output
            return None

        with torch.no_grad():
            self._schedule(micro_batches, collect, forward_only=True, kwargs=kwargs)
        return [self._broadcast_output(outputs.get(j), mb, kwargs) for j, mb in enumerate(micro_batches)]

    def forward_backward(self, micro_batches, loss_fn: Callable, **kwargs) -> list[dict]:
        stats: dict[int, dict] = {}

        def loss_of(j, output):
            loss, values = loss_fn(j, output)
            stats[j] = as_floats(values)
            return loss

        self._schedule(micro_batches, loss_of, forward_only=False, kwargs=kwargs)
        gathered = [[stats[j] for j in range(len(micro_batches))] if self.is_last else None]
        if self.pp_size > 1:
            torch.distributed.broadcast_object_list(gathered, src=self.last_stage_rank, group=self.pp_group)
        return gathered[0]

    def _schedule(self, micro_batches, on_output: Callable, forward_only: bool, kwargs: dict) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        zero = torch.zeros((), device=self.device)
        tokens = torch.zeros((), dtype=torch.int, device=self.device)

        def forward_step(data_iterator, stage):
            j, mb = next(data_iterator)
            inputs = mb.to(self.device).model_inputs()
            if not self.is_first:  # only the first stage runs the vision tower
                inputs["pixel_values"] = inputs["image_grid_thw"] = None
            output = stage(**inputs, **kwargs)

            def loss_func(output):
                loss = on_output(j, output)
                # (loss, token count, reported): with calculate_per_token_loss the schedule leaves our
                # loss as it is (it is already normalised over the global batch)
                return (zero if loss is None else loss), tokens, {}

            return output, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(list(enumerate(micro_batches))),
            model=[self.stage],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.input_ids.shape[-1] for mb in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def _broadcast_output(self, output, mb, kwargs):
        """The last stage's output for one micro-batch, on every rank of the pipeline group."""
        length = mb.input_ids.shape[-1]
        if self.role == "critic":
            parts = [output] if self.is_last else [torch.empty(length, device=self.device)]
        else:
            n = 2 if kwargs.get("return_entropy") else 1
            parts = [t for t in output[:n]] if self.is_last else \
                [torch.empty(length, device=self.device) for _ in range(n)]
        parts = [p.detach().float().contiguous() for p in parts]
        if self.pp_size > 1:
            for p in parts:
                torch.distributed.broadcast(p, src=self.last_stage_rank, group=self.pp_group)
        if self.role == "critic":
            return parts[0]
        return parts[0], (parts[1] if len(parts) > 1 else None)

    # ------------------------------------------------------------------ optimizer

    def step(self) -> None:
        """Reduce gradients (data parallel, replicated parameters, tied embeddings), clip, AdamW, lr."""
        from megatron.core import parallel_state as ps

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.optimizer.average_gradients()
        if self.tp_size > 1:
            partial = [p.grad for p in self.params if id(p) in self.sequence_partial]
            all_reduce_flat(partial, self.tp_group)  # a sum
            replicated = [p.grad for p in self.params if id(p) not in self.tp_sharded | self.sequence_partial]
            all_reduce_flat(replicated, self.tp_group, divisor=self.tp_size)
        if self.pp_size > 1 and self.stage.language.share_embeddings_and_output_weights and (self.is_first or self.is_last):
            weight = self.stage.language.shared_embedding_or_output_weight()
            if weight.requires_grad:
                torch.distributed.all_reduce(weight.grad, group=ps.get_embedding_group())
        self._grad_norm = self._clip_grad_norm()
        self.optimizer.step()
        for p in self.params:
            p.grad = None

    def _clip_grad_norm(self) -> float:
        """Global L2 norm over the whole model: tensor-parallel shards counted on every TP rank,
        replicated parameters once (on TP rank 0), summed over the model-parallel group."""
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params:
            if id(p) in self.tp_sharded or self.tp_rank == 0:
                if self.stage.language.share_embeddings_and_output_weights and self.is_last and not self.is_first \
                        and p is self.stage.language.shared_embedding_or_output_weight():
                    continue  # the tied copy on the last stage: counted on the first
                squares += p.grad.double().pow(2).sum()
        if self.model_parallel_size > 1:
            torch.distributed.all_reduce(squares, group=self.mp_group)
        norm = float(squares.sqrt())
        if self.grad_clip and self.grad_clip > 0:
            coef = self.grad_clip / (norm + 1e-6)
            if coef < 1:
                for p in self.params:
                    p.grad.mul_(coef)
        return norm

    def grad_norm(self) -> float:
        return self._grad_norm

    def lr(self) -> float:
        return self.optimizer.lr()

    def loss_scale_for_mean(self) -> float:
        """Gradients are averaged over data-parallel ranks (as DeepSpeed does)."""
        return float(self.dp_size)

    def dp_sum(self, values: list[float]) -> list[float]:
        """Sums over the data-parallel replicas (every rank gets them): a world all-reduce with the ranks
        of one replica, which hold the same data, counted once."""
        return [x / self.model_parallel_size for x in dist.all_reduce_sum(values)]

    # ------------------------------------------------------------------ checkpoints
    # (distributed checkpoints: they load under any TP x PP x DP layout)

    def _sharded_model_state_dict(self) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = self.stage.language.sharded_state_dict(prefix="language.")
        for prefix, module in (("visual.", self.stage.visual), ("value_head.", self.stage.value_head)):
            if module is not None:  # replicated over tensor- and data-parallel ranks
                sharded.update(make_sharded_tensors_for_checkpoint(module.state_dict(keep_vars=True), prefix))
        return sharded

    def save(self, directory: str, client_state: dict) -> None:
        """All ranks: sharded model + optimizer (megatron-core distributed checkpoint) into `directory`."""
        from megatron.core import dist_checkpointing

        os.makedirs(directory, exist_ok=True)
        dist.barrier()
        model_sharded = self._sharded_model_state_dict()
        state = {"model": model_sharded, **self.optimizer.state_to_save(model_sharded), "client_state": client_state}
        dist_checkpointing.save(state, directory)

    def load(self, directory: str) -> dict:
        from megatron.core import dist_checkpointing

        model_sharded = self._sharded_model_state_dict()
        template = {"model": model_sharded, **self.optimizer.state_to_load(model_sharded)}
        loaded = dist_checkpointing.load(template, directory)
        self._copy_model_state(loaded["model"])
        self.optimizer.load(loaded)
        return loaded["client_state"]

    def _copy_model_state(self, loaded: dict) -> None:
        """The loaded tensors into the stage (keys as `_sharded_model_state_dict` names them)."""
        with torch.no_grad():
            for name, t in self.local_state_dict().items():
                if name.startswith(VISION_PREFIX):
                    key = "visual." + name[len(VISION_PREFIX):]
                else:
                    key = name if name.startswith("value_head.") else "language." + name
                if key not in loaded:
                    raise KeyError(f"{key} is not in the checkpoint")
                t.copy_(loaded[key])

    # ------------------------------------------------------------------ weights out

    def iter_full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every rank: (HF name, full tensor) for every parameter of the policy, one at a time: tensor-
        parallel pieces all-gathered within the stage, then broadcast from that stage over the pipeline
        group. Tensors are on this rank's device, in the compute dtype."""
        for stage_index in range(self.pp_size):
            mine = self.local_state_dict() if self.pp_rank == stage_index else None
            names = [sorted(mine)] if mine is not None else [None]
            if self.pp_size > 1:
                src = torch.distributed.get_global_rank(self.pp_group, stage_index)
                torch.distributed.broadcast_object_list(names, src=src, group=self.pp_group)
            for name in names[0]:
                if name.startswith("value_head.") or (self.role == "critic" and name == "output_layer.weight"):
                    continue
                pairs = self._full_hf_tensors(name, mine[name]) if mine is not None else None
                yield from self._broadcast_pairs(pairs, stage_index)

    def _full_hf_tensors(self, name: str, local: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        local = local.detach().to(self.compute_dtype)
        dim = None if name.startswith(VISION_PREFIX) else tp_partition_dim(name)
        if dim is not None and self.tp_size > 1:
            pieces = [torch.empty_like(local) for _ in range(self.tp_size)]
            torch.distributed.all_gather(pieces, local.contiguous(), group=self.tp_group)
        else:
            pieces = [local]
        return mcore_param_to_hf(name, pieces, self.conversion, self.pp_rank, self.pp_size)

    def _broadcast_pairs(self, pairs, stage_index: int):
        if self.pp_size == 1:
            yield from pairs
            return
        src = torch.distributed.get_global_rank(self.pp_group, stage_index)
        meta = [[(n, tuple(t.shape)) for n, t in pairs] if pairs is not None else None]
        torch.distributed.broadcast_object_list(meta, src=src, group=self.pp_group)
        for k, (name, shape) in enumerate(meta[0]):
            t = pairs[k][1].contiguous() if pairs is not None else \
                torch.empty(shape, dtype=self.compute_dtype, device=self.device)
            torch.distributed.broadcast(t, src=src, group=self.pp_group)
            yield name, t

