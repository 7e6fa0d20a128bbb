"""Partial rollouts' bookkeeping (ovr_hpc/rl/partial.py) against hand-computed cases."""

import json
import math

from ovr_hpc.rl import partial as carry


def _group(prompt_id, born, samples):
    """samples: (tokens, versions, finish_reason) triples."""
    return carry.CarriedGroup(prompt_id, born, [carry.CarriedSample(list(t), [-0.5] * len(t), list(v), f, "x")
                                                for t, v, f in samples], [1, 2])


def test_a_sequence_is_continued_until_it_stops_or_reaches_its_cap():
    s = carry.CarriedSample()
    assert carry.step_limit(s, 4, 10) == 4
    carry.absorb(s, [5, 6, 7, 8], [-1.0, -2.0, -3.0, -4.0], "length", "abcd", step=3, max_response_len=10)
    assert not s.finished and s.versions == [3, 3, 3, 3]   # "length" = the step's limit, not the cap
    assert carry.step_limit(s, 4, 10) == 4
    carry.absorb(s, [9, 10, 11, 12], [-1.0] * 4, "length", "abcdefgh", step=4, max_response_len=10)
    assert carry.step_limit(s, 4, 10) == 2                  # 8 of 10 tokens: 2 left under the cap
    carry.absorb(s, [13, 14], [-1.0, -1.0], "length", "abcdefghij", step=5, max_response_len=10)
    assert s.finish_reason == "length" and s.versions == [3] * 4 + [4] * 4 + [5] * 2 and s.text == "abcdefghij"
    t = carry.CarriedSample()
    carry.absorb(t, [1, 2], [-0.1], "stop", "ab", step=0, max_response_len=10)   # a log-prob missing: padded
    assert t.finish_reason == "stop" and t.logprobs == [-0.1, 0.0]


def test_what_is_continued_and_what_is_finished():
    groups = [_group(7, 0, [([1, 2], [0, 0], "stop"), ([3], [0], None)]),
              _group(8, 1, [([4], [1], "stop"), ([5], [1], "length")]),
              _group(9, 1, [([], [], None), ([6], [1], None)])]
    assert carry.to_continue(groups) == [(0, 1), (2, 0), (2, 1)]
    finished, carried = carry.take_finished(groups)
    assert [g.prompt_id for g in finished] == [8] and [g.prompt_id for g in carried] == [7, 9]


def test_staleness_is_counted_from_the_oldest_token_and_stale_groups_are_dropped():
    old = _group(1, 2, [([1, 2, 3], [2, 3, 4], None), ([4], [3], "stop")])
    young = _group(2, 4, [([5], [4], None), ([], [], None)])
    fresh = carry.new_group(3, 5, 2)
    assert [carry.staleness(g, 5) for g in (old, young, fresh)] == [3, 1, 0]
    kept, dropped = carry.split_stale([old, young, fresh], 5, max_staleness=2)
    assert kept == [young, fresh] and dropped == [old]
    assert carry.split_stale([old], 5, max_staleness=3) == ([old], [])
    # the trained tokens' staleness at step 5: versions 2, 3, 4, 3 -> 3, 2, 1, 2
    assert carry.staleness_counts([old], 5) == {3: 1, 2: 2, 1: 1}


def test_importance_weights_are_one_on_policy_and_truncated_off_policy():
    w = carry.importance_weights([-1.0, -1.0, -0.5, -3.0], [-2.0, -1.2, -0.1, -0.5], [5, 4, 3, 4], step=5, cap=2.0)
    assert w[0] == 1.0                                  # sampled by the current weights (even with a gap)
    assert math.isclose(w[1], math.exp(0.2), rel_tol=1e-12)
    assert math.isclose(w[2], math.exp(-0.4), rel_tol=1e-12)
    assert w[3] == math.exp(-2.5)
    assert carry.importance_weights([0.0], [-5.0], [0], 1, cap=2.0) == [2.0]   # exp(5) truncated at the cap


def test_expected_tokens_follow_the_memoryless_model():
    assert carry.expected_step_tokens(0, 100.0) == 0.0
    assert math.isclose(carry.expected_step_tokens(100, 100.0), 100 * (1 - math.exp(-1)))
    assert math.isclose(carry.expected_step_tokens(10**9, 50.0), 50.0)


