"""Reading and validating records (JSONL or Parquet), with a report of every bad one.

A bad record (malformed JSON, missing field, empty answer, unreadable or corrupt image, non-UTF-8 text)
is reported with its file and line, counted by kind, and skipped; nothing is dropped silently. The
caller decides whether the share of bad records is acceptable (`DataReport.check_threshold`).

Record formats:
- cold start ("sft"): {"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}],
  "images": [path | url | base64], "id": ..., "source": ...}; or ShareGPT's
  {"conversations": [{"from": "human"|"gpt"|"system", "value": str}], ...}
- RL ("rl"): {"problem" (or "question"): str, "answer": str, "images": [...], "id", "source", "answer_type"};
  with "choices" (or "options") the answer may be an option's index, letter or text
An image is a path (relative to the record's file), an http(s) URL, a data: URI, or, in Parquet, the
{"bytes", "path"} struct of a Hugging Face `datasets` Image column; a record may name its images
"image" (one or a list) instead of "images".
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from ovr_hpc.data.errors import BadRecord
from ovr_hpc.data.prompts import IMAGE_PLACEHOLDER
from ovr_hpc.grading.choices import LETTERS, answer_letter, choice_lines

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20  # examples printed per report; every bad record is still counted


@dataclass
class DataReport:
    num_total: int = 0
    num_bad: int = 0
    kinds: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    # samples cut or dropped for length (not bad records, but counted the same way)
    num_truncated: int = 0
    num_dropped_overlong: int = 0

    def add_bad(self, where: str, kind: str, message: str) -> None:
        self.num_bad += 1
        self.kinds[kind] += 1
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(f"{where}: {kind}: {message}")

    def merge(self, other: "DataReport") -> None:
        self.num_total += other.num_total
        self.num_bad += other.num_bad
        self.kinds.update(other.kinds)
        self.examples.extend(other.examples[: max(0, MAX_REPORTED - len(self.examples))])
        self.num_truncated += other.num_truncated
        self.num_dropped_overlong += other.num_dropped_overlong

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_total if self.num_total else 0.0

    def format(self) -> str:
        lines = [f"{self.num_total} records, {self.num_bad} bad ({100 * self.bad_fraction:.2f}%)"]
        for kind, count in sorted(self.kinds.items()):
            lines.append(f"  {kind}: {count}")
        if self.num_truncated or self.num_dropped_overlong:
            lines.append(f"  overlong: {self.num_truncated} truncated, {self.num_dropped_overlong} dropped")
        if self.examples:
            lines.append("first bad records:")
            lines.extend(f"  {e}" for e in self.examples)
        return "\n".join(lines)

    def check_threshold(self, max_bad_fraction: float) -> None:
        if self.bad_fraction > max_bad_fraction:
            raise ValueError(
                f"{self.num_bad} of {self.num_total} records are bad ({100 * self.bad_fraction:.2f}% > "
                f"data.max_bad_fraction {100 * max_bad_fraction:.2f}%); fix the data or raise the threshold.\n"
                + self.format()
            )

    def to_json(self) -> dict:
        return {"num_total": self.num_total, "num_bad": self.num_bad, "kinds": dict(self.kinds),
                "examples": self.examples, "num_truncated": self.num_truncated,
                "num_dropped_overlong": self.num_dropped_overlong}

    @classmethod
    def from_json(cls, d: dict) -> "DataReport":
        return cls(d["num_total"], d["num_bad"], Counter(d["kinds"]), d["examples"], d["num_truncated"],
                   d["num_dropped_overlong"])

    def as_metrics(self) -> dict[str, int]:
        out = {"data/records": self.num_total, "data/bad": self.num_bad}
        out.update({f"data/bad_{k}": v for k, v in self.kinds.items()})
        out["data/truncated"] = self.num_truncated
        out["data/dropped_overlong"] = self.num_dropped_overlong
        return out


@dataclass
class Record:
    """A validated record. `where` is 'file:line' for messages; `images` are resolved references."""

    where: str
    data: dict[str, Any]
    images: list[str]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (h, w) after resizing, when checked
    index: int = 0  # position among all entries of the files read (what `select` chose by)


def iter_raw(path: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed object or BadRecord) for every line of a JSONL file / row of a Parquet file."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRecord("non_utf8", f"not UTF-8 at byte {e.start}")
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark from editors on Windows
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRecord("malformed_json", f"{e.msg} at column {e.colno}")


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    # A row group at a time: files with embedded images can be far larger than memory. A row group that
    # cannot be decoded costs its own rows (each reported), not the rest of the file.
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file
        yield path, BadRecord("unreadable_file", f"cannot read Parquet: {e}")
        return
    first_row = 1
    for group in range(parquet.num_row_groups):
        num_rows = parquet.metadata.row_group(group).num_rows
        try:
            rows = parquet.read_row_group(group).to_pylist()
        except Exception as e:  # noqa: BLE001
            rows = [BadRecord("unreadable_file", f"row group {group} cannot be decoded: {e}")] * num_rows
        for i, row in enumerate(rows):
            yield f"{path}:row {first_row + i}", row
        first_row += num_rows


def embedded_image(data: bytes, image_dir: str | None) -> str:
    """A reference to image bytes embedded in a record.

    With `image_dir`: a file under it named by the bytes' SHA-256, written once and atomically, so ranks,
    nodes and requeued runs share it (training sets hold too many images to keep in memory). Without: a
    data: URI (evaluation sets; checks)."""
    if image_dir is None:
        return "data:image;base64," + base64.b64encode(data).decode("ascii")
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(image_dir, digest[:2], digest)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.partial-{uuid.uuid4().hex}"
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    return path


def resolve_image_ref(ref: Any, base_dir: str, image_dir: str | None = None) -> str:
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):  # a `datasets` Image struct
        data = ref.get("bytes")
        if data:
            if not isinstance(data, (bytes, bytearray)):
                raise BadRecord("bad_image", f"embedded image 'bytes' is a {type(data).__name__}, not binary")
            return embedded_image(bytes(data), image_dir)
        ref = ref.get("path")
    if not isinstance(ref, str) or not ref:
        raise BadRecord("bad_image", f"image reference {str(ref)[:80]!r} is not a non-empty string")
    if ref.startswith(("http://", "https://", "data:image", "file://")):
        return ref
    return ref if os.path.isabs(ref) else os.path.normpath(os.path.join(base_dir, ref))


def _text_of(content: Any, where_field: str) -> tuple[str, int]:
    """Text and number of image slots of a message content (string with <image>, or a list of parts)."""
    if isinstance(content, str):
        return content, content.count(IMAGE_PLACEHOLDER)
    if isinstance(content, list):
        text, n_images = [], 0
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise BadRecord("bad_message", f"{where_field}: content parts must be objects with a 'type'")
            if part["type"] == "image":
                n_images += 1
            elif part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRecord("bad_message", f"{where_field}: text part without a string 'text'")
                text.append(part["text"])
            else:
                raise BadRecord("bad_message", f"{where_field}: unknown content part type {part['type']!r}")
        return "".join(text), n_images
    raise BadRecord("bad_message", f"{where_field}: content must be a string or a list of parts")


# ShareGPT's speaker names (LLaVA, many distilled reasoning sets) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


def _from_sharegpt(conversations: Any) -> list:
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("bad_message", "'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord("bad_message", f"conversations[{i}] needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise BadRecord("bad_message", f"conversations[{i}].from {turn['from']!r} is not one of "
                                           f"{sorted(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def validate_sft(obj: dict) -> int:
    """Checks a cold-start record; returns the number of image slots in its messages. A ShareGPT record
    gets its 'messages' from its 'conversations'."""
    messages = obj.get("messages")
    if messages is None and obj.get("conversations") is not None:
        messages = obj["messages"] = _from_sharegpt(obj["conversations"])
    if messages is None:
        raise BadRecord("missing_field", "no 'messages' (or ShareGPT 'conversations') field")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("bad_message", "'messages' must be a non-empty list")
    n_slots, n_assistant = 0, 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord("bad_message", f"messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRecord("bad_message", f"messages[{i}].role {m['role']!r} is not one of {ROLES}")
        text, slots = _text_of(m["content"], f"messages[{i}].content")
        n_slots += slots
        if m["role"] == "assistant":
            n_assistant += 1
            if slots:
                raise BadRecord("bad_message", f"messages[{i}]: images in an assistant message")
            if not text.strip():
                raise BadRecord("empty_answer", f"messages[{i}] (assistant) is empty")
    if n_assistant == 0:
        raise BadRecord("missing_field", "no assistant message to learn from")
    if messages[-1]["role"] != "assistant":
        raise BadRecord("bad_message", "the last message must be the assistant's")
    return n_slots


def _with_choices(obj: dict) -> None:
    """A multiple-choice record ('choices' or 'options', the answer as an index, a letter or the option's
    text, as ScienceQA-style datasets ship): the options go into the problem, the answer becomes the letter."""
    choices = obj.get("choices") if obj.get("choices") is not None else obj.get("options")
    if choices is None:
        return
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(
            isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
        raise BadRecord("bad_choices", f"'choices' must be a list of 2 to {len(LETTERS)} options")
    choices = [str(c).strip() for c in choices]
    obj["answer"] = answer_letter(obj["answer"], choices)
    obj["problem"] = f"{obj['problem'].rstrip()}\n{choice_lines(choices)}"
    obj["answer_type"] = obj.get("answer_type") or "multiple_choice"


def validate_rl(obj: dict) -> int:
    """Checks an RL record; returns the number of image slots in its problem. A 'question' field (as many
    datasets name it) stands for a missing 'problem'."""
    if obj.get("problem") is None and obj.get("question") is not None:
        obj["problem"] = obj["question"]
    for name in ("problem", "answer"):
        if name not in obj or obj[name] is None:
            raise BadRecord("missing_field", f"no {name!r} field")
    if not isinstance(obj["problem"], str) or not obj["problem"].strip():
        raise BadRecord("bad_message", "'problem' must be a non-empty string")
    _with_choices(obj)
    answer = obj["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if not math.isfinite(answer):   # JSON's NaN / Infinity extensions
            raise BadRecord("empty_answer", f"'answer' {answer!r} is not a finite number")
        obj["answer"] = answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise BadRecord("empty_answer", "'answer' must be a non-empty string")
    return obj["problem"].count(IMAGE_PLACEHOLDER)


VALIDATORS = {"sft": validate_sft, "rl": validate_rl}


def _image_field(obj: dict) -> list:
    """The record's image references: 'images' (a list), or 'image' (one, or a list) as many datasets name it."""
    if obj.get("images") is not None and obj.get("image") is not None:
        raise BadRecord("bad_image", "both 'images' and 'image' are given")
    if obj.get("images") is not None:
        if not isinstance(obj["images"], list):
            raise BadRecord("bad_image", "'images' must be a list")
        return obj["images"]
    image = obj.get("image")
    return [] if image is None else image if isinstance(image, list) else [image]


