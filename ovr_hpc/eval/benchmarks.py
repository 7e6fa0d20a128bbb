"""Benchmark adapters: each benchmark's published local layout -> our sample records, its scoring rule and
its aggregation. Users download the files themselves; nothing here reaches a hub.

An adapter reads JSON (a dict keyed by id, or a list), JSONL, Parquet (images embedded as
{"bytes", "path"} structs) or CSV, resolves images against an image folder, and yields `EvalSample`s:
the question as the benchmark states it, its reference answer, the reward's `answer_type`, the option
texts of a multiple-choice question and, where the benchmark aggregates over several questions
(DynaMath's variants, WeMath's sub-problems), a group key. A row that cannot be used (missing field,
missing image, answer that is none of the options) is reported with its file and row and counted,
never silently dropped.

Scoring goes through the RL reward (`ovr_hpc.grading.score`, in a `RewardPool`): the last \\boxed{}
answer against the reference. Multiple-choice questions accept the boxed letter, or the boxed text of
the right option. Aggregations: avg@n and pass@k everywhere; DynaMath worst case over variants; WeMath
strict and loose four-dimensional scores.

No torch import here: the config check (`ovr-hpc check eval`) imports the adapter names.
"""

from __future__ import annotations

import ast
import csv
import glob
import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ovr_hpc.config import ConfigError
from ovr_hpc.data.errors import BadRecord
from ovr_hpc.data.records import DataReport, embedded_image
from ovr_hpc.grading import LETTERS, answer_letter, choice_lines, letter_of

MC = "multiple_choice"
NUMBER = "number"
MATH = "math"
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")

# The paper's Tables 2/3 (../shared/notes/ovr-paper.md), in percent: (OVR-7B, Qwen2.5-VL-7B); None = not given.
PAPER_RESULTS: dict[str, dict[str, tuple[Optional[float], Optional[float]]]] = {
    "mathvista": {"accuracy": (72.1, 69.2)},
    "mathvision": {"accuracy": (51.8, 25.5)},
    "mathverse": {"accuracy": (54.6, 41.1)},
    "dynamath": {"worst_case": (33.5, 21.8)},
    "wemath": {"score_strict": (44.6, 31.2), "score_loose": (64.8, 53.1)},
    "logicvista": {"accuracy": (54.8, 47.9)},
    "mmmu_pro": {"accuracy": (50.2, None)},
    "charxiv_reasoning": {"accuracy": (44.5, 36.4)},
    "charxiv_descriptive": {"accuracy": (73.6, 67.3)},
    "math500": {"accuracy": (95.3, 67.4)},
    "aime24": {"accuracy": (63.5, 6.7)},
    "aime25": {"accuracy": (52.1, 6.7)},
    "gpqa_diamond": {"accuracy": (49.8, 31.8)},
    "mmlu": {"accuracy": (77.2, 69.6)},
    "mmlu_pro": {"accuracy": (67.9, 51.7)},
    # the perception table: base -> cold start -> RL; MME's number is most likely its perception score
    "mmbench_en": {"circular": (86.6, 85.3)},
    "mme": {"perception": (1559.1, 1659.7)},
}


# ----------------------------------------------------------------------------- samples


@dataclass
class EvalSample:
    """One question of a benchmark, ready to prompt and score."""

    id: str
    question: str
    answer: str
    answer_type: str  # MC | NUMBER | MATH (ovr_hpc.grading answer types)
    images: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)  # option texts, shown as "A. ..." lines
    show_choices: bool = True  # False when the options are already in the question or the image
    group: Optional[str] = None  # DynaMath seed question, WeMath composite problem
    meta: dict = field(default_factory=dict)
    where: str = ""
    text_answer: bool = False  # a word answer: also accepted when the model writes it as \text{...}

    def prompt_text(self, instruction: str = "", choice_instruction: str = "") -> str:
        """question, the lettered options (when not already in the question or image), the instruction;
        one per line, as the RL stage joins problem and instruction."""
        parts = [self.question.strip()]
        if self.choices and self.show_choices:
            parts.append(choice_lines(self.choices))
        parts.append(choice_instruction if self.answer_type == MC else instruction)
        return "\n".join(p.strip() for p in parts if p and p.strip())

    def score_items(self, response: str, finished: bool) -> list[tuple]:
        """Reward items for the pool: the reference first, then the right option's text (multiple choice) or
        the word answer wrapped in \\text{} (math-verify reads bare words as products of symbols)."""
        items = [(response, self.answer, self.answer_type, finished)]
        if self.answer_type == MC and self.choices and len(self.answer) == 1 and self.answer in LETTERS:
            idx = LETTERS.index(self.answer)
            text = self.choices[idx].strip() if idx < len(self.choices) else ""
            if text and len(text) <= 256 and not re.fullmatch(r"\(?[A-Za-z]\)?\.?", text):
                items.append((response, text, MATH, finished))
        if self.text_answer and "\\" not in self.answer and re.search(r"[A-Za-z]{2}", self.answer):
            items.append((response, "\\text{" + self.answer + "}", MATH, finished))
        return items


# ----------------------------------------------------------------------------- reading


