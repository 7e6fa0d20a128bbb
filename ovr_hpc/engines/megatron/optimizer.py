"""The Megatron engine's optimizer: AdamW with its states sharded over data-parallel ranks (ZeRO-1).

Ours, plain torch, the same on CPU and GPU: AdamW over the stage's fp32 parameters (they are the master
weights; with ``model.dtype: bfloat16`` the forward runs under bf16 autocast on GPUs). Its states are
sharded by whole parameters: `owners_by_size` gives each parameter to one data-parallel rank, that rank
alone updates it and then broadcasts it to the others, so the 8 bytes of AdamW state per parameter become
8 / DP. megatron-core's own DDP and distributed optimizer are not used: they need CUDA, so they could not
be tested here.

What the engine calls:

    optimizer = ShardedAdamW(params, optimizer_cfg, schedule, total_steps, dp_group, device)
    optimizer.average_gradients()        # p.grad averaged over the data-parallel ranks
    optimizer.step()                     # AdamW on the owned parameters, lr schedule, broadcast from owners
    optimizer.lr()
    optimizer.state_to_save(model_sharded) / state_to_load(model_sharded) / load(loaded)   # checkpoints

Between `average_gradients` and `step` the engine does what depends on the model's layout (tensor-parallel
and tied-embedding reductions, clipping over the model-parallel group).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ovr_hpc.buckets import size_bounded
from ovr_hpc.engines.common import lr_lambda

# elements per flat tensor of a bucketed collective (256 MiB in fp32)
FLAT_BUCKET_ELEMS = 1 << 26


class ShardedAdamW:
    def __init__(self, params: list[nn.Parameter], optimizer_cfg, schedule, total_steps: int, dp_group,
                 device: torch.device):
        self.params = params
        self.dp_group = dp_group
        self.dp_rank = torch.distributed.get_rank(dp_group)
        self.dp_size = torch.distributed.get_world_size(dp_group)
        self.owner = owners_by_size(params, self.dp_size)
        self.owned = [p for p in params if self.owner[id(p)] == self.dp_rank]
        # (a DP rank may own nothing when a stage has fewer parameters than there are DP ranks: AdamW needs one)
        self.adamw = torch.optim.AdamW(
            self.owned or [nn.Parameter(torch.zeros(0, device=device))], lr=optimizer_cfg.lr,
            betas=tuple(optimizer_cfg.betas), eps=optimizer_cfg.eps, weight_decay=optimizer_cfg.weight_decay,
            fused=torch.cuda.is_available() or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.adamw, lr_lambda(schedule, total_steps))
        self.updates = 0

    def average_gradients(self) -> None:
        """Every parameter's gradient averaged over the data-parallel ranks (all must have one)."""
        if self.dp_size > 1:
            all_reduce_flat([p.grad for p in self.params], self.dp_group, divisor=self.dp_size)

    def step(self) -> None:
        """AdamW on this rank's parameters, the lr schedule's step, then every rank gets the others'."""
        self.adamw.step()
        self.scheduler.step()
        if self.dp_size > 1:
            self._broadcast_from_owners()
        self.updates += 1

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _broadcast_from_owners(self) -> None:
        """Every DP rank gets the parameters the others updated (one flat broadcast per owner and bucket)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for owner in range(self.dp_size):
            src = torch.distributed.get_global_rank(self.dp_group, owner)
            mine = [p.data for p in self.params if self.owner[id(p)] == owner]
            for chunk in size_bounded(mine, FLAT_BUCKET_ELEMS, size=torch.Tensor.numel):
                flat = _flatten_dense_tensors(chunk)
                torch.distributed.broadcast(flat, src=src, group=self.dp_group)
                if owner != self.dp_rank:
                    for t, updated in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
                        t.copy_(updated)

    # ------------------------------------------------------------------ checkpoints
    # (megatron-core distributed checkpoints: the states are sharded tensors, so they load under any layout)

    def state_to_save(self, model_sharded: dict) -> dict:
        """The checkpoint's optimizer entries, given the model's sharded state dict (parameters by id)."""
        return {
            "optimizer": self._sharded_state_dict(model_sharded, template=False),
            "scheduler": self.scheduler.state_dict(),
            "updates": self.updates,
        }

    def state_to_load(self, model_sharded: dict) -> dict:
        """What `dist_checkpointing.load` should read for the optimizer (before the first step AdamW has
        no state: this describes what the checkpoint holds)."""
        return {"optimizer": self._sharded_state_dict(model_sharded, template=True)}

    def load(self, loaded: dict) -> None:
        """From a loaded checkpoint (its "optimizer", "scheduler" and "updates" entries)."""
        self.updates = int(loaded["updates"])
        optim_state = self.adamw.state_dict()
        # every parameter takes part in every update, so AdamW's per-parameter step count is the update count
        optim_state["state"] = {
            i: {**s, "step": torch.tensor(float(self.updates))} for i, s in loaded["optimizer"]["state"].items()
        } if self.updates > 0 and self.owned else {}
        self.adamw.load_state_dict(optim_state)
        self.scheduler.load_state_dict(loaded["scheduler"])
        for group, lr in zip(self.adamw.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the param groups are not in the checkpoint; the scheduler knows the lr

    def _sharded_state_dict(self, model_sharded: dict, template: bool) -> dict:
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        state = self.adamw.state_dict()
        if template:
            state["state"] = {i: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                              for i, p in enumerate(self.owned)}
        id_map = get_param_id_to_sharded_param_map(model_sharded, self.owned)
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        for per_param in state["state"].values():
            for sharded in per_param.values():
                # only the owner holds this state: it is the main replica along the data-parallel axis (the
                # model's replica id, whose last entry is the DP rank, would elect DP rank 0 instead)
                if isinstance(sharded.replica_id, tuple):
                    sharded.replica_id = (*sharded.replica_id[:-1], 0)
                else:
                    sharded.replica_id = 0
        return state


def owners_by_size(params: list[torch.Tensor], num_ranks: int) -> dict[int, int]:
    """{id(param): rank}: whole parameters to ranks, largest first to the least loaded (ties to the lower
    rank), so every rank holds about 1/num_ranks of the elements. Deterministic in the parameters' order
    and shapes: every rank computes the same assignment."""
    load = [0] * num_ranks
    owner = {}
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        rank = min(range(num_ranks), key=lambda r: (load[r], r))
        owner[id(params[i])] = rank
        load[rank] += params[i].numel()
    return owner


def all_reduce_flat(tensors: Iterable[torch.Tensor], group, divisor: int = 1) -> None:
    """Sum tensors (gradients) over `group` in place (then divide: `divisor` = the group size averages
    them), in a few flat buckets (fewer collectives than one per tensor)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for chunk in size_bounded(tensors, FLAT_BUCKET_ELEMS, size=torch.Tensor.numel):
        flat = _flatten_dense_tensors(chunk)
        torch.distributed.all_reduce(flat, group=group)
        if divisor != 1:
            flat.div_(divisor)
        for t, reduced in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
            t.copy_(reduced)
