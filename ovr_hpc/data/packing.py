"""Sequence packing: samples -> rows of at most max_seq_len tokens.

Best-fit decreasing: the longest samples are placed first, each into the open row whose free space
fits it most tightly. On long-tailed length distributions (reasoning traces) this fills rows to
>= 99% (bench/packing.py), where padding each batch to its longest sample wastes over half the
compute. Deterministic: ties break on the sample index.
"""

from __future__ import annotations

import bisect


def pack_best_fit(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Rows of sample indices; every sample must be <= max_seq_len (truncate or drop first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # free space of each open row, sorted, with the row id to break ties deterministically
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > max_seq_len:
            raise ValueError(f"sample {i} has {n} tokens > max_seq_len {max_seq_len}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, row = free.pop(pos)
            rows[row].append(i)
            space -= n
        else:
            rows.append([i])
            row, space = len(rows) - 1, max_seq_len - n
        if space > 0:
            bisect.insort(free, (space, row))
    # rows in the order of their first (longest) sample keeps the result independent of dict/set order
    return rows


def one_per_row(lengths: list[int]) -> list[list[int]]:
    return [[i] for i in range(len(lengths))]


def packing_efficiency(rows: list[list[int]], lengths: list[int], max_seq_len: int) -> float:
    """Share of real tokens in the rows when each row is padded to max_seq_len."""
    return sum(lengths) / (len(rows) * max_seq_len) if rows else 1.0


def padded_batch_efficiency(lengths: list[int], batch_size: int) -> float:
    """Share of real tokens when consecutive batches are padded to their longest sample (no packing)."""
    total = padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        total += sum(batch)
        padded += max(batch) * len(batch)
    return total / padded if padded else 1.0
