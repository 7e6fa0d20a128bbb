"""Rule-based verifiable reward for the RL stage and evaluation's scores (binary, no format reward).

A response earns 1.0 when it finished normally and its *last* ``\\boxed{...}`` (or ``\\fbox{...}``)
answer matches the reference, else 0.0.  Every outcome carries a short reason code for logging.

Entry points
------------
``score(response, reference, *, answer_type=None, finished=True) -> RewardResult``
    Pure function, in-process.  Never raises, never evaluates model text as code.
``RewardPool(num_workers, timeout_s)`` (pool.py)
    Scores batches in worker processes; a worker that hangs past ``timeout_s`` is killed and
    replaced, its item scored 0 with reason ``"timeout"``.  ``num_workers=0`` scores in-process.

Comparison by ``answer_type``
-----------------------------
* ``None`` (or unknown): infer.  A reference that is a lone capital letter ("C", "(C)", "C.")
  is a multiple-choice reference; anything else is compared as math.
* ``"multiple_choice"`` / ``"choice"`` / ``"mc"`` / ``"option"``: letters.  The response may
  spell the letter "B", "(B)", "[B]", "B.", "B)", "B:", "option B", "Answer: (B)",
  "\\text{B}", "\\textbf{(B)}", "B: <choice text>", "(B) <choice text>"; a lowercase lone
  letter ("b") counts too.  Several letters ("A, C", "AC") are compared as a set when the
  reference also names several.  With a declared choice type the reference may carry the
  option text ("B. 12 cm"); if it names no letter at all, falls back to math.
* ``"number"`` / ``"numeric"`` / ``"float"``: numbers with tolerance
  ``|pred - ref| <= max(REL_TOL * |ref|, ABS_TOL)`` with ``REL_TOL = 1e-4`` (relative to the
  reference) and ``ABS_TOL = 1e-8``.  A response percentage "50%" matches both 50 and 0.5.
  Units, "x =", thousands separators, ``\\frac``, ``a \\times 10^{k}`` are understood.
  Falls back to math when the reference is not a number.
* ``"math"`` (and any other value, e.g. "expression", "integer", "free_form"): mathematical
  equivalence by math-verify (fractions, decimals to 6 places, percentages, units, LaTeX
  forms, sets, intervals, relations such as "x=3" vs "3", matrices), after a cheap
  normalised-string equality test.  Before any comparison: repeating decimals
  ("0.1\\overline{6}") become fractions, a leading "\\approx" is dropped, an answer that is
  one number word ("two", "\\text{Twelve}", up to twenty and the tens) becomes its digits, and a
  number followed by plain words ("5 dollars", "50 percent") is a number with a unit, unless a
  word changes the value ("2 pi", "5 thousand"); an answer of words against a reference of
  words ("Democrats", "north-east"; a word has three letters, not all capitals) is compared as
  text, ignoring case, spaces and hyphens (math-verify reads words as products of symbols: "act"
  would equal "cat"); trigonometric functions of degrees
  ("\\cos 60^\\circ") are written in radians (math-verify reads cos of 60 radians) and a
  segment "\\overline{AB}" is AB.
* The form of the answers decides before any value is compared, where the normalisation would
  discard what tells them apart: two different units ("5 cm" against "5 m"; a unit left out, or one
  not in the table, such as "apples", is not compared); two different unknowns ("x = 2" against
  "y = 2"); points named by capitals ("ABC", "\\angle ABC") are names, equal read backwards (a
  triangle's in any order), not the product A*B*C; an explicit set "\\{1, 2\\}" is neither a pair
  nor an interval; a one-column or one-row matrix against a tuple "(1, 4)" (or "\\langle 1, 4\\rangle")
  is compared entry by entry; an answer equation whose numeric sides differ ("3 = 7") is wrong
  (math-verify would keep its right-hand side); a choice answer naming several letters ("C or D",
  "(A) and (C)") names all of them.
* A reference with several boxed parts ("\\boxed{3} apples and \\boxed{7} pears") asks for all of them,
  in order: as the parts of the last boxed answer ("\\boxed{3, 7}", "\\boxed{(3; 7)}") or as the last
  boxed answers ("\\boxed{3} ... \\boxed{7}"); a part repeated verbatim counts once
  (:func:`reference_parts`).  ``ovr-hpc grade --references-only`` lists such references.
* LaTeX is normalised token by token: a row break ``\\\\`` stays one (MATH's spaced
  ``\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}``), the negative thin space ``\\!`` joins (MATH's
  thousands separator "14,\\!916"), a lone trailing backslash is dropped.
* Then a "wrong" verdict gets a second look by value: plain numbers spelled differently ("1e3"
  and 1000), degrees against radians ("30^\\circ" and "\\frac{\\pi}{6}"), and a rounded
  reference (a decimal with a decimal place and three significant digits, "11.31") matched by an
  exact answer ("8\\sqrt{2}") or a more precise decimal within half a unit of its last place.
  Rounding an exact reference ("3.14" for \\pi) stays wrong.

Safety
------
* Only the last ``MAX_RESPONSE_CHARS`` characters of a response are inspected; the extracted
  answer may be at most ``MAX_ANSWER_CHARS`` long (else ``"too_long"``); answers nested deeper
  than ``MAX_NESTING`` brackets, numeric power towers, 7+ digit exponents and 6+ digit
  factorials are refused (``"too_complex"``) before any parsing: they are what makes the
  LaTeX parser or sympy blow up.
* Only math-verify's LaTeX extraction is used (its plain-expression extractor calls sympy's
  ``parse_expr``, which evaluates code); references are parsed the same way.
* Time bound in-process: ``score(..., timeout_s=5.0)`` arms a SIGALRM interval timer when
  called from the main thread (math-verify's own signal timeouts are switched off: they need
  the main thread, take whole seconds and report a timeout as a plain "wrong").  A signal
  cannot interrupt one long C call (a huge big-integer operation inside sympy), so the hard
  bound is the :class:`RewardPool`, which kills the worker.  Off the main thread ``score`` has
  no timer.
* Reason codes: see :data:`REASONS`.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from ovr_hpc.grading.choices import CHOICE_TYPES, choice_letters, multi_letter_reference
from ovr_hpc.grading.text import (NOT_UNIT_WORDS, ROW_BREAK, canon, clean, extract_boxed_parts, number_word,
                                  strip_text_commands, unwrap_text, word_answer)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- limits
MAX_REFERENCE_CHARS = 4096
MAX_NESTING = 8  # ( [ { nesting; the antlr LaTeX parser gets exponentially slow past ~10
REL_TOL = 1e-4
ABS_TOL = 1e-8
DEFAULT_TIMEOUT_S = 5.0
_NUMBER_TYPES = {"number", "numeric", "numerical", "float", "real"}
# Explicitly "math": never reinterpreted as a letter even when the reference is one capital.
_MATH_TYPES = {"math", "expression", "latex", "formula", "integer", "int", "free_form", "text", "list"}

REASONS = (
    "correct",  # score 1
    "wrong",  # parsed, not equivalent
    "no_boxed",  # no \boxed / \fbox answer
    "empty_boxed",  # \boxed{}
    "truncated",  # finished=False (length cut, abort)
    "too_long",  # boxed answer longer than MAX_ANSWER_CHARS
    "too_complex",  # refused by the pre-screen (deep nesting, power tower, huge exponent/factorial)
    "parse_error",  # unbalanced braces or math-verify could not parse the answer
    "bad_reference",  # reference empty / not a string / too long
    "timeout",  # time bound hit (in-process timer or pool kill)
    "error",  # unexpected exception while scoring (also MemoryError under the pool's limit)
    "crashed",  # pool worker died while scoring this item
)


@dataclass(frozen=True)
class RewardResult:
    """``score`` in [0, 1]; ``reason`` one of :data:`REASONS`; ``answer`` the extracted boxed
    text (at most 200 chars, for logging) or None."""

    score: float
    reason: str
    answer: str | None = None

    @property
    def correct(self) -> bool:
        return self.reason == "correct"


def result_of(reason: str, answer: str | None = None) -> RewardResult:
    if answer is not None and len(answer) > 200:
        answer = answer[:200]
    return RewardResult(1.0 if reason == "correct" else 0.0, reason, answer)


# ----------------------------------------------------------------------------- time bound
class _RewardTimeout(BaseException):
    """Raised by our SIGALRM handler.  BaseException on purpose: sympy and math-verify catch
    ``Exception`` all over the place and would swallow an ordinary exception."""


_TIMER_REPEAT_S = 0.05  # after the first expiry, fire again every 50 ms (see below)


def call_with_time_limit(fn: Callable[[], RewardResult], timeout_s: float | None) -> RewardResult:
    """Run ``fn()``; if it takes longer than ``timeout_s`` return a "timeout" result.

    SIGALRM interval timer, main thread only (elsewhere: no bound, ``fn()`` runs as is).  The
    timer keeps firing every 50 ms after expiry because some library code swallows even
    BaseException (bare ``except:``); the handler raises only while the interrupted frame is not
    this function's own, so the exception can never escape from our clean-up code."""
    usable = (
        timeout_s is not None
        and timeout_s > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        return fn()
    own_code = call_with_time_limit.__code__
    armed = [True]

    def handler(signum, frame):
        if armed[0] and frame is not None and frame.f_code is not own_code:
            raise _RewardTimeout()

    old_handler = signal.signal(signal.SIGALRM, handler)
    prev_delay, _ = signal.setitimer(signal.ITIMER_REAL, float(timeout_s), _TIMER_REPEAT_S)
    started = time.monotonic()
    result = None
    try:
        result = fn()
    except _RewardTimeout:
        result = None
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if prev_delay > 0:  # somebody else's timer was running: re-arm what is left of it
            left = prev_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))
    return result if result is not None else result_of("timeout")


