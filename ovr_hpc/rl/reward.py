"""Rule-based verifiable reward for the RL stage (binary, no format reward).

A response earns 1.0 when it finished normally and its *last* ``\\boxed{...}`` (or ``\\fbox{...}``)
answer matches the reference, else 0.0.  Every outcome carries a short reason code for logging.

Entry points
------------
``score(response, reference, *, answer_type=None, finished=True) -> RewardResult``
    Pure function, in-process.  Never raises, never evaluates model text as code.
``RewardPool(num_workers, timeout_s)``
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
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from multiprocessing.connection import wait as _mp_wait
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "RewardResult",
    "REASONS",
    "score",
    "extract_last_boxed",
    "extract_boxed_parts",
    "reference_parts",
    "check_reference",
    "REFERENCE_VERDICTS",
    "RewardPool",
    "MAX_RESPONSE_CHARS",
    "MAX_ANSWER_CHARS",
    "MAX_NESTING",
    "REL_TOL",
    "ABS_TOL",
]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- limits
MAX_RESPONSE_CHARS = 1 << 19  # 524288 chars inspected (tail); a 48k-token response is ~200k chars
MAX_ANSWER_CHARS = 1024  # extracted answer
MAX_REFERENCE_CHARS = 4096
MAX_NESTING = 8  # ( [ { nesting; the antlr LaTeX parser gets exponentially slow past ~10
MAX_BOXED_CANDIDATES = 64  # \boxed mentions without an argument skipped before giving up
REL_TOL = 1e-4
ABS_TOL = 1e-8
DEFAULT_TIMEOUT_S = 5.0

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


def _result(reason: str, answer: str | None = None) -> RewardResult:
    if answer is not None and len(answer) > 200:
        answer = answer[:200]
    return RewardResult(1.0 if reason == "correct" else 0.0, reason, answer)


# ----------------------------------------------------------------------------- time bound
class _RewardTimeout(BaseException):
    """Raised by our SIGALRM handler.  BaseException on purpose: sympy and math-verify catch
    ``Exception`` all over the place and would swallow an ordinary exception."""


_TIMER_REPEAT_S = 0.05  # after the first expiry, fire again every 50 ms (see below)


def _call_with_time_limit(fn: Callable[[], RewardResult], timeout_s: float | None) -> RewardResult:
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
    own_code = _call_with_time_limit.__code__
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
    return result if result is not None else _result("timeout")


# ----------------------------------------------------------------------------- boxed extraction
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_INLINE_STOP = ("$", "\n", "\\]", "\\)")


def extract_last_boxed(text: str) -> tuple[str | None, str]:
    """Return ``(content, status)`` of the last ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed x``.

    status: "ok", "no_boxed", "too_long" (argument longer than MAX_ANSWER_CHARS) or
    "parse_error" (opening brace never closed).  Linear in the inspected text; escaped braces
    ``\\{ \\}`` do not count.  Mentions of ``\\boxed`` with no argument are skipped (at most
    MAX_BOXED_CANDIDATES of them)."""
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    content, status, _ = _boxed_before(text, len(text))
    return content, status


def extract_boxed_parts(text: str, limit: int = MAX_BOXED_CANDIDATES) -> tuple[list[str], str]:
    """The contents of every ``\\boxed`` answer of ``text`` in reading order (at most ``limit``, the
    last ones), and the status of the last (as :func:`extract_last_boxed`)."""
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    parts: list[str] = []
    end, status = len(text), "no_boxed"
    while len(parts) < limit:
        content, st, pos = _boxed_before(text, end)
        if not parts:
            status = st
        if st != "ok" or content is None:
            break
        end = pos
        if any(c in content for c in _BOX_COMMANDS):  # "\\boxed{\\boxed{3}}": the inner one counts
            continue
        parts.append(content)
    return parts[::-1], status


def _boxed_before(text: str, end: int) -> tuple[str | None, str, int]:
    """(content, status, position of the command) of the last boxed answer that starts before ``end``."""
    for _ in range(MAX_BOXED_CANDIDATES):
        pos, cmd = -1, ""
        for c in _BOX_COMMANDS:
            p = text.rfind(c, 0, end)
            if p > pos:
                pos, cmd = p, c
        if pos < 0:
            return None, "no_boxed", -1
        end = pos  # next round searches before this mention
        i = pos + len(cmd)
        if i < len(text) and text[i].isalpha():  # another control word, e.g. \boxedx, \fboxsep
            continue
        j = i
        while j < len(text) and j - i < 16 and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            return (*_match_braces(text, j), pos)
        if j == i or j >= len(text):  # "\boxed." / "\boxed" at the very end: a mention
            continue
        # "\boxed 5": TeX takes one token, models mean the rest of the inline math.
        stop = min(len(text), j + MAX_ANSWER_CHARS + 1)
        for s in _INLINE_STOP:
            k = text.find(s, j, stop)
            if k >= 0:
                stop = k
        content = text[j:stop].strip().rstrip(".,;").strip()
        if not content:
            continue
        if len(content) > MAX_ANSWER_CHARS:
            return None, "too_long", pos
        return content, "ok", pos
    return None, "no_boxed", -1


def _match_braces(text: str, open_pos: int) -> tuple[str | None, str]:
    depth = 0
    i = open_pos
    limit = min(len(text), open_pos + MAX_ANSWER_CHARS + 2)
    while i < limit:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i], "ok"
        i += 1
    if limit < len(text):
        return None, "too_long"
    return None, "parse_error"


# ----------------------------------------------------------------------------- normalisation
_UNICODE = {
    "\u2212": "-",  # minus
    "\u2013": "-",
    "\u2014": "-",
    "\u00d7": "\\times ",
    "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ",
    "\u00f7": "\\div ",
    "\u03c0": "\\pi ",
    "\u221e": "\\infty ",
    "\u00b0": "^\\circ",
    "\\degree": "^\\circ",  # gensymb
    "\u2264": "\\le ",
    "\u2265": "\\ge ",
    "\u2260": "\\ne ",
    "\u00bd": "\\frac{1}{2}",
    "\uff08": "(",
    "\uff09": ")",
    "\uff1a": ":",
    "\uff0c": ",",
    "\u3000": " ",
    "\u2205": "\\emptyset ",
    "\\varnothing": "\\emptyset ",  # the same set; math-verify knows only \emptyset
    "\u2248": "\\approx ",
    "\\langle": "(",  # a vector <a, b> is the tuple (a, b)
    "\\rangle": ")",
    "\u27e8": "(",
    "\u27e9": ")",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_SQRT_UNI_RE = re.compile(r"\u221a\s*(\d+(?:\.\d+)?|[A-Za-z]|\([^()]{0,64}\)|\{[^{}]{0,64}\})")
_NEG_SPACE_RE = re.compile(r"\\!\s*")
_SPACING_RE = re.compile(r"\\[,;: ]|\\q?quad\b|~|\\displaystyle\b|\\textstyle\b")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)\b\s*\.?")
_FRAC_VARIANT_RE = re.compile(r"\\[dt]frac\b")
# "\approx 3.14": an answer that leads with "about" is the number.
_LEADING_APPROX_RE = re.compile(r"^(?:\\approx|\\simeq|\\sim|\\thickapprox)(?![A-Za-z])\s*")
# 0.1\overline{6} = 1/6: repeating decimals become fractions (at most 12 digits each part).
_REPEATING_RE = re.compile(r"(?<![\d.])(\d{0,12})\.(\d{0,12})\\overline\s*\{(\d{1,12})\}")
# \cos 60^\circ: math-verify reads the argument as 60 radians; written out in radians instead.
_TRIG = r"\\(sin|cos|tan|cot|sec|csc)\s*"
_DEGREES = r"\s*(\d+(?:\.\d+)?)\s*\^\s*(?:\\circ|\{\s*\\circ\s*\})\s*"
_TRIG_DEGREES_RE = re.compile(_TRIG + r"(?:\(" + _DEGREES + r"\)|\{" + _DEGREES + r"\}|" + _DEGREES + ")")
# \overline{AB} (a segment) is named AB.
_SEGMENT_RE = re.compile(r"\\(?:overline|overleftrightarrow|overrightarrow|vec)\s*\{\s*([A-Z]{1,3})\s*\}")
# "5 dollars", "12 square units": a number followed by plain words is a number with a unit, as
# "5\\text{ dollars}" is; words that change the value ("2 pi", "5 thousand") or join numbers do not count.
_UNIT_WORD = r"(?:[A-Za-z]{2,}|[A-Za-z]+/[A-Za-z]+(?:\^\{?\d\}?)?)"   # "dollars", "m/s", "km/h", "m/s^2"
_NUMBER_UNIT_WORDS_RE = re.compile(
    r"^([+-]?\d[\d,]*(?:\.\d+)?)\s+(" + _UNIT_WORD + r"(?:\s+" + _UNIT_WORD + r"){0,2})$")
_NOT_UNIT_WORDS = frozenset(
    "pi sqrt sin cos tan cot sec csc log ln exp times thousand thousands million millions billion billions "
    "hundred hundreds dozen dozens and or to plus minus over divided by of".split())
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                      "eighty": "80", "ninety": "90", "hundred": "100", "a hundred": "100",
                      "one hundred": "100", "thousand": "1000", "one thousand": "1000"})


def _repeating_to_fraction(m: re.Match) -> str:
    whole, fixed, period = m.group(1) or "0", m.group(2), m.group(3)
    # x = whole.fixed(period...) = (whole fixed period - whole fixed) / (10^|fixed| (10^|period| - 1))
    numerator = int(whole + fixed + period) - int(whole + fixed)
    denominator = 10 ** len(fixed) * (10 ** len(period) - 1)
    return f"\\frac{{{numerator}}}{{{denominator}}}"


def _trig_in_radians(m: re.Match) -> str:
    degrees = next(g for g in m.groups()[1:] if g is not None)
    return f"\\{m.group(1)}(\\frac{{{degrees}\\pi}}{{180}})"


def _number_with_unit_words(s: str) -> str:
    m = _NUMBER_UNIT_WORDS_RE.match(s)
    if not m:
        return s
    words = re.split(r"[\s/^{}\d]+", m.group(2).lower())
    if words == ["percent"]:
        return m.group(1) + "\\%"
    if any(w in _NOT_UNIT_WORDS for w in words):
        return s
    return m.group(1) + "\\text{ " + m.group(2) + "}"


_ROW_BREAK = "\\\\"


def _clean_commands(s: str) -> str:
    """The rewrites of ``_clean`` inside one piece of text that holds no row break ``\\\\``."""
    s = _SQRT_UNI_RE.sub(lambda m: "\\sqrt{" + m.group(1).strip("(){}") + "}", s)
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = s.replace("\\$", "").replace("$", "")  # currency "\$5" and inline-math dollars
    # "\!" is a negative thin space: it joins ("14,\!916" is MATH's 14916), it never separates.
    s = _NEG_SPACE_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _FRAC_VARIANT_RE.sub(r"\\frac", s)
    s = _REPEATING_RE.sub(_repeating_to_fraction, s)
    s = _TRIG_DEGREES_RE.sub(_trig_in_radians, s)
    return _SEGMENT_RE.sub(r"\1", s)


def _number_word(s: str) -> str:
    """'two' / '\\text{Two}' -> '2' when that word is the whole answer; anything else unchanged."""
    word = _unwrap_text(s).strip().lower()
    return _NUMBER_WORDS.get(re.sub(r"[\s-]+", " ", word), s)


def _clean(s: str) -> str:
    """Cosmetic normalisation, safe on any string (linear regexes only).

    LaTeX is read token by token where it matters: ``\\\\`` (a row break, as in
    ``\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}``) is one token, so the rewrites of control sequences
    below work on the text between row breaks and never see its second backslash as the start of a
    command (``\\ `` is a control space, but in ``\\\\ 4`` the space follows a row break)."""
    s = _ROW_BREAK.join(_clean_commands(part) for part in s.split(_ROW_BREAK))
    s = _LEADING_APPROX_RE.sub("", s.strip())
    # A lone trailing backslash escapes nothing (our own wrapping, "\\boxed{" + s + "}", would make it
    # escape the closing brace), and a row break at the very end breaks nothing: dropped.
    s = s.rstrip("\\").rstrip()
    while s and s[-1] in ".,;" and not s.endswith("\\."):
        s = s[:-1].rstrip()
    return _number_with_unit_words(s)


_WORDS_RE = re.compile(r"^[A-Za-z]+(?:(?:\s+|\s*-\s*|')[A-Za-z]+)*$")


def _word_answer(s: str) -> str | None:
    """Lower-case letters of an answer made of words ("United States", "north-east"), else None. A word
    has three letters and is not all capitals: "xy" and "ABC" (segments, triangles) stay mathematics."""
    text = _strip_text_commands(_unwrap_text(s)).strip()
    if not _WORDS_RE.match(text):
        return None
    if not any(len(word) >= 3 and not word.isupper() for word in re.findall(r"[A-Za-z]+", text)):
        return None
    return re.sub(r"[^a-z]", "", text.lower())


def _canon(s: str) -> str:
    return re.sub(r"\s+", "", s)


_WRAP_RE = re.compile(r"^\\(?:text|textbf|textit|textrm|texttt|textsf|mathrm|mathbf|mathit|mathsf|mbox|operatorname)\s*\{(.*)\}$", re.S)


def _unwrap_text(s: str) -> str:
    for _ in range(4):
        m = _WRAP_RE.match(s)
        if not m or not _balanced(m.group(1)):
            break
        s = m.group(1).strip()
    return s


def _balanced(s: str) -> bool:
    depth = 0
    i = 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


def _strip_text_commands(s: str) -> str:
    """\\text{B} -> B anywhere (one level), for letter parsing."""
    return re.sub(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)


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


# ----------------------------------------------------------------------------- multiple choice
_CHOICE_TYPES = {"multiple_choice", "choice", "mc", "mcq", "option", "options", "letter"}
_CHOICE_TYPES |= {"multi_choice", "multichoice", "multiple_choices"}
_NUMBER_TYPES = {"number", "numeric", "numerical", "float", "real"}
# Explicitly "math": never reinterpreted as a letter even when the reference is one capital.
_MATH_TYPES = {"math", "expression", "latex", "formula", "integer", "int", "free_form", "text", "list"}
_MC_PREFIX_RE = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:=]?\s*", re.I
)
_MC_SINGLE_RE = re.compile(r"^([\(\[]?)\s*([A-Za-z])\s*([\)\]]?)(?=$|[\s.:,)\]])(.*)$", re.S)
_MC_MULTI_RE = re.compile(r"^[A-Z](?:\s*[,;/&]\s*[A-Z]|\s+(?:and|or)\s+[A-Z]|\s+[A-Z])+$")
# After one letter, "or D", ", (D)", "and (D)": the answer names another option too (a hedge).
_MC_MORE_RE = re.compile(r"^\s*(?:[,;/&+]|\bor\b|\band\b)\s*(?:\\text\s*\{\s*)?[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?=$|[\s.:,;)\]}])")


def _choice_letters(s: str, *, strict: bool = False) -> frozenset[str] | None:
    """Letters named by a choice answer, or None.  ``strict``: the whole string must be the
    (uppercase) letter form, no choice text (used to infer a choice *reference*)."""
    s = _strip_text_commands(_unwrap_text(_clean(s))).strip()
    s = _MC_PREFIX_RE.sub("", s).strip()
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    if _MC_MULTI_RE.match(s):  # "A, C", "A and C"
        if strict:
            return None
        return frozenset(re.findall(r"[A-Z]", s))
    m = _MC_SINGLE_RE.match(s)
    if m:
        letter, rest = m.group(2), m.group(4)
        bracketed = bool(m.group(1) or m.group(3))
        more = _MC_MORE_RE.match(rest)
        if more and (letter.isupper() or bracketed):  # "C or D", "(A) and (C)": every letter named
            letters = {letter.upper()}
            while more:
                letters.add(more.group(1).upper())
                rest = rest[more.end():]
                more = _MC_MORE_RE.match(rest)
            return None if strict else frozenset(letters)
        rest_s = rest.strip().lstrip(".:)]").strip()
        if strict:
            if letter.isupper() and not rest_s:
                return frozenset(letter)
            return None
        if not rest_s:
            return frozenset(letter.upper())
        if letter.isupper() or bracketed:  # "B: 12 cm", "(b) 12 cm"
            return frozenset(letter.upper())
        return None
    if not strict and 2 <= len(s) <= 10 and s.isalpha() and s.isupper():  # "AC"
        return frozenset(s)
    return None


def _multi_letter_reference(s: str) -> frozenset[str] | None:
    s = _strip_text_commands(_unwrap_text(_clean(s))).strip()
    if _MC_MULTI_RE.match(s):
        return frozenset(re.findall(r"[A-Z]", s))
    if 2 <= len(s) <= 10 and s.isalpha() and s.isupper():
        return frozenset(s)
    return None


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
    s = _strip_text_commands(_unwrap_text(_clean(s)))
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
    bare, _, _ = _bare_number_text(_UNIT_SUFFIX_RE.sub("", _clean(s)))
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
    if m and not _NOT_UNIT_WORDS.intersection(re.findall(r"[a-z]+", s[m.end(1):].lower())):   # "2 pi" is no unit
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
        return "\\pi" in _clean(expression) and _close(math.radians(degrees), radians)
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
        part = _number_word(_clean(c))
        if part and _canon(part) not in {_canon(q) for q in parts}:
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
            readable = (_choice_letters(part, strict=True) or _word_answer(part) is not None
                        or (not _too_complex(part) and _gold(part)))
            if not readable:
                return _result("parse_error")
        return _result("correct")

    try:
        res = _call_with_time_limit(parse_all, timeout_s)
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
        return _result("truncated")
    try:
        return _call_with_time_limit(
            lambda: _score_impl(response, reference, answer_type), timeout_s
        )
    except Exception:  # MemoryError, RecursionError, anything a library throws at us
        logger.debug("reward scoring failed", exc_info=True)
        return _result("error")


def _score_impl(response: Any, reference: Any, answer_type: str | None) -> RewardResult:
    if not isinstance(reference, str):
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = repr(reference)
        else:
            return _result("bad_reference")
    if not isinstance(response, str):
        return _result("error")
    if len(reference) > MAX_REFERENCE_CHARS:
        return _result("bad_reference")
    refs = reference_parts(reference)
    if not refs:
        return _result("bad_reference")

    boxes, status = extract_boxed_parts(response, limit=len(refs))
    if status != "ok":
        return _result(status)
    raw = boxes[-1]
    kind = answer_type.strip().lower().replace(" ", "_").replace("-", "_") if isinstance(answer_type, str) else ""
    if len(refs) == 1:
        return _result(_grade(raw, refs[0], kind), raw)
    # A reference of several boxed parts: every part, in order, either as the parts of the last boxed
    # answer ("\boxed{3, 7}") or as the last boxed answers ("\boxed{3} ... \boxed{7}").
    whole = _clean(raw)
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
    return _result(verdict, raw)


def _grade(raw: str, ref: str, kind: str) -> str:
    """Verdict (a reason code) of one extracted answer ``raw`` against one normalised reference part."""
    answer = _number_word(_clean(raw))
    if not answer:
        return "empty_boxed"
    infer = kind not in _NUMBER_TYPES and kind not in _MATH_TYPES
    if kind in _CHOICE_TYPES or (infer and _choice_letters(ref, strict=True)):
        if kind in _CHOICE_TYPES:  # declared choice: the reference may carry the option text
            ref_letters = _choice_letters(ref) or _multi_letter_reference(ref)
        else:
            ref_letters = _choice_letters(ref, strict=True)
        if ref_letters:
            return "correct" if _choice_letters(answer) == ref_letters else "wrong"
        # choice question whose reference is the option text: compare as math below

    # Cheap exact match on the normalised text (no parser involved).
    if _canon(answer) == _canon(ref):
        return "correct"
    # Words against words ("Democrats"): compared as text. math-verify would read them as products of
    # symbols: case-sensitive, and "act" equal to "cat".
    answer_words, ref_words = _word_answer(answer), _word_answer(ref)
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
    m = _POINTS_RE.match(_strip_text_commands(s).strip())
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
        if body.endswith(_ROW_BREAK):
            body = body[: -len(_ROW_BREAK)]
        rows = [r.strip() for r in body.split(_ROW_BREAK)]
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
        a = _canon(_unwrap_text(answer)).lower()
        r = _canon(_unwrap_text(ref)).lower()
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


# ----------------------------------------------------------------------------- worker pool
Item = Any  # (response, reference[, answer_type[, finished]]) or a dict with those keys


def _unpack(item: Item) -> tuple[Any, Any, str | None, bool]:
    if isinstance(item, dict):
        return (
            item.get("response"),
            item.get("reference"),
            item.get("answer_type"),
            bool(item.get("finished", True)),
        )
    item = tuple(item)
    response, reference = item[0], item[1]
    answer_type = item[2] if len(item) > 2 else None
    finished = bool(item[3]) if len(item) > 3 else True
    return response, reference, answer_type, finished


def _score_item(score_fn: Callable[..., RewardResult], item: Item, timeout_s: float | None) -> RewardResult:
    response, reference, answer_type, finished = _unpack(item)
    if score_fn is score:
        return score(response, reference, answer_type=answer_type, finished=finished, timeout_s=timeout_s)
    try:
        return _call_with_time_limit(
            lambda: score_fn(response, reference, answer_type=answer_type, finished=finished),
            timeout_s,
        )
    except Exception:
        return _result("error")


def _set_memory_limit(extra_mb: int | None) -> None:
    if not extra_mb:
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + int(extra_mb) * (1 << 20)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except Exception:  # not Linux / not permitted: run without a memory cap
        pass


def _worker_main(conn, score_fn, soft_timeout_s, max_memory_mb) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which closes us
    _set_memory_limit(max_memory_mb)
    # Import sympy/antlr and warm the caches before "ready" (also for a custom score_fn, which
    # usually wraps ``score``), so that no item's time limit pays the ~1 s import.
    score("\\boxed{\\frac{1}{2}}", "0.5", timeout_s=None)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, item = msg
        try:
            res = _score_item(score_fn, item, soft_timeout_s)
        except BaseException:  # noqa: BLE001 - a worker must answer
            res = _result("error")
        if not isinstance(res, RewardResult):
            res = _result("error")
        try:
            conn.send((idx, res))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    __slots__ = ("proc", "conn", "ready", "idx", "deadline", "born")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.idx: int | None = None
        self.deadline = 0.0
        self.born = time.monotonic()


class RewardPool:
    """Score reward items in ``num_workers`` worker processes.

    ``score_batch(items)`` returns one :class:`RewardResult` per item, in input order.  An item
    not answered within ``timeout_s`` seconds of being handed to a worker scores 0 with reason
    "timeout"; that worker is SIGKILLed and a fresh one started (asynchronously: the batch goes
    on with the others).  Inside each worker ``score`` also runs under a SIGALRM timer of
    ``soft_timeout_s`` (default ``0.6 * timeout_s``) which usually ends a slow item without a
    kill.  A worker that dies scores its item "crashed" and is replaced.  Each worker's address
    space is capped at its size after start-up + ``max_memory_mb`` (MemoryError -> "error").

    ``mp_context``: "spawn" (default) or "forkserver" — never fork: the trainer has threads and
    CUDA.  With spawn each worker re-imports the trainer's ``__main__`` module (standard
    multiprocessing behaviour), then sympy/math-verify: start-up is about 1-3 s per worker, paid
    once in ``__init__`` (which waits until all are ready unless ``wait_ready=False``) and again
    for each replacement.  ``num_workers=0`` scores in the calling process (tests, debugging),
    with the SIGALRM bound only if that is the main thread.

    One ``score_batch`` at a time (a lock serialises calls); it may run in a background thread
    of the trainer.  ``score_fn`` (a picklable top-level function with ``score``'s signature,
    minus ``timeout_s``) replaces the reward, e.g. for other tasks or tests.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float = 10.0,
        *,
        soft_timeout_s: float | None = -1.0,
        max_memory_mb: int | None = 2048,
        mp_context: str = "spawn",
        score_fn: Callable[..., RewardResult] | None = None,
        wait_ready: bool = True,
        start_timeout_s: float = 120.0,
    ):
        if num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError("mp_context must be 'spawn' or 'forkserver' (fork is unsafe here)")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.soft_timeout_s = 0.6 * self.timeout_s if soft_timeout_s == -1.0 else soft_timeout_s
        self.max_memory_mb = max_memory_mb
        self.start_timeout_s = start_timeout_s
        self.score_fn = score_fn or score
        self._ctx = mp.get_context(mp_context)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._start_failures = 0
        # counters for logging
        self.num_timeouts = 0
        self.num_crashes = 0
        self.num_restarts = 0
        for _ in range(num_workers):
            self._workers.append(self._spawn())
        if wait_ready and num_workers:
            try:
                self._wait_all_ready()
            except BaseException:
                self.close()
                raise

    # -- lifecycle
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.score_fn, self.soft_timeout_s, self.max_memory_mb),
            daemon=True,
            name="ovr-reward-worker",
        )
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _kill(self, w: _Worker) -> None:
        try:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(timeout=5)
        except Exception:
            pass
        try:
            w.conn.close()
        except Exception:
            pass

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        i = self._workers.index(w)
        self._workers[i] = self._spawn()
        self.num_restarts += 1

    def _wait_all_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not all(w.ready for w in self._workers):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("reward workers did not start within %.0f s" % self.start_timeout_s)
            waiting = [w for w in self._workers if not w.ready]
            _mp_wait([w.conn for w in waiting] + [w.proc.sentinel for w in waiting], timeout=left)
            for w in waiting:
                self._poll_ready(w)

    def _poll_ready(self, w: _Worker) -> None:
        """Handle a not-yet-ready worker: consume its 'ready', or replace it if it died."""
        try:
            if w.conn.poll():
                msg = w.conn.recv()
                if isinstance(msg, tuple) and msg and msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                return
        except (EOFError, OSError):
            pass
        if not w.proc.is_alive() or time.monotonic() - w.born > self.start_timeout_s:
            self._start_failures += 1
            if self._start_failures > 3 * max(1, self.num_workers):
                raise RuntimeError(
                    "reward workers keep dying during start-up (exit code %s)" % w.proc.exitcode
                )
            self._replace(w)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except Exception:
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(w)
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- scoring
    def score_batch(self, items: Sequence[Item] | Iterable[Item]) -> list[RewardResult]:
        items = list(items)
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        if self.num_workers == 0:
            return [_score_item(self.score_fn, it, self.timeout_s) for it in items]
        with self._lock:
            return self._score_batch(items)

    def _prepare(self, item: Item) -> tuple:
        response, reference, answer_type, finished = _unpack(item)
        if isinstance(response, str) and len(response) > MAX_RESPONSE_CHARS:
            response = response[-MAX_RESPONSE_CHARS:]  # do not pickle 10 MB through a pipe
        if not finished:
            response = ""
        return (response, reference, answer_type, finished)

    def _score_batch(self, items: list) -> list[RewardResult]:
        n = len(items)
        results: list[RewardResult | None] = [None] * n
        pending = deque(range(n))
        done = 0
        while done < n:
            # hand out work
            for w in self._workers:
                if not pending:
                    break
                if w.ready and w.idx is None:
                    idx = pending.popleft()
                    try:
                        w.conn.send((idx, self._prepare(items[idx])))
                    except (BrokenPipeError, OSError, EOFError):
                        pending.appendleft(idx)
                        self._replace(w)
                        continue
                    except Exception:  # unpicklable item
                        results[idx] = _result("error")
                        done += 1
                        continue
                    w.idx = idx
                    w.deadline = time.monotonic() + self.timeout_s
            if done >= n:
                break
            busy = [w for w in self._workers if w.idx is not None]
            starting = [w for w in self._workers if not w.ready]
            now = time.monotonic()
            wait_s = min([w.deadline - now for w in busy], default=1.0)
            wait_s = max(0.0, min(wait_s, 1.0))
            watched = busy + starting
            _mp_wait([w.conn for w in watched] + [w.proc.sentinel for w in watched], timeout=wait_s)
            for w in starting:
                self._poll_ready(w)
            now = time.monotonic()
            for w in busy:
                idx = w.idx
                got = None
                try:
                    if w.conn.poll():
                        msg = w.conn.recv()
                        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == idx:
                            got = msg[1]
                except (EOFError, OSError):
                    got = None
                    if results[idx] is None:
                        results[idx] = _result("crashed")
                        self.num_crashes += 1
                        done += 1
                    w.idx = None
                    self._replace(w)
                    continue
                if got is not None:
                    results[idx] = got
                    done += 1
                    w.idx = None
                elif not w.proc.is_alive():
                    results[idx] = _result("crashed")
                    self.num_crashes += 1
                    done += 1
                    w.idx = None
                    self._replace(w)
                elif now >= w.deadline:
                    results[idx] = _result("timeout")
                    self.num_timeouts += 1
                    done += 1
                    w.idx = None
                    self._replace(w)
        return results  # type: ignore[return-value]
