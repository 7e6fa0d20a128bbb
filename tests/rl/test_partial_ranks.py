"""Partial rollouts on 2 gloo ranks (the hf engine, configs/tiny/rl.yaml): each rank carries its own
buffer, saved per rank; the new groups are shared by expected work; a run resumed from a mid-run
checkpoint, or stopped between two rounds of a step's rollouts, ends with the metrics of a straight one."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.cluster.slurmjobs import final_weights, same_weights
from tests.rl.test_partial_loop import KEYS, PARTIAL
from tests.rl.test_rl_loop import RL_CONFIG, _rl_overrides, color_file  # noqa: F401 - a fixture

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

RANKS = 2
# the in-process test's partial setup without its step count (set per run here) and its one-sequence
# batches (there for a stop inside the engine, which 2 hf ranks never ask for)
PARTIAL_RANKS = [o for o in PARTIAL if not o.startswith(("schedule.max_steps=", "rollout.batch_size="))]
BALANCE = "gen/tokens_per_rank_max_over_mean"


def run_ranks(model_dir, data, out, steps: int, *extra) -> int:
    from ovr_hpc.local import start_ranks, wait_ranks

    overrides = _rl_overrides(model_dir, data, out, *PARTIAL_RANKS, f"schedule.max_steps={steps}", *extra)
    return wait_ranks(start_ranks("rl", RL_CONFIG, overrides, RANKS, os.path.join(out, "logs")))


def curve(out):
    from ovr_hpc.metrics import read_metrics

    return [[m["step"]] + [m[k] for k in KEYS + [BALANCE]] for m in read_metrics(out)]


def rank_buffers(checkpoint: str) -> list[dict]:
    return [json.load(open(os.path.join(checkpoint, f"partial_rollouts_rank{r}.json"))) for r in range(RANKS)]


def test_partial_rollouts_on_two_ranks_resume_exactly(tiny_model_dir, color_file, tmp_path):
    from ovr_hpc.metrics import read_metrics

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert run_ranks(tiny_model_dir, color_file, straight, 4) == 0
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert any(m["partial/carried_groups"] > 0 for m in metrics)       # something was carried
    assert any(m["partial/staleness_tokens/1"] > 0 for m in metrics)   # and trained on a step later
    # both ranks generated every step (max / mean is 2 when one rank does all the work)
    assert all(math.isfinite(m[BALANCE]) and 1.0 <= m[BALANCE] < RANKS for m in metrics), [m[BALANCE] for m in metrics]

    assert run_ranks(tiny_model_dir, color_file, resumed, 2) == 0
    mid = os.path.join(resumed, "checkpoints", "step_2")
    buffers = rank_buffers(mid)   # one file per rank, each the buffer of its own groups
    assert sum(len(b["groups"]) for b in buffers) == metrics[1]["partial/carried_groups"]
    assert buffers[0]["mean_len"] == buffers[1]["mean_len"]   # the length model is the world's: same on every rank
    assert run_ranks(tiny_model_dir, color_file, resumed, 4) == 0
    assert "resumed from" in open(os.path.join(resumed, "logs", "rank0.log")).read()
    assert curve(resumed) == curve(straight)
    assert same_weights(final_weights(resumed), final_weights(straight))


# in every rank process (sitecustomize on PYTHONPATH): the rank OVR_TEST_SIGNAL_RANK sends itself SIGUSR1 at
# its OVR_TEST_SIGNAL_AT_CALL-th round of rollouts (HFRolloutEngine.generate_samples call)
SIGNAL_SHIM = """
import os
if os.environ.get("OVR_TEST_SIGNAL_RANK") == os.environ.get("RANK"):
    import signal
    from ovr_hpc.rollout.hf import HFRolloutEngine
    _real, _calls, _at = HFRolloutEngine.generate_samples, [], int(os.environ["OVR_TEST_SIGNAL_AT_CALL"])

    def _generate_samples(self, *args, **kwargs):
        _calls.append(1)
        if len(_calls) == _at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return _real(self, *args, **kwargs)

    HFRolloutEngine.generate_samples = _generate_samples
"""
# one token per step: step 1 takes 4 rounds and carries a group, step 2 continues it in 3 rounds (measured)
ONE_TOKEN = "rollout.partial.tokens_per_step=1"


def test_a_stop_between_rounds_on_one_rank_stops_both_and_resumes_exactly(tiny_model_dir, color_file, tmp_path,
                                                                          monkeypatch):
    from ovr_hpc.metrics import read_metrics
    from tests.conftest import REPO

    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    assert run_ranks(tiny_model_dir, color_file, straight, 4, ONE_TOKEN) == 0
    metrics = read_metrics(straight)
    assert [m["partial/rounds"] for m in metrics[:2]] == [4, 3] and metrics[0]["partial/carried_groups"] > 0

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SIGNAL_SHIM)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), REPO, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OVR_TEST_SIGNAL_RANK", "0")
    monkeypatch.setenv("OVR_TEST_SIGNAL_AT_CALL", "5")   # rank 0's first round of step 2: 2 more to go
    # 2 hf ranks agree on the stop between rounds: rank 1, never signalled, stops with rank 0
    assert run_ranks(tiny_model_dir, color_file, stopped, 4, ONE_TOKEN) == 75
    assert "during the rollouts of step 2: saving step 1" in open(os.path.join(stopped, "logs", "rank0.log")).read()
    assert len(read_metrics(stopped)) == 1
    buffers = rank_buffers(os.path.join(stopped, "checkpoints", "latest"))   # the buffer step 2 started from
    assert sum(len(b["groups"]) for b in buffers) == metrics[0]["partial/carried_groups"]

    monkeypatch.delenv("OVR_TEST_SIGNAL_RANK")
    assert run_ranks(tiny_model_dir, color_file, stopped, 4, ONE_TOKEN) == 0
    assert curve(stopped) == curve(straight)
    assert same_weights(final_weights(stopped), final_weights(straight))
