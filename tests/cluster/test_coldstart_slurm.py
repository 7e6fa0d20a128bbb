"""The cold start on a real Slurm cluster (the local 2-node one): the tiny config on 2 nodes x 1 task.

1. `sbatch slurm/coldstart.sh` runs to completion and leaves a checkpoint and an exportable model;
2. a job stopped mid-training (the warning signal, `scontrol requeue`, a preemption, a kill without
   warning) saves (or falls back to the periodic checkpoint), requeues, resumes and finishes with the
   training curve and final weights of the uninterrupted run, bit for bit;
3. a job that hits a real --time limit saves on the warning, requeues and finishes;
4. the same through submitit (ovr_hpc.launch.submit), preempted with submitit's own signals;
5. a bad config is rejected before anything starts, with the config system's message.

What the test cluster lacks (GPUs, big nodes) goes in through sbatch flags; the scripts are the users'.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

import pytest

from ovr_hpc import launch
from ovr_hpc.config import ConfigError
from tests.cluster import slurmjobs as slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = "slurm/coldstart.sh"
CONFIG = "configs/tiny/coldstart.yaml"
# 2 nodes x 1 task on nodes with 2 CPUs and fake GPUs; the warning (USR1@600 in the script) never comes
SMALL_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--mem=3G", "--time=15"]


def overrides(inputs, out_dir, *extra):
    return [f"model.path={inputs['model']}", f"data.train_files=[{inputs['data']}]",
            f"data.cache_dir={inputs['cache']}", f"checkpoint.output_dir={out_dir}", "checkpoint.every_steps=10",
            "schedule.epochs=1", "logging.progress_bar=false", "logging.tensorboard=false", *extra]


class Run:
    """One sbatch submission of the cold start, its output folder and log."""

    def __init__(self, name, inputs, env, submitted, sbatch_flags=(), extra=()):
        self.dir = str(inputs["root"] / name)
        os.makedirs(self.dir, exist_ok=True)
        self.out = os.path.join(self.dir, "out")
        self.job = slurm.sbatch([*SMALL_JOB, *sbatch_flags, f"--job-name=t-{name}", f"--output={self.dir}/%j.log",
                                 SCRIPT, CONFIG, *overrides(inputs, self.out, *extra)], env=env)
        submitted.append(self.job)

    @property
    def log(self) -> str:
        path = os.path.join(self.dir, f"{self.job}.log")
        return open(path).read() if os.path.exists(path) else ""

    def wait(self, timeout=300) -> str:
        return slurm.wait_job(self.job, timeout)

    def wait_for_step(self, step, timeout=240) -> int:
        return slurm.wait_for_step(self.out, step, self.job, timeout)

    @property
    def total_steps(self) -> int:
        return slurm.total_steps(self.log)


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_inputs, job_env, cancel_leftovers):
    """The uninterrupted run every interrupted one is compared with (it also builds DeepSpeed's JIT ops once)."""
    run = Run("reference", tiny_inputs, job_env, cancel_leftovers)
    run.state = run.wait()
    return run


@pytest.fixture(scope="module", autouse=True)
def time_limit_run(reference, tiny_inputs, job_env, cancel_leftovers):
    """Started right after the reference run: it spends most of its time waiting for Slurm's clock, so it
    runs beside the next tests (the cluster fits two of these jobs) and its test, near the end, collects it.
    (Not beside the reference run: a warning during the first JIT build of DeepSpeed's ops would kill the
    compiler, which gets the signal too.)"""
    # 2 min limit, warning 40 s before it: Slurm checks every 30 s, so USR1 comes 50-80 s into each run.
    # Six epochs (288 steps, ~85 s of training here) cannot fit before the first warning.
    return Run("time-limit", tiny_inputs, job_env, cancel_leftovers, sbatch_flags=["--time=2", "--signal=USR1@40"],
               extra=["schedule.epochs=6", "checkpoint.every_steps=100"])


def assert_same_training(run, reference):
    assert slurm.training_curve(run.out) == slurm.training_curve(reference.out)
    assert slurm.same_weights(slurm.final_weights(run.out), slurm.final_weights(reference.out))


# ----------------------------------------------------------------------------- 1. a plain run


def test_sbatch_runs_to_completion_and_exports(reference, tmp_path):
    log = reference.log
    assert reference.state == "COMPLETED", log[-3000:]
    for expected in ("coldstart: job", "nodes     2: node[1-2]", "tasks     2 (1 per node)", "gpus      1 per node",
                     "commit    ", "master    node1:", "zero_stage: 3", "coldstart finished"):
        assert expected in log, expected
    assert [m["step"] for m in slurm.metrics(reference.out)] == list(range(1, reference.total_steps + 1))
    latest = os.path.join(reference.out, "checkpoints", "latest")
    assert os.path.exists(os.path.join(latest, "COMPLETE"))
    export = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "ovr_hpc.cli", "export", latest, str(export)], check=True,
                   capture_output=True, timeout=300)
    from safetensors.torch import load_file

    assert (export / "config.json").exists()
    assert slurm.same_weights(load_file(str(export / "model.safetensors")), slurm.final_weights(reference.out))


