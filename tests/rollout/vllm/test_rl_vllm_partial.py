"""Partial rollouts with rollout.engine: vllm on 2 gloo ranks (one engine of rollout TP 2: the ranks'
continuations are generated together): groups are carried between steps, and a run stopped after step 2
and resumed (the carried buffer from the checkpoint, the resumed weights pushed into a new engine) gives
the curve of an uninterrupted run."""

from __future__ import annotations

import os

import pytest

from tests.rollout.vllm.conftest import needs_two_devices
from tests.rollout.vllm.test_rl_vllm import RL_CONFIG, _overrides, color_file  # noqa: F401 - a fixture

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, needs_two_devices()]

# a frequent stop string gives responses of mixed lengths; a 3-token budget per step carries most of them
PARTIAL = ["rollout.stop=[e]", "rollout.partial.enabled=true", "rollout.partial.tokens_per_step=3",
           "rollout.tensor_parallel_size=2", "parallel.zero_stage=3", "rollout.check_weights=true"]
KEYS = ["reward", "response_length", "policy/pg_loss", "critic/vf_loss", "partial/carried_groups",
        "partial/old_policy_token_share", "partial/rounds", "rollout_logprob_gap_max"]


def test_rl_partial_rollouts_with_vllm_resume_exactly(tiny_model_dir, color_file, tmp_path):
    from ovr_hpc.local import start_ranks, wait_ranks
    from ovr_hpc.metrics import read_metrics

    def run(out, steps):
        overrides = _overrides(tiny_model_dir, color_file, out, f"schedule.max_steps={steps}", *PARTIAL)
        return wait_ranks(start_ranks("rl", RL_CONFIG, overrides, 2, os.path.join(out, "logs")))

    def curve(out):
        return [[m[k] for k in KEYS] for m in read_metrics(out)]

    full = str(tmp_path / "full")
    assert run(full, 4) == 0
    metrics = read_metrics(full)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert sum(m["partial/carried_groups"] for m in metrics) > 0                # something was carried
    assert sum(m["partial/staleness_tokens/1"] for m in metrics) > 0            # and trained on later
    # the engine samples with the step's weights (rollout.check_weights checks every push too): where no
    # token of an older policy is trained on, the sampled log-probs are the trainer's
    on_policy = [m for m in metrics if m["partial/old_policy_token_share"] == 0]
    assert on_policy and all(m["rollout_logprob_gap_max"] < 5e-3 for m in on_policy), on_policy
    assert all(m["response_length_max"] <= m["max_response_len"] for m in metrics)

    resumed = str(tmp_path / "resumed")
    assert run(resumed, 2) == 0
    assert os.path.exists(os.path.join(resumed, "checkpoints", "latest", "partial_rollouts_rank1.json"))
    assert run(resumed, 4) == 0
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4]
    assert curve(resumed) == curve(full)
