"""Fixtures for the tests on the local Slurm cluster (scripts/local-slurm/start.sh).

`make test` starts the cluster before pytest; run alone, the session fixture starts it where it can.
Without root or apt-get the tests are skipped with the reason; on a machine that should run them (root
and apt-get) a cluster that does not come up is an error, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.cluster import slurmjobs as slurm

START = os.path.join(slurm.REPO, "scripts", "local-slurm", "start.sh")
NODES = 2


def _cluster_problem() -> str | None:
    if not shutil.which("sinfo"):
        return "Slurm is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T"], capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer"
    if out.returncode:
        return f"sinfo failed: {out.stderr.strip()}"
    usable = [line for line in out.stdout.splitlines()
              if line.split()[-1].rstrip("*~#") in ("idle", "mixed", "allocated", "completing")]
    if len(usable) < NODES:
        return f"fewer than {NODES} usable nodes: {out.stdout.strip()!r}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    problem = _cluster_problem()
    if problem is None:
        return
    if os.geteuid() != 0:
        pytest.skip(f"no local Slurm cluster ({problem}), and starting one needs root: sudo {START}")
    if not shutil.which("apt-get"):
        pytest.skip(f"no local Slurm cluster ({problem}), and {START} needs apt-get (Debian or Ubuntu)")
    proc = subprocess.run(["bash", START], capture_output=True, text=True, timeout=900)
    if proc.returncode or _cluster_problem():
        pytest.fail(f"could not start the local Slurm cluster with {START}:\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory, tiny_model_dir):
    """The tiny model and 2000 synthetic records (36 steps of the tiny config in one epoch)."""
    from ovr_hpc.data.synthetic import write_coldstart_sft

    root = tmp_path_factory.mktemp("slurm")
    data = write_coldstart_sft(str(root / "coldstart.jsonl"), 2000, seed=0)
    return {"model": tiny_model_dir, "data": data, "root": root, "cache": str(root / "data_cache")}


@pytest.fixture(scope="session")
def job_env():
    """The environment sbatch passes on: this interpreter, and a short grace for a crashed rank's peers.

    With the rank variables of a torchrun worker, as if submitted from inside one (or from a process whose
    in-process tests ran torch.distributed): the jobs must take their ranks from Slurm, not from these."""
    # PYTHONFAULTHANDLER: a rank that crashes prints every thread's Python stack into the job log
    return {**os.environ, "OVR_PYTHON": sys.executable, "OVR_SRUN_WAIT": "30", "PYTHONFAULTHANDLER": "1",
            **slurm.LEAKED_RANK_ENV}


@pytest.fixture(scope="session")
def cancel_leftovers():
    """Jobs the tests submitted; whatever is still queued at the end is cancelled."""
    submitted: list[str] = []
    yield submitted
    alive = [j for j in submitted if slurm.in_queue(j)]
    if alive:
        subprocess.run(["scancel", *alive], check=False)
