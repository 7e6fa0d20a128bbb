"""DeepSpeed training engine: ZeRO-1/2/3 and AutoTP behind the small engine surface the loops use.

Surface (the Megatron-core engine offers the same): `module` (call it to run a forward), `backward`,
`step`, `lr`, `grad_norm`, `save`, `load`, `full_state_dict` (rank 0, for export), `iter_full_params`
(every rank, streamed, for the rollout engine), and the parallel layout (`dp_rank`, `dp_size`,
`tp_size`, `tp_group`).

Two ways to accumulate gradients: `grad_accum_steps=N` lets DeepSpeed count N micro-batches per
optimizer step (the cold start: a fixed number of rows per rank); `grad_accum_steps=None` leaves the
boundary to the caller (`backward(loss, last=...)` then one `step()`), for RL's micro-batches cut by a
token budget.
"""

from __future__ import annotations

import math
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


def ds_config(parallel, optimizer, dtype: str, grad_accum: int) -> dict:
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.zero_stage == 3:
        # keep whole-model gathers bounded and let the 16-bit consolidation work for exports
        zero.update(stage3_gather_16bit_weights_on_model_save=True, contiguous_gradients=True)
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict = {
        # a micro-batch is one packed row to DeepSpeed (our rows of samples are concatenated before the forward)
        "train_micro_batch_size_per_gpu": 1,
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
                 schedule, grad_accum_steps: int | None, external_params: tuple = ()):
        import deepspeed
        from deepspeed.utils import groups

        self.parallel = parallel
        self.manual_accumulation = grad_accum_steps is None
        grad_accum = grad_accum_steps or 1
        config = ds_config(parallel, optimizer, dtype, grad_accum)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=optimizer.lr, betas=tuple(optimizer.betas), eps=optimizer.eps,
            weight_decay=optimizer.weight_decay, fused=torch.cuda.is_available() or None,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, total_steps))
        if parallel.zero_stage == 3:
            # parameters read directly (the LM head's weight, by the fused kernel) rather than through
            # their module's forward: ZeRO-3 must gather them whenever the wrapper runs
            for p in external_params:
                deepspeed.zero.register_external_parameter(module, p)
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
        head = getattr(module.model, "lm_head", None)
        vocab = module.model.config.get_text_config().vocab_size
        if self.tp_group is not None and isinstance(head, nn.Module) and head.weight.shape[0] < vocab:
            module.tp_group = self.tp_group  # AutoTP split the LM head over the vocabulary: reduce across TP

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """With manual accumulation, `last` marks the micro-batch after which `step()` is called."""
        if self.manual_accumulation:
            self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> None:
        """Managed: after every micro-batch (DeepSpeed steps at the boundary). Manual: once per update."""
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_scale_for_mean(self) -> float:
        """Multiply a loss `sum / N_global` by this: DeepSpeed divides by its accumulation steps (managed
        mode) and averages gradients over the data-parallel ranks."""
        return float((1 if self.manual_accumulation else self.grad_accum) * self.dp_size)

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


    def iter_full_params(self):
        """Every rank: (HF name, full tensor) for each parameter, gathered one module at a time
        (ZeRO-3 partitions and AutoTP shards), as a CPU-independent copy the consumer may keep."""
        import deepspeed
        from deepspeed.module_inject.layers import GatherReplacedLayerParams

        zero3, tp = self.parallel.zero_stage == 3, self.tp_size > 1
        for module_name, module in self.engine.module.named_modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
                with GatherReplacedLayerParams(params, module, enabled=tp):
                    for name, p in module.named_parameters(recurse=False):
                        full = f"{module_name}.{name}" if module_name else name
                        yield full.removeprefix("model."), p.detach().clone()
