"""Rule-based reward: extraction, equivalence, reason codes, adversarial inputs (in-process)."""

import time

import pytest

from ovr_hpc.grading import MAX_ANSWER_CHARS, REASONS, RewardResult, extract_last_boxed, score
from ovr_hpc.grading import answer as R


def boxed(ans: str) -> str:
    return "<think>some reasoning</think> So the final answer is $\\boxed{" + ans + "}$."


def check(response, reference, expected_reason, answer_type=None, finished=True):
    res = score(response, reference, answer_type=answer_type, finished=finished)
    assert isinstance(res, RewardResult)
    assert res.reason == expected_reason, (response[:80], reference, res)
    assert res.score == (1.0 if expected_reason == "correct" else 0.0)
    assert res.reason in REASONS
    return res


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text,content,status",
    [
        ("\\boxed{5}", "5", "ok"),
        ("a \\boxed{1} b \\boxed{2} c", "2", "ok"),  # last boxed wins
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", "ok"),  # nested braces
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", "ok"),  # escaped braces do not count
        ("$\\boxed 5$", "5", "ok"),
        ("\\boxed 42.", "42", "ok"),
        ("\\boxed {7}", "7", "ok"),
        ("\\fbox{C}", "C", "ok"),
        ("\\boxed{1} and \\fbox{2}", "2", "ok"),
        ("\\fbox{1} and \\boxed{2}", "2", "ok"),
        ("\\boxed{\\boxed{3}}", "3", "ok"),
        ("\\boxed{4} (I used \\boxed.)", "4", "ok"),  # a bare mention is skipped
        ("\\boxed{}", "", "ok"),
        ("no box here", None, "no_boxed"),
        ("\\boxedx{5}", None, "no_boxed"),  # another control word
        ("\\boxed{12", None, "parse_error"),  # never closed
        ("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 10) + "}", None, "too_long"),
    ],
)
def test_extract_last_boxed(text, content, status):
    assert extract_last_boxed(text) == (content, status)


