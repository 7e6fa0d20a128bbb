"""One builder for the rollout engine of both stages: what it makes of the shared `rollout` keys
(ovr_hpc.config.RolloutEngineConfig) and each stage's own values. The vLLM engine is replaced by a
recorder here (the real one: tests/rollout/vllm/, in the CPU vLLM venv)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ovr_hpc.config import RLConfig, RolloutConfig, RolloutEngineConfig
from ovr_hpc.eval.config import EvalConfig, EvalModelConfig, EvalRolloutConfig
from ovr_hpc.rollout import vllm as V


class Recorder:
    def __init__(self, model_path, cfg, **kwargs):
        self.model_path, self.cfg, self.kwargs = model_path, cfg, kwargs


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setattr(V, "VLLMRolloutEngine", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_both_stages_hold_the_engine_keys_once():
    engine_keys = [f.name for f in dataclasses.fields(RolloutEngineConfig)]
    for section in (RolloutConfig, EvalRolloutConfig):
        assert issubclass(section, RolloutEngineConfig)
        assert [f.name for f in dataclasses.fields(section)][:len(engine_keys)] == engine_keys


def test_rl_engine_settings(recorded):
    from ovr_hpc.rl.trainer import rollout_engine

    cfg = RLConfig(seed=7)
    cfg.model.path, cfg.model.dtype = "/models/policy", "float32"
    cfg.rollout.engine, cfg.rollout.kv_cache_mb = "vllm", 64
    engine = rollout_engine(cfg, processor="the trainer's processor")
    assert engine.model_path == "/models/policy"
    assert engine.cfg.max_model_len == cfg.data.max_prompt_len + 49152  # the longest response of the curriculum
    assert engine.cfg.enable_sleep_mode is True  # without vllm_allow_cpu the config goes through as it is
    assert engine.cfg.kv_cache_mb == 64 and engine.cfg.weight_bucket_mb == 512
    assert engine.cfg.max_num_batched_tokens == 32768 and engine.cfg.tensor_parallel_size == 1
    assert engine.kwargs == dict(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, dtype="float32",
                                 seed=7, load_format="dummy", processor="the trainer's processor")
    assert cfg.rollout.max_model_len == 0  # the config itself is left as it was
    # the CPU test build runs the same config without sleep mode; an explicit max_model_len is kept
    cfg.rollout.vllm_allow_cpu, cfg.rollout.max_model_len = True, 1000
    engine = rollout_engine(cfg, processor=None)
    assert engine.cfg.enable_sleep_mode is False and engine.cfg.max_model_len == 1000


def test_rl_sleep_mode_stays_on_cuda(recorded, monkeypatch):
    from ovr_hpc.rl.trainer import rollout_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = RLConfig()
    cfg.rollout.engine, cfg.rollout.vllm_allow_cpu = "vllm", True
    assert rollout_engine(cfg, processor=None).cfg.enable_sleep_mode is True


def test_eval_engine_settings(recorded):
    from ovr_hpc.eval.runner import build_engine

    cfg = EvalConfig(model=EvalModelConfig(path="/models/m", dtype="float32"),
                     rollout=EvalRolloutConfig(engine="vllm", gpu_memory_utilization=0.85, max_images_per_prompt=8))
    cfg.sampling.seed, cfg.sampling.max_new_tokens = 3, 100
    engine = build_engine(cfg, "/models/m/hf")
    assert engine.model_path == "/models/m/hf"
    assert engine.cfg.max_model_len == 100 + 8192  # the prompt + the response budget
    assert (engine.cfg.gpu_memory_utilization, engine.cfg.max_images_per_prompt) == (0.85, 8)
    # eval's own defaults: it generates alone on its GPUs
    assert engine.cfg.enable_sleep_mode is False and engine.cfg.max_num_batched_tokens == 8192
    assert engine.cfg.batch_size == 16
    assert engine.kwargs == dict(min_pixels=3136, max_pixels=1003520, dtype="float32", seed=3, load_format="auto",
                                 processor=None)
    cfg.rollout.max_model_len = 4096
    assert build_engine(cfg, "/models/m/hf").cfg.max_model_len == 4096


def test_hf_engine_generates_with_the_kv_cache(tiny_model_dir, processor):
    from ovr_hpc.rollout.build import build_rollout_engine
    from ovr_hpc.rollout.hf import HFRolloutEngine

    engine = build_rollout_engine(RolloutEngineConfig(batch_size=5), tiny_model_dir, dtype="float32",
                                  attn_implementation="sdpa", min_pixels=3136, max_pixels=50176, seed=0,
                                  max_model_len=0, processor=processor)
    assert isinstance(engine, HFRolloutEngine) and engine.processor is processor and engine.batch_size == 5
    assert engine.model.config.use_cache is True and engine.model.generation_config.use_cache is True
    assert not engine.model.training
