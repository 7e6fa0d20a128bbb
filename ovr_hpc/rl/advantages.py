"""Advantage estimation for PPO (GAE) and GRPO-style group baselines.

Small pure torch functions on [B, T] token tensors: no I/O, no distributed calls.  Where a
statistic must be global over data-parallel ranks, a helper returns *sums* that the caller
all-reduces, and the function takes the reduced statistic as an argument.

Conventions
-----------
* ``mask`` is 1 on response tokens (the tokens whose log-probabilities are trained), 0 on
  prompt and padding.  Masks may have holes (multi-turn, packed samples are split per row).
* ``rewards`` is per token; with outcome rewards the whole reward sits on the last response
  token of each row (see :func:`outcome_rewards_to_tokens`).
* OVR: gamma = lambda = 1, so every response token's advantage is ``R - V(token)`` and the
  return is ``R`` (no KL term in the reward).
"""

from __future__ import annotations

import torch

__all__ = [
    "gae",
    "outcome_rewards_to_tokens",
    "masked_moments",
    "masked_moment_sums",
    "moments_from_sums",
    "normalize_advantages",
    "grpo_advantages",
    "broadcast_to_tokens",
]


def outcome_rewards_to_tokens(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place one scalar reward per row on that row's last masked token.

    rewards: [B]; mask: [B, T]  ->  [B, T] float tensor, zero elsewhere (rows with an empty
    mask get no reward)."""
    mask = mask.bool()
    B, T = mask.shape
    positions = torch.arange(T, device=mask.device).expand(B, T)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values  # [B]
    out = torch.zeros(B, T, dtype=torch.float32 if not rewards.is_floating_point() else rewards.dtype,
                      device=mask.device)
    has = last >= 0
    rows = torch.arange(B, device=mask.device)[has]
    out[rows, last[has]] = rewards.to(out.dtype)[has]
    return out


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked tokens of each row.

    For the k-th response token t_k of a row (masked positions, in order; unmasked positions
    are skipped, so a hole in the mask does not cut the trajectory)::

        delta_k = r_k + gamma * V_{k+1} - V_k        (V_{K} := 0 after the last token: terminal)
        A_k     = delta_k + gamma * lam * A_{k+1}     (A_K := 0)
        R_k     = A_k + V_k                           (the value target, "returns")

    With gamma = lam = 1 and the reward only on the last token: ``A_k = R - V_k``, ``R_k = R``
    (computed in closed form with one reverse cumsum; other gamma/lam loop over T).

    rewards, values, mask: [B, T] (values are detached).  Returns (advantages, returns), both
    [B, T] float32, zero where ``mask`` is 0.  Computed in float32 whatever the input dtype."""
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"shape mismatch: {tuple(rewards.shape)} {tuple(values.shape)} {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    r = rewards.to(torch.float32) * m
    v = values.to(torch.float32) * m
    if gamma == 1.0 and lam == 1.0:
        # Telescoping sum: A_k = sum_{j >= k} r_j - V_k.  One reverse cumsum instead of a
        # T-step loop (T is up to ~48k response tokens in OVR).
        future = torch.flip(torch.cumsum(torch.flip(r, dims=[1]), dim=1), dims=[1])
        adv = (future - v) * m
        return adv, (adv + v) * m
    return _gae_loop(r, v, m, gamma, lam)


def _gae_loop(r: torch.Tensor, v: torch.Tensor, m: torch.Tensor, gamma: float, lam: float):
    """Reference recursion (any gamma, lam); r, v already masked, all float32."""
    B, T = m.shape
    adv = torch.zeros(B, T, dtype=torch.float32, device=m.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=m.device)
    next_adv = torch.zeros(B, dtype=torch.float32, device=m.device)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * mt
        # Unmasked positions pass the running values through unchanged.
        next_value = torch.where(mt > 0, v[:, t], next_value)
        next_adv = torch.where(mt > 0, a, next_adv)
    returns = (adv + v) * m
    return adv, returns


def masked_moment_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[sum(x*m), sum(x^2*m), sum(m)]`` as one float64 tensor of shape [3].

    In data-parallel training every rank computes this on its local tokens, the caller does
    ``torch.distributed.all_reduce(s, op=SUM)`` (one collective), then
    :func:`moments_from_sums` gives the global (mean, var)."""
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    return torch.stack([(xd * m).sum(), (xd * xd * m).sum(), m.sum()])


def moments_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) from ``[sum, sum_sq, count]``; population variance (divides by count),
    clamped at 0 against round-off.  count 0 gives mean 0, var 1 (a no-op whitening)."""
    s, ss, n = sums[0], sums[1], sums[2]
    if float(n) <= 0:
        return torch.zeros((), dtype=sums.dtype, device=sums.device), torch.ones((), dtype=sums.dtype, device=sums.device)
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0.0)
    return mean, var


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (mean, var) of ``x`` over masked entries (population variance)."""
    return moments_from_sums(masked_moment_sums(x, mask))


def normalize_advantages(
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    stats: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
    subtract_mean: bool = True,
) -> torch.Tensor:
    """Batch-level whitening (the OVR paper's "batch-level advantage normalisation")::

        A' = (A - mean) / sqrt(var + eps)     on masked tokens, 0 elsewhere

    mean / var are over *all masked tokens of the batch* (token-weighted, so long responses
    count more), population variance.  The mean IS subtracted (whitening), as in ORZ/OpenRLHF;
    ``subtract_mean=False`` only rescales.

    Distributed: pass ``stats=(mean, var)`` of the global batch, obtained as
    ``moments_from_sums(all_reduce(masked_moment_sums(adv, mask)))``; without ``stats`` the
    local batch is used (single process, or per-rank normalisation)."""
    if stats is None:
        mean, var = masked_moments(adv, mask)
    else:
        mean, var = stats
    mean = torch.as_tensor(mean, dtype=torch.float32, device=adv.device)
    var = torch.as_tensor(var, dtype=torch.float32, device=adv.device)
    out = adv.to(torch.float32)
    if subtract_mean:
        out = out - mean
    out = out * torch.rsqrt(var + eps)
    return out * mask.to(out.dtype)


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    eps: float = 1e-6,
    scale: bool = True,
) -> torch.Tensor:
    """Group-relative advantages (GRPO-style outcome baseline)::

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)     (scale=True)
        A_i =  r_i - mean_group(r)                             (scale=False)

    ``rewards``: [num_prompts, n], or flat [num_prompts * n] with ``group_size=n`` (samples of
    one prompt contiguous).  std is the *unbiased* sample std (divides by n-1; a group of one
    gives std 0, so A = 0).  Returns the same shape as ``rewards`` (float32).  A group whose
    rewards are all equal gets 0.  Spread over tokens with :func:`broadcast_to_tokens`."""
    flat = rewards.dim() == 1
    if flat:
        if group_size is None or group_size <= 0 or rewards.numel() % group_size:
            raise ValueError("flat rewards need group_size dividing their length")
        r = rewards.to(torch.float32).view(-1, group_size)
    elif rewards.dim() == 2:
        r = rewards.to(torch.float32)
    else:
        raise ValueError("rewards must be [num_prompts, n] or flat [num_prompts * n]")
    mean = r.mean(dim=1, keepdim=True)
    centered = r - mean
    if scale:
        if r.shape[1] > 1:
            std = r.std(dim=1, keepdim=True, unbiased=True)
        else:
            std = torch.zeros_like(mean)
        denom = std + eps
        # all-equal group: centered is 0; keep it 0 even with eps=0 (no 0/0)
        centered = torch.where(denom > 0, centered / torch.where(denom > 0, denom, torch.ones_like(denom)),
                               torch.zeros_like(centered))
    return centered.reshape(rewards.shape)


def broadcast_to_tokens(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] per-sample values -> [B, T] on masked tokens (0 elsewhere)."""
    return per_sample.to(torch.float32).reshape(-1, 1) * mask.to(torch.float32)
