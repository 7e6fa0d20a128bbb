"""Shared inputs and checks for the kernel tests (also run inside the Triton-interpreter subprocess)."""

import math

import torch

from ovr_hpc.kernels import fused_logprobs, logprobs_reference


def make_inputs(num_rows, hidden_size, vocab, *, dtype=torch.float32, peaked=False, ignore_every=0,
                seed=0, device="cpu"):
    """Random inputs; ``peaked`` copies hidden rows (scaled) into half the weight rows, so those
    rows' softmax puts nearly all mass on one token (the regime where sloppy kernels go wrong)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / math.sqrt(hidden_size)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    if peaked:
        n = min(num_rows, vocab) // 2
        rows = torch.randperm(vocab, generator=gen)[:n]
        weight[rows] = hidden[:n] * (4.0 / math.sqrt(hidden_size))
        targets[: n // 2] = rows[: n // 2]            # some peaked rows hit their peak, others not
        targets[-1] = vocab - 1                        # the last (partial) vocabulary tile
    if ignore_every:
        targets[::ignore_every] = -100
    return (hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device))


def reference_fp64(hidden, weight, targets, temperature, with_entropy, g_logp, g_ent):
    """Outputs and gradients of the naive path in fp64 on the same (rounded) input values."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    logp, ent = logprobs_reference(h, w, targets.cpu(), temperature=temperature,
                                   return_entropy=with_entropy)
    loss = (logp * g_logp.cpu().double()).sum()
    if with_entropy:
        loss = loss + (ent * g_ent.cpu().double()).sum()
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return logp, ent, grad_h, grad_w


def fused_with_grads(hidden, weight, targets, temperature, with_entropy, g_logp, g_ent, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fused_logprobs(h, w, targets, temperature=temperature, return_entropy=with_entropy, **kw)
    loss = (logp * g_logp).sum()
    if with_entropy:
        loss = loss + (ent * g_ent).sum()
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return logp, ent, grad_h, grad_w


def rel_err(x, ref):
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against_reference(hidden, weight, targets, temperature, with_entropy, *, tol, **kw):
    """Assert outputs and gradients match the fp64 naive path; returns the errors for messages."""
    gen = torch.Generator().manual_seed(1)
    g_logp = torch.randn(targets.shape[0], generator=gen).to(hidden.device)
    g_ent = torch.randn(targets.shape[0], generator=gen).to(hidden.device)
    logp, ent, gh, gw = fused_with_grads(hidden, weight, targets, temperature, with_entropy,
                                         g_logp, g_ent, **kw)
    r_logp, r_ent, r_gh, r_gw = reference_fp64(hidden, weight, targets, temperature, with_entropy,
                                               g_logp, g_ent)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert torch.isfinite(logp).all()
    assert (logp <= 0).all(), f"log-prob above 0: {logp.max().item()}"
    ignored = targets == -100
    assert (logp[ignored] == 0).all()
    errs = {"logp": (logp.cpu().double() - r_logp).abs().max().item(),
            "grad_hidden": rel_err(gh, r_gh), "grad_weight": rel_err(gw, r_gw)}
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert (gh[ignored] == 0).all()
    if with_entropy:
        assert ent.dtype == torch.float32 and torch.isfinite(ent).all()
        assert (ent >= 0).all() and (ent <= math.log(weight.shape[0]) + 1e-4).all()
        assert (ent[ignored] == 0).all()
        errs["entropy"] = (ent.cpu().double() - r_ent).abs().max().item()
    else:
        assert ent is None
    for name, err in errs.items():
        assert err < tol[name], f"{name} error {err:.3g} >= {tol[name]} ({errs})"
    return errs