# ----------------------------------------------------------------------------- math equivalence
@pytest.mark.parametrize(
    "answer,reference",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("50\\%", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "1/2"),
        ("\\tfrac12", "0.5"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("2√3", "2\\sqrt{3}"),
        ("(1,2]", "(1,2]"),
        ("[1, 2)", "[1,2)"),
        ("x<3", "(-\\infty, 3)"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("x=3", "3"),
        ("3", "x=3"),
        ("y=1+2x", "y=2x+1"),
        ("5 cm", "5"),
        ("5\\text{ cm}", "5"),
        ("5\\,\\mathrm{cm}^2", "5"),
        ("30^\\circ", "30"),
        ("30°", "30"),
        ("45", "45^\\circ"),
        ("2\\pi", "2\\pi"),
        ("\\pi/6", "\\frac{\\pi}{6}"),
        ("6.283185", "2\\pi"),
        ("1,000", "1000"),
        ("3.0", "3"),
        ("\\$5", "5"),
        ("−1", "-1"),  # unicode minus
        ("\\left(\\frac{1}{2}\\right)", "0.5"),
        ("\\text{Yes}", "yes"),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("12", "\\boxed{12}"),  # reference given boxed
        ("12", "$12$"),
        ("\\varnothing", "\\emptyset"),
        ("∅", "\\emptyset"),
        ("0.\\overline{3}", "\\frac{1}{3}"),  # repeating decimals
        ("0.1\\overline{6}", "1/6"),
        ("1.\\overline{142857}", "\\frac{8}{7}"),
        ("\\frac{1}{3}", "0.\\overline{3}"),
        ("\\approx 3.14", "3.14"),  # a leading "about"
        ("≈2.5", "2.5"),
        ("3.14", "\\approx 3.14"),
        ("two", "2"),  # a number word as the whole answer
        ("\\text{Three}", "3"),
        ("12", "twelve"),
        ("5 dollars", "5"),  # a number with plain unit words
        ("12 square units", "12"),
        ("50 percent", "0.5"),
        ("7", "7 apples"),
        ("30^\\circ", "\\frac{\\pi}{6}"),  # degrees against radians
        ("\\frac{\\pi}{3}", "60°"),
        ("180^\\circ", "\\pi"),
        ("\\cos 60^\\circ", "\\frac12"),  # trigonometry of degrees (math-verify reads cos(60 radians))
        ("\\sin(30^{\\circ})", "0.5"),
        ("\\tan 45\\degree", "1"),
        ("1e3", "1000"),  # math-verify reads 1e3 as 1*e*3
        ("1.5e-3", "0.0015"),
        ("8\\sqrt{2}", "11.31"),  # a rounded reference: exact answers, and more precise decimals, round to it
        ("x = 8\\sqrt{2}", "11.31"),
        ("8\\sqrt{2}\\text{ cm}", "11.31\\text{ cm}"),
        ("11.3137", "11.31"),
        ("6\\pi", "18.85"),
        ("2\\sqrt{3}", "3.464"),
        ("\\overline{AB}", "AB"),  # a segment by its name
        ("Democrats", "democrats"),  # words are text: any case, spaces and hyphens aside
        ("\\text{united states}", "United States"),
        ("north-east", "north east"),
        ("5 m/s", "5"),  # compound units
        ("5 km/h", "5"),
    ],
)
def test_math_equivalent(answer, reference):
    check(boxed(answer), reference, "correct")


@pytest.mark.parametrize(
    "answer,reference",
    [
        ("\\frac{1}{3}", "0.5"),
        ("0.333", "\\frac{1}{3}"),  # math compares floats to 6 places
        ("(1,2]", "[1,2)"),
        ("\\{1,2\\}", "\\{1,3\\}"),
        ("x=4", "3"),
        ("3.14", "\\pi"),
        ("\\sqrt{3}", "\\sqrt{2}"),
        ("-5", "5"),
        ("\\text{No}", "yes"),
        ("y=2x", "y=2x+1"),
        ("0.\\overline{3}", "0.33"),
        ("0.\\overline{3}", "\\frac{1}{9}"),
        ("two", "3"),
        ("\\approx 3.2", "3.14"),
        ("2 pi", "2"),  # words that change the value are not units
        ("5 thousand", "5"),
        ("3 and 4", "3"),
        ("6 dollars", "5"),
        ("30", "\\frac{\\pi}{6}"),  # no degree sign: not an angle
        ("0.5236", "30^\\circ"),  # radians only as an expression of pi
        ("30^\\circ", "\\frac{\\pi}{5}"),
        ("\\cos 60^\\circ", "\\frac{\\sqrt{3}}{2}"),
        ("1e3", "100"),
        ("11.32", "11.31"),  # a rounded reference matches within half a unit of its last place...
        ("11.3", "11.31"),  # ...never a less precise answer
        ("-11.3137", "11.31"),
        ("1.04", "1.0"),  # ...and only with 3 significant digits: "1.0" may well be exact
        ("0.54", "0.5"),
        ("6.28", "2\\pi"),  # rounding an exact reference is not the answer
        ("\\overline{AB}", "AC"),
        ("act", "cat"),  # as products of symbols these would be equal
        ("listen", "silent"),
        ("dog", "God"),
        ("mitochondrion", "mitochondria"),
    ],
)
def test_math_not_equivalent(answer, reference):
    check(boxed(answer), reference, "wrong")


# ----------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize(
    "answer",
    [
        "C", "(C)", "C.", "C)", "[C]", "C:", "c", "(c)", "c)", "option C", "Option (C)", "Answer: C",
        "\\text{C}", "\\text{(C)}", "\\textbf{C}", "\\mathrm{C}", "C: 12 cm", "C. 12", "(C) 12", "\\text{C: twelve}",
    ],
)
def test_choice_correct(answer):
    check(boxed(answer), "C", "correct")  # inferred from a lone capital letter
    check(boxed(answer), "(C)", "correct", answer_type="multiple_choice")
    check(boxed(answer), "C", "correct", answer_type="choice")


@pytest.mark.parametrize("answer", ["B", "(B)", "b", "option B", "B: 12 cm", "12", "CD", "A, C", "a triangle"])
def test_choice_wrong(answer):
    check(boxed(answer), "C", "wrong")


def test_choice_multi_letter_reference():
    check(boxed("A, C"), "A, C", "correct", answer_type="multiple_choice")
    check(boxed("C,A"), "AC", "correct", answer_type="multiple_choice")
    check(boxed("A"), "AC", "wrong", answer_type="multiple_choice")


