"""Small helpers for the tests on the local Slurm cluster: submit, watch, interrupt, compare runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What a torchrun worker's environment holds: jobs submitted from one must still take their ranks from Slurm.
LEAKED_RANK_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")


def run(cmd: list[str], **kwargs) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60, **kwargs).stdout


def sbatch(args: list[str], env: dict | None = None, cwd: str = REPO) -> str:
    out = run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
    return out.strip().split(";")[0]


def in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    if out.returncode and "Invalid job id" not in out.stderr:
        return True  # the controller did not answer: assume nothing changed
    return bool(out.stdout.strip())


def sacct_states(job_id: str) -> list[str]:
    """Every run of the job allocation (requeues included), oldest first, e.g. ['REQUEUED', 'COMPLETED']."""
    out = run(["sacct", "-X", "-n", "-P", "-D", "-j", job_id, "-o", "State"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def steps_of(job_id: str) -> list[str]:
    out = run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID"])
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def wait_job(job_id: str, timeout: float) -> str:
    """Wait until the job has left the queue for good; returns its final state from accounting.

    A requeue passes through states where the job may briefly be missing from squeue and accounting
    lags behind the queue, so both must agree: out of the queue, and a final state in sacct."""
    deadline = time.time() + timeout
    while True:
        if not in_queue(job_id):
            states = sacct_states(job_id)
            if states and states[-1] in TERMINAL and not in_queue(job_id):
                return states[-1]
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s ({sacct_states(job_id)})")
        time.sleep(1)


def metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_step(run_dir: str, step: int, job_id: str, timeout: float) -> int:
    """Wait until the run logged `step` (returns the last logged step); fails if the job ended before."""
    deadline = time.time() + timeout
    while True:
        logged = metrics(run_dir)
        if logged and logged[-1]["step"] >= step:
            return logged[-1]["step"]
        if not in_queue(job_id):
            raise AssertionError(f"job {job_id} ended before step {step}")
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} did not reach step {step} in {timeout:.0f} s")
        time.sleep(0.2)


def training_curve(run_dir: str) -> list[tuple]:
    """What must be identical between an interrupted and an uninterrupted run (timings differ)."""
    return [(m["step"], m["loss"], m["grad_norm"], m["lr"], m["loss_tokens"]) for m in metrics(run_dir)]


def final_weights(run_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "checkpoints", "latest", "hf", "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumed_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]


def total_steps(log: str) -> int:
    """The run's length as the trainer printed it ("... N steps of 8 rows")."""
    match = re.search(r"(\d+) steps of \d+ rows", log)
    assert match, "the log does not say how many steps the run has"
    return int(match.group(1))


def step_processes(job_id: str, step: str = "0") -> list[int]:
    """Pids of the processes of one job step on this machine (the local cluster's nodes are all here),
    found by the SLURM_JOB_ID / SLURM_STEP_ID in their environment."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_STEP_ID={step}".encode()}
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if wanted <= env:
            pids.append(int(name))
    return pids
