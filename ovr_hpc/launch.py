"""Submit a stage through submitit: `submit(...)` from Python, `ovr-hpc submit` from the shell, launchers/*.py.

    job = submit("coldstart", "configs/qwen25vl_7b/coldstart.yaml", ["optimizer.lr=1e-5"], nodes=4)
    job.result()   # waits; raises if the run failed

The config is loaded and checked for the job's world size before anything is submitted. Every task of the
job runs `StageTask`, i.e. one rank of `ovr-hpc STAGE CONFIG overrides` in the task's own process, and the
run ends in the same entry point as the sbatch scripts (`ovr_hpc.cli.run_stage`).

Stopping and requeueing (the same contract as slurm/common.sh):
- While the stage loop runs, its stop flag (ovr_hpc.dist.StopRequest) owns SIGUSR1, SIGUSR2 and SIGTERM:
  submitit's timeout/preemption signal (USR2, `signal_delay_s` before the time limit) or a preemption's
  SIGTERM sets the flag, all ranks agree at the next step boundary, save one checkpoint together and
  return exit code 75. Only then does rank 0 write the resubmission (`StageTask.checkpoint()`) into
  submitit's folder and requeue the job; the next run resumes from OUTPUT_DIR/checkpoints/latest by itself.
  No task writes a result on that path, so `job.result()` keeps waiting for the run that finishes.
- A job Slurm is already ending (scancel, `scontrol requeue`) is left to Slurm: the tasks save and exit.
- Before the loop installs its flag (imports, model build), submitit's own handler answers USR2: it calls
  `checkpoint()` and requeues; nothing is lost because nothing was trained since the latest checkpoint.
- At most `max_requeues` requeues per job (submitit's timeout countdown, decremented on every requeue).

Rendezvous: on Slurm, every task is a step task (SLURM_PROCID, SLURM_NTASKS, ...) and ovr_hpc.dist derives
the master from the step's first node and the port from the job id; with cluster="local", submitit starts
the tasks itself and StageTask exports RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for them.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time as _time
from typing import Any, Sequence

import ovr_hpc.eval.config  # noqa: F401 - registers the "eval" stage for submit() called from Python
from ovr_hpc.config import ConfigError, load_config
from ovr_hpc.dist import EXIT_REQUEUE, slurm_master_port

# Runtime defaults for the ranks, the same as slurm/common.sh sets for sbatch jobs (tests/test_launch.py
# keeps the two lists equal); a value already in the environment wins.
RUNTIME_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",  # the tokenizers thread pool deadlocks in forked data-loader workers
    "PYTHONUNBUFFERED": "1",  # log lines reach the job log when printed
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed or timed-out collective aborts the rank, no hang
    "NCCL_DEBUG": "WARN",  # NCCL prints warnings only
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # fewer fragmentation OOMs with packed rows
}

DEFAULT_FOLDER = os.path.join("logs", "submitit", "%j")
CLUSTERS = ("auto", "slurm", "local", "debug")


# ----------------------------------------------------------------------------- the submitted callable


class StageTask:
    """One rank of a stage inside a submitit job. Checkpointable: submitit requeues it after `checkpoint()`."""

    def __init__(self, stage: str, config: str, overrides: Sequence[str] = ()) -> None:
        self.stage = stage
        self.config = config
        self.overrides = list(overrides)

    def __repr__(self) -> str:
        return f"StageTask({self.stage!r}, {self.config!r}, {self.overrides!r})"

    def checkpoint(self, *args: Any, **kwargs: Any):
        """The next run of this job: the same stage and config, which resumes from checkpoints/latest."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(StageTask(self.stage, self.config, self.overrides), *args, **kwargs)

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        export_rank_env(env.cluster, env.global_rank, env.local_rank, env.num_tasks, env.num_nodes, env.job_id)
        from ovr_hpc.cli import run_stage

        code = run_stage(self.stage, self.config, self.overrides)
        destroy_process_group()
        if code == EXIT_REQUEUE:
            self._requeue(env)  # never returns
        if code != 0:
            raise RuntimeError(f"ovr-hpc {self.stage} exited with status {code}")
        return {"stage": self.stage, "config": self.config, "overrides": self.overrides, "status": "completed"}

    def _requeue(self, env) -> None:
        """After a save all ranks agreed on: rank 0 requeues the job; every rank exits without a result."""
        if env.global_rank == 0:
            reason = requeue_refusal(env.cluster, env.job_id)
            if reason is None:
                self._write_next_run_and_requeue(env)
            else:
                _log(f"checkpoint saved; not requeueing: {reason}")
        raise SystemExit(EXIT_REQUEUE)

    def _write_next_run_and_requeue(self, env) -> None:
        from submitit.core.utils import DelayedSubmission, UncompletedJobError, temporary_save_path

        paths = env.paths
        current = DelayedSubmission.load(paths.submitted_pickle)
        countdown = current._timeout_countdown - 1  # submitit's "remaining requeues"
        if countdown < 0:
            # job.result() reports the cap instead of waiting for a run that never comes
            raise UncompletedJobError(
                f"ovr-hpc {self.stage}: checkpoint saved, but the job was requeued max_requeues times already"
            )
        next_run = self.checkpoint()
        next_run.set_timeout(current._timeout_min, countdown)
        with temporary_save_path(paths.submitted_pickle) as tmp:
            next_run.dump(tmp)
        _log(f"checkpoint saved; requeueing job {env.job_id} ({countdown} requeues left)")
        env._requeue(countdown)  # slurm: scontrol requeue; local: exit with submitit's requeue status


