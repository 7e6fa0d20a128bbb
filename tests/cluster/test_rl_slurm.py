"""The RL stage through `sbatch slurm/rl.sh` on the local cluster (2 nodes x 1 task): it runs, and a job
stopped by the warning signal mid-training saves both engines, requeues, resumes and ends with the
rewards, losses and final policy of the uninterrupted run.
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


def submit_rl(name, inputs, env, submitted):
    run_dir = str(inputs["root"] / f"rl-{name}")
    os.makedirs(run_dir, exist_ok=True)
    out = os.path.join(run_dir, "out")
    job = slurm.sbatch([*SMALL_JOB, f"--job-name=t-rl-{name}", f"--output={run_dir}/%j.log", "slurm/rl.sh",
                        "configs/tiny/rl.yaml", f"model.path={inputs['model']}",
                        f"data.train_files=[{inputs['rl_data']}]", f"checkpoint.output_dir={out}",
                        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                        "rollout.max_response_len=[[0,6],[4,8]]", "algorithm.critic_updates_per_step=2",
                        "algorithm.reward_workers=1", "schedule.max_steps=8", "checkpoint.every_steps=100",
                        "logging.progress_bar=false", "logging.tensorboard=false"], env=env)
    submitted.append(job)
    return job, run_dir, out


def curve(out):
    return [tuple(m[k] for k in KEYS) for m in slurm.metrics(out)]


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
