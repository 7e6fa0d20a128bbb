"""PPO policy / value losses against hand-computed numbers, gradients, aggregation, bandit."""

import math

import pytest
import torch

from ovr_hpc.rl.advantages import gae
from ovr_hpc.rl.losses import (
    entropy_bonus,
    entropy_from_logits,
    explained_variance,
    finalize_stats,
    kl_penalty,
    masked_token_sum,
    ppo_policy_loss,
    value_loss,
)


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def _logp(ratios):
    """New log-probs with old log-probs 0, so that exp(new - old) = ratios."""
    return torch.log(torch.tensor([ratios], dtype=torch.float32)).requires_grad_(True)


# ----------------------------------------------------------------------------- policy loss
def test_ppo_policy_loss_hand_computed():
    # ratio  A    unclipped  clipped(0.8..1.2)  max    branch
    # 1.5    1    -1.5       -1.2               -1.2   clipped (no gradient)
    # 0.5   -1     0.5        0.8                0.8   clipped
    # 1.1    2    -2.2       -2.2               -2.2   unclipped
    # 0.7   -2     1.4        1.6                1.6   clipped
    # loss = (-1.2 + 0.8 - 2.2 + 1.6) / 4 = -0.25
    logp = _logp([1.5, 0.5, 1.1, 0.7])
    old = torch.zeros(1, 4)
    adv = T([1.0, -1.0, 2.0, -2.0])
    mask = torch.ones(1, 4)
    loss, st = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.25, abs=1e-6)
    loss.backward()
    # d loss / d logp_t = -A_t * ratio_t / N on unclipped tokens, 0 on clipped ones
    assert torch.allclose(logp.grad, T([0.0, 0.0, -2.0 * 1.1 / 4, 0.0]), atol=1e-6)
    f = finalize_stats(st)
    assert f["num_tokens"] == 4
    assert f["clipfrac"] == pytest.approx(0.75)
    assert f["pg_loss"] == pytest.approx(-0.25, abs=1e-6)
    k3 = sum((r - 1) - math.log(r) for r in [1.5, 0.5, 1.1, 0.7]) / 4  # 0.3490468 / 4
    assert f["approx_kl"] == pytest.approx(k3, rel=1e-5)
    assert f["logratio"] == pytest.approx(-sum(math.log(r) for r in [1.5, 0.5, 1.1, 0.7]) / 4, rel=1e-5)
    assert f["ratio"] == pytest.approx(0.95, rel=1e-6)
    assert f["ratio_max"] == pytest.approx(1.5, rel=1e-6)
    assert f["dual_clip"] == 0.0
    assert all(not v.requires_grad for v in st.values())


def test_ppo_gradient_directions_and_unclipped_sides():
    # A > 0, ratio below 1-eps: NOT clipped (the objective wants the prob back up) -> grad flows
    # A < 0, ratio above 1+eps: NOT clipped (wants it back down) -> grad flows
    logp = _logp([0.5, 1.5])
    adv = T([1.0, -1.0])
    loss, st = ppo_policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx((-0.5 + 1.5) / 2)
    loss.backward()
    g = logp.grad[0]
    assert float(g[0]) == pytest.approx(-0.5 / 2)  # descent raises logp of the A>0 token
    assert float(g[1]) == pytest.approx(1.5 / 2)  # descent lowers logp of the A<0 token
    assert float(st["clipfrac_sum"]) == 0.0


def test_ppo_clip_eps_high():
    # ratio 1.25, A = 1: clipped at 1.2 with symmetric eps, not with eps_high = 0.28
    logp = _logp([1.25])
    loss, st = ppo_policy_loss(logp, torch.zeros(1, 1), T([1.0]), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2) and float(st["clipfrac_sum"]) == 1.0
    loss, st = ppo_policy_loss(logp, torch.zeros(1, 1), T([1.0]), torch.ones(1, 1), clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and float(st["clipfrac_sum"]) == 0.0
    # eps_low still applies on the other side: ratio 0.7, A = -1 -> clipped at 0.8
    loss, _ = ppo_policy_loss(_logp([0.7]), torch.zeros(1, 1), T([-1.0]), torch.ones(1, 1), 0.2, 0.28)
    assert loss.item() == pytest.approx(0.8)


def test_ppo_dual_clip():
    # ratio 5, A = -1: plain PPO loss = max(5, 1.2) = 5 (unbounded in the ratio);
    # dual clip c=3 caps it at -c*A = 3 with zero gradient.  A > 0 tokens are untouched.
    logp = _logp([5.0, 5.0, 2.0])
    adv = T([-1.0, 1.0, -1.0])
    mask = torch.ones(1, 3)
    loss, st = ppo_policy_loss(logp, torch.zeros(1, 3), adv, mask)
    assert loss.item() == pytest.approx((5.0 - 1.2 + 2.0) / 3)
    loss, st = ppo_policy_loss(logp, torch.zeros(1, 3), adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 2.0) / 3)
    loss.backward()
    assert torch.allclose(logp.grad, T([0.0, 0.0, 2.0 / 3]), atol=1e-6)
    assert float(st["dual_clip_sum"]) == 1.0 and float(st["clipfrac_sum"]) == 1.0
    with pytest.raises(ValueError):
        ppo_policy_loss(logp, torch.zeros(1, 3), adv, mask, dual_clip=1.0)


