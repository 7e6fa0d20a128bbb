"""Run a stage as N ranks on this machine (a workstation, the demo, the tests): torchrun's job, minus torchrun.

Each rank is `python -m ovr_hpc.cli STAGE CONFIG overrides...` with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT exported, so it goes through exactly the path srun and submitit take.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(stage: str, config: str, overrides: list[str], nprocs: int, log_dir: str | None = None,
                threads_per_rank: int | None = None) -> list[subprocess.Popen]:
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nprocs)
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads))
        out = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            out = open(os.path.join(log_dir, f"rank{rank}.log"), "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "ovr_hpc.cli", stage, config, *overrides], env=env,
                                      stdout=out, stderr=subprocess.STDOUT if out else None))
    return procs


def wait_ranks(procs: list[subprocess.Popen], poll_s: float = 0.5) -> int:
    """Wait for all ranks; if one fails, stop the others (they would hang in a collective). Returns rank 0's code."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and any(c is None for c in codes) and failed[0] != 75:
            time.sleep(5)  # let a coordinated stop finish on the others first
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return failed[0]
        if all(c is not None for c in codes):
            return next((c for c in codes if c != 0), 0)
        time.sleep(poll_s)


def run_local(stage: str, config: str, overrides: list[str] = (), nprocs: int = 2, log_dir: str | None = None) -> int:
    procs = start_ranks(stage, config, list(overrides), nprocs, log_dir)
    try:
        return wait_ranks(procs)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        return wait_ranks(procs)
