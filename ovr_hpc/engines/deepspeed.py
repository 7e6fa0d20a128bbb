"""DeepSpeed training engine: ZeRO-1/2/3 and AutoTP behind the engine surface of `ovr_hpc.engines.base`.

Gradient accumulation is ours: DeepSpeed sees one micro-batch per "step" and we mark the last
micro-batch of an update as the accumulation boundary (micro-batches are cut by rows in the cold start
and by a token budget in RL, so their number varies).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time

import torch
from torch import nn

from ovr_hpc import dist
from ovr_hpc.engines.common import as_floats, lr_lambda


def ds_config(parallel, optimizer, dtype: str) -> dict:
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.zero_stage == 3:
        # keep whole-model gathers bounded and let the 16-bit consolidation work for exports
        zero.update(stage3_gather_16bit_weights_on_model_save=True, contiguous_gradients=True)
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict = {
        # a micro-batch is one packed row to DeepSpeed (our rows of samples are concatenated before the forward)
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # the boundary is set by forward_backward
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
                 schedule, external_params: tuple = ()):
        import deepspeed
        from deepspeed.utils import groups

        self.parallel = parallel
        config = ds_config(parallel, optimizer, dtype)
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
        self.device = dist.device()
        self.tp_size = self.model_parallel_size = parallel.autotp_size
        self.tp_group = groups.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # DeepSpeed's AutoTP groups are consecutive ranks: [0..tp-1], [tp..2tp-1], ...
        self.dp_size = world_size // self.tp_size
        self.dp_rank = rank // self.tp_size
        head = getattr(module.model, "lm_head", None)
        vocab = module.model.config.get_text_config().vocab_size
        if self.tp_group is not None and isinstance(head, nn.Module) and head.weight.shape[0] < vocab:
            module.tp_group = self.tp_group  # AutoTP split the LM head over the vocabulary: reduce across TP

    def forward(self, micro_batches, **kwargs) -> list:
        with torch.no_grad():
            return [self.engine(**mb.to(self.device).model_inputs(), **kwargs) for mb in micro_batches]

    def forward_backward(self, micro_batches, loss_fn, **kwargs) -> list[dict]:
        stats = []
        for j, mb in enumerate(micro_batches):
            loss, values = loss_fn(j, self.engine(**mb.to(self.device).model_inputs(), **kwargs))
            self.engine.set_gradient_accumulation_boundary(j == len(micro_batches) - 1)
            self.engine.backward(loss)
            stats.append(as_floats(values))
        return stats

    def step(self) -> None:
        """Once per update, after forward_backward."""
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_scale_for_mean(self) -> float:
        """Multiply a loss `sum / N_global` by this: DeepSpeed averages gradients over data-parallel ranks."""
        return float(self.dp_size)

    def dp_sum(self, values: list[float]) -> list[float]:
        """Sums over the data-parallel replicas (every rank gets them): a world all-reduce with the ranks
        of one replica, which hold the same data, counted once."""
        return [x / self.model_parallel_size for x in dist.all_reduce_sum(values)]

    def save(self, directory: str, client_state: dict) -> None:
        """All ranks: model, optimizer and scheduler state (sharded as trained) into `directory`."""
        self.engine.save_checkpoint(directory, tag="engine", client_state=client_state)

    def load(self, directory: str) -> dict:
        """All ranks. A checkpoint saved on another number of ranks is converted to DeepSpeed's universal
        format first (by rank 0, once) and loaded from there."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        saved = saved_world_size(directory)
        universal = saved not in (0, world)
        if universal:
            directory = universal_checkpoint(directory, saved, world)
        self.engine._config.load_universal_checkpoint = universal
        try:
            _, client_state = self.engine.load_checkpoint(directory, tag="engine")
        finally:
            self.engine._config.load_universal_checkpoint = False   # later saves are ordinary ones
        if client_state is None:
            raise RuntimeError(f"could not load the engine state from {directory}")
        return client_state

    def iter_full_params(self):
        """Every rank: (HF name, full tensor) for each parameter, gathered one module at a time
        (ZeRO-3 partitions and AutoTP shards), as a CPU-independent copy the consumer may keep."""
        import deepspeed
        from deepspeed.module_inject.layers import GatherReplacedLayerParams

        zero3, tp = self.parallel.zero_stage == 3, self.tp_size > 1
        seen = set()   # a tied LM head is the embedding's parameter: exported once, as the embedding
        for module_name, module in self.engine.module.named_modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            if not params:
                continue
            seen.update(map(id, params))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
                with GatherReplacedLayerParams(params, module, enabled=tp):
                    for name, p in module.named_parameters(recurse=False):
                        if any(p is q for q in params):
                            full = f"{module_name}.{name}" if module_name else name
                            yield full.removeprefix("model."), p.detach().clone()


# ---------------------------------------------------------------------------------------------------------------
# Resuming on another number of ranks
# ---------------------------------------------------------------------------------------------------------------
UNIVERSAL_TIMEOUT_S = 4 * 3600   # how long the other ranks wait for rank 0's conversion


def saved_world_size(directory: str) -> int:
    """Ranks that saved the engine checkpoint in `directory` (one optimizer-state file each, ZeRO 1-3)."""
    return len(glob.glob(os.path.join(directory, "engine", "*_optim_states.pt")))


def universal_checkpoint(directory: str, saved_world: int, world: int) -> str:
    """All ranks call; returns `directory`.universal, DeepSpeed's layout-free form of the checkpoint.

    Rank 0 converts with DeepSpeed's own tool (`deepspeed.checkpoint.ds_to_universal`, in a subprocess: it
    runs process pools, which must not fork a training process) unless an earlier requeue already did;
    the others wait on the file system rather than in a collective, which could time out during a
    conversion of many minutes."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = directory.rstrip("/") + ".universal"
    done, failed = os.path.join(out, "CONVERTED"), out + ".failed"
    if rank == 0 and os.path.exists(failed):
        os.remove(failed)
    dist.barrier()
    if rank == 0 and not os.path.exists(done):
        print(f"{directory} was saved on {saved_world} ranks, this run has {world}: converting it to DeepSpeed's "
              f"universal checkpoint in {out}", flush=True)
        started = time.time()
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", os.path.join(directory, "engine"), "--output_folder", os.path.join(tmp, "engine"),
               "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
               "--inject_missing_state"]   # ZeRO-1/2 checkpoints lack the (empty) universal info DeepSpeed checks for
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = f"DeepSpeed's universal conversion of {directory} failed (exit {proc.returncode}):\n" + \
                (proc.stdout + proc.stderr)[-3000:]
            with open(failed, "w") as f:
                f.write(reason)
            raise RuntimeError(reason)
        with open(os.path.join(tmp, "CONVERTED"), "w") as f:
            f.write(f"from {saved_world} ranks\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        print(f"converted in {time.time() - started:.0f} s", flush=True)
    deadline = time.time() + UNIVERSAL_TIMEOUT_S
    while not os.path.exists(done):
        if os.path.exists(failed):
            raise RuntimeError(open(failed).read())
        if time.time() > deadline:
            raise RuntimeError(f"rank 0 did not convert {directory} to {out} within {UNIVERSAL_TIMEOUT_S} s")
        time.sleep(2)
    dist.barrier()
    return out