def test_ppo_mask_and_garbage_in_padding():
    logp = torch.tensor([[math.log(1.1), -float("inf")]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    loss, st = ppo_policy_loss(logp, old, T([1.0, 1.0]), T([1.0, 0.0]))
    assert loss.item() == pytest.approx(-1.1)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and float(logp.grad[0, 1]) == 0.0
    assert float(st["num_tokens"]) == 1.0 and math.isfinite(float(st["approx_kl_sum"]))


def test_normalizer_equivalence_microbatches():
    g = torch.Generator().manual_seed(0)
    B, L = 6, 9
    logits = torch.randn(B, L, generator=g)
    old = logits.detach() + 0.3 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, L, generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    values_old = torch.randn(B, L, generator=g)
    returns = torch.randn(B, L, generator=g)

    p_full = logits.clone().requires_grad_(True)
    v_full = (values_old + 0.3 * torch.randn(B, L, generator=g)).requires_grad_(True)
    loss_p, st_full = ppo_policy_loss(p_full, old, adv, mask)
    loss_v, _ = value_loss(v_full, values_old, returns, mask)
    (loss_p + loss_v).backward()

    p_mb = logits.clone().requires_grad_(True)
    v_mb = v_full.detach().clone().requires_grad_(True)
    n_global = mask.sum()  # all micro-batches, passed by the caller
    total, sums = 0.0, None
    for sl in (slice(0, 2), slice(2, 6)):  # uneven micro-batches with different token counts
        lp, st = ppo_policy_loss(p_mb[sl], old[sl], adv[sl], mask[sl], normalizer=n_global)
        lv, _ = value_loss(v_mb[sl], values_old[sl], returns[sl], mask[sl], normalizer=n_global)
        (lp + lv).backward()
        total += lp.item()
        sums = st if sums is None else {k: (torch.maximum(sums[k], v) if k == "ratio_max" else sums[k] + v)
                                         for k, v in st.items()}
    assert total == pytest.approx(loss_p.item(), abs=1e-5)
    assert torch.allclose(p_mb.grad, p_full.grad, atol=1e-6)
    assert torch.allclose(v_mb.grad, v_full.grad, atol=1e-6)
    f_full, f_mb = finalize_stats(st_full), finalize_stats(sums)
    for k in f_full:
        assert f_mb[k] == pytest.approx(f_full[k], rel=1e-6, abs=1e-9), k
    # a per-micro-batch mean would NOT match (different token counts): the reason for normalizer
    lp0, _ = ppo_policy_loss(logits[:2], old[:2], adv[:2], mask[:2])
    lp1, _ = ppo_policy_loss(logits[2:], old[2:], adv[2:], mask[2:])
    assert abs((lp0 + lp1).item() / 2 - loss_p.item()) > 1e-4


# ----------------------------------------------------------------------------- value loss
def test_value_loss_hand_computed():
    # v     old   R     (v-R)^2  v_clip  (v_clip-R)^2  0.5*max   clipped
    # 1.0   0.8   1.2   0.04     1.0     0.04          0.02      no
    # 0.5   0.8   0.0   0.25     0.6     0.36          0.18      yes (no gradient)
    # 0.0   0.1   1.0   1.00     0.0     1.00          0.50      no
    v = T([1.0, 0.5, 0.0]).requires_grad_(True)
    old = T([0.8, 0.8, 0.1])
    R = T([1.2, 0.0, 1.0])
    mask = torch.ones(1, 3)
    loss, st = value_loss(v, old, R, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.7 / 3, abs=1e-6)
    loss.backward()
    assert torch.allclose(v.grad, T([-0.2 / 3, 0.0, -1.0 / 3]), atol=1e-6)
    f = finalize_stats(st)
    assert f["vf_clipfrac"] == pytest.approx(1 / 3) and f["value"] == pytest.approx(0.5)
    # no clipping: 0.5 * (0.04 + 0.25 + 1) / 3
    v2 = T([1.0, 0.5, 0.0]).requires_grad_(True)
    loss, st = value_loss(v2, old, R, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.645 / 3, abs=1e-6)
    loss.backward()
    assert torch.allclose(v2.grad, T([-0.2 / 3, 0.5 / 3, -1.0 / 3]), atol=1e-6)
    assert float(st["vf_clipfrac_sum"]) == 0.0


def test_value_loss_mask():
    v = T([1.0, 100.0])
    loss, st = value_loss(v, v, T([0.0, 0.0]), T([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.5) and float(st["num_tokens"]) == 1.0


# ----------------------------------------------------------------------------- helpers
def test_kl_penalty():
    logp, ref = T([-1.0]), T([-1.5])  # d = 0.5
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(0.125)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(math.exp(-0.5) - 1 + 0.5)  # 0.1065307
    assert float(kl_penalty(ref, ref, "k3")) == 0.0
    assert (kl_penalty(torch.randn(3, 5), torch.randn(3, 5), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_entropy():
    H = entropy_from_logits(torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]))
    assert torch.allclose(H, torch.tensor([math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))
    ent = T([0.7, 0.5, 9.0])
    loss, st = entropy_bonus(ent, T([1.0, 1.0, 0.0]), coef=0.01)
    assert loss.item() == pytest.approx(-0.01 * 0.6)
    assert finalize_stats(st)["entropy"] == pytest.approx(0.6)
    assert float(masked_token_sum(ent, T([1.0, 1.0, 0.0]), normalizer=4)) == pytest.approx(0.3)


def test_explained_variance():
    # Var[R] = 42/27, Var[R - V] = 2/9 -> 1 - (2/9)/(42/27) = 6/7
    ev = explained_variance(T([1.0, 2.0, 3.0, 50.0]), T([1.0, 2.0, 4.0, 0.0]), T([1.0, 1.0, 1.0, 0.0]))
    assert float(ev) == pytest.approx(6 / 7)
    assert float(explained_variance(T([1.0, 2.0]), T([1.0, 2.0]), torch.ones(1, 2))) == pytest.approx(1.0)
    assert math.isnan(float(explained_variance(T([1.0, 2.0]), T([3.0, 3.0]), torch.ones(1, 2))))


# ----------------------------------------------------------------------------- bandit sanity check
def test_ppo_bandit_moves_probability_to_rewarded_token():
    """Softmax over 4 actions, reward 1 for action 2.  PPO with gamma = lam = 1 advantages
    (reward - baseline, the baseline a constant value) moves the probability to action 2."""
    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([logits], lr=0.05)
    B = 64
    p_start = float(torch.softmax(logits.detach(), -1)[2])
    for _ in range(30):
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            actions = torch.multinomial(probs, B, replacement=True)
            old_logp = torch.log(probs[actions]).unsqueeze(1)  # [B, 1]: one-token responses
            reward = (actions == 2).float().unsqueeze(1)
            baseline = torch.full_like(reward, float(reward.mean()))  # stands in for V
        mask = torch.ones(B, 1)
        adv, ret = gae(reward, baseline, mask, gamma=1.0, lam=1.0)
        assert torch.allclose(adv, reward - baseline) and torch.allclose(ret, reward)
        for _ in range(4):  # a few PPO epochs on the same batch exercise the clip
            logp = torch.log_softmax(logits, -1)[actions].unsqueeze(1)
            loss, _ = ppo_policy_loss(logp, old_logp, adv, mask, clip_eps=0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    p_end = float(torch.softmax(logits.detach(), -1)[2])
    assert p_start == pytest.approx(0.25)
    assert p_end > 0.8, p_end


def test_ppo_huge_log_ratio_gives_a_finite_loss_and_no_gradient():
    # reachable with several policy updates per step: a token whose probability rose by e^100
    logp = torch.tensor([[100.0, -1.0, -120.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in stats.values())
    # token 0: A > 0, ratio e^20 >> 1.2 -> clipped: loss -1.2, no gradient; token 1: ratio 1, gradient -A/3;
    # token 2: A < 0, ratio e^-20 << 0.8 -> clipped: loss 0.8, no gradient
    assert torch.allclose(loss, torch.tensor((-1.2 - 1.0 + 0.8) / 3))
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.0 / 3, 0.0]]))
    assert float(stats["ratio_max"]) == pytest.approx(math.exp(20.0))
