"""The stage harness: what the cold start, RL and evaluation do around their loops, written once.

    stage = start(cfg, cfg.checkpoint.output_dir)  # ranks, every pre-run check, stop flag, seeds, folder
    state = stage.resume(engines)                  # the saved train state, {} for a fresh run
    ... per step: stage.end_of_step(step, total_steps, save) ... (save: a function that calls stage.save)
    return stage.finish(status, save)

`caught_stop_signals` is the stop flag alone, for a run inside another program (the eval runner called
by the demo or a test): the caller's signal handlers come back when it ends.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from dataclasses import dataclass
from typing import Callable

from ovr_hpc import dist, preflight
from ovr_hpc.checkpoint import (COMPLETE, checkpoints_dir, end_of_step, load_checkpoint, load_rank_json,
                                save_checkpoint)
from ovr_hpc.config import dump_config


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Stage:
    cfg: object
    info: dist.RankInfo
    checks: preflight.Preflight
    stop: dist.StopRequest
    out_dir: str

    def log(self, *args, **kwargs) -> None:
        if self.info.is_main:
            print(*args, **kwargs)

    def resume(self, engines: dict) -> dict:
        """Every engine's state and this rank's RNG from the checkpoint preflight chose (latest, or
        checkpoint.resume_from); returns its train state ({} when the run starts fresh)."""
        path = self.checks.resume_from
        if not path:
            return {}
        state = load_checkpoint(engines, path)
        self.log(f"resumed from {path} at step {state['step']}")
        return state

    def save(self, engines: dict, state: dict, rank_json: dict | None = None) -> None:
        """All ranks: checkpoint step state["step"] of every engine, with the train state and the config
        (and this rank's rank_json files: {name: JSON-able}, read back by `resumed_rank_json`)."""
        ck = self.cfg.checkpoint
        save_checkpoint(engines, self.out_dir, state["step"], state, dump_config(self.cfg), self.cfg.model.path,
                        ck.keep_last, ck.save_hf_weights, rank_json=rank_json)

    def resumed_rank_json(self, name: str):
        """This rank's file `name` of the checkpoint resumed from; None for a fresh run or without one."""
        return load_rank_json(self.checks.resume_from, name) if self.checks.resume_from else None

    def saved(self, step: int) -> bool:
        """Step `step`'s checkpoint is complete already (e.g. saved at the step boundary before a stop)."""
        return os.path.exists(os.path.join(checkpoints_dir(self.out_dir), f"step_{step}", COMPLETE))

    def end_of_step(self, step: int, total_steps: int, save: Callable[[], None]) -> str | None:
        """At every step boundary, on every rank: "completed", "preempted" (saved) or None (saved when due)."""
        return end_of_step(step, total_steps, self.cfg.checkpoint.every_steps, self.stop, save, self.log)

    def finish(self, status: str | None, step: int, total_steps: int, save: Callable[[], None]) -> dict:
        """After the loop: the final save of a completed run; every rank leaves together. A status of None
        is a resumed run that had already finished."""
        if status == "completed":
            save()
        dist.barrier()
        return {"status": status or "completed", "step": step, "total_steps": total_steps}


def start(cfg, out_dir: str) -> Stage:
    """The stage's first call on every rank: distributed setup, every pre-run check on this machine
    (ovr_hpc/preflight.py), the stop flag (set by SIGUSR1/SIGUSR2/SIGTERM, read at step boundaries), seeds."""
    info = dist.init_distributed()
    checks = preflight.at_start(cfg, info.world_size)
    stop = dist.StopRequest().install()
    seed_everything(cfg.seed)
    os.makedirs(out_dir, exist_ok=True)
    return Stage(cfg, info, checks, stop, out_dir)


@contextlib.contextmanager
def caught_stop_signals():
    """A StopRequest for the duration of the block; the caller's handlers are restored afterwards (the
    demo and tests run evaluations in their own process). Off the main thread signals cannot be caught:
    the request then never fires."""
    stop = dist.StopRequest()
    try:
        previous = {name: signal.getsignal(getattr(signal, name)) for name in dist.StopRequest.SIGNALS}
        stop.install()
    except ValueError:
        previous = {}
    try:
        yield stop
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
        stop.consume()