def read_records(
    paths: list[str],
    kind: str = "sft",
    check_images: bool = True,
    min_pixels: int = 3136,
    max_pixels: int = 1003520,
    select=None,
    image_dir: str | None = None,
) -> tuple[list[Record], DataReport]:
    """Every usable record of the files, in file order, and the report of the others.

    With check_images every image is decoded and resized once (a corrupt file is reported here) and its
    resized size kept in `Record.image_sizes`, which fixes its number of visual tokens.
    `select(i)` keeps only the i-th raw entries (over all files) it accepts: ranks split the work.
    `image_dir`: where images embedded in Parquet records are written (see `embedded_image`).
    """
    from ovr_hpc.data.vision import check_image

    validate = VALIDATORS[kind]
    report = DataReport()
    records: list[Record] = []
    raw_index = -1
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path} does not exist")
        base_dir = os.path.dirname(os.path.abspath(path))
        for where, obj in iter_raw(path):
            raw_index += 1
            if select is not None and not select(raw_index):
                continue
            report.num_total += 1
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                if not isinstance(obj, dict):
                    raise BadRecord("malformed_json", "a record must be a JSON object")
                n_slots = validate(obj)
                images = [resolve_image_ref(r, base_dir, image_dir) for r in _image_field(obj)]
                if n_slots and n_slots != len(images):
                    raise BadRecord(
                        "image_count_mismatch", f"{n_slots} image placeholders but {len(images)} images"
                    )
                sizes = [check_image(ref, min_pixels, max_pixels) for ref in images] if check_images else []
                records.append(Record(where=where, data=obj, images=images, image_sizes=sizes, index=raw_index))
            except BadRecord as e:
                report.add_bad(where, e.kind, e.message)
    return records, report
