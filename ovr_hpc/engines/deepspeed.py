"""DeepSpeed training engine: ZeRO-1/2/3 and AutoTP behind the small engine surface the loops use.

Surface (the Megatron-core engine offers the same): `module` (call it to run a forward), `backward`,
`step`, `lr`, `grad_norm`, `save`, `load`, `full_state_dict`, and the parallel layout (`dp_rank`,
`dp_size`, `tp_group`).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch import nn


def lr_lambda(schedule, total_steps: int) -> Callable[[int], float]:
    """Warm-up then cosine / linear / constant, as a multiplier of the peak lr (pure, unit-tested)."""
    warmup = schedule.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        floor = schedule.min_lr_ratio
        if schedule.kind == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def ds_config(parallel, optimizer, dtype: str, micro_batch_size: int, grad_accum: int) -> dict:
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.zero_stage == 3:
        # keep whole-model gathers bounded and let the 16-bit consolidation work for exports
        zero.update(stage3_gather_16bit_weights_on_model_save=True, contiguous_gradients=True)
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": zero,
        # our torch AdamW (fused on GPUs) rather than DeepSpeed's JIT-built ones
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif dtype == "float16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if parallel.autotp_size > 1:
        config["tensor_parallel"] = {"autotp_size": parallel.autotp_size}
    return config


class DeepSpeedEngine:
    def __init__(self, module: nn.Module, parallel, optimizer, dtype: str, world_size: int, total_steps: int,
                 schedule, lr_scale: Callable[[int], float] | None = None):
        import deepspeed
        from deepspeed.utils import groups

        self.parallel = parallel
        grad_accum = parallel.grad_accum_steps(world_size)
        config = ds_config(parallel, optimizer, dtype, parallel.micro_batch_size, grad_accum)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=optimizer.lr, betas=tuple(optimizer.betas), eps=optimizer.eps,
            weight_decay=optimizer.weight_decay, fused=torch.cuda.is_available() or None,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale or lr_lambda(schedule, total_steps))
        if parallel.zero_stage == 3:
            # the LM head's weight is read by the fused kernel, not through lm_head.forward: ZeRO-3
            # must gather it whenever the wrapper runs
            deepspeed.zero.register_external_parameter(module, module.model.lm_head.weight)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=scheduler, config=config
        )
        self.module = self.engine  # call it like the wrapped module
        self.grad_accum = grad_accum
        self.tp_size = parallel.autotp_size
        self.tp_group = groups.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # DeepSpeed's AutoTP groups are consecutive ranks: [0..tp-1], [tp..2tp-1], ...
        self.dp_size = world_size // self.tp_size
        self.dp_rank = rank // self.tp_size
        rows, vocab = module.model.lm_head.weight.shape[0], module.model.config.get_text_config().vocab_size
        if self.tp_group is not None and rows < vocab:
            module.tp_group = self.tp_group  # AutoTP split the LM head over the vocabulary: reduce across TP

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed steps the optimizer at the accumulation boundary."""
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_scale_for_mean(self) -> float:
        """DeepSpeed divides by the accumulation steps and averages over data-parallel ranks."""
        return float(self.grad_accum * self.dp_size)

    def save(self, directory: str, client_state: dict) -> None:
        """All ranks: model, optimizer and scheduler state (sharded as trained) into `directory`."""
        self.engine.save_checkpoint(directory, tag="engine", client_state=client_state)

    def load(self, directory: str) -> dict:
        _, client_state = self.engine.load_checkpoint(directory, tag="engine")
        if client_state is None:
            raise RuntimeError(f"could not load the engine state from {directory}")
        return client_state

    def full_state_dict(self) -> dict | None:
        """All ranks call; rank 0 gets full tensors on the CPU (ZeRO-3 and TP shards gathered layer by layer)."""
        if self.parallel.zero_stage == 3 or self.tp_size > 1:
            sd = self.engine._consolidated_16bit_state_dict()
        else:
            sd = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
        if sd is None or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
            return None
        prefix = "model."
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if os.environ.get("OVR_DEBUG_MEMORY"):
        print(torch.cuda.memory_summary() if torch.cuda.is_available() else "cpu")
