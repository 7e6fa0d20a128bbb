"""Where a process sits in the job: rank info from the environment, the process group, preemption.

Launchers covered, in the order they are recognised:
- torchrun (or anything that exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
- a Slurm job step (srun, or submitit's tasks): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the master
  is the first host of the step's node list, the port is derived from the job id;
- a single process.
The stage loops know nothing else about how they were launched.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

# Exit status of a run that saved a checkpoint because it was asked to stop (preemption, time limit):
# the sbatch script requeues the job on it. 75 = EX_TEMPFAIL ("try again later").
EXIT_REQUEUE = 75


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # scontrol missing: handle "node[1-3,5],other" and plain names ourselves
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        return prefix + first
    return head


def slurm_master_port(job_id: str | int) -> int:
    """A port from the job id, so two jobs sharing a node do not collide (range 20000-59999)."""
    return 20000 + int(job_id) % 40000


def detect_rank_info(environ: dict | None = None) -> RankInfo:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return RankInfo(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    # Only a job step (srun) has one task per rank; the batch script itself is not a rank.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", 1)))
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))
        return RankInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=max(1, world // max(1, nodes)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or slurm_master_port(env.get("SLURM_JOB_ID", 0))),
            launcher="slurm",
        )
    return RankInfo(0, 1, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


def init_distributed(timeout_minutes: int = 60) -> RankInfo:
    """Export the torch.distributed variables and start the process group (NCCL on GPUs, gloo on CPU)."""
    import datetime

    import torch
    import torch.distributed as dist

    info = detect_rank_info()
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            # NCCL binds each rank to its GPU up front (no guessing from the global rank)
            device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None,
        )
    return info


def device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


_stop_signal: str | None = None  # set by the handler below, read through StopRequest


def _on_stop_signal(signum, frame) -> None:  # noqa: ARG001
    global _stop_signal
    _stop_signal = signal.Signals(signum).name


def catch_stop_signals() -> None:
    """Turn the stop signals into a (cleared) flag from the first line of a run: a warning that arrives
    while the model is still loading must not kill the rank (it is honoured at the first step boundary)."""
    global _stop_signal
    _stop_signal = None
    for name in StopRequest.SIGNALS:
        signal.signal(getattr(signal, name), _on_stop_signal)


def ignore_stop_signals() -> None:
    """After a run: a stop signal has nothing left to stop. Ignored rather than caught: while Python shuts
    down it gives caught signals their default action back (terminate), so a time-limit warning arriving
    then turned a finished rank into one killed by SIGUSR1 (exit 138, the job FAILED)."""
    for name in StopRequest.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def shutdown() -> None:
    """Destroy the process group before exit: gloo's threads can abort the process at interpreter exit
    otherwise, turning a clean finish (or a saved stop) into a failed job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups at module level (its clone of the world group, TP / DP groups): after
    destroy_process_group they are dead, and a later run in the same process (tests, notebooks) would get
    "Group ... is not registered". Drop them; DeepSpeed creates them again."""
    import sys

    from torch.distributed import ProcessGroup

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if isinstance(value, ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, ProcessGroup) for v in value.values()):
            value.clear()


class StopRequest:
    """Set by a signal; the loops read `agreed()` at step boundaries so every rank stops at the same step.

    Signals: SIGUSR1 (our sbatch scripts' warning before the time limit), SIGTERM (scancel, preemption,
    `scontrol requeue`), SIGUSR2 (submitit's timeout/preemption signal). The handler only sets a flag:
    saving from inside a signal handler would race the step in flight.
    """

    SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")

    def install(self) -> "StopRequest":
        """Keeps a signal caught since the run started (run_stage); else starts with a clear flag."""
        if any(signal.getsignal(getattr(signal, name)) is not _on_stop_signal for name in self.SIGNALS):
            catch_stop_signals()
        return self

    @property
    def signal_name(self) -> str | None:
        return _stop_signal

    @property
    def requested(self) -> bool:
        return _stop_signal is not None

    agreed_signal: str | None = None
    """The signal the ranks agreed on (this rank's, or the highest-numbered one another rank caught)."""

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal (one all-reduce per call). Slurm signals every
        task, but not at the same instant: a rank may agree before its own signal arrives."""
        own = float(signal.Signals[_stop_signal].value) if _stop_signal else 0.0
        number = int(all_reduce_max(own))
        if number:
            self.agreed_signal = _stop_signal or signal.Signals(number).name
        return number > 0

    def consume(self) -> None:
        """The run is over (saved and stopped, or finished): forget the signal, so that a later run in this
        process (tests, notebooks, the demo) does not stop at its first step boundary."""
        global _stop_signal
        _stop_signal = None
        self.agreed_signal = None

    def describe(self) -> str:
        """For the log: "SIGTERM", or "SIGTERM on another rank"."""
        if _stop_signal:
            return _stop_signal
        return f"{self.agreed_signal} on another rank" if self.agreed_signal else "another rank"