def test_choice_reference_with_option_text():
    check(boxed("B"), "B. 12 cm", "correct", answer_type="multiple_choice")
    check(boxed("(B)"), "(B) 12 cm", "correct", answer_type="multi-choice")
    check(boxed("C"), "B. 12 cm", "wrong", answer_type="multiple_choice")


def test_odd_answer_types():
    check(boxed("5"), "5", "correct", answer_type=float("nan"))  # e.g. a missing value from a table
    check(boxed("(C)"), "C", "correct", answer_type="Multiple Choice")
    check(boxed("5"), "5", "correct", answer_type="something_new")


def test_choice_reference_is_option_text_falls_back_to_math():
    check(boxed("12"), "12", "correct", answer_type="multiple_choice")


def test_explicit_math_type_does_not_infer_choice():
    # "C" as a constant in a math answer: letter spellings are not equivalent to it.
    check(boxed("option C"), "C", "wrong", answer_type="math")
    check(boxed("C"), "C", "correct", answer_type="math")


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "answer,reference,reason",
    [
        ("12.0001", "12", "correct"),  # rel err 8e-6 <= 1e-4
        ("12.01", "12", "wrong"),  # rel err 8e-4
        ("3.1416", "3.14159", "correct"),
        ("3.14", "\\pi", "wrong"),  # 5e-4 relative
        ("3.14159", "\\pi", "correct"),
        ("50\\%", "0.5", "correct"),
        ("50\\%", "50", "correct"),
        ("0.12", "12\\%", "correct"),
        ("12", "12\\%", "correct"),
        ("1,000", "1000", "correct"),
        ("3\\times 10^{8}", "300000000", "correct"),
        ("x = 2.5", "2.5", "correct"),
        ("2.5 \\text{ m}", "2.5", "correct"),
        ("\\frac{1}{3}", "0.33333", "correct"),
        ("-\\frac{7}{2}", "-3.5", "correct"),
        ("1e-9", "0", "correct"),  # absolute tolerance 1e-8 at 0
        ("1e-7", "0", "wrong"),
        ("abc", "3", "wrong"),
        ("\\sqrt{2}", "1.41421", "correct"),
        ("2 pi", "2", "wrong"),  # "pi" is no unit
        ("2\\pi", "6.28", "correct"),  # a rounded reference
        ("3.46", "2\\sqrt{3}", "wrong"),
    ],
)
def test_number_tolerance(answer, reference, reason):
    check(boxed(answer), reference, reason, answer_type="number")


def test_number_type_with_non_numeric_reference_uses_math():
    check(boxed("x+1"), "1+x", "correct", answer_type="numeric")


# ----------------------------------------------------------------------------- reason codes
def test_reason_codes():
    check("the answer is 5", "5", "no_boxed")
    check(boxed(""), "5", "empty_boxed")
    check(boxed("5"), "5", "truncated", finished=False)
    check("\\boxed{" + "1" * 5000 + "}", "5", "too_long")
    check("\\boxed{5", "5", "parse_error")
    check(boxed("5"), "", "bad_reference")
    check(boxed("5"), None, "bad_reference")
    check(boxed("9^{9^{9^{9}}}"), "5", "too_complex")
    check(boxed("\\frac{" * 20 + "1" + "}{2}" * 20), "5", "too_complex")
    res = check(None, "5", "error")
    assert res.answer is None
    assert check(boxed("5"), 5, "correct").answer == "5"  # numeric reference accepted


def test_result_is_frozen():
    res = score(boxed("1"), "1")
    with pytest.raises(Exception):
        res.score = 0.0  # type: ignore[misc]
    assert res.correct


def test_score_off_the_main_thread():
    # No SIGALRM there (signals are main-thread only): still scores, without an in-process timer.
    import threading

    out = []
    th = threading.Thread(target=lambda: out.append(score(boxed("\\frac{2}{4}"), "0.5", timeout_s=1.0)))
    th.start()
    th.join(30)
    assert out and out[0].reason == "correct"


def test_in_process_timer(monkeypatch):
    # A check that runs too long is cut by the SIGALRM timer in the main thread.
    def slow(*a, **k):
        time.sleep(5)

    monkeypatch.setattr(R, "_score_math", slow)
    t = time.perf_counter()
    res = score(boxed("x+1"), "1+x", timeout_s=0.3)
    assert res.reason == "timeout" and res.score == 0.0
    assert time.perf_counter() - t < 2.0


