"""Per-token log-probabilities (and entropy) of the LM head without materialising [T, V] logits.

    logprobs, entropy = fused_logprobs(hidden, weight, targets, temperature=..., return_entropy=True)

computes, for every row t of ``hidden`` [T, H] and the LM head ``weight`` [V, H],

    z_t      = hidden_t @ weight.T / temperature            (the logits, never stored whole)
    logp_t   = z_t[targets_t] - logsumexp(z_t)
    entropy_t = logsumexp(z_t) - sum_v softmax(z_t)_v * z_t,v

in fp32, differentiable with respect to ``hidden`` and ``weight`` through both outputs.

How it is done without the [T, V] tensor: every backend returns, per row, four "partial statistics"
over the slice of the vocabulary it saw, all relative to that slice's maximum m:

    m = max_v z_v,   s = sum_v exp(z_v - m),   a = sum_v exp(z_v - m) (z_v - m),   zt = z_target (or 0)

Partials over disjoint vocabulary slices merge exactly (``partials.merge_partials``): that one rule serves the
Triton kernel's split-vocabulary programs, the torch backend's chunks and tensor parallelism alike.
From the merged numbers: lse = m + log s, E[z] = m + a / s, entropy = log s - a / s (no cancellation
between two large numbers), logp = zt - lse.

The backward recomputes the logits tile by tile and forms the logit gradient

    dL/dz_v = g_lp (1[v = target] - p_v) - g_ent p_v (z_v - E[z])

which needs only the saved per-row lse and E[z]: O(T) memory between forward and backward.

Tensor parallelism (``tp_group``): the vocabulary is sharded over the group by contiguous row blocks
of ``weight``, in rank order: rank r holds global ids [start_r, start_r + V_r), start_r = V_0 + ... +
V_{r-1}. Shards may be uneven (their sizes are all-gathered each call). ``hidden`` and ``targets`` are
the same on every rank; targets are global ids. The forward all-reduces the partials (a max, then one
sum); the backward all-reduces the hidden gradient, and each rank's weight gradient is its own shard's.

Ignored targets (``ignore_index``) give 0 for both outputs and no gradient; their rows are dropped
before any work is done (in SFT and RL most rows are prompt or image tokens).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from .partials import allreduce_partials, merge_partials

__all__ = ["fused_logprobs", "logprobs_reference", "merge_partials"]

# Torch backend: bytes of one fp32 [rows, V] chunk of logits. The backward holds two such buffers
# (probabilities and the logit gradient), the forward one or two. On the CPU 32 MiB keeps a chunk
# near the caches while its [rows, H] x [H, V] product still runs at full speed. On a GPU (this
# backend is the fallback there) each chunk also re-reads and re-writes the fp32 [V, H] weight-
# gradient accumulator, so chunks must be large: 512 MiB is ~880 rows at V=152064.
TORCH_CHUNK_BYTES = int(os.environ.get("OVR_LOGPROB_TORCH_CHUNK_BYTES", 32 * 2**20))
TORCH_CHUNK_BYTES_CUDA = int(os.environ.get("OVR_LOGPROB_TORCH_CHUNK_BYTES_CUDA", 512 * 2**20))

_BACKENDS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def logprobs_reference(hidden, weight, targets, *, temperature=1.0, return_entropy=False,
                       ignore_index=-100):
    """The naive path: materialises all [T, V] logits. For tests and the benchmark's baseline.

    Computes in fp32 (fp64 when the inputs are fp64, for tests); ignored rows give 0.
    """
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.T).to(compute_dtype) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = log_probs.gather(1, safe_targets[:, None]).squeeze(1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp, None
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def fused_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False,
                   ignore_index=-100, tp_group=None, backend="auto"):
    """fp32 log p(target | hidden) under softmax(hidden @ weight.T / temperature), per row.

    Args:
        hidden: [T, H] floating point (fp32 / bf16 / fp16 / fp64), same dtype and device as weight.
        weight: [V, H], or this rank's [V_r, H] vocabulary shard when ``tp_group`` is given.
        targets: [T] integer global vocabulary ids, or ``ignore_index``.
        temperature: > 0; the sampling temperature for RL, 1.0 for SFT.
        return_entropy: also return the per-row entropy of the same distribution (differentiable).
        ignore_index: rows with this target give 0 (both outputs) and no gradient.
        tp_group: process group over which ``weight`` is sharded along the vocabulary (see module doc).
        backend: "triton" (CUDA), "torch" (chunked, any device) or "auto" (triton on CUDA tensors
            when triton imports, torch otherwise).

    Returns:
        (logprobs [T] fp32, entropy [T] fp32 or None). Gradients reach hidden and weight in their
        own dtypes.

    Callers: flatten [B, S, H] to [B*S, H] and shift targets yourself (row t predicts token t+1).
    One host synchronisation per call (target validation, dropping ignored rows): keep it out of
    CUDA graphs. Under ZeRO-3 the weight must be the gathered parameter in both passes: call this
    inside the LM head module's own forward (its hooks gather the weight for forward and backward),
    not with ``model.lm_head.weight`` from outside, which is an empty placeholder there.
    """
    _check_inputs(hidden, weight, targets, temperature, backend)
    impl = _pick_backend(backend, hidden)
    vocab_start, vocab_size = _vocab_range(weight, tp_group)

    # One host sync answers both questions: are all targets in range, and are any ignored.
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= vocab_size))
    n_bad, n_valid = torch.stack([out_of_range.sum(), valid.sum()]).tolist()
    if n_bad:
        bad = targets[out_of_range][:5].tolist()
        raise ValueError(
            f"targets must be in [0, {vocab_size}) (the vocabulary size{' over tp_group' if tp_group else ''}) "
            f"or equal ignore_index={ignore_index}; {n_bad} are not, e.g. {bad}")

    num_rows = hidden.shape[0]
    if n_valid == num_rows:
        rows_hidden, rows_targets = hidden, targets
    else:
        # Work only on the rows that count; index_select keeps the graph, so ignored rows get a
        # zero gradient from autograd's scatter. With no valid row at all the Function still runs
        # on an empty batch, so weight receives a (zero) gradient and ZeRO's hooks see it.
        index = valid.nonzero().squeeze(1)
        rows_hidden, rows_targets = hidden.index_select(0, index), targets.index_select(0, index)

    logp, entropy = _FusedLogprobs.apply(
        rows_hidden, weight, rows_targets - vocab_start, 1.0 / float(temperature),
        bool(return_entropy), tp_group, impl)

    if n_valid != num_rows:
        zeros = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
        logp = zeros.index_put((index,), logp)
        if return_entropy:
            entropy = zeros.index_put((index,), entropy)
    return logp, (entropy if return_entropy else None)


def _check_inputs(hidden, weight, targets, temperature, backend):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, H], got shape {tuple(hidden.shape)} "
                         "(flatten batch and sequence first)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [T], got shape {tuple(targets.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight [V, H] and hidden [T, H] disagree on H: weight {tuple(weight.shape)}, "
                         f"hidden {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets [T] must have one entry per row of hidden [T, H]: targets "
                         f"{tuple(targets.shape)}, hidden {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight and hidden must share a dtype, got weight {weight.dtype} with shape "
                         f"{tuple(weight.shape)}, hidden {hidden.dtype} with shape {tuple(hidden.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight and targets must be on one device, got hidden on "
                         f"{hidden.device} {tuple(hidden.shape)}, weight on {weight.device} "
                         f"{tuple(weight.shape)}, targets on {targets.device} {tuple(targets.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _pick_backend(backend, hidden):
    if backend == "torch":
        return _TorchBackend
    if backend == "triton":
        from . import logprob_triton
        logprob_triton.check_usable(hidden)   # raises a clear error on CPU tensors / no triton
        return logprob_triton
    # auto: the kernels take fp32 / bf16 / fp16 on CUDA; anything else goes to the torch backend.
    if hidden.is_cuda and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16):
        from . import logprob_triton
        if logprob_triton.available():
            return logprob_triton
    return _TorchBackend


def _vocab_range(weight, group):
    """(start of this rank's shard, total vocabulary size) under the sharding in the module doc."""
    local = weight.shape[0]
    if group is None or dist.get_world_size(group) == 1:
        return 0, local
    sizes = [torch.zeros(1, dtype=torch.int64, device=weight.device)
             for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local], dtype=torch.int64, device=weight.device), group=group)
    sizes = [int(s.item()) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class _FusedLogprobs(torch.autograd.Function):
    """Shared by both backends: they supply ``partial_stats`` and ``backward``.

    Saves only hidden, weight (through save_for_backward: under ZeRO-3 weight is the gathered
    parameter, which DeepSpeed re-gathers for backward; no other reference to it is kept), the
    local targets and two fp32 numbers per row.
    """

    @staticmethod
    def forward(ctx, hidden, weight, local_targets, inv_temp, with_entropy, group, impl):
        m, s, a, zt = impl.partial_stats(hidden, weight, local_targets, inv_temp, with_entropy)
        if group is not None and dist.get_world_size(group) > 1:
            m, s, a, zt = allreduce_partials(m, s, a, zt, group)
        log_s = torch.log(s)
        lse = m + log_s
        # lse >= every logit, the target's included; the clamp only removes rounding noise.
        logp = (zt - lse).clamp_(max=0.0)
        if with_entropy:
            mean_shift = a / s                      # E[z] - m
            entropy = (log_s - mean_shift).clamp_(min=0.0)
            mean_logit = m + mean_shift             # E[z], needed by the entropy's gradient
        else:
            entropy = logp.new_empty(0)
            mean_logit = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, local_targets, lse, mean_logit)
        ctx.inv_temp, ctx.with_entropy, ctx.group, ctx.impl = inv_temp, with_entropy, group, impl
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, local_targets, lse, mean_logit = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None, None
        # Fold 1/temperature (dz/d(hidden @ weight.T)) into the per-row upstream gradients.
        inv_temp = ctx.inv_temp
        g_logp = (torch.zeros_like(lse) if grad_logp is None else grad_logp.float() * inv_temp)
        g_ent = None
        if ctx.with_entropy and grad_entropy is not None:
            g_ent = grad_entropy.float() * inv_temp
        grad_hidden, grad_weight = ctx.impl.backward(
            hidden, weight, local_targets, lse, mean_logit if g_ent is not None else None,
            g_logp.contiguous(), None if g_ent is None else g_ent.contiguous(), inv_temp,
            need_hidden, need_weight)
        if need_hidden:
            group = ctx.group
            if group is not None and dist.get_world_size(group) > 1:
                grad_hidden = grad_hidden.float()          # sum the shards' parts in fp32
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Torch backend: row chunks of [rows, V] fp32 logits, the same maths as the Triton kernels
# ----------------------------------------------------------------------------------------------
def _chunk_rows(num_rows, vocab, device):
    budget = TORCH_CHUNK_BYTES_CUDA if device.type == "cuda" else TORCH_CHUNK_BYTES
    return max(1, min(num_rows, budget // (4 * vocab)))


def _logits_fp32(hidden_rows, weight, inv_temp):
    if hidden_rows.dtype in (torch.float32, torch.float64):
        z = hidden_rows @ weight.T
        z = z.float() if z.dtype != torch.float32 else z
    else:
        z = None
        if hidden_rows.is_cuda:
            try:   # fp32 straight out of the GEMM: no bf16 rounding of the logits
                z = torch.mm(hidden_rows, weight.T, out_dtype=torch.float32)
            except (TypeError, RuntimeError):
                pass
        if z is None:
            z = (hidden_rows @ weight.T).float()
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _local_target_mask(local_targets, vocab):
    """Rows whose target lies in this shard, and the targets clamped to valid column ids."""
    in_shard = (local_targets >= 0) & (local_targets < vocab)
    return in_shard, torch.where(in_shard, local_targets, torch.zeros_like(local_targets)).long()


class _TorchBackend:
    @staticmethod
    def partial_stats(hidden, weight, local_targets, inv_temp, with_entropy):
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        m, s, zt = (torch.empty(num_rows, dtype=torch.float32, device=hidden.device) for _ in range(3))
        a = torch.empty_like(m) if with_entropy else None
        in_shard, cols = _local_target_mask(local_targets, vocab)
        step = _chunk_rows(num_rows, vocab, hidden.device)
        with torch.no_grad():
            for r0 in range(0, num_rows, step):
                r1 = min(r0 + step, num_rows)
                z = _logits_fp32(hidden[r0:r1], weight, inv_temp)
                target_logit = z.gather(1, cols[r0:r1, None]).squeeze(1)
                zt[r0:r1] = torch.where(in_shard[r0:r1], target_logit, 0.0)
                row_max = z.amax(1)
                m[r0:r1] = row_max
                z.sub_(row_max[:, None])               # z - m, in place
                if with_entropy:
                    e = torch.exp(z)
                    s[r0:r1] = e.sum(1)
                    # Row-wise dot product as a batched matmul: no [rows, V] temporary.
                    a[r0:r1] = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
                else:
                    s[r0:r1] = z.exp_().sum(1)
        return m, s, a, zt

    @staticmethod
    def backward(hidden, weight, local_targets, lse, mean_logit, g_logp, g_ent, inv_temp,
                 need_hidden, need_weight):
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = hidden.dtype
        in_shard, cols = _local_target_mask(local_targets, vocab)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulation over row chunks; for fp32 inputs the returned gradient is the accumulator.
        grad_weight_acc = (torch.zeros(weight.shape, dtype=torch.float32 if dtype != torch.float64
                                       else dtype, device=weight.device) if need_weight else None)
        step = _chunk_rows(num_rows, vocab, hidden.device)
        with torch.no_grad():
            for r0 in range(0, num_rows, step):
                r1 = min(r0 + step, num_rows)
                h = hidden[r0:r1]
                z = _logits_fp32(h, weight, inv_temp)
                g = g_logp[r0:r1, None]
                if g_ent is None:
                    dz = z.sub_(lse[r0:r1, None]).exp_().mul_(-g)      # -g p
                else:
                    p = torch.exp(z - lse[r0:r1, None])
                    gh = g_ent[r0:r1, None]
                    # coefficient g + gh (z - E[z]) = gh z + (g - gh E[z]), in place in z
                    z.mul_(gh).add_(g - gh * mean_logit[r0:r1, None])
                    dz = z.mul_(p).neg_()
                    del p
                rows = in_shard[r0:r1].nonzero().squeeze(1)
                dz[rows, cols[r0:r1][rows]] += g_logp[r0:r1][rows]
                dz = dz.to(dtype) if dtype != torch.float32 else dz
                if need_hidden:
                    torch.mm(dz, weight, out=grad_hidden[r0:r1])
                if need_weight:
                    if dz.dtype == grad_weight_acc.dtype:
                        grad_weight_acc.addmm_(dz.T, h)
                    elif dz.is_cuda:
                        torch.addmm(grad_weight_acc, dz.T, h, out_dtype=torch.float32,
                                    out=grad_weight_acc)
                    else:
                        grad_weight_acc.add_((dz.T @ h).float())
                del dz, z
        grad_weight = None
        if need_weight:
            grad_weight = grad_weight_acc.to(weight.dtype)
        return grad_hidden, grad_weight
