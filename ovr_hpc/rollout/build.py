"""The one place a rollout engine is built, from the `rollout` keys (ovr_hpc.config.RolloutEngineConfig)
that the RL and eval configs share. The stages pass what lives elsewhere in their configs: the model, its
dtype, the image bounds, the seed, and their rule for max_model_len when rollout.max_model_len is 0.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ovr_hpc.config import RolloutEngineConfig


def build_rollout_engine(cfg: "RolloutEngineConfig", model_path: str, *, dtype: str, attn_implementation: str,
                         min_pixels: int, max_pixels: int, seed: int, max_model_len: int,
                         load_format: str = "dummy", processor=None):
    """The engine `cfg.engine` names, serving the model at `model_path`. Every rank calls it (building the
    vLLM engine is collective when its tensor-parallel groups span several ranks).

    seed: vllm's engine-wide seed (the hf engine seeds each generate call from SamplingParams.seed).
    max_model_len: the stage's value for cfg.max_model_len 0 (vllm only).
    load_format: vllm only: "dummy" (the RL trainer pushes its weights before the first generate) or "auto"
        (read from model_path). The hf engine always loads model_path.
    attn_implementation: hf only (vLLM picks its own attention backend).
    processor: the caller's processor of model_path (else loaded with min/max pixels).
    """
    if cfg.engine == "vllm":
        import torch

        from ovr_hpc.rollout.vllm import VLLMRolloutEngine

        resolved = dataclasses.replace(
            cfg, max_model_len=cfg.max_model_len or max_model_len,
            # sleep mode is CUDA-only: the CPU test build runs the same config without it
            enable_sleep_mode=cfg.enable_sleep_mode and (not cfg.vllm_allow_cpu or torch.cuda.is_available()))
        return VLLMRolloutEngine(model_path, resolved, min_pixels=min_pixels, max_pixels=max_pixels, dtype=dtype,
                                 seed=seed, load_format=load_format, processor=processor)
    from ovr_hpc import dist
    from ovr_hpc.models.loading import load_processor, load_vlm
    from ovr_hpc.rollout.hf import HFRolloutEngine

    processor = processor or load_processor(model_path, min_pixels, max_pixels)
    model = load_vlm(model_path, dtype, attn_implementation).to(dist.device())
    model.config.use_cache = True  # load_vlm turns the KV cache off for training; generation wants it
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    return HFRolloutEngine(model, processor, min_pixels, max_pixels, batch_size=cfg.batch_size)
