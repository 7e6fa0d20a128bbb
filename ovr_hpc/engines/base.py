"""What the stage loops need from a training engine, and the one place that builds one.

Two engines implement the surface: `deepspeed.DeepSpeedEngine` (ZeRO-1/2/3, AutoTP) and
`megatron.engine.MegatronEngine` (megatron-core tensor x pipeline parallelism). The loops call only:

* ``forward(micro_batches, **kwargs) -> [output per micro-batch]`` without gradients, on every rank
  (the policy's output is ``(logprobs [T], entropy [T] | None)``, the critic's ``values [T]``);
* ``forward_backward(micro_batches, loss_fn, **kwargs) -> [stats per micro-batch]``: gradients of
  ``loss_fn(j, output) -> (loss, {name: number})`` accumulated over the micro-batches (a pipeline
  engine runs them through its schedule; the stats reach every rank);
* ``step()`` once per optimizer update, then ``lr()``, ``grad_norm()``;
* ``save(dir, client_state)`` / ``load(dir) -> client_state`` (all ranks; a checkpoint loads on another
  number of ranks and layout too), ``iter_full_params()`` (every rank walks
  it: HF names and full tensors one at a time, for the rollout engine and the HF export);
* the layout: ``dp_rank``, ``dp_size`` (which share of the data this rank trains on),
  ``model_parallel_size`` (ranks that hold one replica and see the same data: sums all-reduced over the
  world count each sample that many times), ``loss_scale_for_mean()`` (multiply a ``sum / N_global``
  loss by it: the engine averages gradients over data-parallel ranks), ``dp_sum(values)`` (sums over the
  data-parallel replicas, on every rank: what a loop all-reduces, each replica counted once).
"""

from __future__ import annotations

# the schedule lives below the backends (common.py, which they import); still importable from here
from ovr_hpc.engines.common import lr_lambda  # noqa: F401


def build_engine(role: str, model_cfg, parallel, optimizer, schedule, total_steps: int, world_size: int,
                 model_path: str | None = None, seed: int = 0):
    """The policy (`role="policy"`: log-probs through the fused kernel) or the critic (`"critic"`: a value
    head on the last hidden state) on the configured engine, from `model_path` (default model_cfg.path)."""
    path = model_path or model_cfg.path
    if parallel.engine == "megatron":
        from ovr_hpc.engines.megatron.engine import MegatronEngine

        return MegatronEngine(role, path, model_cfg, parallel, optimizer, schedule, total_steps, seed=seed)

    from ovr_hpc.engines.deepspeed import DeepSpeedEngine
    from ovr_hpc.models.loading import TokenLogprobs, load_critic, load_vlm

    if role == "critic":
        module = load_critic(path, model_cfg.dtype, model_cfg.attn_implementation, model_cfg.freeze_vision,
                             model_cfg.gradient_checkpointing, seed=seed)
        external = ()
    else:
        model = load_vlm(path, model_cfg.dtype, model_cfg.attn_implementation, model_cfg.freeze_vision,
                         model_cfg.gradient_checkpointing)
        module, external = TokenLogprobs(model), (model.lm_head.weight,)
    return DeepSpeedEngine(module, parallel, optimizer, model_cfg.dtype, world_size, total_steps, schedule,
                           external_params=external)


def full_state_dict(engine) -> dict | None:
    """All ranks call; rank 0 gets {HF name: full CPU tensor} of the whole model, the others None. Holds the
    whole model in rank 0's memory: for tests and small models (the HF export streams instead)."""
    import torch.distributed as torch_dist

    rank0 = not torch_dist.is_initialized() or torch_dist.get_rank() == 0
    out = {}
    for name, tensor in engine.iter_full_params():
        if rank0:
            out[name] = tensor.detach().cpu().clone()
    return out if rank0 else None
