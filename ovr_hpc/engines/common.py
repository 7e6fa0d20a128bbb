"""What both training backends share (`deepspeed.py`, `megatron/`): the learning-rate schedule and a loss
function's stats as plain numbers. Pure, no package imports: the backends import it, and `base.py`, which
builds the backends, re-exports it, so nothing here imports upwards.
"""

from __future__ import annotations

import math
from typing import Callable


def lr_lambda(schedule, total_steps: int) -> Callable[[int], float]:
    """Warm-up then cosine / linear / constant, as a multiplier of the peak lr (pure, unit-tested)."""
    warmup = schedule.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        floor = schedule.min_lr_ratio
        if schedule.kind == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def as_floats(stats: dict) -> dict[str, float]:
    """A loss function's stats as plain numbers (detached from the graph)."""
    return {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in stats.items()}
