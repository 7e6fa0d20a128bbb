"""Learning outcomes, guarded: a cold start and an RL run on tiny setups with fixed seeds must learn
(held-out thresholds) and follow their golden curves (tests/assets/golden/, regenerated only by
scripts/update-golden-curves.py). A resume test compares a run with itself; these catch a change that
shifts every run.

Tolerances: the curves are compared as means over windows of steps (single steps of a tiny model are
noisy, and RL's sampled tokens may flip with CPU numerics), within an absolute + relative band for the
loss and an absolute band for the reward (a fraction of 64 samples per step). On the machine and versions
that wrote them (constraints.txt) the runs reproduce the curves exactly.
"""

import pytest

from tests.learning import setups

LOSS_WINDOW, LOSS_ABS, LOSS_REL = 10, 0.03, 0.10
REWARD_WINDOW, REWARD_ABS = 4, 0.15


def _assert_follows(curve: list[float], golden: list[float], window: int, abs_tol: float, rel_tol: float = 0.0):
    assert len(curve) == len(golden), f"{len(curve)} steps, the golden curve has {len(golden)}"
    ours, gold = setups.windowed_means(curve, window), setups.windowed_means(golden, window)
    off = [(i * window + 1, round(a, 4), round(b, 4)) for i, (a, b) in enumerate(zip(ours, gold))
           if abs(a - b) > abs_tol + rel_tol * abs(b)]
    assert not off, f"windows (first step, ours, golden) outside the tolerance: {off}"


@pytest.mark.slow
def test_coldstart_learns_and_follows_its_golden_loss_curve(tmp_path):
    result = setups.run_coldstart(str(tmp_path))
    losses = result["losses"]
    assert losses[-1] < 0.2 < 5 < losses[0], (losses[0], losses[-1])
    # greedy held-out arithmetic (100 problems the run never saw): 0.52 when the golden curve was written
    assert result["heldout"]["accuracy"] >= 0.35, result["heldout"]
    _assert_follows(losses, setups.read_golden("coldstart")["curves"]["loss"], LOSS_WINDOW, LOSS_ABS, LOSS_REL)


@pytest.mark.slow
def test_rl_learns_from_the_picture_and_follows_its_golden_reward_curve(tmp_path):
    result = setups.run_rl(str(tmp_path))
    before, after = result["before"], result["after"]
    # the picture-only colour question, 64 held-out pictures, greedy: 0.31 -> 0.95 when the curve was written
    assert after["accuracy"] >= before["accuracy"] + 0.3 and after["accuracy"] >= 0.7, (before, after)
    assert after["top_answer_share"] <= 0.55, after["answers"]        # no collapse onto one colour
    assert min(after["per_class"].values()) >= 0.4, after["per_class"]  # every colour learnt
    _assert_follows(result["rewards"], setups.read_golden("rl")["curves"]["reward"], REWARD_WINDOW, REWARD_ABS)


def test_the_tolerance_catches_a_shifted_curve():
    golden = setups.read_golden("coldstart")["curves"]["loss"]
    _assert_follows(golden, golden, LOSS_WINDOW, LOSS_ABS, LOSS_REL)
    with pytest.raises(AssertionError, match="outside the tolerance"):
        _assert_follows([1.2 * x + 0.05 for x in golden], golden, LOSS_WINDOW, LOSS_ABS, LOSS_REL)
    rewards = setups.read_golden("rl")["curves"]["reward"]
    with pytest.raises(AssertionError, match="outside the tolerance"):
        _assert_follows([0.25] * len(rewards), rewards, REWARD_WINDOW, REWARD_ABS)  # an RL that never learns