# ----------------------------------------------------------------------------- safety pre-screen
_TOWER_RES = (
    re.compile(r"\^\{?\(?[0-9.]+\)?\}?\^"),  # 9^9^9, 9^{9}^{9}
    re.compile(r"\^\{\(?[0-9.]+\)?\^"),  # 9^{9^{..}}
    re.compile(r"\^\{?\(?\d{7,}"),  # 2^{12345678}
    re.compile(r"\d{6,}\)?!"),  # 123456!
    re.compile(r"!\)+!"),  # (n!)!
    re.compile(r"\\exp\s*\{?\(?\s*\\exp"),  # exp(exp(..
    re.compile(r"\^\{[^{}]*!"),  # 2^{(12)!}
    re.compile(r"\(\d+\^\{?\d{3,}\}?\)\^\{?\(?\d{3,}"),  # (2^{9999})^{9999}
)
_BIG_LITERAL_RE = re.compile(r"\d{7,}")
# With a 7+ digit literal around, these make sympy build astronomically large integers in
# single C calls that no signal can interrupt (e.g. \binom{x^{2.5}}{-2637690055}).
_EXPLOSIVE_RE = re.compile(r"\\binom|\\choose|\\dbinom|\\tbinom|!|\^|\\Gamma|\\prod")


def _nesting_depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            if depth > best:
                best = depth
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return best


