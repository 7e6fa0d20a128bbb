"""A short RL run of the tiny config with rollout.engine: vllm on 2 gloo ranks (trainer ZeRO-3, rollout
TP=2), then a resume with another rollout layout (TP=1 x DP=2) that must serve the resumed weights."""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.conftest import REPO
from tests.rollout.vllm.conftest import needs_two_devices

RL_CONFIG = os.path.join(REPO, "configs", "tiny", "rl.yaml")
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, needs_two_devices()]


def _has_vllm_keys() -> bool:
    from ovr_hpc.config import RolloutConfig

    return "vllm_allow_cpu" in {f.name for f in dataclasses.fields(RolloutConfig)}


@pytest.fixture
def color_file(tmp_path):
    from ovr_hpc.data.synthetic import write_color_rl

    return write_color_rl(str(tmp_path / "color.jsonl"), 24, seed=0)


def _overrides(model_dir, data, out, *extra):
    return [f"model.path={model_dir}", f"data.train_files=[{data}]", f"checkpoint.output_dir={out}",
            "logging.progress_bar=false", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
            "rollout.max_response_len=[[0,6],[2,8]]", "algorithm.critic_updates_per_step=2",
            "algorithm.reward_workers=1", "checkpoint.every_steps=100",
            "optimizer.lr=0.02",  # large steps: a stale policy in the engine would show in the log-prob gap
            "rollout.engine=vllm", "rollout.vllm_allow_cpu=true", "rollout.kv_cache_mb=64",
            "rollout.enforce_eager=true", "rollout.max_num_seqs=16", *extra]


@pytest.mark.skipif(not _has_vllm_keys(), reason="needs the rollout.vllm_* config keys (engine report)")
def test_rl_run_with_vllm_and_resume(tiny_model_dir, color_file, tmp_path):
    from ovr_hpc.local import start_ranks, wait_ranks
    from ovr_hpc.metrics import read_metrics

    out = str(tmp_path / "rl")
    run = lambda *extra: wait_ranks(start_ranks(  # noqa: E731
        "rl", RL_CONFIG, _overrides(tiny_model_dir, color_file, out, *extra), 2, os.path.join(out, "logs")))
    assert run("schedule.max_steps=2", "rollout.tensor_parallel_size=2", "parallel.zero_stage=3") == 0
    first = read_metrics(out)
    assert [m["step"] for m in first] == [1, 2]
    # resumed at step 2 with one engine per rank; the engine serves the trained (resumed) policy
    assert run("schedule.max_steps=3", "rollout.tensor_parallel_size=1", "parallel.zero_stage=3") == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        # vLLM's log-probs are those of the sampling distribution, without the two banned placeholder
        # tokens (~2/2048 of the mass for this random model); the trainer's include them
        assert m["rollout_logprob_gap_max"] < 5e-3, m
        assert m["response_length_max"] <= m["max_response_len"]
    assert metrics[2]["max_response_len"] == 8


def test_rl_megatron_policy_feeds_vllm(tiny_model_dir_2kv, color_file, tmp_path, monkeypatch):
    """The megatron-core engine (TP 2) streams its parameters into the vLLM CPU engine (rollout TP 2):
    the sampled log-probs are those of the trained policy after every update."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed in this venv")
    from ovr_hpc.local import start_ranks, wait_ranks
    from ovr_hpc.metrics import read_metrics

    site = os.path.join(REPO, "tests", "engines", "mcore_cpu", "site")  # the test-only CPU shims, in every rank
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([site, REPO, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OVR_TEST_MCORE_CPU_SHIMS", "1")
    out = str(tmp_path / "rl")
    overrides = _overrides(tiny_model_dir_2kv, color_file, out, "schedule.max_steps=2", "rollout.tensor_parallel_size=2",
                           "parallel.engine=megatron", "parallel.tensor_parallel_size=2",
                           "parallel.megatron_spec=local", "model.attn_implementation=sdpa")
    assert wait_ranks(start_ranks("rl", RL_CONFIG, overrides, 2, os.path.join(out, "logs"))) == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["rollout_logprob_gap_max"] < 5e-3, m