def test_new_groups_go_to_the_least_loaded_ranks():
    # loads 10, 0, 5; groups of cost 4: rank 1 (0->4), 1 (4->8), 2 (5->9), 1 (8->12), 2 (9->13), 0 (10->14)
    assert carry.assign_new_groups([10.0, 0.0, 5.0], 6, 4.0) == [1, 1, 2, 1, 2, 0]
    assert carry.assign_new_groups([0.0, 0.0], 4, 1.0) == [0, 1, 0, 1]           # equal loads: round robin
    ranks = carry.assign_new_groups([3.0, 0.0, 0.0, 7.0], 8, 2.0)
    loads = [3.0, 0.0, 0.0, 7.0]
    for r in ranks:
        loads[r] += 2.0
    assert max(loads) - min(loads) <= 2.0                                        # within one group's cost


def _rank_loads(buffers, tokens_per_step, max_len, mean_len):
    """Each rank's view of the loads as generate_partial builds it: its own expected tokens, zeros elsewhere."""
    views = []
    for r, groups in enumerate(buffers):
        view = [0.0] * len(buffers)
        view[r] = sum(carry.expected_step_tokens(carry.step_limit(s, tokens_per_step, max_len), mean_len)
                      for g in groups for s in g.samples if not s.finished)
        views.append(view)
    return views


def test_new_groups_share_the_step_by_expected_tokens_as_generate_partial_shares_them():
    # 3 ranks: rank 0 carries two long unfinished groups, rank 1 one almost at its cap, rank 2 nothing
    tokens_per_step, max_len, mean_len, n = 4, 10, 6.0, 2
    buffers = [[_group(1, 0, [([1] * 5, [0] * 5, None), ([2] * 3, [0] * 3, None)]),
                _group(2, 0, [([3] * 2, [0] * 2, None), ([4], [0], "stop")])],
               [_group(3, 0, [([5] * 9, [0] * 9, None), ([6], [0], "stop")])],
               []]
    views = _rank_loads(buffers, tokens_per_step, max_len, mean_len)
    loads = [sum(col) for col in zip(*views)]   # dp_sum of the views: the same loads on every rank
    cost = n * carry.expected_step_tokens(min(tokens_per_step, max_len), mean_len)
    ids = [11, 12, 13, 14, 15, 16, 17]
    owners = [carry.assign_new_groups(loads, len(ids), cost) for _ in views]   # every rank computes them
    assert owners[0] == owners[1] == owners[2]
    mine = [[i for i, r in zip(ids, owners[0]) if r == rank] for rank in range(3)]
    assert sorted(sum(mine, [])) == ids                    # every new prompt goes to exactly one rank
    totals = [loads[r] + cost * len(mine[r]) for r in range(3)]
    assert max(totals) - min(totals) <= cost + 1e-9         # the step's expected tokens, within one group
    # expected loads 8.76, 0.92, 0 and groups of 5.84: ranks 2, 1, 2, 1, 0, 2, 1 (by hand)
    assert mine == [[15], [12, 14, 17], [11, 13, 16]]
    # round robin (what a share by count would give) is not balanced here: the test can tell them apart
    counted = [loads[r] + cost * len(ids[r::3]) for r in range(3)]
    assert max(counted) - min(counted) > cost


def test_tail_seconds():
    assert carry.tail_seconds([]) == 0.0
    times = [1.0] * 9 + [10.0]           # 90% done at 1 s, the last at 10 s
    assert carry.tail_seconds(times) == 9.0
    assert carry.tail_seconds([float(t) for t in range(1, 21)]) == 20.0 - 18.0


def test_the_buffer_round_trips_through_json_exactly():
    groups = [_group(7, 0, [([1, 2], [0, 1], "stop"), ([3], [1], None)])]
    groups[0].samples[0].logprobs = [-0.1234567890123, -1e-30]
    back, mean = carry.from_json(json.loads(json.dumps(carry.to_json(groups, 12.5))))
    assert back == groups and mean == 12.5