def _too_complex(s: str) -> bool:
    if _nesting_depth(s) > MAX_NESTING:
        return True
    compact = re.sub(r"\s+", "", s)
    if _BIG_LITERAL_RE.search(compact) and _EXPLOSIVE_RE.search(compact):
        return True
    return any(r.search(compact) for r in _TOWER_RES)


# ----------------------------------------------------------------------------- numbers
_NUM = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?"
_PLAIN_NUM_RE = re.compile(r"^(" + _NUM + r")$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{(" + _NUM + r")\}\{(" + _NUM + r")\}$")
_SLASH_RE = re.compile(r"^(" + _NUM + r")\s*/\s*(" + _NUM + r")$")
_SCI_RE = re.compile(r"^(" + _NUM + r")\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{?\s*([+-]?\d{1,4})\s*\}?$")
_ASSIGN_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*(?:=|\\approx|\\approxeq)\s*")
# One character per repetition for letters/spaces: no nested quantifier, so no backtracking blow-up.
_UNIT_TAIL_RE = re.compile(
    r"^(" + _NUM + r")(?:\\(?:text|mathrm|mbox)\s*\{[^{}]*\}|[A-Za-z\u00b5\u03bc/\s]|\^\\circ|\\circ|\^\{?\d\}?)+$"
)


