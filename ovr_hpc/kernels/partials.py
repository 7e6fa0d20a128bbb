"""The partial statistics of ``fused_logprobs`` (see logprob.py's module doc) and how they merge.

Every backend returns, per row, m (the slice's max logit), s = sum exp(z - m), a = sum exp(z - m)(z - m)
and zt (the target's logit, or 0) over the slice of the vocabulary it saw. Partials over disjoint slices
merge exactly: the Triton kernel's split-vocabulary programs, the torch backend's chunks and the
tensor-parallel shards all use the rules here. Both backends import this module; it imports neither.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def merge_partials(m, s, a, zt, dim=0):
    """Merge per-slice partials stacked along ``dim`` into one set (see the module doc).

    Each slice's sums are relative to its own max; moving them to the common max M multiplies s by
    exp(m - M) and shifts each (z - m) by (m - M). ``a`` may be None (no entropy asked).
    """
    big_m = m.amax(dim, keepdim=True)
    scale = torch.exp(m - big_m)
    s_all = (s * scale).sum(dim)
    a_all = None if a is None else (scale * (a + (m - big_m) * s)).sum(dim)
    return big_m.squeeze(dim), s_all, a_all, zt.sum(dim)


def allreduce_partials(m, s, a, zt, group):
    """`merge_partials` across the ranks of `group` (tensor-parallel vocabulary shards): a max, then one
    all-reduced sum of the rescaled partials."""
    big_m = m.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    scale = torch.exp(m - big_m)
    parts = [s * scale, zt] + ([] if a is None else [scale * (a + (m - big_m) * s)])
    packed = torch.stack(parts)           # one collective for the sums
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return big_m, packed[0], (None if a is None else packed[2]), packed[1]
