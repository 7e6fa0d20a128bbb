"""PPO losses with token-level aggregation.

Aggregation
-----------
Every loss here is ``sum over masked tokens of a per-token term / normalizer``.  The caller
passes ``normalizer`` = the number of response tokens of the *global* batch (all micro-batches,
all data-parallel ranks) so that summing the gradients of micro-batches and averaging over ranks
gives the gradient of one big batch:

    loss_mb = sum_{tokens in mb} l_t / N_global
    sum_{mb, ranks} grad(loss_mb) == grad(mean over all tokens of l_t)

What to pass depends on how the engine combines the per-micro-batch losses: the invariant is
"everything summed, divided once by N_global":

* plain ``loss.backward()`` per micro-batch, gradients summed: ``normalizer = N_global``;
* DDP (averages gradients over W ranks): ``normalizer = N_global / W``;
* DeepSpeed ``engine.backward`` with gradient accumulation k (also divides by k unless
  ``scale_wrt_gas=False``): ``normalizer = N_global / (W * k)``.

N_global is one ``all_reduce(SUM)`` of the local ``mask.sum()`` before the update, e.g.
together with the advantage statistics.  Without ``normalizer`` the local ``mask.sum()`` is used
(the single-batch, single-process case).

Statistics
----------
The functions return ``stats``: a dict of *detached* float64 sums and counts (keys ending in
``_sum`` and ``num_tokens``), never means, so the caller can stack them into one tensor,
``all_reduce(SUM)`` over ranks and micro-batches, and divide at the end:
``clip_frac = clipfrac_sum / num_tokens``.  :func:`finalize_stats` does the division.
The one exception is ``ratio_max``: reduce it with ``MAX``.
"""

from __future__ import annotations

import torch

__all__ = [
    "ppo_policy_loss",
    "value_loss",
    "kl_penalty",
    "entropy_from_logits",
    "entropy_bonus",
    "masked_token_sum",
    "explained_variance",
    "finalize_stats",
]


LOG_RATIO_BOUND = 20.0


def _normalizer(mask: torch.Tensor, normalizer: float | torch.Tensor | None) -> torch.Tensor:
    if normalizer is None:
        return mask.sum().to(torch.float32).clamp_min(1.0)
    return torch.as_tensor(normalizer, dtype=torch.float32, device=mask.device).clamp_min(1e-8)