def _num(s: str) -> float | None:
    if not s or s in "+-" or s in (".", "+.", "-."):
        return None
    try:
        v = float(s.replace(",", ""))
    except (ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


_DEGREE_SIGN_RE = re.compile(r"\^\s*\{?\\circ\}?$")


def _bare_number_text(s: str) -> tuple[str, bool, bool]:
    """(text, is_percent, is_degrees): s without text commands, "x =", currency, a trailing % or degree sign."""
    s = strip_text_commands(unwrap_text(clean(s)))
    s = _ASSIGN_RE.sub("", s).strip()
    s = s.replace("\\$", "").replace("\\%", "%").strip()
    pct = s.endswith("%")
    if pct:
        s = s[:-1].strip()
    bare = _DEGREE_SIGN_RE.sub("", s).strip()
    return bare, pct, bare != s


_UNIT_SUFFIX_RE = re.compile(r"\s*\\(?:text|mathrm|mbox)\s*\{[^{}]*\}(?:\s*\^\s*\{?\d\}?)?\s*$")


def _plain_numeral(s: str) -> str | None:
    """The text of one plain decimal number ("11.31", "x = 11.31", "11.31\\text{ cm}", "11.31^\\circ"), else None."""
    bare, _, _ = _bare_number_text(_UNIT_SUFFIX_RE.sub("", clean(s)))
    return bare if _PLAIN_NUM_RE.match(bare) and _num(bare) is not None else None


def _plain_float(s: str) -> tuple[float | None, bool]:
    """(value, is_percent) for plain numeric text, without sympy.  Value None if not plain."""
    s, pct, _ = _bare_number_text(s)
    m = _PLAIN_NUM_RE.match(s)
    if m:
        return _num(m.group(1)), pct
    m = _FRAC_RE.match(s)
    if m:
        a, b = _num(m.group(2)), _num(m.group(3))
        if a is not None and b:
            return (-a / b if m.group(1) == "-" else a / b), pct
    m = _SLASH_RE.match(s)
    if m:
        a, b = _num(m.group(1)), _num(m.group(2))
        if a is not None and b:
            return a / b, pct
    m = _SCI_RE.match(s)
    if m:
        a = _num(m.group(1))
        if a is not None:
            try:
                v = a * 10.0 ** int(m.group(2))
            except OverflowError:
                return None, pct
            return (v if math.isfinite(v) else None), pct
    m = _UNIT_TAIL_RE.match(s)
    if m and not NOT_UNIT_WORDS.intersection(re.findall(r"[a-z]+", s[m.end(1):].lower())):   # "2 pi" is no unit
        return _num(m.group(1)), pct
    return None, pct


def _sympy_float(expr: Any) -> float | None:
    try:
        import sympy

        if isinstance(expr, sympy.Eq) or (isinstance(expr, sympy.Basic) and expr.is_Relational):
            expr = expr.rhs
        if not isinstance(expr, sympy.Basic):
            return None
        expr = expr.doit() if expr.has(sympy.UnevaluatedExpr) else expr
        if not expr.is_number:
            return None
        v = complex(expr.evalf(30))
        if abs(v.imag) > 1e-12:
            return None
        v = v.real
        return v if math.isfinite(v) else None
    except Exception:
        return None


def _close(pred: float, ref: float) -> bool:
    return abs(pred - ref) <= max(REL_TOL * abs(ref), ABS_TOL)


def _value(s: str, parse: Callable[[str], list]) -> float | None:
    """The real value of a plain number or, parsed, of a closed-form expression (units allowed)."""
    numeral = _plain_numeral(s)
    return _num(numeral) if numeral is not None else _sympy_float(_first(parse(s)))


def _places(numeral: str) -> tuple[int, int]:
    """(decimal places, significant digits) of a decimal numeral: "11.31" -> (2, 4), "0.0450" -> (4, 3)."""
    whole, _, fraction = numeral.lstrip("+-").replace(",", "").partition(".")
    return len(fraction), len((whole + fraction).lstrip("0"))


def _equal_by_value(answer: str, ref: str) -> bool:
    """A second look at a 'wrong' verdict, by numeric value (percentages are left to the first look):
    - plain numbers spelled differently ("1e3" and 1000: math-verify reads "1e3" as 1*e*3);
    - degrees against radians ("30^\\circ" and "\\frac{\\pi}{6}");
    - a rounded reference: a decimal reference with at least one decimal place and three significant
      digits ("11.31", as in geometry sets) matches an exact answer ("8\\sqrt{2}") or a more precise
      decimal ("11.3137") within half a unit of its last place. A less precise decimal ("11.3") is at
      least a whole unit away, so it stays wrong; so does rounding an exact reference ("3.14" for \\pi)."""
    _, answer_pct, answer_degrees = _bare_number_text(answer)
    _, ref_pct, ref_degrees = _bare_number_text(ref)
    if answer_pct or ref_pct:
        return False
    ref_numeral = _plain_numeral(ref)
    ref_places, ref_digits = _places(ref_numeral) if ref_numeral and "e" not in ref_numeral.lower() else (0, 0)
    rounded_ref = ref_places >= 1 and ref_digits >= 3
    if answer_degrees == ref_degrees and not rounded_ref:   # only other spellings of one plain number
        answer_numeral = _plain_numeral(answer)
        return (answer_numeral is not None and ref_numeral is not None
                and abs(_num(answer_numeral) - _num(ref_numeral)) <= 1e-9 * max(1.0, abs(_num(ref_numeral))))
    answer_value, ref_value = _value(answer, _mv_parse), _value(ref, _gold)
    if answer_value is None or ref_value is None:
        return False
    if answer_degrees != ref_degrees:
        degrees, radians, expression = ((answer_value, ref_value, ref) if answer_degrees
                                        else (ref_value, answer_value, answer))
        return "\\pi" in clean(expression) and _close(math.radians(degrees), radians)
    return abs(answer_value - ref_value) <= 0.5 * 10.0 ** -ref_places * (1 + 1e-9)


# ----------------------------------------------------------------------------- math-verify
_MV: dict[str, Any] = {}


def _mv():
    """Import math-verify lazily (sympy import is ~1 s) and switch off its signal timeouts."""
    if not _MV:
        import math_verify
        import math_verify.grader as _grader
        import math_verify.parser as _parser
        from math_verify import LatexExtractionConfig

        _parser.TIMEOUT_WARNING_SHOWN = True  # we pass timeouts=None on purpose
        _grader.TIMEOUT_WARNING_SHOWN = True
        _MV["parse"] = math_verify.parse
        _MV["verify"] = math_verify.verify
        _MV["config"] = [LatexExtractionConfig(boxed_match_priority=0)]
    return _MV


def _mv_parse(s: str) -> list:
    mv = _mv()
    return mv["parse"](
        "\\boxed{" + s + "}",
        extraction_config=mv["config"],
        fallback_mode="no_fallback",
        parsing_timeout=None,
    )


def _mv_verify(gold: list, pred: list) -> bool:
    return bool(
        _mv()["verify"](gold, pred, timeout_seconds=None, allow_set_relation_comp=True)
    )


_GOLD_CACHE: "OrderedDict[str, list]" = OrderedDict()  # 16 samples share one reference


def _gold(ref: str) -> list:
    hit = _GOLD_CACHE.get(ref)
    if hit is not None:
        _GOLD_CACHE.move_to_end(ref)
        return hit
    parsed = _mv_parse(ref)
    _GOLD_CACHE[ref] = parsed
    if len(_GOLD_CACHE) > 512:
        _GOLD_CACHE.popitem(last=False)
    return parsed


def reference_parts(reference: str) -> list[str]:
    """The answer(s) a reference asks for, normalised: the contents of its ``\\boxed`` parts, in order,
    without repeats (a solution text that boxes its answer twice asks for one answer), or the whole
    reference when it has no box.  Several parts ("\\boxed{3} apples and \\boxed{7} pears") mean the
    response must give all of them (see :func:`score`).  Empty list: nothing to grade against."""
    ref = reference.strip()
    contents = [ref]
    if "\\boxed" in ref or "\\fbox" in ref:
        found, status = extract_boxed_parts(ref)
        if status == "ok" and found:
            contents = found
    parts: list[str] = []
    for c in contents:
        part = number_word(clean(c))
        if part and canon(part) not in {canon(q) for q in parts}:
            parts.append(part)
    return parts


def _split_parts(s: str, *, keep_thousands: bool) -> list[str]:
    """``s`` split at its top-level separators (",", ";", "and"), outside any brackets.  With
    ``keep_thousands`` a comma between a digit and a group of three digits ("14,916") does not split."""
    s = re.sub(r"\s*\\text\s*\{\s*and\s*\}\s*|\s+and\s+", ",", s)
    pieces, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            if s.startswith("\\{", i) or s.startswith("\\langle", i):
                depth += 1
            elif s.startswith("\\}", i) or s.startswith("\\rangle", i):
                depth -= 1
            i += 2
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch in ",;" and depth == 0:
            thousands = (ch == "," and i > 0 and s[i - 1].isdigit()
                         and re.match(r"\d{3}(?![\d.])", s[i + 1:i + 5]) is not None)
            if not (keep_thousands and thousands):
                pieces.append(s[start:i].strip())
                start = i + 1
        i += 1
    pieces.append(s[start:].strip())
    return [p for p in pieces if p]


REFERENCE_VERDICTS = ("ok", "multi_box", "empty", "too_long", "unbalanced", "unparsed", "timeout")


def check_reference(reference: Any, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> str:
    """Audit one reference alone; one of :data:`REFERENCE_VERDICTS`.

    "ok": math-verify parses it, or it is a choice letter or words (compared as text); "multi_box":
    several boxed parts, so a response must give all of them (see :func:`reference_parts`); "empty":
    nothing to grade against (also a non-string); "too_long": over MAX_REFERENCE_CHARS; "unbalanced":
    a ``\\boxed{`` never closed; "unparsed": math-verify reads no answer in it, so responses are
    compared with it as plain text only; "timeout": parsing it ran past ``timeout_s``."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = repr(reference)
    if not isinstance(reference, str) or not reference.strip():
        return "empty"
    if len(reference) > MAX_REFERENCE_CHARS:
        return "too_long"
    if ("\\boxed" in reference or "\\fbox" in reference) and extract_boxed_parts(reference)[1] == "parse_error":
        return "unbalanced"
    parts = reference_parts(reference)
    if not parts:
        return "empty"

    def parse_all() -> RewardResult:
        for part in parts:
            readable = (choice_letters(part, strict=True) or word_answer(part) is not None
                        or (not _too_complex(part) and _gold(part)))
            if not readable:
                return result_of("parse_error")
        return result_of("correct")

    try:
        res = call_with_time_limit(parse_all, timeout_s)
    except Exception:
        return "unparsed"
    if res.reason == "timeout":
        return "timeout"
    if res.reason != "correct":
        return "unparsed"
    return "multi_box" if len(parts) > 1 else "ok"


# ----------------------------------------------------------------------------- scoring
def score(
    response: str,
    reference: str,
    *,
    answer_type: str | None = None,
    finished: bool = True,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> RewardResult:
    """Binary reward of ``response`` against ``reference``; see the module docstring.

    ``finished=False`` (length cut / aborted) scores 0 with reason "truncated" without looking
    at the text.  ``timeout_s`` bounds the check with SIGALRM when called from the main thread
    (None: no in-process bound; the pool supplies the hard one).  Never raises for bad input."""
    if not finished:
        return result_of("truncated")
    try:
        return call_with_time_limit(
            lambda: _score_impl(response, reference, answer_type), timeout_s
        )
    except Exception:  # MemoryError, RecursionError, anything a library throws at us
        logger.debug("reward scoring failed", exc_info=True)
        return result_of("error")


def _score_impl(response: Any, reference: Any, answer_type: str | None) -> RewardResult:
    if not isinstance(reference, str):
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = repr(reference)
        else:
            return result_of("bad_reference")
    if not isinstance(response, str):
        return result_of("error")
    if len(reference) > MAX_REFERENCE_CHARS:
        return result_of("bad_reference")
    refs = reference_parts(reference)
    if not refs:
        return result_of("bad_reference")

    boxes, status = extract_boxed_parts(response, limit=len(refs))
    if status != "ok":
        return result_of(status)
    raw = boxes[-1]
    kind = answer_type.strip().lower().replace(" ", "_").replace("-", "_") if isinstance(answer_type, str) else ""
    if len(refs) == 1:
        return result_of(_grade(raw, refs[0], kind), raw)
    # A reference of several boxed parts: every part, in order, either as the parts of the last boxed
    # answer ("\boxed{3, 7}") or as the last boxed answers ("\boxed{3} ... \boxed{7}").
    whole = clean(raw)
    if _outer_bracket(whole) in ("tuple", "interval"):  # "(3, 7)", "[3, 7]": the parts as a tuple
        whole = whole[1:-1]
    candidates = [p for p in (_split_parts(whole, keep_thousands=False), _split_parts(whole, keep_thousands=True))
                  if len(p) == len(refs)]
    if len(boxes) == len(refs):
        candidates.append(boxes)
    verdict = "wrong"
    for answers in candidates:
        verdicts = [_grade(a, r, kind) for a, r in zip(answers, refs)]
        verdict = next((v for v in verdicts if v != "correct"), "correct")
        if verdict == "correct":
            break
    return result_of(verdict, raw)


def _grade(raw: str, ref: str, kind: str) -> str:
    """Verdict (a reason code) of one extracted answer ``raw`` against one normalised reference part."""
    answer = number_word(clean(raw))
    if not answer:
        return "empty_boxed"
    infer = kind not in _NUMBER_TYPES and kind not in _MATH_TYPES
    if kind in CHOICE_TYPES or (infer and choice_letters(ref, strict=True)):
        if kind in CHOICE_TYPES:  # declared choice: the reference may carry the option text
            ref_letters = choice_letters(ref) or multi_letter_reference(ref)
        else:
            ref_letters = choice_letters(ref, strict=True)
        if ref_letters:
            return "correct" if choice_letters(answer) == ref_letters else "wrong"
        # choice question whose reference is the option text: compare as math below

    # Cheap exact match on the normalised text (no parser involved).
    if canon(answer) == canon(ref):
        return "correct"
    # Words against words ("Democrats"): compared as text. math-verify would read them as products of
    # symbols: case-sensitive, and "act" equal to "cat".
    answer_words, ref_words = word_answer(answer), word_answer(ref)
    if answer_words is not None and ref_words is not None:
        return "correct" if answer_words == ref_words else "wrong"
    if _too_complex(answer):
        return "too_complex"
    structural = _structural_verdict(answer, ref, kind)
    if structural is not None:
        return structural

    verdict = _score_number(answer, ref) if kind in _NUMBER_TYPES else None
    if verdict is None:
        verdict = _score_math(answer, ref)
    if verdict in ("wrong", "parse_error") and _equal_by_value(answer, ref):
        verdict = "correct"
    return verdict


def _structural_verdict(answer: str, ref: str, kind: str) -> str | None:
    """'wrong' (or 'correct') where the form of the answers decides before any value is compared, else
    None.  Each rule is a fact the value comparisons below cannot see because their normalisation
    discards it: the unit, the name of the unknown, the order of a point's letters, braces, a vector's
    notation."""
    answer_unit, ref_unit = _unit_of(answer), _unit_of(ref)
    if answer_unit and ref_unit and answer_unit != ref_unit:  # "5 cm" is not "5 m"; "5" is (unit left out)
        return "wrong"
    answer_var, ref_var = _assigned_name(answer), _assigned_name(ref)
    if answer_var and ref_var and answer_var != ref_var:  # "x = 2" is not "y = 2"; "2" is
        return "wrong"
    answer_points, ref_points = _point_names(answer), _point_names(ref)
    if answer_points and ref_points:  # "ABC": points' names, not the product A*B*C
        return "correct" if _same_figure(answer_points, ref_points) else "wrong"
    answer_bracket, ref_bracket = _outer_bracket(answer), _outer_bracket(ref)
    if {answer_bracket, ref_bracket} in ({"set", "tuple"}, {"set", "interval"}):
        return "wrong"  # the set {1, 2} is neither the pair (1, 2) nor the interval [1, 2]
    answer_entries, ref_entries = _vector_entries(answer), _vector_entries(ref)
    if answer_entries is not None and ref_entries is not None and (answer_bracket == "vector") != (
            ref_bracket == "vector"):  # (1, 4) against the column vector of 1 and 4: entry by entry
        if len(answer_entries) != len(ref_entries):
            return "wrong"
        verdicts = [_grade(a, r, kind) for a, r in zip(answer_entries, ref_entries)]
        return next((v for v in verdicts if v != "correct"), "correct")
    return None


# ----------------------------------------------------------------------------- units
# Spellings of the units whose mix-up is a wrong answer, by canonical name. Not listed (apples, people,
# "units") means: not compared, a unit left out or named in other words stays right.
_UNIT_NAMES = {
    "mm": "mm millimeter millimetre", "cm": "cm centimeter centimetre", "m": "m meter metre",
    "km": "km kilometer kilometre", "in": "in inch inches", "ft": "ft foot feet", "yd": "yd yard",
    "mi": "mi mile", "s": "s sec second", "min": "min minute", "h": "h hr hour", "day": "day days",
    "week": "week wk", "month": "month", "year": "year yr", "mg": "mg milligram", "g": "g gram gm",
    "kg": "kg kilogram kilo", "lb": "lb pound", "oz": "oz ounce", "ton": "ton tonne t",
    "ml": "ml milliliter millilitre", "l": "l liter litre", "dollar": "dollar usd", "cent": "cent cents",
    "km/h": "km/h kmh kph kmph", "mph": "mph mi/h", "m/s": "m/s", "ft/s": "ft/s",
    "n": "n newton", "j": "j joule", "w": "w watt", "v": "v volt", "a": "amp ampere", "pa": "pa pascal",
    "hz": "hz hertz", "kj": "kj kilojoule", "kw": "kw kilowatt", "cal": "cal calorie",
}
_UNIT_CANON = {spelling: name for name, spellings in _UNIT_NAMES.items() for spelling in spellings.split()}
_UNIT_TEXT_RE = re.compile(
    r"(?:\\(?:text|mathrm|mbox|textrm|operatorname)\s*\{([^{}]*)\}|(?<=[\d\s}])([A-Za-z]+(?:/[A-Za-z]+)?))"
    r"\s*(?:\^\s*\{?\s*([23])\s*\}?|([\u00b2\u00b3]))?\s*$")
_UNIT_VALUE_RE = re.compile(r"^[+-]?(?:\d[\d,]*(?:\.\d*)?|\.\d+|\\frac\{[^{}]*\}\{[^{}]*\}|[\d.]+\s*/\s*[\d.]+)$")


def _unit_of(s: str) -> str | None:
    """The canonical unit of "<number> <unit>" ("5 cm", "5\\text{ cm}^2", "5 square meters"), else None."""
    m = _UNIT_TEXT_RE.search(s)
    if not m:
        return None
    value = s[:m.start()].strip()
    # A unit in a text command follows any value ("2\\pi\\text{ cm}"); bare letters only a plain number
    # ("5 cm"), since "2x" is no unit.
    if not (_UNIT_VALUE_RE.match(value) or (m.group(1) is not None and value and value[-1] not in "+-*/=^_({[,")):
        return None
    words = (m.group(1) if m.group(1) is not None else m.group(2)).strip().lower().split()
    power = m.group(3) or {"\u00b2": "2", "\u00b3": "3"}.get(m.group(4) or "", "")
    if words and words[0] in ("square", "sq", "sq.") and len(words) > 1:
        power, words = "2", words[1:]
    elif words and words[0] == "cubic" and len(words) > 1:
        power, words = "3", words[1:]
    if len(words) != 1:
        return None
    word = re.sub(r"\^\{?([23])\}?$", lambda x: "", words[0]) if not power else words[0]
    if word != words[0]:
        power = words[0][-1]
    name = _UNIT_CANON.get(word) or (_UNIT_CANON.get(word[:-1]) if word.endswith("s") and len(word) > 2 else None)
    if name is None and word.endswith("es") and len(word) > 3:
        name = _UNIT_CANON.get(word[:-2])
    if name is None:
        return None
    return name + ("^" + power if power else "")


# ----------------------------------------------------------------------------- forms
_ASSIGNED_RE = re.compile(r"^\s*([A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)\s*=(?!=)")


def _assigned_name(s: str) -> str | None:
    """The unknown of a single assignment "x = ..." ("x_1 = 2", "\\theta = \\pi"), else None."""
    m = _ASSIGNED_RE.match(s)
    if not m or s.count("=") != 1 or len(_split_parts(s, keep_thousands=True)) != 1:
        return None
    return re.sub(r"[{}\s]", "", m.group(1)).lower()


_POINTS_RE = re.compile(r"^(?:\\(angle|triangle|measuredangle|square)\s*)?\{?\s*([A-Z]{2,8})\s*\}?$")


def _point_names(s: str) -> tuple[str, str] | None:
    """("angle"/"triangle"/"", letters) of a figure named by its points ("AB", "\\angle ABC"), else None."""
    m = _POINTS_RE.match(strip_text_commands(s).strip())
    if not m:
        return None
    prefix = {"measuredangle": "angle"}.get(m.group(1) or "", m.group(1) or "")
    return prefix, m.group(2)


def _same_figure(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """A segment or an angle read backwards is the same ("AB" = "BA", "ABC" = "CBA"); a triangle's
    vertices may come in any order; anything else names another figure."""
    (pa, la), (pb, lb) = a, b
    if pa and pb and pa != pb:
        return False
    if "triangle" in (pa, pb) and len(la) == len(lb) == 3:
        return sorted(la) == sorted(lb)
    return la == lb or la == lb[::-1]


def _outer_bracket(s: str) -> str | None:
    """'set' for "\\{...\\}" (not set-builder), 'tuple' for "(a, b)", 'interval' for "[a, b)" and the
    like, 'vector' for a one-column or one-row matrix, when that bracket encloses the whole answer."""
    s = s.strip()
    if re.match(r"^\\begin\{[pbBvV]?matrix\}", s):
        return "vector" if _vector_entries(s) is not None else None
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        if "|" in inner or "\\mid" in inner or ":" in inner or not _encloses(s, 2):
            return None
        return "set"
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s, 1):
        return "tuple" if s[0] + s[-1] == "()" else "interval"
    return None


def _encloses(s: str, width: int) -> bool:
    """Whether the opening bracket of ``s`` (``width`` characters) closes only at its very end."""
    depth = 0
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            if s.startswith("\\{", i):
                depth += 1
            elif s.startswith("\\}", i):
                depth -= 1
            i += 2
        else:
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            i += 1
        if depth == 0 and i < len(s) - (width - 1) and i >= width:
            return False
    return depth == 0


_VECTOR_RE = re.compile(r"^\\begin\{([pbBvV]?matrix)\}(.*)\\end\{\1\}$", re.S)


def _vector_entries(s: str) -> list[str] | None:
    """The entries of a vector: a one-column or one-row matrix, or a parenthesised tuple of two or more."""
    s = s.strip()
    m = _VECTOR_RE.match(s)
    if m:
        body = m.group(2).strip()
        if body.endswith(ROW_BREAK):
            body = body[: -len(ROW_BREAK)]
        rows = [r.strip() for r in body.split(ROW_BREAK)]
        if len(rows) > 1 and all("&" not in r for r in rows):
            return rows
        if len(rows) == 1 and "&" in rows[0]:
            return [c.strip() for c in rows[0].split("&")]
        return None
    if _outer_bracket(s) == "tuple":
        entries = _split_parts(s[1:-1], keep_thousands=True)
        return entries if len(entries) >= 2 else None
    return None


def _score_number(answer: str, ref: str) -> str | None:
    """'correct' / 'wrong', or None when the reference is not a number (caller uses math)."""
    ref_val, ref_pct = _plain_float(ref)
    if ref_val is None:
        ref_val = _sympy_float(_first(_gold(ref)))
    if ref_val is None:
        return None
    if ref_pct:
        ref_val = ref_val / 100.0
    val, pct = _plain_float(answer)
    if val is None:
        parsed = _mv_parse(answer)
        if not parsed:
            return "parse_error"
        if _false_equation(parsed[0]):
            return "wrong"
        val = _sympy_float(_strip_pct(parsed[0]))
        pct = pct or _is_pct(parsed[0])
    if val is None:
        return "wrong"
    candidates = (val, val / 100.0) if pct else (val,)
    if ref_pct:  # reference "12%": accept 12% and 0.12 (val) and a bare 12
        candidates = candidates + (val / 100.0,)
    return "correct" if any(_close(c, ref_val) for c in candidates) else "wrong"


def _first(parsed: list) -> Any:
    return parsed[0] if parsed else None


def _is_pct(expr: Any) -> bool:
    try:
        import sympy

        return (
            isinstance(expr, sympy.Mul)
            and len(expr.args) == 2
            and expr.args[1] == sympy.UnevaluatedExpr(sympy.Rational(1, 100))
        )
    except Exception:
        return False


def _strip_pct(expr: Any) -> Any:
    return expr.args[0] if _is_pct(expr) else expr


def _score_math(answer: str, ref: str) -> str:
    gold = _gold(ref)
    if not gold:
        # Reference math-verify cannot read (plain words etc.): case-insensitive text match.
        a = canon(unwrap_text(answer)).lower()
        r = canon(unwrap_text(ref)).lower()
        return "correct" if a and a == r else "wrong"
    pred = _mv_parse(answer)
    if not pred:
        return "parse_error"
    if _false_equation(pred[0]):
        return "wrong"
    return "correct" if _mv_verify(gold, pred) else "wrong"


def _false_equation(expr: Any) -> bool:
    """An equation or chain of equations two of whose sides are numbers that differ ("3 = 7",
    "x = 3 = 7"). math-verify keeps only the last right-hand side of an answer equation when the
    reference is none, so "3 = 7" would be graded 7. A rounding step ("2\\sqrt{2} = 2.83") is no
    contradiction: numbers within 1% count as equal here."""
    try:
        import sympy

        if isinstance(expr, sympy.Eq):
            equations = [expr]
        elif isinstance(expr, sympy.And) and all(isinstance(a, sympy.Eq) for a in expr.args):
            equations = list(expr.args)
        else:
            return False
        values = [v for eq in equations for v in (_sympy_float(eq.lhs), _sympy_float(eq.rhs)) if v is not None]
    except Exception:
        return False
    return any(abs(v - values[0]) > max(0.01 * max(abs(v), abs(values[0])), 1e-9) for v in values[1:])
