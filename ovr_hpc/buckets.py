"""Size-bounded buckets: consecutive items grouped so each group's sizes sum to at most a limit.

One rule serves every place that cuts a stream by size: the RL loop's micro-batches (tokens), the vLLM
weight push (bytes per bucket), the HF export's safetensors shards (bytes per file) and the Megatron
engine's flat collectives (elements per flat tensor). Pure: no torch, no I/O.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
U = TypeVar("U")


def size_bounded(items: Iterable[T], limit: int, size: Callable[[T], int],
                 convert: Callable[[T], U] | None = None) -> Iterator[list[U]]:
    """Consecutive `items` in lists whose `size`s sum to at most `limit`; an item larger than `limit`
    makes a list of its own. Order is kept and nothing is dropped.

    Lazy: `items` is read one at a time, and a list is yielded as soon as the next item does not fit
    (reading one item past a full list, no more). `convert(item)`, if given, is what the list holds; it
    runs after the item's size has placed it and the previous list has been handed out, so at most one
    list of converted items exists at a time (the vLLM push casts and copies each tensor only then).
    """
    group: list = []
    used = 0
    for item in items:
        n = size(item)
        if group and used + n > limit:
            yield group
            group, used = [], 0
        group.append(item if convert is None else convert(item))
        used += n
    if group:
        yield group


def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive sequences into micro-batches of at most `budget` tokens (a longer one goes alone):
    lists of indices into `lengths`."""
    return list(size_bounded(range(len(lengths)), budget, lengths.__getitem__))
