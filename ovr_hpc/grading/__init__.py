"""Grading a model's answers: the verifiable reward of the RL stage and the scores of evaluation.

    text.py     the size limits, the boxed answer of a response, normalisation
    choices.py  multiple-choice letters (a record's answer as a letter, option lines, the letters an
                answer names)
    answer.py   equivalence by answer type, `score` -> RewardResult, `check_reference`
    pool.py     RewardPool: batches scored in worker processes under a hard time bound
    audit.py    `ovr-hpc grade`: a JSONL of (response, reference) pairs, or its references, before a run
"""

from ovr_hpc.grading.answer import (ABS_TOL, DEFAULT_TIMEOUT_S, MAX_NESTING, REASONS, REFERENCE_VERDICTS, REL_TOL,
                                    RewardResult, check_reference, reference_parts, score)
from ovr_hpc.grading.choices import LETTERS, answer_letter, choice_lines, letter_of
from ovr_hpc.grading.pool import RewardPool
from ovr_hpc.grading.text import MAX_ANSWER_CHARS, MAX_RESPONSE_CHARS, extract_boxed_parts, extract_last_boxed

__all__ = [
    "RewardResult", "REASONS", "score", "extract_last_boxed", "extract_boxed_parts", "reference_parts",
    "check_reference", "REFERENCE_VERDICTS", "RewardPool", "MAX_RESPONSE_CHARS", "MAX_ANSWER_CHARS", "MAX_NESTING",
    "REL_TOL", "ABS_TOL", "DEFAULT_TIMEOUT_S", "LETTERS", "answer_letter", "choice_lines", "letter_of",
]