def masked_token_sum(x: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    """``sum(x * mask) / normalizer`` (default normalizer: ``mask.sum()``, i.e. a token mean)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / _normalizer(mask, normalizer).to(x.dtype)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate, token-level::

        ratio_t = exp(clamp(logp_t - logp_old_t, -20, 20))
        l_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))
        dual clip (c > 1, only where A_t < 0):  l_t = min(l_t, -c * A_t)
        loss    = sum_t mask_t * l_t / normalizer

    ``clip_eps`` is eps_low; ``clip_eps_high`` defaults to ``clip_eps`` (set it higher for the
    asymmetric "clip-higher" variant).  The dual clip caps the loss of a negative-advantage
    token whose ratio exploded (ratio > c), where the plain clip leaves it unbounded.
    All inputs [B, T]; advantages and old_logprobs are treated as constants.

    stats (detached float64, sum over masked tokens; divide by ``num_tokens`` after reduction):
      ``pg_loss_sum``     sum of l_t
      ``clipfrac_sum``    tokens where the clipped branch was taken (gradient zero)
      ``dual_clip_sum``   tokens where the dual clip was taken
      ``approx_kl_sum``   k3 estimator of KL(old || new): (r - 1) - log r,  r = ratio
      ``logratio_sum``    sum of (logp_old - logp) (k1 estimator of the same KL)
      ``ratio_sum``, ``ratio_max`` (max: reduce with MAX, not SUM)
      ``num_tokens``      mask.sum()
    """
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError("dual_clip must be > 1")
    m = mask.to(torch.float32)
    adv = advantages.detach().to(torch.float32)
    log_ratio = logprobs.to(torch.float32) - old_logprobs.detach().to(torch.float32)
    # Masked positions can hold garbage (e.g. -inf logprobs of padding): zero them before exp.
    log_ratio = torch.where(m > 0, log_ratio, torch.zeros_like(log_ratio))
    # exp overflows past ~88 (inf * 0 = NaN in the loss); as peers do, clamp: beyond the bound the loss
    # stays finite and the clamp's gradient is zero (it is in the clipped region there anyway)
    log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
    else:
        dual = torch.zeros_like(clipped)
    loss = (per_token * m).sum() / _normalizer(mask, normalizer)

    with torch.no_grad():
        md = m.to(torch.float64)
        lr = log_ratio.detach().to(torch.float64)
        r = ratio.detach().to(torch.float64)
        stats = {
            "pg_loss_sum": (per_token.detach().to(torch.float64) * md).sum(),
            "clipfrac_sum": ((clipped & ~dual).to(torch.float64) * md).sum(),
            "dual_clip_sum": (dual.to(torch.float64) * md).sum(),
            "approx_kl_sum": (((r - 1.0) - lr) * md).sum(),
            "logratio_sum": (-lr * md).sum(),
            "ratio_sum": (r * md).sum(),
            "ratio_max": torch.where(md > 0, r, torch.zeros_like(r)).max() if r.numel() else r.new_zeros(()),
            "num_tokens": md.sum(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, token-level::

        v_clip = old_v + clip(v - old_v, -eps, +eps)
        l_t    = 0.5 * max((v - R)^2, (v_clip - R)^2)        (clip_eps=None: 0.5 * (v - R)^2)
        loss   = sum_t mask_t * l_t / normalizer

    ``old_values`` are the critic's values at rollout time (constants), ``returns`` the GAE
    targets.  stats (detached float64 sums): ``vf_loss_sum``, ``vf_clipfrac_sum`` (tokens where
    the clipped branch was larger, so no gradient), ``value_sum``, ``num_tokens``."""
    m = mask.to(torch.float32)
    v = values.to(torch.float32)
    R = returns.detach().to(torch.float32)
    err = (v - R) ** 2
    if clip_eps is not None:
        old = old_values.detach().to(torch.float32)
        v_clip = old + torch.clamp(v - old, -clip_eps, clip_eps)
        err_clip = (v_clip - R) ** 2
        per_token = 0.5 * torch.maximum(err, err_clip)
        clipped = err_clip > err
    else:
        per_token = 0.5 * err
        clipped = torch.zeros_like(err, dtype=torch.bool)
    loss = (per_token * m).sum() / _normalizer(mask, normalizer)
    with torch.no_grad():
        md = m.to(torch.float64)
        stats = {
            "vf_loss_sum": (per_token.detach().to(torch.float64) * md).sum(),
            "vf_clipfrac_sum": (clipped.to(torch.float64) * md).sum(),
            "value_sum": (v.detach().to(torch.float64) * md).sum(),
            "num_tokens": md.sum(),
        }
    return loss, stats


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (not used by OVR: no KL).

    k1: ``logp - logp_ref`` (unbiased, can be negative);
    k2: ``0.5 * (logp - logp_ref)^2``;
    k3: ``exp(logp_ref - logp) - 1 - (logp_ref - logp)`` (unbiased, >= 0, low variance).
    The caller masks and aggregates (e.g. ``masked_token_sum``)."""
    d = logprobs.to(torch.float32) - ref_logprobs.to(torch.float32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        nd = (-d).clamp(max=20.0)  # exp overflow guard; k3 of a ratio beyond e^20 is garbage anyway
        return torch.exp(nd) - 1.0 - nd
    raise ValueError(f"unknown kl kind {kind!r} (k1, k2, k3)")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy ``H = logsumexp(z) - sum softmax(z) * z`` over the last dim."""
    z = logits.to(torch.float32)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, coef: float, normalizer=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss term ``-coef * sum_t mask_t * H_t / normalizer`` (add to the policy loss; OVR: coef 0).

    stats: ``entropy_sum``, ``num_tokens`` (detached float64)."""
    loss = -coef * masked_token_sum(entropy.to(torch.float32), mask, normalizer)
    with torch.no_grad():
        md = mask.to(torch.float64)
        stats = {"entropy_sum": (entropy.detach().to(torch.float64) * md).sum(), "num_tokens": md.sum()}
    return loss, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over masked tokens (population variances); 1 is a perfect
    critic, 0 no better than a constant, negative worse.  Returns NaN when Var[R] is 0."""
    m = mask.to(torch.float64)
    n = m.sum()
    if float(n) == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    R = returns.to(torch.float64)
    diff = R - values.to(torch.float64)

    def var(x):
        mu = (x * m).sum() / n
        return (((x - mu) ** 2) * m).sum() / n

    vr = var(R)
    if float(vr) == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return 1.0 - var(diff) / vr


def finalize_stats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn (reduced) sums into means: every ``<name>_sum`` becomes ``<name>`` = sum / num_tokens;
    other keys (``num_tokens``, ``ratio_max``) are passed through as floats."""
    n = float(stats.get("num_tokens", torch.tensor(0.0)))
    out: dict[str, float] = {}
    for k, v in stats.items():
        if k.endswith("_sum"):
            out[k[: -len("_sum")]] = float(v) / n if n > 0 else float("nan")
        else:
            out[k] = float(v)
    return out
