"""Partial rollouts in the RL loop: carried groups survive a stop, between steps and during the rollouts,
and the resumed run equals an uninterrupted one (the carried buffer is in the checkpoint)."""

import json
import os
import signal

import pytest
import torch

from tests.conftest import signal_at_call
from tests.rl.test_rl_loop import RL_CONFIG, _rl_overrides, color_file  # noqa: F401 - a fixture

# a random tiny model rarely ends a turn: a frequent stop string gives responses of mixed lengths, and a
# 3-token budget per step carries most of them
PARTIAL = ["schedule.max_steps=4", "parallel.zero_stage=2", "rollout.batch_size=1", "rollout.stop=[e]",
           "rollout.max_response_len=[[0,12],[3,16]]", "rollout.partial.enabled=true",
           "rollout.partial.tokens_per_step=3"]
KEYS = ["reward", "response_length", "policy/pg_loss", "critic/vf_loss", "partial/carried_groups",
        "partial/old_policy_token_share", "partial/staleness_tokens/1", "partial/rounds"]


@pytest.mark.slow
def test_partial_rollouts_stopped_between_steps_and_during_rollouts_resume_exactly(tiny_model_dir, color_file,
                                                                                   tmp_path, monkeypatch):
    from ovr_hpc.config import load_config
    from ovr_hpc.local import free_port
    from ovr_hpc.metrics import read_metrics
    from ovr_hpc.rl import trainer
    from ovr_hpc.rollout.hf import HFRolloutEngine

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_PORT", str(free_port()))

    def cfg(out):
        return load_config("rl", RL_CONFIG, _rl_overrides(tiny_model_dir, color_file, out, *PARTIAL))

    def curve(out):
        return [[m[k] for k in KEYS] for m in read_metrics(out)]

    full = str(tmp_path / "full")
    assert trainer.train(cfg(full))["status"] == "completed"
    assert sum(m["partial/carried_groups"] for m in read_metrics(full)) > 0        # something was carried
    assert sum(m["partial/staleness_tokens/1"] for m in read_metrics(full)) > 0    # and trained on later

    # 1. a stop between steps (the signal arrives while step 2 is scored): saved at step 2 with its buffer
    between = str(tmp_path / "between")
    real_score = trainer.score
    monkeypatch.setattr(trainer, "score", signal_at_call(real_score, 2))  # while step 2 is scored
    assert trainer.train(cfg(between)) == {"status": "preempted", "step": 2, "total_steps": 4}
    saved = os.path.join(between, "checkpoints", "latest")
    buffer = json.load(open(os.path.join(saved, "partial_rollouts_rank0.json")))
    assert len(buffer["groups"]) == read_metrics(full)[1]["partial/carried_groups"]
    monkeypatch.setattr(trainer, "score", real_score)
    assert trainer.train(cfg(between))["status"] == "completed"
    assert curve(between) == curve(full)

    # 2. a stop while step 3 generates (its 2nd sequence; batch_size 1: a stop check before each): step 2 is
    #    saved with the buffer step 3 started from, and step 3 is generated again after the resume
    during = str(tmp_path / "during")
    real_partial, real_chunk = trainer.generate_partial, HFRolloutEngine._continue_chunk
    now, chunks = {}, []

    def partial_step(rollout, prompts, carried, step, *args):
        now["step"] = step
        return real_partial(rollout, prompts, carried, step, *args)

    def signal_in_step_3(self, *args):
        if now["step"] == 2:
            chunks.append(1)
            if len(chunks) == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
        return real_chunk(self, *args)

    monkeypatch.setattr(trainer, "generate_partial", partial_step)
    monkeypatch.setattr(HFRolloutEngine, "_continue_chunk", signal_in_step_3)
    assert trainer.train(cfg(during)) == {"status": "preempted", "step": 2, "total_steps": 4}
    assert len(chunks) == 2 and len(read_metrics(during)) == 2
    saved = os.path.join(during, "checkpoints", "latest")
    assert json.load(open(os.path.join(saved, "partial_rollouts_rank0.json"))) == buffer
    monkeypatch.setattr(HFRolloutEngine, "_continue_chunk", real_chunk)
    assert trainer.train(cfg(during))["status"] == "completed"
    assert curve(during) == curve(full)
