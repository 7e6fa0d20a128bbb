"""Fixtures for the vLLM engine tests. They run in the CPU vLLM venv (.venv-vllm, made by
scripts/vllm-cpu-venv.sh: `make test-vllm`); elsewhere every test here is skipped.

One in-process engine serves the whole session (building one costs ~15 s of imports and start-up, and
vLLM's in-process distributed state is set up once per process); each test pushes the weights it needs.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

# the engine in this process, a small KV cache: 2 cores and 24 GiB are shared with other work
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from ovr_hpc.config import RolloutEngineConfig  # noqa: E402 - after the environment above

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
MIN_PIXELS, MAX_PIXELS = 3136, 50176
# the engine's settings (the rollout keys of a config, resolved) and the rest of its arguments
ENGINE = RolloutEngineConfig(engine="vllm", max_model_len=512, max_num_batched_tokens=512, max_num_seqs=16,
                             kv_cache_mb=64, enforce_eager=True, enable_sleep_mode=False, vllm_allow_cpu=True)
ENGINE_ARGS = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype="float32")


def needs_two_devices():
    """A skip mark for the 2-process tests where they would share one GPU (vLLM puts rank r on cuda:r)."""
    import torch

    return pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                              reason="2 ranks need 2 GPUs (or the CPU build)")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="needs the CPU vLLM venv: bash scripts/vllm-cpu-venv.sh; make test-vllm")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vllm)
            if not HAVE_VLLM:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    from ovr_hpc.models.loading import load_vlm

    return load_vlm(tiny_model_dir, "float32", "sdpa").eval()


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> str:
    """The same architecture and tokenizer with different random weights (seed 1)."""
    from ovr_hpc.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_seed1") / "model", seed=1))


@pytest.fixture(scope="session")
def engine_state(tiny_model_dir):
    """(engine, what generate() did before the first weight push)."""
    from ovr_hpc.data.prompts import Prompt
    from ovr_hpc.rollout.base import SamplingParams
    from ovr_hpc.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine(tiny_model_dir, ENGINE, **ENGINE_ARGS)
    try:
        engine.generate([Prompt("hello")], SamplingParams(max_new_tokens=2))
        before_push = "generated"
    except RuntimeError as e:
        before_push = str(e)
    return engine, before_push


@pytest.fixture
def engine(engine_state):
    return engine_state[0]


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    from tests.conftest import write_png

    d = tmp_path_factory.mktemp("images")
    return {"red": write_png(d / "red.png", (56, 56), (200, 30, 30)),
            "wide": write_png(d / "wide.png", (112, 56), (0, 90, 200))}
