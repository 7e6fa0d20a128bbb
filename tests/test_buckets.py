"""The one size-bounded grouping rule (ovr_hpc/buckets.py): hand-computed groups, laziness, conversion."""

from ovr_hpc.buckets import size_bounded, token_budget_batches


def test_groups_by_hand():
    # 3+4 = 7 fits; 7+2 > 7; 2+9 > 7 and 9 alone (larger than the limit); 9+1 > 7
    assert list(size_bounded([3, 4, 2, 9, 1], 7, size=int)) == [[3, 4], [2], [9], [1]]
    assert list(size_bounded([2, 2, 2, 2, 2], 4, size=int)) == [[2, 2], [2, 2], [2]]
    assert list(size_bounded([], 7, size=int)) == []
    assert list(size_bounded([0, 0, 5], 5, size=int)) == [[0, 0, 5]]  # zero sizes join the open group


def test_order_kept_nothing_dropped():
    words = "a bb ccc dddd eeeee ffffff".split()
    groups = list(size_bounded(words, 6, size=len))
    assert groups == [["a", "bb", "ccc"], ["dddd"], ["eeeee"], ["ffffff"]]
    assert [w for g in groups for w in g] == words
    assert all(sum(map(len, g)) <= 6 or len(g) == 1 for g in groups)


def test_lazy_reads_one_item_past_a_full_group():
    read = []

    def source():
        for i in range(6):
            read.append(i)
            yield i

    groups = size_bounded(source(), 3, size=lambda i: 1)
    assert next(groups) == [0, 1, 2] and read == [0, 1, 2, 3]
    assert list(groups) == [[3, 4, 5]]


def test_convert_runs_after_the_previous_group_is_handed_out():
    events = []

    def convert(i):
        events.append(f"convert {i}")
        return i * 10

    for group in size_bounded(range(4), 2, size=lambda i: 1, convert=convert):
        events.append(f"group {group}")
    assert events == ["convert 0", "convert 1", "group [0, 10]", "convert 2", "convert 3", "group [20, 30]"]


def test_token_budget_batches_are_indices():
    assert token_budget_batches([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert token_budget_batches([], 7) == []
    assert token_budget_batches([5, 5], 10) == [[0, 1]]