def export_rank_env(cluster: str, rank: int, local_rank: int, world_size: int, num_nodes: int, job_id: str) -> dict:
    """Set the variables ovr_hpc.dist reads, for launchers that are not a Slurm step; returns what was set.

    On Slurm the tasks are step tasks and dist.detect_rank_info() reads SLURM_* itself (the same path as the
    sbatch scripts; inherited rank variables are removed first); the local executor starts plain processes,
    so they get torchrun's variables.
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or str(max(1, (os.cpu_count() or 1) // max(1, world_size)))
    values = {"OMP_NUM_THREADS": cpus, **RUNTIME_ENV_DEFAULTS}
    if cluster != "slurm":
        values.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(max(1, world_size // max(1, num_nodes))),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(slurm_master_port(re.sub(r"\D", "", str(job_id)) or 0)),
        )
    if cluster == "slurm":
        # submitit passes the submitting process's environment on: rank variables there (a notebook or a
        # torchrun worker that ran torch.distributed) would make every task rank 0 on one port
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
            os.environ.pop(key, None)
    exported = {}
    for key, value in values.items():
        if key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") or key not in os.environ:
            os.environ[key] = exported[key] = value
    return exported


def destroy_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to interpreter teardown, gloo's worker
    threads can abort the process ("terminate called without an active exception", pytorch issue 190489),
    which would turn a clean exit or a requeue into a crash. A no-op when none is up."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def requeue_refusal(cluster: str, job_id: str, state: str | None = None) -> str | None:
    """Why rank 0 must not requeue after a save, or None. On Slurm a job that is no longer RUNNING is being
    cancelled or requeued by Slurm itself (scancel, scontrol requeue, preemption): Slurm decides."""
    if cluster != "slurm":
        return None
    state = state if state is not None else slurm_job_state(job_id)
    if state != "RUNNING":
        return f"the job is {state or 'in an unknown state'}, Slurm is ending or requeueing it"
    return None


def slurm_job_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else None


def _log(message: str) -> None:
    print(f"[ovr-hpc {_time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- submitting


def parse_time_minutes(value: int | float | str) -> int:
    """Minutes from a number of minutes or a Slurm time ("90", "2:00:00", "1-12", "1-00:30:00")."""
    if isinstance(value, (int, float)):
        minutes = float(value)
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not match:
            raise ValueError(f"time {value!r}: expected minutes or a Slurm time such as 4:00:00 or 1-12:00:00")
        days, a, b, c = match.groups()
        parts = [int(a)] + [int(x) for x in (b, c) if x is not None]
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            hours, mins, secs = (parts + [0, 0])[:3]
            minutes = int(days) * 1440 + hours * 60 + mins + secs / 60
        elif len(parts) == 1:  # MM
            minutes = parts[0]
        elif len(parts) == 2:  # MM:SS
            minutes = parts[0] + parts[1] / 60
        else:  # HH:MM:SS
            minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    if minutes <= 0:
        raise ValueError(f"time {value!r} must be positive")
    return int(math.ceil(minutes))


def executor_parameters(
    stage: str,
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks_per_node: int | None = None,
    cpus_per_task: int | None = None,
    mem_gb: float | None = None,
    partition: str | None = None,
    time: int | float | str = "24:00:00",
    name: str | None = None,
    signal_delay_s: int = 600,
    slurm_params: dict | None = None,
) -> dict:
    """The parameters for submitit's AutoExecutor.update_parameters (pure: unit-tested without a cluster)."""
    if nodes < 1:
        raise ValueError(f"nodes ({nodes}) must be >= 1")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node ({gpus_per_node}) must be >= 0")
    tasks = tasks_per_node if tasks_per_node is not None else max(1, gpus_per_node)
    if tasks < 1:
        raise ValueError(f"tasks_per_node ({tasks}) must be >= 1")
    timeout_min = parse_time_minutes(time)
    if signal_delay_s >= timeout_min * 60:
        raise ValueError(
            f"signal_delay_s ({signal_delay_s}) must be shorter than the time limit ({timeout_min * 60} s): the "
            "warning would come at once"
        )
    params: dict[str, Any] = {
        "name": name or f"ovr-{stage}",
        "nodes": nodes,
        "tasks_per_node": tasks,
        "timeout_min": timeout_min,
        "slurm_signal_delay_s": int(signal_delay_s),
        # requeue allowed (preemption, node failure), and srun ends the step 300 s after a first task exits,
        # so a crashed rank does not leave the others blocked in a collective
        "slurm_additional_parameters": {"requeue": True},
        "slurm_srun_args": ["--kill-on-bad-exit=0", "--wait=300"],
    }
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
        # srun no longer inherits sbatch's --cpus-per-task (Slurm >= 22.05)
        params["slurm_setup"] = [f"export SRUN_CPUS_PER_TASK={cpus_per_task}"]
    if mem_gb is not None:
        params["mem_gb"] = mem_gb
    if partition:
        params["slurm_partition"] = partition
    for key, value in (slurm_params or {}).items():
        if key == "additional_parameters":
            params["slurm_additional_parameters"] = {**params["slurm_additional_parameters"], **value}
        else:
            params[f"slurm_{key}"] = value
    return params


