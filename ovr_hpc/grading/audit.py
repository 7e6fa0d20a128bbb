"""`ovr-hpc grade`: the reward over a JSONL of (response, reference) pairs, to audit a data set before a run.

    ovr-hpc grade FILE.jsonl [--response-key response --reference-key answer --answer-type-key answer_type]
                             [--references-only] [--out VERDICTS.jsonl] [--timeout 5]

Each line is graded by `ovr_hpc.grading.score` (its reason codes are the verdicts: correct, wrong,
no_boxed, timeout, ...); a line that is not a JSON object with the two keys is "malformed", reported
with its file:line. `--references-only` audits each reference alone (`check_reference`): ok,
multi_box, empty, unparsed, ... `--out` writes one verdict per line as JSONL.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ovr_hpc.grading.answer import DEFAULT_TIMEOUT_S, check_reference, reference_parts, score

MAX_LISTED = 20  # flagged lines printed; every one is still counted
ALWAYS_SHOWN = ("correct", "wrong", "no_boxed", "timeout", "malformed")  # printed even when 0 (grading)


@dataclass
class GradeReport:
    counts: Counter = field(default_factory=Counter)
    flagged: list[str] = field(default_factory=list)  # "file:line: verdict: detail", the first MAX_LISTED
    num_lines: int = 0

    def add(self, where: str, verdict: str, detail: str = "", flag: bool = False) -> None:
        self.num_lines += 1
        self.counts[verdict] += 1
        if flag and len(self.flagged) < MAX_LISTED:
            self.flagged.append(f"{where}: {verdict}" + (f": {detail}" if detail else ""))

    def format(self) -> str:
        lines = [f"{self.num_lines} lines"]
        shown = [v for v in ALWAYS_SHOWN if v in self.counts or "ok" not in self.counts]
        shown += sorted(set(self.counts) - set(shown), key=lambda v: (-self.counts[v], v))
        lines += [f"  {verdict}: {self.counts[verdict]}" for verdict in shown]
        if self.flagged:
            lines.append("flagged lines:")
            lines += [f"  {f}" for f in self.flagged]
        return "\n".join(lines)


def _lines(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield f"{path}:{lineno}", raw


def _parse(raw: bytes, keys: tuple[str, ...]) -> tuple[dict | None, str]:
    try:
        obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as e:
        return None, f"{e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    missing = [k for k in keys if k not in obj]
    if missing:
        return None, "no " + ", ".join(repr(k) for k in missing)
    return obj, ""


def grade_file(path: str, *, response_key: str = "response", reference_key: str = "answer",
               answer_type_key: str = "answer_type", references_only: bool = False, out: str | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> GradeReport:
    """Grade (or, with references_only, audit the references of) every line of a JSONL file."""
    report = GradeReport()
    keys = (reference_key,) if references_only else (response_key, reference_key)
    sink = open(out, "w") if out else None
    try:
        for where, raw in _lines(path):
            obj, problem = _parse(raw, keys)
            row: dict[str, Any] = {"where": where}
            if obj is None:
                report.add(where, "malformed", problem, flag=True)
                row.update(verdict="malformed", detail=problem)
            elif references_only:
                verdict = check_reference(obj[reference_key], timeout_s=timeout_s)
                report.add(where, verdict, str(obj[reference_key])[:80], flag=verdict != "ok")
                row.update(verdict=verdict, parts=len(reference_parts(obj[reference_key]))
                           if isinstance(obj[reference_key], str) else 1)
            else:
                res = score(obj[response_key], obj[reference_key], answer_type=obj.get(answer_type_key),
                                   timeout_s=timeout_s)
                report.add(where, res.reason, flag=res.reason in ("timeout", "bad_reference", "error"))
                row.update(verdict=res.reason, score=res.score, answer=res.answer)
            if sink is not None:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if sink is not None:
            sink.close()
    return report


def grade_command(args) -> int:
    report = grade_file(args.file, response_key=args.response_key, reference_key=args.reference_key,
                        answer_type_key=args.answer_type_key, references_only=args.references_only, out=args.out,
                        timeout_s=args.timeout)
    print(report.format())
    if args.out:
        print(f"wrote {args.out}")
    bad = report.counts["malformed"] + (report.num_lines - report.counts["ok"] if args.references_only else 0)
    return 1 if bad else 0