def iter_rows(path: str) -> Iterator[tuple[str, Any, Optional[str]]]:
    """(where, row or BadRecord, key) for each row of a JSON / JSONL / Parquet / CSV / TSV file.

    JSON files hold a list of rows or a dict {id: row} (key = the id)."""
    from ovr_hpc.data.records import iter_raw

    if path.endswith((".jsonl", ".parquet")):
        for where, obj in iter_raw(path):
            yield where, obj, None
        return
    if path.endswith((".csv", ".tsv")):
        csv.field_size_limit(1 << 30)   # TSV benchmarks (MMBench) hold base64 images of several MB in a field
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
            for row in reader:
                yield f"{path}:{reader.line_num}", row, None
        return
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        yield path, BadRecord("malformed_json", f"cannot read JSON: {e}"), None
        return
    if isinstance(data, dict):
        for key, row in data.items():
            yield f"{path}:{key}", row, str(key)
    elif isinstance(data, list):
        for i, row in enumerate(data):
            yield f"{path}:[{i}]", row, None
    else:
        yield path, BadRecord("malformed_json", "expected a list of rows or an object {id: row}"), None


def resolve_files(pattern: str) -> list[str]:
    """A file, a folder (its data files, recursively) or a glob -> sorted data files."""
    if os.path.isdir(pattern):
        found = []
        for root, _, names in os.walk(pattern):
            found += [os.path.join(root, n) for n in names if n.endswith(DATA_EXTENSIONS)]
        return sorted(found)
    if any(c in pattern for c in "*?["):
        return sorted(p for p in glob.glob(pattern, recursive=True) if p.endswith(DATA_EXTENSIONS))
    return [pattern] if os.path.isfile(pattern) else []


class ImageResolver:
    """Benchmark image fields -> references qwen-vl-utils reads (paths, URLs, data: URIs)."""

    def __init__(self, data_file: str, images_root: str):
        self.data_dir = os.path.dirname(os.path.abspath(data_file))
        self.root = images_root

    def __call__(self, value: Any) -> str:
        if isinstance(value, dict):  # Parquet / datasets Image struct
            if value.get("bytes"):
                return self(bytes(value["bytes"]))
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return embedded_image(bytes(value), None)   # evaluation sets are small enough to keep in memory
        if not isinstance(value, str) or not value.strip():
            raise BadRecord("bad_image", f"image field {str(value)[:80]!r} is neither a path nor image bytes")
        value = value.strip()
        if value.startswith(("http://", "https://", "data:image", "file://")):
            return value
        if os.path.isabs(value):
            if os.path.exists(value):
                return value
            raise BadRecord("missing_image", f"image {value} does not exist")
        base = os.path.basename(value)
        candidates = [os.path.join(self.root, value), os.path.join(self.root, base), os.path.join(self.data_dir, value),
                      os.path.join(self.data_dir, "images", value), os.path.join(self.data_dir, "images", base)]
        for c in candidates:
            if os.path.isfile(c):
                return os.path.normpath(c)
        raise BadRecord("missing_image", f"image {value!r} not found in {self.root} (nor beside the data file)")


@dataclass
class Context:
    """What an adapter needs besides the row: where it came from and how to find its images."""

    path: str
    file_index: int
    images: ImageResolver
    options: dict
    data_root: str = ""


def field_of(row: dict, *names: str, default: Any = None) -> Any:
    """The first of `names` present in the row with a non-empty value."""
    for n in names:
        v = row.get(n)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    return default


def required(row: dict, *names: str) -> Any:
    v = field_of(row, *names)
    if v is None:
        raise BadRecord("missing_field", f"no {' / '.join(repr(n) for n in names)} field")
    return v