# ----------------------------------------------------------------------------- 2. stopped mid-training


def check_stopped_run(run, reference, stopped_at, signal, requeued_by):
    state = run.wait()
    log = run.log
    assert state == "COMPLETED", log[-3000:]
    assert f"stop requested ({signal}" in log  # rank 0's own signal, or "SIGTERM on another rank"
    assert ("requeueing the job" in log) == (requeued_by == "script")
    states = slurm.sacct_states(run.job)
    assert len(states) == 2 and states[0] in ("REQUEUED", "PREEMPTED"), states
    resumed = slurm.resumed_steps(log)
    # saved when told to (not at the periodic checkpoint of step 10), resumed once from there
    assert len(resumed) == 1 and stopped_at <= resumed[0] < run.total_steps, (stopped_at, resumed)
    assert_same_training(run, reference)


@pytest.mark.parametrize("how, signal, requeued_by", [
    # the time-limit warning (what --signal=USR1@600 sends), here at once; the script requeues the job
    ("warning", "SIGUSR1", "script"),
    # SIGTERM to every process of the job, KillWait seconds to save and exit; Slurm requeues it
    ("scontrol-requeue", "SIGTERM", "slurm"),
])
def test_stopped_job_saves_requeues_and_ends_like_an_uninterrupted_run(how, signal, requeued_by, reference,
                                                                       tiny_inputs, job_env, cancel_leftovers):
    run = Run(how, tiny_inputs, job_env, cancel_leftovers)
    stopped_at = run.wait_for_step(12)
    if how == "warning":
        slurm.run(["scancel", "--signal=USR1", run.job])
    else:
        slurm.run(["scontrol", "requeue", run.job])
    check_stopped_run(run, reference, stopped_at, signal, requeued_by)


def test_killed_job_resumes_from_the_periodic_checkpoint(reference, tiny_inputs, job_env, cancel_leftovers):
    run = Run("kill", tiny_inputs, job_env, cancel_leftovers)
    run.wait_for_step(12)
    # the ranks die at once, as under the OOM killer or on a node crash: no save, srun fails.
    # (scancel --signal=KILL would not do: Slurm turns it into a cancellation, which warns with SIGTERM.)
    ranks = slurm.step_processes(run.job)
    assert ranks
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    assert run.wait() == "FAILED"
    assert "stop requested" not in run.log and "requeueing" not in run.log
    slurm.run(["scontrol", "requeue", run.job])  # what Slurm does after a node failure
    assert run.wait() == "COMPLETED", run.log[-3000:]
    assert slurm.resumed_steps(run.log) == [10]
    assert_same_training(run, reference)


# ----------------------------------------------------------------------------- 4. submitit


def test_submitit_preemption_requeues_and_resumes(reference, tiny_inputs, tmp_path, cancel_leftovers, monkeypatch):
    for key, value in slurm.LEAKED_RANK_ENV.items():   # submitit passes this process's environment on
        monkeypatch.setenv(key, value)
    out = str(tmp_path / "out")
    job = launch.submit("coldstart", CONFIG, overrides(tiny_inputs, out), cluster="slurm", nodes=2, gpus_per_node=1,
                        cpus_per_task=1, mem_gb=3, time=20, signal_delay_s=120, folder=str(tmp_path / "submitit" / "%j"))
    cancel_leftovers.append(job.job_id)
    stopped_at = slurm.wait_for_step(out, 12, job.job_id, timeout=240)
    job._interrupt()  # what a preemption sends under submitit: SIGTERM, then USR2
    results = job.results()
    assert [r["status"] for r in results] == ["completed", "completed"]
    log = job.stdout()
    assert "requeueing job" in log and "Requeued job" in log
    resumed = slurm.resumed_steps(log)
    assert len(resumed) == 1 and stopped_at <= resumed[0] < slurm.total_steps(log), (stopped_at, resumed)
    assert_same_training(types.SimpleNamespace(out=out), reference)


