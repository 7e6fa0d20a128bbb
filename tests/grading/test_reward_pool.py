"""RewardPool: order, timeouts (soft and hard kill), crashes, recovery, in-process mode."""

import time

import pytest

from ovr_hpc.grading import RewardPool, RewardResult, score
from tests.grading._pool_hooks import hooked_score


def B(x):
    return "so \\boxed{" + str(x) + "}"


def _items(n):
    # alternating correct / wrong, with references that need math-verify
    out = []
    for i in range(n):
        ans = "\\frac{%d}{2}" % (2 * i) if i % 2 == 0 else str(i + 1)
        out.append((B(ans), str(i), None, True))
    return out


def _expected(n):
    return ["correct" if i % 2 == 0 else "wrong" for i in range(n)]


@pytest.fixture(scope="module")
def pool():
    t = time.perf_counter()
    with RewardPool(2, timeout_s=3.0, soft_timeout_s=1.0, score_fn=hooked_score) as p:
        p.start_seconds = time.perf_counter() - t
        yield p


def test_in_process_pool_matches_score():
    items = _items(6) + [(B("C"), "C"), {"response": B("5"), "reference": "5", "finished": False}]
    with RewardPool(0, timeout_s=5.0) as p:
        res = p.score_batch(items)
    assert [r.reason for r in res] == _expected(6) + ["correct", "truncated"]
    assert res[0] == score(*items[0][:2])


@pytest.mark.multiprocess
def test_pool_order_and_values(pool):
    assert pool.start_seconds < 30
    n = 40
    res = pool.score_batch(_items(n))
    assert len(res) == n and all(isinstance(r, RewardResult) for r in res)
    assert [r.reason for r in res] == _expected(n)
    assert [r.score for r in res] == [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    assert pool.score_batch([]) == []


@pytest.mark.multiprocess
def test_pool_soft_timeout_keeps_worker(pool):
    restarts = pool.num_restarts
    t = time.perf_counter()
    res = pool.score_batch([(B(1), "1"), ("SLOW", "1"), (B(2), "2")])
    assert [r.reason for r in res] == ["correct", "timeout", "correct"]
    assert time.perf_counter() - t < 2.9  # ended by the 1 s in-worker timer, before the 3 s kill
    assert pool.num_restarts == restarts


@pytest.mark.multiprocess
def test_pool_hard_timeout_kills_and_recovers(pool):
    restarts, timeouts = pool.num_restarts, pool.num_timeouts
    items = _items(10)
    items[3] = ("HANG", "1", None, True)
    t = time.perf_counter()
    res = pool.score_batch(items)
    elapsed = time.perf_counter() - t
    expected = _expected(10)
    expected[3] = "timeout"
    assert [r.reason for r in res] == expected
    assert res[3].score == 0.0
    assert 2.9 <= elapsed < 15, elapsed
    assert pool.num_restarts == restarts + 1 and pool.num_timeouts == timeouts + 1
    # the pool is whole again: two workers answer
    res = pool.score_batch(_items(8))
    assert [r.reason for r in res] == _expected(8)
    assert len(pool._workers) == 2


@pytest.mark.multiprocess
def test_pool_worker_crash(pool):
    crashes = pool.num_crashes
    res = pool.score_batch([(B(1), "1"), ("CRASH", "1"), (B(3), "3"), (B(4), "5")])
    assert [r.reason for r in res] == ["correct", "crashed", "correct", "wrong"]
    assert pool.num_crashes == crashes + 1
    assert [r.reason for r in pool.score_batch(_items(4))] == _expected(4)


@pytest.mark.multiprocess
def test_pool_default_reward_adversarial():
    big = "x" * 10_000_000 + "\\boxed{3}"
    items = [(big, "3"), ("\\boxed{9^{9^{9^{9}}}}", "3"), (B("\\binom{n}{83}"), "3"), (B("(C)"), "C", "choice"),
             (B(7), "7", None, False)]
    t = time.perf_counter()
    with RewardPool(1, timeout_s=4.0) as p:
        started = time.perf_counter() - t
        res = p.score_batch(items)
    assert [r.reason for r in res][:2] == ["correct", "too_complex"]
    assert res[2].score == 0.0 and res[2].reason in ("wrong", "timeout")
    assert [r.reason for r in res][3:] == ["correct", "truncated"]
    assert time.perf_counter() - t < started + 10


@pytest.mark.multiprocess
def test_pool_from_background_thread(pool):
    # the trainer may score in a thread while the GPUs work
    import threading

    out = []
    th = threading.Thread(target=lambda: out.append(pool.score_batch(_items(6))))
    th.start()
    th.join(60)
    assert out and [r.reason for r in out[0]] == _expected(6)
