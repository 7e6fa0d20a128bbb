"""The transformers rollout engine's completions: where a generated row ends and why."""

from ovr_hpc.rollout.hf import trim_completion

END, PAD = 100, 101
PIECES = {1: "The answer", 2: " is", 3: " 4", 4: "</ans", 5: "wer>", 6: " more", 7: "</answer>!", END: "", PAD: ""}


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_a_row_stopped_by_a_stop_string_drops_the_padding_after_it():
    # generate keeps the row going with pads while other rows of the batch still generate
    ids, text, finish = trim_completion([1, 2, 3, 4, 5, PAD, PAD, PAD], [END], ["</answer>"], decode)
    assert (ids, text, finish) == ([1, 2, 3, 4, 5], "The answer is 4</answer>", "stop")


def test_a_stop_string_inside_the_last_token_is_a_stop_and_the_text_ends_at_it():
    ids, text, finish = trim_completion([1, 2, 3, 7], [END], ["</answer>"], decode)
    assert (ids, text, finish) == ([1, 2, 3, 7], "The answer is 4</answer>", "stop")
    ids, text, finish = trim_completion([1, 7, 6, 6, PAD], [END], ["</answer>", "User:"], decode)
    assert (ids, text, finish) == ([1, 7], "The answer</answer>", "stop")


def test_end_of_turn_and_truncation():
    assert trim_completion([1, 2, END, PAD, PAD], [END], [], decode) == ([1, 2, END], "The answer is", "stop")
    assert trim_completion([1, 2, 3, 6], [END], ["</answer>"], decode) == ([1, 2, 3, 6], "The answer is 4 more",
                                                                         "length")
    # the end of turn comes before a stop string would: the end of turn wins, nothing after it counts
    assert trim_completion([1, END, 4, 5], [END], ["</answer>"], decode) == ([1, END], "The answer", "stop")
    # a stop string that is complete before the end-of-turn token
    assert trim_completion([1, 4, 5, 6, END], [END], ["</answer>"], decode) == ([1, 4, 5], "The answer</answer>",
                                                                               "stop")
