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
