"""The stop flag: a signal becomes a flag, the ranks agree on it at step boundaries, the log names it."""

import signal

from ovr_hpc import dist


def test_own_signal_is_agreed_and_named():
    stop = dist.StopRequest()
    dist.catch_stop_signals()
    try:
        assert not stop.requested and not stop.agreed()
        dist._on_stop_signal(signal.SIGTERM, None)
        assert stop.requested and stop.agreed()
        assert stop.describe() == "SIGTERM"
    finally:
        dist.catch_stop_signals()  # clear the flag for the other tests


def test_signal_of_another_rank_is_named(monkeypatch):
    """Slurm signals every task, not at the same instant: this rank agrees before its own signal arrives."""
    dist.catch_stop_signals()
    monkeypatch.setattr(dist, "all_reduce_max", lambda value: float(signal.SIGUSR1.value))
    stop = dist.StopRequest()
    assert not stop.requested and stop.agreed()
    assert stop.describe() == "SIGUSR1 on another rank"


def test_a_finished_run_leaves_no_stop_for_the_next_run_in_the_process():
    from ovr_hpc.checkpoint import end_of_step

    saved = []
    dist.catch_stop_signals()
    try:
        dist._on_stop_signal(signal.SIGUSR1, None)
        stop = dist.StopRequest().install()          # a signal caught while loading is kept
        assert stop.requested
        assert end_of_step(3, 10, 100, stop, lambda: saved.append(3), print) == "preempted"
        assert saved == [3]
        # the next run in this process (handlers still ours) starts clear and runs to its end
        stop = dist.StopRequest().install()
        assert not stop.requested and end_of_step(4, 10, 100, stop, lambda: saved.append(4), print) is None
        dist._on_stop_signal(signal.SIGTERM, None)   # a signal during the last step
        assert end_of_step(10, 10, 100, stop, lambda: None, print) == "completed"
        assert not dist.StopRequest().install().requested
    finally:
        dist.catch_stop_signals()


def test_a_signal_during_a_periodic_save_stops_right_after_it():
    from ovr_hpc.checkpoint import end_of_step

    saved = []

    def save_and_get_signal():
        saved.append(len(saved))
        dist._on_stop_signal(signal.SIGTERM, None)     # arrives while the checkpoint is written

    dist.catch_stop_signals()
    try:
        stop = dist.StopRequest().install()
        assert end_of_step(5, 10, 5, stop, save_and_get_signal, print) == "preempted"
        assert saved == [0]                            # one save, no second one for the stop
        assert not stop.requested
    finally:
        dist.catch_stop_signals()


def test_a_signal_while_a_finished_run_exits_does_not_kill_it(tmp_path):
    """Python gives caught signals their default action back while it shuts down: a time-limit warning
    arriving then killed finished ranks (exit 138, seen on the local Slurm cluster). After the run the stop
    signals are ignored instead."""
    import subprocess
    import sys

    script = tmp_path / "finish.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from ovr_hpc import dist\n"
        "dist.catch_stop_signals()\n"
        "if sys.argv[1] == 'after_run':\n"
        "    dist.ignore_stop_signals()\n"
        "class LateSignal:  # a signal while the interpreter tears its modules down\n"
        "    def __del__(self, kill=os.kill, pid=os.getpid(), usr1=signal.SIGUSR1, sleep=time.sleep):\n"
        "        kill(pid, usr1)\n"
        "        sleep(1)\n"
        "late = LateSignal()\n")
    run = [sys.executable, str(script)]
    assert subprocess.run(run + ["caught"], timeout=60).returncode == -10   # what happened before
    assert subprocess.run(run + ["after_run"], timeout=60).returncode == 0


def test_run_stage_ignores_stop_signals_once_the_run_is_over(monkeypatch):
    import ovr_hpc.sft.trainer
    from ovr_hpc.cli import run_stage
    from tests.conftest import REPO

    monkeypatch.setattr(ovr_hpc.sft.trainer, "train", lambda config: {"status": "completed"})
    try:
        assert run_stage("coldstart", f"{REPO}/configs/tiny/coldstart.yaml",
                         ["model.path=/nonexistent", "data.train_files=[x.jsonl]"]) == 0
        assert all(signal.getsignal(getattr(signal, name)) is signal.SIG_IGN for name in dist.StopRequest.SIGNALS)
    finally:
        dist.catch_stop_signals()


def test_a_run_after_shutdown_in_the_same_process_builds_its_engine(tiny_model_dir, monkeypatch):
    """dist.shutdown drops DeepSpeed's cached groups: an engine built after a shutdown and a new
    init (an in-process run after run_stage, in tests or notebooks) does not hit a dead group."""
    import torch

    from ovr_hpc import dist
    from ovr_hpc.config import OptimizerConfig, RLParallelConfig, ScheduleConfig
    from ovr_hpc.engines.deepspeed import DeepSpeedEngine
    from ovr_hpc.local import free_port
    from ovr_hpc.models.loading import TokenLogprobs, load_vlm

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    for _ in range(2):
        if not torch.distributed.is_initialized():
            monkeypatch.setenv("MASTER_PORT", str(free_port()))
        dist.init_distributed()
        model = load_vlm(tiny_model_dir, "float32", "sdpa")
        DeepSpeedEngine(TokenLogprobs(model), RLParallelConfig(zero_stage=2), OptimizerConfig(lr=1e-3), "float32", 1,
                        2, ScheduleConfig(kind="constant"), external_params=(model.lm_head.weight,))
        dist.shutdown()
