"""GAE, whitening and group advantages against hand-computed numbers."""

import pytest
import torch

from ovr_hpc.rl.advantages import (
    _gae_loop,
    broadcast_to_tokens,
    gae,
    grpo_advantages,
    masked_moment_sums,
    masked_moments,
    moments_from_sums,
    normalize_advantages,
    outcome_rewards_to_tokens,
)


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_outcome_rewards_to_tokens():
    mask = T([0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0])
    out = outcome_rewards_to_tokens(torch.tensor([1.0, 0.5, 7.0]), mask)
    assert torch.equal(out, T([0, 0, 1, 0], [0, 0, 0, 0.5], [0, 0, 0, 0]))


def test_gae_gamma_lambda_one_is_reward_minus_value():
    # row 0: prompt token, 3 response tokens, padding; row 1: 4 response tokens, reward 0
    mask = T([0, 1, 1, 1, 0], [1, 1, 1, 1, 0])
    values = T([9.0, 0.2, 0.5, 0.7, 9.0], [0.1, -0.3, 0.4, 0.6, 5.0])
    rewards = outcome_rewards_to_tokens(torch.tensor([1.0, 0.0]), mask)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, T([0, 0.8, 0.5, 0.3, 0], [-0.1, 0.3, -0.4, -0.6, 0]), atol=1e-6)
    assert torch.allclose(ret, T([0, 1, 1, 1, 0], [0, 0, 0, 0, 0]), atol=1e-6)
    # every response token: A = R_final - V(token), returns = R_final
    R = torch.tensor([1.0, 0.0]).unsqueeze(1)
    assert torch.allclose(adv, (R - values) * mask, atol=1e-6)
    assert torch.allclose(ret, R * mask, atol=1e-6)


def test_gae_closed_form_matches_recursion():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 33, generator=g) > 0.3).float()
    values = torch.randn(6, 33, generator=g)
    rewards = torch.randn(6, 33, generator=g) * mask
    a1, r1 = gae(rewards, values, mask, 1.0, 1.0)
    a2, r2 = _gae_loop(rewards * mask, values * mask, mask, 1.0, 1.0)
    assert torch.allclose(a1, a2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)


def test_gae_general_hand_computed():
    # response values 0.2, 0.5, 0.7; reward 1 on the last token; gamma 0.9, lam 0.8
    # delta = [0.9*0.5-0.2, 0.9*0.7-0.5, 1-0.7] = [0.25, 0.13, 0.3]
    # A2 = 0.3; A1 = 0.13 + 0.72*0.3 = 0.346; A0 = 0.25 + 0.72*0.346 = 0.49912
    mask = T([0, 1, 1, 1, 0])
    values = T([9.0, 0.2, 0.5, 0.7, 9.0])
    rewards = T([0, 0, 0, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, T([0, 0.49912, 0.346, 0.3, 0]), atol=1e-6)
    assert torch.allclose(ret, T([0, 0.69912, 0.846, 1.0, 0]), atol=1e-6)
    # a hole in the mask (e.g. an unmasked tool/observation token) does not cut the trajectory
    mask_h = T([1, 1, 0, 1])
    adv_h, _ = gae(T([0, 0, 5, 1]), T([0.2, 0.5, 99.0, 0.7]), mask_h, gamma=0.9, lam=0.8)
    assert torch.allclose(adv_h, T([0.49912, 0.346, 0, 0.3]), atol=1e-6)


def test_gae_no_grad_and_dtype():
    values = torch.tensor([[0.5, 0.5]], dtype=torch.bfloat16, requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2))
    assert adv.dtype == torch.float32 and not adv.requires_grad


def test_normalize_advantages_hand_computed():
    adv = T([1, 2, 3, 0])
    mask = T([1, 1, 1, 0])
    # mean 2, var (1 + 0 + 1)/3 = 2/3 -> (x - 2) / sqrt(2/3)
    out = normalize_advantages(adv, mask, eps=0.0)
    s = (2 / 3) ** 0.5
    assert torch.allclose(out, T([-1 / s, 0, 1 / s, 0]), atol=1e-6)
    out2 = normalize_advantages(adv, mask, eps=0.0, subtract_mean=False)
    assert torch.allclose(out2, T([1 / s, 2 / s, 3 / s, 0]), atol=1e-6)
    mean, var = masked_moments(adv, mask)
    assert float(mean) == pytest.approx(2.0) and float(var) == pytest.approx(2 / 3)


def test_normalize_advantages_distributed_stats():
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(8, 10, generator=g)
    mask = (torch.rand(8, 10, generator=g) > 0.4).float()
    full = normalize_advantages(adv, mask)
    # two "ranks": each computes sums, the caller all-reduces (here: adds)
    sums = masked_moment_sums(adv[:3], mask[:3]) + masked_moment_sums(adv[3:], mask[3:])
    stats = moments_from_sums(sums)
    parts = torch.cat([normalize_advantages(adv[:3], mask[:3], stats=stats),
                       normalize_advantages(adv[3:], mask[3:], stats=stats)])
    assert torch.allclose(parts, full, atol=1e-6)
    m = mask.bool()
    assert abs(float(full[m].mean())) < 1e-5 and float(full[m].var(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_moments_empty():
    mean, var = moments_from_sums(masked_moment_sums(torch.zeros(2, 3), torch.zeros(2, 3)))
    assert float(mean) == 0.0 and float(var) == 1.0


def test_grpo_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) -> +-0.5 * sqrt(3) = +-0.8660254
    a = grpo_advantages(r, eps=0.0)
    k = 0.5 * 3 ** 0.5
    assert torch.allclose(a[0], torch.tensor([k, -k, -k, k]), atol=1e-6)
    assert torch.equal(grpo_advantages(r)[1], torch.zeros(4))  # all-equal group -> 0
    flat = grpo_advantages(r.flatten(), group_size=4, eps=0.0)
    assert flat.shape == (8,) and torch.allclose(flat, a.flatten())
    assert torch.allclose(grpo_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError):
        grpo_advantages(r.flatten(), group_size=3)
    tok = broadcast_to_tokens(flat[:2], T([1, 1, 0], [0, 1, 1]))
    assert torch.allclose(tok, T([k, k, 0], [0, -k, -k]), atol=1e-6)
