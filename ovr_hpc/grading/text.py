"""Answer text: the size limits, the boxed answer of a response and the cosmetic normalisation every
comparison starts from (shared by the answer grader, answer.py, and the choice letters, choices.py)."""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------- limits
MAX_RESPONSE_CHARS = 1 << 19  # 524288 chars inspected (tail); a 48k-token response is ~200k chars
MAX_ANSWER_CHARS = 1024  # extracted answer
MAX_BOXED_CANDIDATES = 64  # \boxed mentions without an argument skipped before giving up


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
NOT_UNIT_WORDS = frozenset(
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
    if any(w in NOT_UNIT_WORDS for w in words):
        return s
    return m.group(1) + "\\text{ " + m.group(2) + "}"


ROW_BREAK = "\\\\"


def _clean_commands(s: str) -> str:
    """The rewrites of ``clean`` inside one piece of text that holds no row break ``\\\\``."""
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


def number_word(s: str) -> str:
    """'two' / '\\text{Two}' -> '2' when that word is the whole answer; anything else unchanged."""
    word = unwrap_text(s).strip().lower()
    return _NUMBER_WORDS.get(re.sub(r"[\s-]+", " ", word), s)


def clean(s: str) -> str:
    """Cosmetic normalisation, safe on any string (linear regexes only).

    LaTeX is read token by token where it matters: ``\\\\`` (a row break, as in
    ``\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}``) is one token, so the rewrites of control sequences
    below work on the text between row breaks and never see its second backslash as the start of a
    command (``\\ `` is a control space, but in ``\\\\ 4`` the space follows a row break)."""
    s = ROW_BREAK.join(_clean_commands(part) for part in s.split(ROW_BREAK))
    s = _LEADING_APPROX_RE.sub("", s.strip())
    # A lone trailing backslash escapes nothing (our own wrapping, "\\boxed{" + s + "}", would make it
    # escape the closing brace), and a row break at the very end breaks nothing: dropped.
    s = s.rstrip("\\").rstrip()
    while s and s[-1] in ".,;" and not s.endswith("\\."):
        s = s[:-1].rstrip()
    return _number_with_unit_words(s)


_WORDS_RE = re.compile(r"^[A-Za-z]+(?:(?:\s+|\s*-\s*|')[A-Za-z]+)*$")


def word_answer(s: str) -> str | None:
    """Lower-case letters of an answer made of words ("United States", "north-east"), else None. A word
    has three letters and is not all capitals: "xy" and "ABC" (segments, triangles) stay mathematics."""
    text = strip_text_commands(unwrap_text(s)).strip()
    if not _WORDS_RE.match(text):
        return None
    if not any(len(word) >= 3 and not word.isupper() for word in re.findall(r"[A-Za-z]+", text)):
        return None
    return re.sub(r"[^a-z]", "", text.lower())


def canon(s: str) -> str:
    return re.sub(r"\s+", "", s)


_WRAP_RE = re.compile(r"^\\(?:text|textbf|textit|textrm|texttt|textsf|mathrm|mathbf|mathit|mathsf|mbox|operatorname)\s*\{(.*)\}$", re.S)


def unwrap_text(s: str) -> str:
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


def strip_text_commands(s: str) -> str:
    """\\text{B} -> B anywhere (one level), for letter parsing."""
    return re.sub(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)

