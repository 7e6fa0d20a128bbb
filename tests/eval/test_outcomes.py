"""What a model answers: per-class accuracy and the answer distribution (the demo's report and the
learning tests read them), and their picture."""

import os

from ovr_hpc.eval.outcomes import answer_breakdown, format_breakdown


def _s(reference, extracted, score):
    return {"reference": reference, "extracted": extracted, "score": score}


def test_a_collapsed_policy_shows_as_one_answer_and_one_right_class():
    samples = [_s("red", "blue", 0.0), _s("red", "blue", 0.0), _s("blue", "blue", 1.0), _s("green", "blue", 0.0),
               _s("green", None, 0.0)]
    b = answer_breakdown(samples)
    assert b["n"] == 5 and b["accuracy"] == 0.2
    assert b["per_class"] == {"blue": 1.0, "green": 0.0, "red": 0.0}
    assert b["class_counts"] == {"blue": 1, "green": 2, "red": 2}
    assert b["answers"] == {"blue": 0.8, "(none)": 0.2}
    assert (b["top_answer"], b["top_answer_share"]) == ("blue", 0.8)
    line = format_breakdown("color", b)
    assert "accuracy 0.200" in line and "blue=1.00 green=0.00 red=0.00" in line and "blue:80%" in line
    assert answer_breakdown([])["accuracy"] == 0.0


def test_outcomes_picture_and_demo_summary(tmp_path):
    from ovr_hpc.demo import summary
    from ovr_hpc.eval.plots import plot_outcomes

    before = answer_breakdown([_s("red", "blue", 0.0), _s("blue", "blue", 1.0)])
    after = answer_breakdown([_s("red", "red", 1.0), _s("blue", "blue", 1.0)])
    path = plot_outcomes({"after the cold start": before, "after RL": after}, ["blue", "red"], "t",
                         str(tmp_path / "outcomes.png"))
    assert os.path.getsize(path) > 1000
    text = summary({"seed": 3, "seconds_total": 12.0, "outcomes": {"color": {"coldstart": before, "rl": after}}})
    assert "seed 3" in text and "accuracy 0.500" in text and "accuracy 1.000" in text and "blue=1.00 red=0.00" in text
