"""Source weights: `data.source_weights` ({source: weight}) as an endless, seeded, resumable stream.

The unweighted stream (`ovr_hpc.data.dataset.rows_at`) is epoch after epoch of a permutation of the items
(packed rows of the cold start, prompts of RL) drawn from (seed, epoch). The weighted stream keeps that
shape, with each epoch's permutation taken over an expanded index list:

- an item of source s with weight w appears floor(w) times in every epoch, plus once more in some epochs:
  epoch e holds floor((e + 1) * f) - floor(e * f) extra items of s, where f = (w - floor(w)) * n_s (n_s:
  the items of s), chosen without repeats by a permutation of s's items drawn from (seed, epoch, s). Over
  E epochs s gets exactly floor(w) * n_s * E + floor(E * f) items, so every item is drawn w times per
  epoch in expectation (w exact in binary, as `fractions.Fraction(w)`), the extras rotating over the items;
- sources not named keep weight 1; weight 0 removes a source; every item of the stream is still a whole
  item (a row or a prompt), so a step's batch is as large as without weights;
- where epoch e starts is a closed form (e * sum floor(w) n_s + sum floor(e * f_s)), so the item at any
  position is a pure function of (position, seed, weights, items): a run resumes exactly at any step, on
  any number of ranks, without replaying the positions before it;
- with no weights, or all of them 1, the stream is `rows_at`'s, item for item (the same permutations).

`schedule.epochs` still counts passes over the unweighted items (a run of E epochs consumes E x N items);
the weighted stream just decides which ones.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np
import torch

from ovr_hpc.config import ConfigError


def source_plan(sources: Sequence[str], weights: Mapping[str, float], key: str = "data.source_weights") -> dict:
    """{source: (item ids ascending, whole copies, fractional items per epoch as a Fraction)}; ConfigError
    for a weighted source no item has, or weights that leave nothing to draw."""
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    unknown = sorted(set(weights) - set(by_source))
    if unknown:
        raise ConfigError(
            f"{key} names source(s) no record has: {', '.join(map(repr, unknown))}; the records' sources are "
            f"{', '.join(map(repr, sorted(by_source)))} (the records' 'source' field; 'unknown' when absent)")
    plan = {}
    for s in sorted(by_source):
        w = Fraction(float(weights.get(s, 1.0)))
        whole = math.floor(w)
        plan[s] = (by_source[s], whole, (w - whole) * len(by_source[s]))
    if not any(whole * len(ids) + frac for ids, whole, frac in plan.values()):
        raise ConfigError(f"{key} gives every source weight 0: nothing left to train on")
    return plan


def _epoch_start(epoch: int, plan: dict) -> int:
    return sum(whole * len(ids) * epoch + math.floor(frac * epoch) for ids, whole, frac in plan.values())


def _epoch_of(position: int, plan: dict) -> int:
    mean = sum(whole * len(ids) + frac for ids, whole, frac in plan.values())
    epoch = int(Fraction(position) / mean)
    while epoch > 0 and _epoch_start(epoch, plan) > position:
        epoch -= 1
    while _epoch_start(epoch + 1, plan) <= position:
        epoch += 1
    return epoch


def epoch_items(epoch: int, plan: dict, num_items: int, seed: int, shuffle: bool) -> list[int]:
    """The item ids of one epoch of the weighted stream, in the order they are drawn."""
    counts = np.zeros(num_items, dtype=np.int64)
    for s, (ids, whole, frac) in plan.items():
        ids_arr = np.asarray(ids, dtype=np.int64)
        counts[ids_arr] += whole
        extra = math.floor(frac * (epoch + 1)) - math.floor(frac * epoch)
        if extra:
            g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7919 + zlib.crc32(s.encode()))
            chosen = torch.randperm(len(ids), generator=g)[:extra].numpy()
            counts[ids_arr[chosen]] += 1
    base = np.repeat(np.arange(num_items, dtype=np.int64), counts)
    if not shuffle:
        return base.tolist()
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # rows_at's permutation when base = range(N)
    return base[torch.randperm(len(base), generator=g).numpy()].tolist()


def weighted_rows_at(position: int, count: int, sources: Sequence[str], weights: Mapping[str, float] | None,
                     seed: int, shuffle: bool) -> list[int]:
    """`count` item ids of the weighted stream from `position` (items consumed so far); `sources[i]` is item
    i's source. Without weights this is `rows_at(position, count, len(sources), seed, shuffle)`."""
    if not weights:
        from ovr_hpc.data.dataset import rows_at

        return rows_at(position, count, len(sources), seed, shuffle)
    plan = source_plan(sources, weights)
    out: list[int] = []
    epoch = _epoch_of(position, plan)
    while len(out) < count:
        start, end = _epoch_start(epoch, plan), _epoch_start(epoch + 1, plan)
        if end > start and position < end:
            items = epoch_items(epoch, plan, len(sources), seed, shuffle)
            take = min(count - len(out), end - position)
            out.extend(items[position - start : position - start + take])
            position += take
        epoch += 1
    return out


def source_counts(ids: Sequence[int], sources: Sequence[str], prefix: str) -> dict[str, int]:
    """{prefix/<source>: how many of `ids` are of that source} (the per-step metric)."""
    return {f"{prefix}/{s}": n for s, n in sorted(Counter(sources[i] for i in ids).items())}