def answer_text(value: Any) -> str:
    if isinstance(value, bool):
        raise BadRecord("bad_answer", f"answer {value!r} is not text or a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and len(value) == 1:
        return answer_text(value[0])
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("empty_answer", f"answer {value!r} is empty or not text")
    return value.strip()


def as_list(value: Any) -> list:
    """Option lists stored as lists, numpy-free arrays, or their Python repr in a string."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        try:
            parsed = ast.literal_eval(s)  # literals only: never evaluates code
        except (ValueError, SyntaxError):
            raise BadRecord("bad_choices", f"options {s[:80]!r} are not a list") from None
        value = parsed
    if not isinstance(value, (list, tuple)):
        raise BadRecord("bad_choices", f"options {str(value)[:80]!r} are not a list")
    return [str(v) for v in value]


def is_letter_answer(answer: str) -> bool:
    """'B', '(B)', 'A, C', 'B and D': a choice reference the reward compares as letters."""
    return bool(re.fullmatch(r"\(?[A-Z]\)?(?:\s*(?:,|and|&)?\s*\(?[A-Z]\)?)*", answer.strip()))


# ----------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampling_metrics(scores: dict[str, list[float]], n: int, pass_k: list[int] = ()) -> dict:
    """avg@n (mean over questions of the mean over samples; = accuracy when greedy) and pass@k."""
    if not scores:
        return {"accuracy": None, "num_questions": 0}
    out = {"accuracy": sum(sum(s) / len(s) for s in scores.values()) / len(scores), "num_questions": len(scores)}
    if n > 1:
        out[f"avg@{n}"] = out["accuracy"]
    for k in sorted(set(list(pass_k) + ([n] if n > 1 else []))):
        total = sum(pass_at_k(len(s), int(sum(x >= 1.0 for x in s)), k) for s in scores.values())
        out[f"pass@{k}"] = total / len(scores)
    return out


def all_of_group(samples: list[EvalSample], scores: dict[str, list[float]]) -> tuple[float, int]:
    """(share of groups whose questions are all right, number of groups), per sample index then averaged:
    DynaMath's worst case over variants, MMBench's circular evaluation over option orders."""
    groups: dict[str, list[str]] = {}
    for s in samples:
        if s.id in scores:
            groups.setdefault(s.group or s.id, []).append(s.id)
    if not groups:
        return 0.0, 0
    n = min(len(v) for v in scores.values())
    right = sum(sum(all(scores[i][j] >= 1.0 for i in ids) for j in range(n)) / n for ids in groups.values())
    return right / len(groups), len(groups)


# MME's subtasks: ten perception and four cognition ones (`category` in lmms-lab/MME)
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(samples: list[EvalSample], scores: dict[str, list[float]]) -> dict:
    """MME's score: per subtask, acc (questions right) + acc+ (images with both questions right); summed
    over the perception (max 20, shown x100 as MME's 2000 points) and cognition subtasks (max 8)."""
    n = min((len(v) for v in scores.values()), default=0)
    by_task: dict[str, list[EvalSample]] = {}
    for s in samples:
        if s.id in scores:
            by_task.setdefault(str(s.meta.get("category")), []).append(s)
    out: dict[str, Any] = {}
    for task, task_samples in sorted(by_task.items()):
        images: dict[str, list[str]] = {}
        for s in task_samples:
            images.setdefault(s.group or s.id, []).append(s.id)
        acc = sum(scores[s.id][j] >= 1.0 for s in task_samples for j in range(n)) / (n * len(task_samples))
        acc_plus = sum(all(scores[i][j] >= 1.0 for i in ids) for ids in images.values() for j in range(n)) / (
            n * len(images))
        out[f"{task}_score"] = acc + acc_plus
    for part, tasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [t for t in tasks if f"{t}_score" in out]
        out[part] = sum(out[f"{t}_score"] for t in present) if present else None
        missing = [t for t in tasks if t not in present]
        if present and missing:
            out[f"{part}_missing_subtasks"] = missing
    return out


def dynamath_worst_case(samples: list[EvalSample], scores: dict[str, list[float]]) -> dict:
    """A seed question counts only when all its variants are right (per sample index, then averaged)."""
    worst, num_groups = all_of_group(samples, scores)
    if not num_groups:
        return {"worst_case": None, "average_case": None, "num_seed_questions": 0}
    n = min(len(v) for v in scores.values())
    sizes = list(Counter(s.group or s.id for s in samples if s.id in scores).values())
    return {
        "worst_case": worst,
        "average_case": sum(sum(v[:n]) / n for v in scores.values()) / len(scores),
        "num_seed_questions": num_groups,
        "variants_per_question": [min(sizes), max(sizes)],
    }


WEMATH_KEY = re.compile(r"^(\d)steps?_(\d+|multi)$")


def wemath_four_dimensional(samples: list[EvalSample], scores: dict[str, list[float]]) -> dict:
    """WeMath's four dimensions over composite problems (sub-problems k..1 + the multi-step one).

    IK: a sub-problem wrong and the composite wrong; IG: all sub-problems right, the composite wrong;
    CM: the composite right with all sub-problems right (strict) / at least one right (loose);
    RM: the composite right otherwise. Score = (N - 0.5 IG - RM - IK) / N over N composite problems,
    computed per sample index and averaged."""
    problems: dict[str, dict[str, str]] = {}
    for s in samples:
        m = WEMATH_KEY.match(str(s.meta.get("key", "")))
        if not m or s.id not in scores:
            continue
        steps, part = m.group(1), m.group(2)
        problems.setdefault(f"{steps}:{s.group}", {"steps": steps})[part] = s.id
    complete = {k: v for k, v in problems.items()
                if "multi" in v and all(str(i) in v for i in range(1, int(v["steps"]) + 1))}
    out: dict[str, Any] = {"num_problems": len(complete), "incomplete_problems": len(problems) - len(complete)}
    if not complete:
        out.update(score_strict=None, score_loose=None)
        return out
    n = min(len(v) for v in scores.values())
    totals = {k: 0.0 for k in ("IK", "IG", "CM_strict", "RM_strict", "CM_loose", "RM_loose")}
    for p in complete.values():
        for j in range(n):
            subs = [scores[p[str(i)]][j] >= 1.0 for i in range(1, int(p["steps"]) + 1)]
            multi = scores[p["multi"]][j] >= 1.0
            if not multi:
                totals["IG" if all(subs) else "IK"] += 1
            else:
                totals["CM_strict" if all(subs) else "RM_strict"] += 1
                totals["CM_loose" if any(subs) else "RM_loose"] += 1
    count = len(complete)
    rates = {k: v / n / count for k, v in totals.items()}
    out.update({f"{k}_rate": v for k, v in rates.items()})
    out["score_strict"] = 1.0 - 0.5 * rates["IG"] - rates["RM_strict"] - rates["IK"]
    out["score_loose"] = 1.0 - 0.5 * rates["IG"] - rates["RM_loose"] - rates["IK"]
    return out


# ----------------------------------------------------------------------------- adapters


class Benchmark:
    """Base adapter. Subclasses set the class attributes and implement `convert`."""

    name = ""
    title = ""
    layout = ""  # what the adapter reads (documentation, README table)
    scoring = ""  # the scoring rule in words (summary table)
    default_path = ""  # relative to data_root
    default_images = ""  # relative to the data file's folder
    headline = ("accuracy",)  # metrics shown in the summary table
    option_names: tuple[str, ...] = ()

    def validate_options(self, options: dict, prefix: str) -> None:
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            allowed = ", ".join(self.option_names) or "none"
            raise ConfigError(f"{prefix}: unknown option(s) {', '.join(unknown)} for {self.name} (allowed: {allowed})")

    def files(self, spec, data_root: str) -> list[str]:
        pattern = spec.path or self.default_path
        if data_root and not os.path.isabs(pattern):
            pattern = os.path.join(data_root, pattern)
        files = resolve_files(pattern)
        if not files:
            raise FileNotFoundError(
                f"benchmark {spec.key}: no data files at {pattern} ({self.layout}); download the benchmark and set "
                f"its path (or data_root)"
            )
        return files

    def load(self, spec, data_root: str = "") -> tuple[list[EvalSample], DataReport, dict]:
        """All usable samples (first `spec.limit`), the bad-record report, and counts of rows outside the subset."""
        report, samples, seen, info = DataReport(), [], set(), {"skipped_rows": 0}
        for file_index, path in enumerate(self.files(spec, data_root)):
            stem = os.path.splitext(os.path.basename(path))[0]
            images_root = spec.images or os.path.join(os.path.dirname(os.path.abspath(path)), self.default_images)
            if spec.images and data_root and not os.path.isabs(spec.images):
                images_root = os.path.join(data_root, spec.images)
            ctx = Context(path, file_index, ImageResolver(path, images_root), spec.options, data_root)
            for row_index, (where, row, key) in enumerate(iter_rows(path)):
                if key is None:  # list / JSONL / Parquet / CSV rows without an id field: numbered per file
                    key = f"{stem}:{row_index + 1}"
                try:
                    if isinstance(row, BadRecord):
                        raise row
                    if not isinstance(row, dict):
                        raise BadRecord("malformed_json", "a row must be an object")
                    converted = self.convert(row, key, ctx)
                except BadRecord as e:
                    report.num_total += 1
                    report.add_bad(where, e.kind, e.message)
                    continue
                if converted is None:  # outside the evaluated subset (e.g. MathVerse's other versions)
                    info["skipped_rows"] += 1
                    continue
                report.num_total += 1
                for s in converted:
                    s.where = s.where or where
                    if s.id in seen:
                        report.add_bad(where, "duplicate_id", f"sample id {s.id!r} appears twice")
                        continue
                    seen.add(s.id)
                    samples.append(s)
        if spec.limit is not None:
            samples = samples[: spec.limit]
        return samples, report, info

    def convert(self, row: dict, key: Optional[str], ctx: Context) -> Optional[list[EvalSample]]:
        raise NotImplementedError

    def aggregate(self, samples: list[EvalSample], scores: dict[str, list[float]], n: int,
                  pass_k: list[int] = ()) -> dict:
        return sampling_metrics(scores, n, pass_k)

    # helpers
    @staticmethod
    def sample_id(row: dict, key: Optional[str], *names: str) -> str:
        v = field_of(row, *names)
        if v is None:
            v = key
        if v is None:
            raise BadRecord("missing_field", f"no id ({' / '.join(names)})")
        return str(v)

    @staticmethod
    def image_list(row: dict, ctx: Context, *names: str) -> list[str]:
        """Images from the first field present (embedded bytes preferred over paths)."""
        for n in names:
            v = row.get(n)
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            if isinstance(v, dict) and not v.get("bytes") and not v.get("path"):
                continue
            return [ctx.images(x) for x in (v if isinstance(v, list) else [v])]
        raise BadRecord("missing_image", f"no image ({' / '.join(names)})")


class MathVista(Benchmark):
    name, title = "mathvista", "MathVista (testmini)"
    layout = "AI4Math/MathVista: data/testmini-*.parquet (decoded_image) or testmini.json {pid: row} + images/"
    scoring = "choice: boxed letter or option text; free form: reward equivalence (numbers with tolerance)"
    default_path = "MathVista/data/testmini-*.parquet"

    def convert(self, row, key, ctx):
        sid = self.sample_id(row, key, "pid")
        question = str(required(row, "question"))
        images = self.image_list(row, ctx, "decoded_image", "image")
        answer = answer_text(required(row, "answer"))
        if str(row.get("question_type", "")).startswith("multi"):
            choices = as_list(row.get("choices"))
            letter = letter_of(answer, choices) if choices else None
            if letter is None:
                raise BadRecord("bad_answer", f"answer {answer!r} is none of the choices {choices}")
            return [EvalSample(sid, question, letter, MC, images, choices)]
        kind = str(row.get("answer_type", ""))
        precision = row.get("precision")
        if kind == "float" and isinstance(precision, (int, float)) and not math.isnan(precision):
            places = f"{int(precision)} decimal place" + ("s" if precision != 1 else "")
            question += f"\n(Give the answer as a number with {places}.)"
        elif kind == "integer":
            question += "\n(The answer is an integer.)"
        return [EvalSample(sid, question, answer, NUMBER if kind in ("integer", "float") else MATH, images,
                           text_answer=kind == "text")]


class MathVision(Benchmark):
    name, title = "mathvision", "MathVision (test)"
    layout = "MathLLMs/MathVision: data/test-*.parquet (decoded_image) or test.jsonl + images/"
    scoring = "options: boxed letter or option text; otherwise reward equivalence"
    default_path = "MathVision/data/test-*.parquet"

    def convert(self, row, key, ctx):
        sid = self.sample_id(row, key, "id")
        question = str(required(row, "question"))
        images = self.image_list(row, ctx, "decoded_image", "image")
        answer = answer_text(required(row, "answer"))
        choices = as_list(row.get("options"))
        if choices:
            letter = letter_of(answer, choices)
            if letter is None:
                raise BadRecord("bad_answer", f"answer {answer!r} is none of the options {choices}")
            return [EvalSample(sid, question, letter, MC, images, choices)]
        return [EvalSample(sid, question, answer, MATH, images)]


class MathVerse(Benchmark):
    name, title = "mathverse", "MathVerse (vision-only)"
    layout = "AI4Math/MathVerse: testmini.json or testmini.parquet (+ images/); rows filtered by problem_version"
    scoring = "multi-choice: boxed letter; free form: reward equivalence"
    default_path = "MathVerse/testmini.json"
    option_names = ("versions",)

    def convert(self, row, key, ctx):
        versions = mathverse_versions(ctx.options)
        if versions and str(row.get("problem_version", "")) not in versions:
            return None
        sid = self.sample_id(row, key, "sample_index")
        images = self.image_list(row, ctx, "image", "decoded_image")
        answer = answer_text(required(row, "answer"))
        question = str(field_of(row, "question", default="")).strip() or "Solve the problem shown in the image."
        mc = str(row.get("question_type", "")).startswith("multi") and is_letter_answer(answer)
        return [EvalSample(sid, question, answer, MC if mc else MATH, images, show_choices=False,
                           meta={"problem_version": row.get("problem_version")})]


def mathverse_versions(options: dict) -> list[str]:
    v = options.get("versions", ["Vision Only"])
    return [v] if isinstance(v, str) else list(v)


class DynaMath(Benchmark):
    name, title = "dynamath", "DynaMath (worst case)"
    layout = "DynaMath/DynaMath_Sample: data/sample{1..10}-*.parquet (one file set per variant) or JSON/JSONL"
    scoring = "reward equivalence per variant; a seed question counts only if all its variants are right"
    default_path = "DynaMath_Sample/data/sample*.parquet"
    headline = ("worst_case", "average_case")

    def convert(self, row, key, ctx):
        qid = self.sample_id(row, key, "id", "qid")
        variant = field_of(row, "variant")
        if variant is None:
            m = re.search(r"(?:sample|variant)[_-]?(?:variant)?(\d+)", os.path.basename(ctx.path))
            variant = m.group(1) if m else str(ctx.file_index + 1)
        question = str(required(row, "question"))
        images = self.image_list(row, ctx, "decoded_image", "image")
        answer = answer_text(required(row, "ground_truth", "answer"))
        kind = str(row.get("answer_type", "")).lower()
        if "choice" in kind:
            atype = MC
        elif kind in ("float", "number"):
            atype = NUMBER
        else:
            atype = MATH
        return [EvalSample(f"{qid}@v{variant}", question, answer, atype, images, show_choices=False, group=qid,
                           meta={"variant": str(variant)})]

    def aggregate(self, samples, scores, n, pass_k=()):
        return {**sampling_metrics(scores, n, pass_k), **dynamath_worst_case(samples, scores)}


class WeMath(Benchmark):
    name, title = "wemath", "WeMath (testmini)"
    layout = "We-Math/We-Math: testmini.json or testmini.parquet (ID, key, question, option, answer, image_path)"
    scoring = "boxed letter; four-dimensional strict / loose scores over composite problems"
    default_path = "We-Math/testmini.json"
    headline = ("score_strict", "score_loose")

    def convert(self, row, key, ctx):
        pid = str(required(row, "ID"))
        part = str(field_of(row, "key", default="")).strip()
        question = str(required(row, "question"))
        option = field_of(row, "option", "options", default="")
        if isinstance(option, list):
            option = "\n".join(map(str, option))
        if option:
            question += "\n" + str(option).strip()
        images = self.image_list(row, ctx, "image", "decoded_image", "image_path")
        answer = answer_text(required(row, "answer"))
        if not is_letter_answer(answer):
            raise BadRecord("bad_answer", f"answer {answer!r} is not an option letter")
        return [EvalSample(f"{pid}_{part}" if part else pid, question, answer, MC, images, show_choices=False,
                           group=pid, meta={"key": part})]

    def aggregate(self, samples, scores, n, pass_k=()):
        return {**sampling_metrics(scores, n, pass_k), **wemath_four_dimensional(samples, scores)}


class LogicVista(Benchmark):
    name, title = "logicvista", "LogicVista"
    layout = "Yijia-Xiao/LogicVista: data/dataset.json {id: {imagename, question, answer}} + data/images/"
    scoring = "letters (sets of letters compared as sets); numbered options by reward equivalence"
    default_path = "LogicVista/data/dataset.json"
    default_images = "images"

    def convert(self, row, key, ctx):
        sid = self.sample_id(row, key, "id")
        question = str(required(row, "question"))
        images = self.image_list(row, ctx, "image", "imagename")
        answer = answer_text(required(row, "answer"))
        return [EvalSample(sid, question, answer, MC if is_letter_answer(answer) else MATH, images, show_choices=False)]


class MMMUPro(Benchmark):
    name, title = "mmmu_pro", "MMMU-Pro"
    layout = ("MMMU/MMMU_Pro: 'standard (10 options)/test-*.parquet' (question, options, image_1..7) or "
              "'vision/test-*.parquet' (the question and options inside the image)")
    scoring = "boxed letter or option text"
    default_path = "MMMU_Pro/standard (10 options)/test-*.parquet"

    def convert(self, row, key, ctx):
        sid = self.sample_id(row, key, "id")
        answer = answer_text(required(row, "answer"))
        choices = as_list(row.get("options"))
        letter = letter_of(answer, choices)
        if letter is None:
            raise BadRecord("bad_answer", f"answer {answer!r} is none of the options")
        question = field_of(row, "question")
        if question is None:  # vision setting: one screenshot holds question and options
            images = self.image_list(row, ctx, "image")
            return [EvalSample(sid, "Answer the question shown in the image.", letter, MC, images, choices,
                               show_choices=False, meta={"setting": "vision"})]
        images = [ctx.images(row[f"image_{i}"]) for i in range(1, 8)
                  if row.get(f"image_{i}") not in (None, "") and not (isinstance(row[f"image_{i}"], dict)
                                                                     and not any(row[f"image_{i}"].values()))]
        return [EvalSample(sid, str(question), letter, MC, images, choices, meta={"setting": "standard"})]


class CharXivReasoning(Benchmark):
    name, title = "charxiv_reasoning", "CharXiv (reasoning, val)"
    layout = "princeton-nlp/CharXiv: data/reasoning_val.json {id: {figure_id, query, answer}} + images/<figure_id>.jpg"
    scoring = "reward equivalence (numbers, LaTeX) or normalised text match"
    default_path = "CharXiv/data/reasoning_val.json"
    default_images = "../images"

    def convert(self, row, key, ctx):
        question = str(required(row, "query", "raw_question", "reasoning_q"))
        answer = answer_text(required(row, "answer", "reasoning_a"))
        figure = field_of(row, "figure_id", "original_id")
        sid = str(figure if figure is not None else self.sample_id(row, key, "id"))
        images = charxiv_images(row, ctx, figure)
        return [EvalSample(sid, question, answer, MATH, images, text_answer=True)]


def charxiv_images(row: dict, ctx: Context, figure: Any) -> list[str]:
    if isinstance(row.get("image"), dict) or row.get("figure_path"):
        return Benchmark.image_list(row, ctx, "image", "figure_path")
    if figure is None:
        raise BadRecord("missing_field", "no figure_id / image")
    return [ctx.images(f"{figure}.jpg")]


class CharXivDescriptive(Benchmark):
    name, title = "charxiv_descriptive", "CharXiv (descriptive, val)"
    layout = ("princeton-nlp/CharXiv: data/descriptive_val.json {id: {figure_id, qids, answers, subplot_loc}} "
              "with options.templates (a JSON {qid: question text, '{subplot}' filled in}), or rows that carry "
              "the question text (question / query, answer)")
    scoring = "reward equivalence (numbers, LaTeX) or normalised text match"
    default_path = "CharXiv/data/descriptive_val.json"
    default_images = "../images"
    option_names = ("templates",)

    def __init__(self):
        self._templates: dict[str, dict] = {}

    def templates(self, ctx: Context) -> Optional[dict]:
        path = ctx.options.get("templates")
        if not path:
            return None
        if ctx.data_root and not os.path.isabs(path):
            path = os.path.join(ctx.data_root, path)
        if path not in self._templates:
            with open(path, encoding="utf-8") as f:
                self._templates[path] = {str(k): v for k, v in json.load(f).items()}
        return self._templates[path]

    def convert(self, row, key, ctx):
        figure = field_of(row, "figure_id", "original_id")
        images = charxiv_images(row, ctx, figure)
        base = str(figure if figure is not None else self.sample_id(row, key, "id"))
        text = field_of(row, "question", "query")
        if text is not None:  # one question per row
            return [EvalSample(base, str(text), answer_text(required(row, "answer")), MATH, images, text_answer=True)]
        if "qids" in row:
            qids, answers = list(row["qids"]), list(required(row, "answers"))
        else:  # Parquet: descriptive_q1..4 / descriptive_a1..4
            qids = [row.get(f"descriptive_q{i}") for i in range(1, 5) if row.get(f"descriptive_q{i}") is not None]
            answers = [row.get(f"descriptive_a{i}") for i in range(1, 5) if row.get(f"descriptive_q{i}") is not None]
        if not qids or len(qids) != len(answers):
            raise BadRecord("missing_field", "no descriptive questions (qids / answers of equal length)")
        out = []
        for i, (q, a) in enumerate(zip(qids, answers)):
            out.append(EvalSample(f"{base}_{i}", self.question_text(q, row, ctx), answer_text(a), MATH, images,
                                  meta={"qid": q}, text_answer=True))
        return out

    def question_text(self, q: Any, row: dict, ctx: Context) -> str:
        if isinstance(q, str) and not q.strip().isdigit():
            return q
        templates = self.templates(ctx)
        if templates is None:
            raise BadRecord("no_question_text",
                            f"question {q} is a template id: set the benchmark's options.templates to a JSON "
                            "{qid: question text} (CharXiv ships its templates with its own code)")
        if str(q) not in templates:
            raise BadRecord("no_question_text", f"template id {q} not in the templates {ctx.options['templates']}")
        text = str(templates[str(q)])
        return text.replace("{subplot}", subplot_phrase(row))


def subplot_phrase(row: dict) -> str:
    loc, num = row.get("subplot_loc"), row.get("num_subplots") or 1
    if isinstance(loc, str) and loc.strip():
        return loc.strip()
    if isinstance(loc, (list, tuple)) and len(loc) == 2 and num and int(num) > 1 and all(int(x) > 0 for x in loc):
        return f"the subplot at row {int(loc[0])} and column {int(loc[1])}"
    return "the plot"


class TextMath(Benchmark):
    """MATH500, AIME: text problems with a math answer."""

    scoring = "reward equivalence (math-verify)"

    def convert(self, row, key, ctx):
        sid = self.sample_id(row, key, "unique_id", "id", "ID", "problem_idx", "idx")
        question = str(required(row, "problem", "question", "Problem", "Question"))
        answer = answer_text(required(row, "answer", "Answer"))
        return [EvalSample(sid, question, answer, MATH)]


class Math500(TextMath):
    name, title = "math500", "MATH500"
    layout = "HuggingFaceH4/MATH-500: test.jsonl (problem, answer, unique_id)"
    default_path = "MATH-500/test.jsonl"


class AIME24(TextMath):
    name, title = "aime24", "AIME 2024"
    layout = "HuggingFaceH4/aime_2024: data/train-*.parquet (id, problem, answer) or any JSONL with problem/answer"
    default_path = "aime_2024/data/*.parquet"


class AIME25(TextMath):
    name, title = "aime25", "AIME 2025"
    layout = "opencompass/AIME2025: aime2025-I.jsonl + aime2025-II.jsonl (question, answer)"
    default_path = "AIME2025/aime2025-*.jsonl"


class GPQADiamond(Benchmark):
    name, title = "gpqa_diamond", "GPQA-Diamond"
    layout = ("Idavidrein/gpqa: dataset/gpqa_diamond.csv (Question, Correct Answer, Incorrect Answer 1-3, "
              "Record ID); options shuffled once per question from its id, so every run shows the same order")
    scoring = "boxed letter or option text"
    default_path = "gpqa/dataset/gpqa_diamond.csv"

    def convert(self, row, key, ctx):
        question = str(required(row, "Question", "question")).strip()
        if "Correct Answer" in row:
            correct = answer_text(required(row, "Correct Answer"))
            wrong = [answer_text(required(row, f"Incorrect Answer {i}")) for i in (1, 2, 3)]
            sid = str(field_of(row, "Record ID", default=hashlib.sha256(question.encode()).hexdigest()[:12]))
            choices = [correct] + wrong
            seed = int(hashlib.sha256(sid.encode()).hexdigest()[:16], 16)
            random.Random(seed).shuffle(choices)
            letter = LETTERS[choices.index(correct)]
        else:  # JSONL re-packagings: question, choices/options, answer (letter or text)
            sid = self.sample_id(row, key, "id", "Record ID")
            choices = as_list(required(row, "choices", "options"))
            letter = answer_letter(answer_text(required(row, "answer")), choices)
        return [EvalSample(sid, question, letter, MC, [], choices)]


class Records(Benchmark):
    name, title = "records", "records"
    layout = "our RL record format (JSONL / Parquet: problem, answer, images, id, answer_type)"
    scoring = "reward equivalence with the record's answer_type"

    def load(self, spec, data_root=""):
        from ovr_hpc.data.records import read_records

        records, report = read_records(self.files(spec, data_root), kind="rl", check_images=False)
        samples, seen = [], set()
        for i, r in enumerate(records):
            sid = str(r.data.get("id", i))
            if sid in seen:
                report.add_bad(r.where, "duplicate_id", f"sample id {sid!r} appears twice")
                continue
            seen.add(sid)
            samples.append(EvalSample(sid, r.data["problem"], r.data["answer"], r.data.get("answer_type") or "",
                                      r.images, where=r.where, meta={"source": r.data.get("source")}))
        if spec.limit is not None:
            samples = samples[: spec.limit]
        return samples, report, {"skipped_rows": 0}


class TextChoice(Benchmark):
    """Text multiple choice: a question, a list of options, the answer as an index, a letter or the option."""

    scoring = "boxed letter or option text"
    category_fields: tuple[str, ...] = ()

    def convert(self, row, key, ctx):
        question = str(required(row, "question")).strip()
        choices = as_list(required(row, "choices", "options"))
        answer = required(row, "answer_index", "answer")
        letter = answer_letter(answer if isinstance(answer, int) else answer_text(answer), choices)
        category = field_of(row, *self.category_fields) if self.category_fields else None
        sid = self.sample_id(row, key, "question_id", "id")
        return [EvalSample(sid, question, letter, MC, [], choices, meta={"category": category})]


class MMLU(TextChoice):
    name, title = "mmlu", "MMLU"
    layout = "cais/mmlu: all/test-*.parquet (question, subject, choices, answer = option index)"
    default_path = "mmlu/all/test-*.parquet"
    category_fields = ("subject",)


class MMLUPro(TextChoice):
    name, title = "mmlu_pro", "MMLU-Pro"
    layout = "TIGER-Lab/MMLU-Pro: data/test-*.parquet (question_id, question, options (up to 10), answer, category)"
    default_path = "MMLU-Pro/data/test-*.parquet"
    category_fields = ("category",)


def _missing(value: Any) -> bool:
    """An empty cell: None, "", or the "nan" pandas writes into TSV/CSV files."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


class MMBench(Benchmark):
    name, title = "mmbench_en", "MMBench (en)"
    layout = ("lmms-lab/MMBench: en/dev-*.parquet, or OpenCompass' MMBench_DEV_EN.tsv (index, question, hint, A-D, "
              "answer, category, image as base64); copies of a question with rotated options share index mod 10^6")
    scoring = "boxed letter or option text; circular: a question counts only when all its option orders are right"
    default_path = "MMBench/en/dev-*.parquet"
    headline = ("circular", "accuracy")

    def convert(self, row, key, ctx):
        try:
            index = int(float(required(row, "index")))
        except (TypeError, ValueError):
            raise BadRecord("bad_id", f"index {row.get('index')!r} is not a number") from None
        question = str(required(row, "question")).strip()
        if not _missing(row.get("hint")):
            question = f"Hint: {str(row['hint']).strip()}\n{question}"
        choices = []
        for letter in LETTERS:
            if _missing(row.get(letter)):
                break
            choices.append(str(row[letter]).strip())
        if len(choices) < 2:
            raise BadRecord("bad_choices", f"{len(choices)} options (columns A, B, ...)")
        letter = answer_letter(answer_text(required(row, "answer")), choices)
        image = required(row, "image")
        base64_cell = isinstance(image, str) and not re.search(r"^(data:|https?:)|\.(png|jpe?g|gif|bmp|webp)$",
                                                               image.strip(), re.I)
        if base64_cell:   # the TSV's images
            image = "data:image;base64," + image.strip()
        return [EvalSample(str(index), question, letter, MC, [ctx.images(image)], choices,
                           group=str(index % 1_000_000), meta={"category": field_of(row, "category")})]

    def aggregate(self, samples, scores, n, pass_k=()):
        circular, questions = all_of_group(samples, scores)
        return {**sampling_metrics(scores, n, pass_k), "circular": circular if questions else None,
                "num_circular_questions": questions}


class MME(Benchmark):
    name, title = "mme", "MME"
    layout = "lmms-lab/MME: data/test-*.parquet (question_id = the image, image, question, answer Yes / No, category)"
    scoring = "boxed yes / no; per subtask acc + acc+ (both questions of an image right), summed over subtasks"
    default_path = "MME/data/test-*.parquet"
    headline = ("perception", "cognition")

    def convert(self, row, key, ctx):
        image_id = str(required(row, "question_id"))
        category = str(required(row, "category"))
        answer = answer_text(required(row, "answer")).rstrip(".").capitalize()
        if answer not in ("Yes", "No"):
            raise BadRecord("bad_answer", f"answer {answer!r} is not yes or no")
        return [EvalSample(key, str(required(row, "question")).strip(), answer, MATH,
                           self.image_list(row, ctx, "image", "image_path"), group=f"{category}/{image_id}",
                           meta={"category": category})]

    def aggregate(self, samples, scores, n, pass_k=()):
        return {**sampling_metrics(scores, n, pass_k), **mme_scores(samples, scores)}


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (MathVista(), MathVision(), MathVerse(), DynaMath(), WeMath(), LogicVista(), MMMUPro(),
              CharXivReasoning(), CharXivDescriptive(), Math500(), AIME24(), AIME25(), GPQADiamond(), MMLU(),
              MMLUPro(), MMBench(), MME(), Records())
}


def paper_numbers(name: str, metric: str) -> tuple[Optional[float], Optional[float]]:
    return PAPER_RESULTS.get(name, {}).get(metric, (None, None))
