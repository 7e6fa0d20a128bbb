"""Submit a stage through submitit: `submit(...)` from Python, `ovr-hpc submit` from the shell, launchers/*.py.

    job = submit("coldstart", "configs/qwen25vl_7b/coldstart.yaml", ["optimizer.lr=1e-5"], nodes=4)
    job.result()   # waits; raises if the run failed

Every pre-run check (ovr_hpc.preflight) runs for the job's ranks before anything is submitted. Every task of the
job runs `StageTask`, i.e. one rank of `ovr-hpc STAGE CONFIG overrides` in the task's own process, and the
run ends in the same entry point as the sbatch scripts (`ovr_hpc.run.run_stage`).

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
import dataclasses
import math
import os
import re
import subprocess
import sys
import time as _time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

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

DEFAULT_FOLDER = os.path.join("logs", "submitit")   # files are named by job id: no literal %j folder
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
        from ovr_hpc.run import run_stage

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


@dataclass
class Resources:
    """What a job asks Slurm for: one list of fields shared by `submit()`, `executor_parameters()`, `make_executor()`
    and the `ovr-hpc submit` flags (each field is the flag of the same name: cpus_per_task = --cpus-per-task).
    Errors name the flag."""

    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int | str = 8
    """GPUs per node: a count, or TYPE:COUNT (h100:8); 0 on CPU-only machines."""
    tasks_per_node: Optional[int] = None
    """Ranks per node (default: one per GPU; 1 without GPUs)."""
    cpus_per_task: Optional[int] = 8
    """CPUs per rank (data loading, reward workers), as the sbatch scripts give; 0 = Slurm's default."""
    mem: Optional[str] = "0"
    """Memory per node in Slurm's syntax: 0 = all of the node's (as the sbatch scripts), 480G, 500000M."""
    partition: Optional[str] = None
    """Slurm partition."""
    time: int | float | str = "24:00:00"
    """Time limit: minutes or a Slurm time (4:00:00, 1-12:00:00)."""
    account: Optional[str] = None
    """Slurm account to charge."""
    qos: Optional[str] = None
    """Slurm quality of service."""
    constraint: Optional[str] = None
    """Slurm node features (h100, "a100&ib")."""
    name: Optional[str] = None
    """Job name (default ovr-STAGE)."""
    signal_delay_s: int = 600
    """The warning signal (USR2) this many seconds before the time limit."""

    @property
    def gpu_count(self) -> int:
        return _gpu_count(self.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else max(1, self.gpu_count)

    def validate(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes ({self.nodes}) must be >= 1")
        if self.gpu_count < 0:
            raise ValueError(f"--gpus-per-node ({self.gpus_per_node}) must be >= 0")
        if self.ranks_per_node < 1:
            raise ValueError(f"--tasks-per-node ({self.ranks_per_node}) must be >= 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 0:
            raise ValueError(f"--cpus-per-task ({self.cpus_per_task}) must be >= 0")
        if self.mem is not None and not re.fullmatch(r"\d+(\.\d+)?[KMGT]?B?", str(self.mem), re.IGNORECASE):
            raise ValueError(f"--mem ({self.mem}): expected Slurm's syntax, e.g. 0 (all of the node's), 480G, 500000M")
        timeout_min = parse_time_minutes(self.time)
        if self.signal_delay_s >= timeout_min * 60:
            raise ValueError(
                f"--signal-delay-s ({self.signal_delay_s}) must be shorter than --time ({timeout_min * 60} s): the "
                "warning would come at once"
            )


def _gpu_count(value: int | str) -> int:
    """8 from 8, "8" or "h100:8"."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:([A-Za-z][\w.-]*):)?(-?\d+)", text)
    if not m:
        raise ValueError(f"--gpus-per-node ({value}): expected a count or TYPE:COUNT, e.g. 8 or h100:8")
    return int(m.group(2))


RESOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(Resources))


def executor_parameters(stage: str, resources: Resources | None = None, *, slurm_params: dict | None = None,
                        **fields: Any) -> dict:
    """The parameters for submitit's AutoExecutor.update_parameters (pure: unit-tested without a cluster).
    `fields` are Resources fields (nodes=..., gpus_per_node=..., ...) when no `resources` is given."""
    res = resources if resources is not None else Resources(**_resource_fields(fields))
    res.validate()
    params: dict[str, Any] = {
        "name": res.name or f"ovr-{stage}",
        "nodes": res.nodes,
        "tasks_per_node": res.ranks_per_node,
        "timeout_min": parse_time_minutes(res.time),
        "slurm_signal_delay_s": int(res.signal_delay_s),
        # requeue allowed (preemption, node failure), and srun ends the step 300 s after a first task exits,
        # so a crashed rank does not leave the others blocked in a collective
        "slurm_additional_parameters": {"requeue": True},
        "slurm_srun_args": ["--kill-on-bad-exit=0", "--wait=300"],
    }
    if res.gpu_count:
        params["gpus_per_node"] = res.gpu_count
        if not str(res.gpus_per_node).strip().isdigit():   # h100:8: Slurm gets the type too (wins over the count)
            params["slurm_gpus_per_node"] = str(res.gpus_per_node).strip()
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
        # srun no longer inherits sbatch's --cpus-per-task (Slurm >= 22.05)
        params["slurm_setup"] = [f"export SRUN_CPUS_PER_TASK={res.cpus_per_task}"]
    if res.mem is not None:
        params["slurm_mem"] = str(res.mem)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[f"slurm_{key}"] = getattr(res, key)
    for key, value in (slurm_params or {}).items():
        if key == "additional_parameters":
            params["slurm_additional_parameters"] = {**params["slurm_additional_parameters"], **value}
        else:
            params[f"slurm_{key}"] = value
    return params


def _resource_fields(fields: dict) -> dict:
    unknown = sorted(set(fields) - set(RESOURCE_FIELDS) - {"mem_gb"})
    if unknown:
        raise TypeError(f"unknown resources {', '.join(unknown)}: expected {', '.join(RESOURCE_FIELDS)}")
    fields = dict(fields)
    if fields.get("mem_gb") is not None:   # the earlier keyword: GB per node
        fields["mem"] = f"{fields['mem_gb']:g}G"
    fields.pop("mem_gb", None)
    return fields


def make_executor(folder: str | None = None, cluster: str = "auto", max_requeues: int = 20, *, stage: str,
                  resources: Resources | None = None, slurm_params: dict | None = None, **fields: Any):
    """A submitit AutoExecutor with `executor_parameters(...)` applied (no job submitted)."""
    import submitit

    if cluster not in CLUSTERS:
        raise ValueError(f"--cluster {cluster!r}: expected one of {', '.join(CLUSTERS)}")
    res = resources if resources is not None else Resources(**_resource_fields(fields))
    folder = os.path.abspath(folder or DEFAULT_FOLDER)
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=None if cluster == "auto" else cluster,
        slurm_max_num_timeout=max_requeues,
        local_max_num_timeout=max_requeues,
    )
    params = executor_parameters(stage, res, slurm_params=slurm_params)
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        params.pop("cpus_per_task", None)   # local processes share this machine's CPUs
    if executor.cluster == "local" and params["nodes"] > 1:
        raise ValueError(f"--cluster local runs on this machine only: --nodes ({params['nodes']}) must be 1")
    executor.update_parameters(**params)
    return executor


def submit(
    stage: str,
    config: str,
    overrides: Sequence[str] = (),
    resources: Resources | None = None,
    *,
    cluster: str = "auto",
    folder: str | None = None,
    max_requeues: int = 20,
    slurm_params: dict | None = None,
    **fields: Any,
):
    """Run every pre-run check (ovr_hpc.preflight) for the job's ranks, then submit STAGE as nodes x
    tasks_per_node ranks; returns the submitit Job.

    `resources` (or its fields as keywords: nodes=4, gpus_per_node="h100:8", time="2-00:00:00", ...) is what
    the job asks for; tasks_per_node defaults to the GPUs per node (one rank per GPU; gpus_per_node=0 runs one
    CPU rank per node). cluster: "auto" (Slurm when srun exists, else local processes), "slurm", "local" (this
    machine, several processes), or "debug" (in this process). slurm_params are extra submitit Slurm
    parameters without their prefix, e.g. {"exclude": "node[1-3]"}. Raises ConfigError, before anything is
    submitted, when the run would fail; ValueError naming the flag for bad resources.
    """
    from ovr_hpc import preflight

    overrides = list(overrides)
    res = resources if resources is not None else Resources(**_resource_fields(fields))
    res.validate()
    cfg = load_config(stage, config, overrides)
    launch = preflight.Launch(ranks=res.nodes * res.ranks_per_node, nodes=res.nodes,
                              tasks_per_node=res.ranks_per_node, gpus_per_node=res.gpu_count or None, flags="submit")
    for note in preflight.check(stage, cfg, launch).notes:
        _log(f"note: {note}")
    executor = make_executor(folder, cluster, max_requeues, stage=stage, resources=res, slurm_params=slurm_params)
    return executor.submit(StageTask(stage, os.path.abspath(config), overrides))


# ----------------------------------------------------------------------------- `ovr-hpc submit`



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ovr-hpc submit",
        description="Run every pre-run check for the job's ranks, then submit a stage through submitit (Slurm, or "
        "local processes).",
        epilog="example: ovr-hpc submit coldstart configs/qwen25vl_7b/coldstart.yaml --nodes 4 --gpus-per-node h100:8 "
        "--time 2-00:00:00 --account proj optimizer.lr=1e-5",
    )
    p.add_argument("stage", help="coldstart, rl or eval")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    defaults = Resources()
    docs = _resource_docs()
    for name in RESOURCE_FIELDS:
        default = getattr(defaults, name)
        kind = int if name in ("nodes", "tasks_per_node", "cpus_per_task", "signal_delay_s") else str
        shown = "" if default is None else f" (default {default})"
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                       help=(docs.get(name, "") + shown).replace("%", "%%"))
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (the same as --mem NG)")
    p.add_argument("--cluster", choices=CLUSTERS, default="auto")
    p.add_argument("--folder", default=None, help="submitit logs and pickles (default " + DEFAULT_FOLDER + ")")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its outcome")
    return p


def _resource_docs() -> dict:
    """{field: the docstring under it} of Resources (as scripts/config_keys.py reads the config classes)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(Resources)).body[0].body
    return {node.target.id: " ".join(str(after.value.value).split()) for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)}


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    fields = {name: getattr(args, name) for name in RESOURCE_FIELDS}
    if args.mem_gb is not None:
        fields["mem"] = f"{args.mem_gb:g}G"
    try:
        job = submit(args.stage, args.config, args.overrides, Resources(**fields), cluster=args.cluster,
                     folder=args.folder, max_requeues=args.max_requeues)
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