def make_executor(folder: str | None = None, cluster: str = "auto", max_requeues: int = 20, **parameters: Any):
    """A submitit AutoExecutor with `executor_parameters(**parameters)` applied (no job submitted)."""
    import submitit

    if cluster not in CLUSTERS:
        raise ValueError(f"cluster {cluster!r}: expected one of {', '.join(CLUSTERS)}")
    folder = os.path.abspath(folder or DEFAULT_FOLDER)
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=None if cluster == "auto" else cluster,
        slurm_max_num_timeout=max_requeues,
        local_max_num_timeout=max_requeues,
    )
    params = executor_parameters(**parameters)
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    if executor.cluster == "local" and params["nodes"] > 1:
        raise ValueError(f"cluster='local' runs on this machine only: nodes ({params['nodes']}) must be 1")
    executor.update_parameters(**params)
    return executor


def submit(
    stage: str,
    config: str,
    overrides: Sequence[str] = (),
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks_per_node: int | None = None,
    cpus_per_task: int | None = None,
    mem_gb: float | None = None,
    partition: str | None = None,
    time: int | float | str = "24:00:00",
    cluster: str = "auto",
    folder: str | None = None,
    name: str | None = None,
    signal_delay_s: int = 600,
    max_requeues: int = 20,
    slurm_params: dict | None = None,
):
    """Check the config, then submit STAGE as nodes x tasks_per_node ranks; returns the submitit Job.

    tasks_per_node defaults to gpus_per_node (one rank per GPU; gpus_per_node=0 runs one CPU rank per node).
    time is minutes or a Slurm time string. cluster: "auto" (Slurm when srun exists, else local processes),
    "slurm", "local" (this machine, several processes), or "debug" (in this process). slurm_params are extra
    submitit Slurm parameters without their prefix, e.g. {"account": "proj", "qos": "high", "constraint":
    "h100"}. Raises ConfigError, before anything is submitted, when the config cannot run.
    """
    overrides = list(overrides)
    cfg = load_config(stage, config, overrides)
    tasks = tasks_per_node if tasks_per_node is not None else max(1, gpus_per_node)
    if hasattr(cfg, "validate_world"):  # checks that need the number of ranks
        cfg.validate_world(nodes * tasks)
    executor = make_executor(
        folder, cluster, max_requeues, stage=stage, nodes=nodes, gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task, mem_gb=mem_gb, partition=partition,
        time=time, name=name, signal_delay_s=signal_delay_s, slurm_params=slurm_params,
    )
    return executor.submit(StageTask(stage, os.path.abspath(config), overrides))


# ----------------------------------------------------------------------------- `ovr-hpc submit`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ovr-hpc submit",
        description="Check a config, then submit a stage through submitit (Slurm, or local processes).",
        epilog="example: ovr-hpc submit coldstart configs/qwen25vl_7b/coldstart.yaml --nodes 4 --time 2-00:00:00 "
        "optimizer.lr=1e-5",
    )
    p.add_argument("stage", help="coldstart, rl or eval")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only machines")
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: gpus per node)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="24:00:00", help="minutes or a Slurm time (default 24:00:00)")
    p.add_argument("--cluster", choices=CLUSTERS, default="auto")
    p.add_argument("--folder", default=None, help="submitit logs and pickles (default " + DEFAULT_FOLDER.replace("%", "%%") + ")")
    p.add_argument("--name", default=None, help="job name (default ovr-STAGE)")
    p.add_argument("--signal-delay-s", type=int, default=600, help="warning signal this long before the limit")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its outcome")
    return p


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    slurm_params = {k: v for k, v in (("account", args.account), ("qos", args.qos)) if v}
    try:
        job = submit(
            args.stage, args.config, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
            partition=args.partition, time=args.time, cluster=args.cluster, folder=args.folder, name=args.name,
            signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues, slurm_params=slurm_params,
        )
    except ConfigError as e:
        print(f"ovr-hpc: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"ovr-hpc submit: {e}", file=sys.stderr)
        return 2
    print(f"submitted {args.stage} as job {job.job_id}; log: {job.paths.stdout}")
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as e:  # noqa: BLE001 - report whatever the job raised
        print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
