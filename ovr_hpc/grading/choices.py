"""Multiple-choice letters, all in one place: the option letters, a record's answer (an option's index,
letter or text) as its letter, the options as the prompt shows them, and the letters a model's answer names.
"""

from __future__ import annotations

import re
from typing import Any

from ovr_hpc.data.errors import BadRecord
from ovr_hpc.grading.text import MAX_ANSWER_CHARS, clean, strip_text_commands, unwrap_text

# ----------------------------------------------------------------------------- a record's answer
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"   # option letters of multiple-choice questions


def letter_of(answer: str, choices: list[str]) -> str | None:
    """The option letter an answer names: itself ("B", "(B)") or the text of one of the choices."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", a)
    if m and (not choices or LETTERS.index(m.group(1)) < len(choices)):
        return m.group(1)
    for i, c in enumerate(choices):
        if c.strip() == a:
            return LETTERS[i]
    return None


def answer_letter(answer: Any, choices: list[str]) -> str:
    """The letter of a multiple-choice answer given as an option's index, its letter or its text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise BadRecord("bad_answer", f"answer index {answer} outside {len(choices)} options")
        return LETTERS[answer]
    letter = letter_of(str(answer), choices)
    if letter is None:
        raise BadRecord("bad_answer", f"answer {str(answer)[:80]!r} is none of the options")
    return letter


def choice_lines(choices: list[str]) -> str:
    """Options as the prompt shows them: one "A. text" line each."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


# ----------------------------------------------------------------------------- the letters an answer names
CHOICE_TYPES = {"multiple_choice", "choice", "mc", "mcq", "option", "options", "letter"}
CHOICE_TYPES |= {"multi_choice", "multichoice", "multiple_choices"}
_MC_PREFIX_RE = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:=]?\s*", re.I
)
_MC_SINGLE_RE = re.compile(r"^([\(\[]?)\s*([A-Za-z])\s*([\)\]]?)(?=$|[\s.:,)\]])(.*)$", re.S)
_MC_MULTI_RE = re.compile(r"^[A-Z](?:\s*[,;/&]\s*[A-Z]|\s+(?:and|or)\s+[A-Z]|\s+[A-Z])+$")
# After one letter, "or D", ", (D)", "and (D)": the answer names another option too (a hedge).
_MC_MORE_RE = re.compile(r"^\s*(?:[,;/&+]|\bor\b|\band\b)\s*(?:\\text\s*\{\s*)?[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?=$|[\s.:,;)\]}])")


def choice_letters(s: str, *, strict: bool = False) -> frozenset[str] | None:
    """Letters named by a choice answer, or None.  ``strict``: the whole string must be the
    (uppercase) letter form, no choice text (used to infer a choice *reference*)."""
    s = strip_text_commands(unwrap_text(clean(s))).strip()
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


def multi_letter_reference(s: str) -> frozenset[str] | None:
    s = strip_text_commands(unwrap_text(clean(s))).strip()
    if _MC_MULTI_RE.match(s):
        return frozenset(re.findall(r"[A-Z]", s))
    if 2 <= len(s) <= 10 and s.isalpha() and s.isupper():
        return frozenset(s)
    return None
