"""`run_stage`: the one entry point every launcher ends in (sbatch/srun, submitit, torchrun, local).

Below the CLI and the launchers (both import it; it imports neither): config -> the stage's loop, which
runs the preflight checks on every rank first (`ovr_hpc.preflight.at_start`) -> exit code.
"""

from __future__ import annotations

import ovr_hpc.eval.config  # noqa: F401 - registers the "eval" stage (no torch import)
from ovr_hpc.config import ConfigError, load_config


def run_stage(stage: str, config_path: str, overrides: list[str]) -> int:
    """Run STAGE on this rank with the config at `config_path` plus `overrides`. Returns an exit code (0, or
    75 = ovr_hpc.dist.EXIT_REQUEUE after a stop request and the save every rank agreed on)."""
    from ovr_hpc import dist

    dist.catch_stop_signals()
    config = load_config(stage, config_path, overrides)
    if stage == "coldstart":
        from ovr_hpc.sft.trainer import train
    elif stage == "rl":
        from ovr_hpc.rl.trainer import train
    elif stage == "eval":
        from ovr_hpc.eval.runner import run_eval as train
    else:  # pragma: no cover - guarded by load_config
        raise ConfigError(f"stage {stage!r} has no trainer")
    try:
        result = train(config)
    finally:
        dist.shutdown()
        dist.ignore_stop_signals()
    if result["status"] == "preempted":
        return dist.EXIT_REQUEUE
    return 0
