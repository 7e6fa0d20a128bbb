"""The RL stage through `sbatch slurm/rl.sh` on the local cluster (2 nodes x 1 task): it runs, and a job
stopped by the warning signal mid-training saves both engines, requeues, resumes and ends with the
rewards, losses and final policy of the uninterrupted run; with partial rollouts too (each rank's carried
buffer in the checkpoint).
"""

from __future__ import annotations

import os

import pytest

from tests.cluster import slurmjobs as slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# rl.sh warns 30 min before the limit: a 15-min test job needs its own, later warning
SMALL_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--mem=3G", "--time=15",
             "--signal=USR1@60"]
KEYS = ("reward", "response_length", "policy/pg_loss", "critic/vf_loss", "max_response_len")


@pytest.fixture(scope="module")
def rl_inputs(slurm_cluster, tiny_inputs):
    from ovr_hpc.data.synthetic import write_color_rl

    return {**tiny_inputs, "rl_data": write_color_rl(str(tiny_inputs["root"] / "rl" / "color.jsonl"), 32, seed=0)}


def submit_rl(name, inputs, env, submitted, *extra):
    run_dir = str(inputs["root"] / f"rl-{name}")
    os.makedirs(run_dir, exist_ok=True)
    out = os.path.join(run_dir, "out")
    job = slurm.sbatch([*SMALL_JOB, f"--job-name=t-rl-{name}", f"--output={run_dir}/%j.log", "slurm/rl.sh",
                        "configs/tiny/rl.yaml", f"model.path={inputs['model']}",
                        f"data.train_files=[{inputs['rl_data']}]", f"checkpoint.output_dir={out}",
                        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                        "rollout.max_response_len=[[0,6],[4,8]]", "algorithm.critic_updates_per_step=2",
                        "algorithm.reward_workers=1", "schedule.max_steps=8", "checkpoint.every_steps=100",
                        "logging.progress_bar=false", "logging.tensorboard=false", *extra], env=env)
    submitted.append(job)
    return job, run_dir, out


def curve(out, keys=KEYS):
    return [tuple(m[k] for k in keys) for m in slurm.metrics(out)]


def test_rl_job_stopped_by_the_warning_ends_like_an_uninterrupted_one(rl_inputs, job_env, cancel_leftovers):
    ref_job, ref_dir, ref_out = submit_rl("reference", rl_inputs, job_env, cancel_leftovers)
    job, run_dir, out = submit_rl("warning", rl_inputs, job_env, cancel_leftovers)
    stopped_at = slurm.wait_for_step(out, 1, job, 600)  # a step takes seconds: signal at once
    slurm.run(["scancel", "--signal=USR1", job])
    assert slurm.wait_job(ref_job, 600) == "COMPLETED", open(os.path.join(ref_dir, f"{ref_job}.log")).read()[-3000:]
    state = slurm.wait_job(job, 600)
    log = open(os.path.join(run_dir, f"{job}.log")).read()
    assert state == "COMPLETED", log[-3000:]
    assert "rl: job" in log and "stop requested (SIGUSR1" in log and "requeueing the job" in log
    resumed = slurm.resumed_steps(log)
    assert len(resumed) == 1 and stopped_at <= resumed[0] < 8, (stopped_at, resumed)
    assert curve(out) == curve(ref_out) and len(curve(out)) == 8
    assert [c[-1] for c in curve(out)] == [6, 6, 6, 6, 8, 8, 8, 8]  # the length curriculum survives the resume
    assert slurm.same_weights(slurm.final_weights(out), slurm.final_weights(ref_out))


# tests/rl/test_partial_loop.py's setup: a random tiny model rarely ends its turn, a frequent stop string
# gives mixed lengths, and 3 tokens per step carry many of them
PARTIAL = ["rollout.stop=[e]", "rollout.partial.enabled=true", "rollout.partial.tokens_per_step=3",
           "rollout.max_response_len=[[0,12],[4,16]]"]
PARTIAL_KEYS = KEYS + ("partial/carried_groups", "partial/old_policy_token_share", "partial/staleness_tokens/1")


def carried_buffers(out, step):
    """The partial-rollout buffer files of both ranks in the checkpoint of `step`."""
    import json

    folder = os.path.join(out, "checkpoints", f"step_{step}")
    return [json.load(open(os.path.join(folder, f"partial_rollouts_rank{r}.json"))) for r in range(2)]


def test_rl_job_with_partial_rollouts_stopped_by_the_warning_ends_like_an_uninterrupted_one(rl_inputs, job_env,
                                                                                           cancel_leftovers):
    ref_job, ref_dir, ref_out = submit_rl("partial-reference", rl_inputs, job_env, cancel_leftovers, *PARTIAL)
    job, run_dir, out = submit_rl("partial-warning", rl_inputs, job_env, cancel_leftovers, *PARTIAL)
    stopped_at = slurm.wait_for_step(out, 1, job, 600)
    slurm.run(["scancel", "--signal=USR1", job])
    assert slurm.wait_job(ref_job, 600) == "COMPLETED", open(os.path.join(ref_dir, f"{ref_job}.log")).read()[-3000:]
    state = slurm.wait_job(job, 600)
    log = open(os.path.join(run_dir, f"{job}.log")).read()
    assert state == "COMPLETED", log[-3000:]
    assert "stop requested (SIGUSR1" in log and "requeueing the job" in log
    resumed = slurm.resumed_steps(log)
    assert len(resumed) == 1 and stopped_at <= resumed[0] < 8, (stopped_at, resumed)
    reference = slurm.metrics(ref_out)
    assert any(m["partial/carried_groups"] > 0 for m in reference)       # groups were carried
    assert any(m["partial/staleness_tokens/1"] > 0 for m in reference)   # and trained on a step later
    # the checkpoint resumed from holds each rank's buffer: together the groups carried after that step
    buffers = carried_buffers(out, resumed[0])
    assert sum(len(b["groups"]) for b in buffers) == reference[resumed[0] - 1]["partial/carried_groups"]
    assert curve(out, PARTIAL_KEYS) == curve(ref_out, PARTIAL_KEYS) and len(curve(out)) == 8
    assert [c[-1] for c in curve(out)] == [12] * 4 + [16] * 4   # the length curriculum survives the resume
    assert slurm.same_weights(slurm.final_weights(out), slurm.final_weights(ref_out))