# ----------------------------------------------------------------------------- 5. bad configs


@pytest.mark.parametrize("override, message", [
    ("parallel.zero_stage=5", "parallel.zero_stage (5) must be 1, 2 or 3"),
    # needs the job's world size (2 ranks): only the job can tell
    ("parallel.global_batch_size=3", "parallel.global_batch_size (3) must be divisible by data-parallel size (2)"),
])
def test_bad_config_fails_before_anything_starts(override, message, slurm_cluster, tiny_inputs, job_env,
                                                 cancel_leftovers):
    run = Run("bad-" + override.split("=")[0], tiny_inputs, job_env, cancel_leftovers, extra=[override])
    assert run.wait(timeout=120) == "FAILED"
    log = run.log
    assert f"ovr-hpc: config error: {message}" in log
    assert "nothing was started" in log
    assert slurm.steps_of(run.job) == [run.job, f"{run.job}.batch"]  # no srun step ever ran
    assert not os.path.exists(run.out)


def test_bad_config_never_reaches_the_queue(slurm_cluster, tiny_inputs, job_env, tmp_path):
    before = slurm.run(["squeue", "-h", "-o", "%A"])
    with pytest.raises(ConfigError, match=r"schedule.kind = 'step'"):
        launch.submit("coldstart", CONFIG, ["schedule.kind=step"], cluster="slurm", nodes=2, gpus_per_node=1,
                      time=20, signal_delay_s=120, folder=str(tmp_path / "submitit"))
    # the script run on a login node checks before it calls sbatch
    proc = subprocess.run(["bash", SCRIPT, CONFIG, "schedule.kind=step"], cwd=slurm.REPO, env=job_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ovr-hpc: config error: schedule.kind = 'step'" in proc.stderr
    assert slurm.run(["squeue", "-h", "-o", "%A"]) == before
    assert not (tmp_path / "submitit").exists()


# ----------------------------------------------------------------------------- 3. the time limit


def test_time_limit_warning_saves_requeues_and_finishes(time_limit_run):
    run = time_limit_run
    state = run.wait(timeout=600)
    log = run.log
    assert state == "COMPLETED", log[-3000:]
    assert "stop requested (SIGUSR1" in log and "requeueing the job" in log
    assert "TIME LIMIT" not in log  # saved and left before Slurm had to kill it
    steps = [m["step"] for m in slurm.metrics(run.out)]
    assert steps == list(range(1, run.total_steps + 1))
    assert len(slurm.resumed_steps(log)) == len(slurm.sacct_states(run.job)) - 1 >= 1


# ----------------------------------------------------------------------------- 2. a real preemption (last: it
# takes both nodes whole, so it would also preempt the time-limit job if that were still running)


def test_preempted_job_saves_requeues_and_ends_like_an_uninterrupted_run(reference, time_limit_run, tiny_inputs,
                                                                         job_env, cancel_leftovers):
    time_limit_run.wait(timeout=600)
    run = Run("preemption", tiny_inputs, job_env, cancel_leftovers)
    stopped_at = run.wait_for_step(12)
    # a job in the higher-priority partition needing both nodes whole: Slurm preempts ours, whose tasks get
    # SIGTERM and GraceTime seconds; the job is still RUNNING when they exit, so the script requeues it
    urgent = slurm.sbatch(["--partition=urgent", "--nodes=2", "--exclusive", "--job-name=t-urgent",
                           "--output=/dev/null", "--wrap", "sleep 2"])
    cancel_leftovers.append(urgent)
    check_stopped_run(run, reference, stopped_at, "SIGTERM", "script")
    assert slurm.wait_job(urgent, 60) == "COMPLETED"