# ----------------------------------------------------------------------------- adversarial inputs
ADVERSARIAL = {
    "huge_no_box": "x" * 10_000_000,
    "huge_then_box": "y" * 10_000_000 + "\\boxed{3}",
    "box_then_huge": "\\boxed{3}" + "z" * 10_000_000,
    "many_boxed": "\\boxed" * 2_000_000,
    "many_boxed_braces": "\\boxed{" * 1_000_000,
    "deep_braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "frac_10k": "\\boxed{" + "\\frac{1}{" * 10_000 + "2" + "}" * 10_000 + "}",
    "frac_60": "\\boxed{" + "\\frac{1}{" * 60 + "2" + "}" * 60 + "}",
    "parens_100": "\\boxed{" + "(" * 100 + "1" + ")" * 100 + "}",
    "sqrt_100": "\\boxed{" + "\\sqrt{" * 100 + "2" + "}" * 100 + "}",
    "tower_braced": "\\boxed{9^{9^{9^{9}}}}",
    "tower_plain": "\\boxed{9^9^9^9}",
    "big_exponent": "\\boxed{3^{123456789}}",
    "power_of_power": "\\boxed{(2^{9999})^{9999}}",
    "ten_tower": "\\boxed{10^{10^{10}}}",
    "factorial": "\\boxed{99999999!}",
    "factorial_fact": "\\boxed{(100!)!}",
    "exp_exp": "\\boxed{\\exp(\\exp(\\exp(100)))}",
    "binom": "\\boxed{\\binom{10^{9}}{10^{8}}}",
    "unicode_garbage": "".join(chr(c) for c in range(0x2000, 0x2000 + 3000)) + "\\boxed{\u202e\u0000\ufffd\U0001f600}",
    "surrogates": "\\boxed{\ud800\udfff}",
    "backslashes": "\\boxed{" + "\\" * 999 + "}",
    "long_sum": "\\boxed{" + "+".join(["1"] * 500) + "}",
    "long_symbols": "\\boxed{" + "x" * 1000 + "}",
    "nested_text": "\\boxed{" + "\\text{" * 6 + "A" + "}" * 6 + "}",
    "regex_bait_units": "\\boxed{5" + " a" * 500 + "!}",
    "regex_bait_mc": "\\boxed{A" + " " * 1000 + "!}",
    "regex_bait_digits": "\\boxed{" + "1" * 1000 + "}",
    "big_matrix": "\\boxed{\\begin{pmatrix}" + "&".join(["1"] * 300) + "\\end{pmatrix}}",
    "latex_env_bomb": "\\boxed{\\begin{array}" * 50,
    "int_bomb": "\\boxed{\\int_0^{10^{10}} e^{x^{x}} dx}",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("answer_type", [None, "number", "multiple_choice"])
def test_adversarial_bounded(name, answer_type):
    text = ADVERSARIAL[name]
    t = time.perf_counter()
    res = score(text, "3", answer_type=answer_type, timeout_s=1.0)
    elapsed = time.perf_counter() - t
    assert isinstance(res, RewardResult) and res.reason in REASONS
    assert 0.0 <= res.score <= 1.0
    if name not in ("huge_then_box", "box_then_huge"):
        assert res.score == 0.0, (name, res)
    assert elapsed < 3.0, (name, elapsed, res)  # 1 s timer + slack for a loaded machine


def test_adversarial_reference_is_safe():
    t = time.perf_counter()
    res = score(boxed("1"), "\\frac{1}{" * 3000 + "2" + "}" * 3000, timeout_s=2.0)
    assert res.score == 0.0 and res.reason == "bad_reference"
    res = score(boxed("1"), "9^{9^{9^{9}}}", timeout_s=1.0)
    assert res.score == 0.0
    assert time.perf_counter() - t < 3.0


def test_never_evaluates_code():
    # Python/sympy code in an answer is text, not code.
    for payload in ["__import__('os').system('touch /tmp/ovr_pwned')", "eval('1+1')", "lambda: 2"]:
        res = score(boxed(payload), "2")
        assert res.score == 0.0
    import os

    assert not os.path.exists("/tmp/ovr_pwned")
