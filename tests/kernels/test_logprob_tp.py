"""Vocabulary-parallel fused_logprobs on 2 gloo processes against the unsharded result."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ovr_hpc.kernels import fused_logprobs

from ._cases import make_inputs

# Uneven shards on purpose: rank 0 holds ids [0, 500), rank 1 [500, 1013).
SHARD_SIZES = (500, 513)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(hidden, weight, targets, g_logp, g_ent, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = fused_logprobs(h, w, targets, temperature=0.7, return_entropy=True, backend="torch", **kw)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        hidden, weight, targets = make_inputs(61, 24, sum(SHARD_SIZES), peaked=True, ignore_every=6)
        targets[1], targets[2] = SHARD_SIZES[0] - 1, SHARD_SIZES[0]   # either side of the boundary
        gen = torch.Generator().manual_seed(7)
        g_logp, g_ent = torch.randn(61, generator=gen), torch.randn(61, generator=gen)
        full = _run(hidden, weight, targets, g_logp, g_ent)

        start = sum(SHARD_SIZES[:rank])
        shard = weight[start:start + SHARD_SIZES[rank]]
        logp, ent, grad_h, grad_w = _run(hidden, shard, targets, g_logp, g_ent, tp_group=dist.group.WORLD)

        torch.testing.assert_close(logp, full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, full[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_h, full[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_w, full[3][start:start + SHARD_SIZES[rank]], atol=1e-5, rtol=1e-5)
        # The hidden gradient is all-reduced: identical on both ranks.
        both = [torch.empty_like(grad_h) for _ in range(2)]
        dist.all_gather(both, grad_h)
        assert torch.equal(both[0], both[1])

        # Targets are global ids: one past the global vocabulary is an error on every rank.
        bad = targets.clone()
        bad[0] = sum(SHARD_SIZES)
        with pytest.raises(ValueError, match=r"\[0, 1013\)"):
            fused_logprobs(hidden, shard, bad, tp_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_vocab_parallel_matches_unsharded():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)
