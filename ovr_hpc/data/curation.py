"""Data curation as OVR did it: RL prompts by pass rate (too easy, infeasible) and proof questions, cold-start
samples by their loss under a pretrained model; what was removed is reported by source and reason.

    ovr-hpc data passrate CONFIG [key=value ...]    k responses per RL prompt with the current model, graded by
                                                   the training reward: OUTPUT_DIR/<label>/passrates.jsonl
    ovr-hpc data loss-scores CONFIG --out DIR      per-sample mean token loss of cold-start records (loss.py)
    ovr-hpc data filter FILE... --out KEPT.jsonl   keep a pass-rate band / drop proofs / drop the highest-loss
                                                   share (per source or overall); KEPT.jsonl.report.json

Pass rates are an evaluation: CONFIG is an eval config (ovr_hpc/eval/config.py) whose benchmarks are `records`
(our RL record format), with sampling.n = k and sampling.temperature > 0, run by the eval runner itself
(`run_eval`: transformers or vLLM engines, the ranks splitting the prompts, answers appended per batch so a
preempted run continues where it stopped, graded through ovr_hpc.grading.RewardPool). Once every answer is
there, rank 0 writes one line per record: {"id", "index", "where", "source", "k", "passes", "pass_rate",
"reasons"} (id: the record's id, or its position among the usable records as the records benchmark numbers
them; index: its position among all entries of the files). Use the RL stage's prompt settings (prompt.template,
prompt.instruction, prompt.system) so the prompts are the ones RL will see.

The proof rule (`is_proof`): the problem asks for a proof (prove / proving / show that / demonstrate that /
verify that / justify, as words, any case) and the reference is no answer a reward can check: not readable by
the grader (ovr_hpc.grading.check_reference other than "ok" or "multi_box"), or a proof marker (proof, proved,
QED, a box or tombstone symbol), or a sentence of more than 8 words. "Show that x = 3, then find x" with
answer 3 is kept; "Prove that the sum is even" with answer "proof" is dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from typing import Optional

from ovr_hpc.config import ConfigError

PASSRATES = "passrates.jsonl"


# ----------------------------------------------------------------------------- pass rates


def run_passrate(cfg, engine=None) -> dict:
    """Pass rates of cfg.model on the records of cfg.benchmarks (all `records`). Every rank calls it; returns
    run_eval's result with "passrates": {label: path} (rank 0, once complete)."""
    from ovr_hpc import dist
    from ovr_hpc.eval.runner import run_eval

    check_passrate_config(cfg)
    result = run_eval(cfg, engine)
    if result["status"] != "completed":
        return result
    paths = {}
    if dist.detect_rank_info().is_main:
        for spec in cfg.benchmarks:
            paths[spec.key] = write_passrates(cfg, spec)
            print(f"[passrate] {spec.key}: wrote {paths[spec.key]}", flush=True)
    dist.barrier()
    return {**result, "passrates": paths}


def check_passrate_config(cfg) -> None:
    for i, spec in enumerate(cfg.benchmarks):
        if spec.name != "records":
            raise ConfigError(f"benchmarks[{i}].name = {spec.name!r}: pass rates are measured on RL records, "
                              "benchmarks=[{name: records, path: FILE.jsonl}]")


def record_ids(records) -> list[Optional[str]]:
    """The id the records benchmark gives each usable record (None for a repeated id, which it skips)."""
    ids, seen = [], set()
    for i, r in enumerate(records):
        sid = str(r.data.get("id", i))
        ids.append(None if sid in seen else sid)
        seen.add(sid)
    return ids


def write_passrates(cfg, spec) -> str:
    """OUTPUT_DIR/<label>/passrates.jsonl from that benchmark's answers (records without all k answers, e.g.
    beyond `limit`, are left out)."""
    from ovr_hpc.data.records import read_records
    from ovr_hpc.eval.benchmarks import BENCHMARKS
    from ovr_hpc.eval.runner import read_results

    out_dir = os.path.join(cfg.output_dir, spec.key)
    found, _ = read_results(out_dir)
    records, _ = read_records(BENCHMARKS[spec.name].files(spec, cfg.data_root), kind="rl", check_images=False)
    k = cfg.sampling.n
    lines = []
    for r, sid in zip(records, record_ids(records)):
        got = [found.get((sid, j)) for j in range(k)] if sid is not None else [None]
        if any(g is None for g in got):
            continue
        passes = sum(float(g["score"]) > 0 for g in got)
        lines.append({"id": sid, "index": r.index, "where": r.where, "source": str(r.data.get("source", "unknown")),
                      "k": k, "passes": passes, "pass_rate": passes / k,
                      "reasons": dict(sorted(Counter(g["reason"] for g in got).items()))})
    path = os.path.join(out_dir, PASSRATES)
    _write_jsonl_atomic(path, lines)
    return path


# ----------------------------------------------------------------------------- the proof rule

PROOF_WORDS = re.compile(r"\b(prove|proves|proving|show that|demonstrate that|verify that|justify)\b", re.I)
PROOF_MARKERS = re.compile(r"\b(proof|proven|proved|q\.?e\.?d)\b|∎|□|\\blacksquare|\\square|\\qed", re.I)
MAX_ANSWER_WORDS = 8


def is_proof(problem: str, answer: str) -> bool:
    """A proof question without a checkable answer (the module docstring's rule)."""
    from ovr_hpc.grading import check_reference

    if not isinstance(problem, str) or not PROOF_WORDS.search(problem):
        return False
    answer = str(answer)
    if PROOF_MARKERS.search(answer) or len(answer.split()) > MAX_ANSWER_WORDS:
        return True
    return check_reference(answer) not in ("ok", "multi_box")


# ----------------------------------------------------------------------------- the filter


def read_keyed(paths: list[str], key: str) -> dict:
    """{line[key]: line} over JSONL files (the pass-rate or loss-score files); a key twice is an error."""
    out: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                line = json.loads(raw)
                if line[key] in out:
                    raise ValueError(f"{path}:{lineno}: {key} {line[key]!r} appears twice")
                out[line[key]] = line
    return out


def highest_share(scores: dict[int, float], groups: dict[int, str], share: float) -> set[int]:
    """The ids with the highest scores: floor(share x n) of each group (ties: the later record first)."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i in scores:
        by_group[groups[i]].append(i)
    dropped = set()
    for ids in by_group.values():
        ids.sort(key=lambda i: (-scores[i], -i))
        dropped.update(ids[: math.floor(share * len(ids) + 1e-9)])
    return dropped


def filter_records(files: list[str], out: str, *, pass_rates: list[str] = (), min_pass_rate: float = 0.0,
                   max_pass_rate: float = 1.0, drop_unsolved: bool = False, drop_solved: bool = False,
                   drop_proofs: bool = False, loss_scores: list[str] = (), drop_highest: float = 0.0,
                   by_source: bool = False, report_path: Optional[str] = None) -> dict:
    """Keep the records of `files` that pass every rule; write them to `out` (JSONL, in file order, each as it
    was read; relative image paths rewritten for out's folder, images embedded in Parquet written under
    OUT.images/) and the report (counts by source and reason) to `report_path` (default OUT.report.json).

    Pass rates are matched by record id (records without one: their position among the usable records, as the
    records benchmark numbers them, so give the files in the same order); loss scores by the record's position
    among all entries of the files (checked against its line). Reasons: bad_record (not a usable record),
    proof, no_pass_rate / too_hard (pass rate below min_pass_rate, or 0 with drop_unsolved) / too_easy (above
    max_pass_rate, or 1 with drop_solved), no_loss_score / high_loss (the highest-loss `drop_highest` share of
    the scored records, per source with `by_source`); a record is counted under its first reason, in that
    order. Returns the report."""
    from ovr_hpc.data.records import iter_raw, read_records

    if pass_rates and loss_scores:
        raise ValueError("give pass rates (RL records) or loss scores (cold-start records), not both")
    if not 0.0 <= drop_highest < 1.0:
        raise ValueError(f"--drop-highest ({drop_highest}) must be in [0, 1)")
    if not 0.0 <= min_pass_rate <= max_pass_rate <= 1.0:
        raise ValueError(f"the pass-rate band [{min_pass_rate}, {max_pass_rate}] must lie in [0, 1], low <= high")
    if (drop_highest or by_source) and not loss_scores:
        raise ValueError("--drop-highest and --by-source need --loss-scores")
    if (drop_unsolved or drop_solved or (min_pass_rate, max_pass_rate) != (0.0, 1.0)) and not pass_rates:
        raise ValueError("a pass-rate band needs --pass-rates")
    kind = "sft" if loss_scores else "rl"
    rates = read_keyed(list(pass_rates), "id") if pass_rates else None
    losses = read_keyed(list(loss_scores), "index") if loss_scores else None
    records, _ = read_records(list(files), kind=kind, check_images=False)
    usable = {r.index: (r, sid) for r, sid in zip(records, record_ids(records))}

    entries = []  # [file, raw object, source, first reason to go (None: kept), index]
    raw_index = -1
    for path in files:
        for where, obj in iter_raw(path):
            raw_index += 1
            source = str(obj.get("source", "unknown")) if isinstance(obj, dict) else "unknown"
            reason = None
            if raw_index not in usable:
                reason = "bad_record"
            else:
                rec, sid = usable[raw_index]
                if drop_proofs and kind == "rl" and is_proof(rec.data["problem"], rec.data["answer"]):
                    reason = "proof"
                elif rates is not None:
                    line = rates.get(sid) if sid is not None else None
                    if line is None:
                        reason = "no_pass_rate"
                    elif line["pass_rate"] < min_pass_rate or (drop_unsolved and line["passes"] == 0):
                        reason = "too_hard"
                    elif line["pass_rate"] > max_pass_rate or (drop_solved and line["passes"] == line["k"]):
                        reason = "too_easy"
                elif losses is not None:
                    line = losses.get(raw_index)
                    if line is None:
                        reason = "no_loss_score"
                    elif _file_and_line(str(line.get("where", ""))) != _file_and_line(where):
                        raise ValueError(f"{where}: the loss scores hold {line['where']} as record {raw_index}: "
                                         "they were computed on other files (give the cold-start config's "
                                         "data.train_files, in order)")
            entries.append([path, obj, source, reason, raw_index])
    if losses is not None and drop_highest:
        scored = {e[4]: float(losses[e[4]]["loss"]) for e in entries if e[3] is None}
        groups = {e[4]: (e[2] if by_source else "") for e in entries if e[3] is None}
        high = highest_share(scored, groups, drop_highest)
        for e in entries:
            if e[3] is None and e[4] in high:
                e[3] = "high_loss"

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    kept = [json.dumps(_portable(obj, path, out), ensure_ascii=False, default=str)
            for path, obj, _, reason, _ in entries if reason is None]
    _write_jsonl_atomic(out, kept, raw=True)

    per_source: dict[str, Counter] = defaultdict(Counter)
    for _, _, source, reason, _ in entries:
        per_source[source]["total"] += 1
        per_source[source][reason or "kept"] += 1
    removed = Counter(e[3] for e in entries if e[3] is not None)
    report = {
        "inputs": list(files), "output": out, "kind": kind,
        "rules": {"pass_rates": list(pass_rates), "min_pass_rate": min_pass_rate, "max_pass_rate": max_pass_rate,
                  "drop_unsolved": drop_unsolved, "drop_solved": drop_solved, "drop_proofs": drop_proofs,
                  "loss_scores": list(loss_scores), "drop_highest": drop_highest, "by_source": by_source},
        "total": len(entries), "kept": len(kept), "removed": dict(sorted(removed.items())),
        "by_source": {s: dict(sorted(c.items())) for s, c in sorted(per_source.items())},
    }
    report_path = report_path or out + ".report.json"
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    report["report"] = report_path
    return report


def _file_and_line(where: str) -> tuple[str, str]:
    """'dir/file.jsonl:12' -> ('file.jsonl', '12'): the same record whether its file was named relative or not."""
    path, _, line = where.rpartition(":")
    return os.path.basename(path), line


def format_report(report: dict) -> str:
    reasons = sorted(report["removed"])
    lines = [f"{report['kept']} of {report['total']} records kept -> {report['output']}",
             "| source | total | kept | " + " | ".join(reasons) + " |",
             "|---|---:|---:|" + "---:|" * len(reasons)]
    for source, c in report["by_source"].items():
        lines.append(f"| {source} | {c['total']} | {c.get('kept', 0)} | "
                     + " | ".join(str(c.get(r, 0)) for r in reasons) + " |")
    lines.append(f"report: {report.get('report')}")
    return "\n".join(lines)


def _portable(obj: dict, src: str, out: str) -> dict:
    """The record as JSON that reads the same from out's folder: relative image paths rebased (they resolve
    against the record file's folder), images embedded in Parquet written once under OUT.images/."""
    from ovr_hpc.data.records import embedded_image

    src_dir, out_dir = os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(out))

    def rebase(ref):
        if isinstance(ref, dict) and ref.get("bytes"):
            ref = embedded_image(bytes(ref["bytes"]), out + ".images")
        elif isinstance(ref, dict):
            ref = ref.get("path")
        if not isinstance(ref, str) or re.match(r"^(https?://|data:|file://)", ref):
            return ref
        return os.path.relpath(ref if os.path.isabs(ref) else os.path.join(src_dir, ref), out_dir)

    if src_dir == out_dir and not src.endswith(".parquet"):
        return obj
    portable = dict(obj)
    for name in ("images", "image"):
        value = obj.get(name)
        if isinstance(value, list):
            portable[name] = [rebase(r) for r in value]
        elif value is not None:
            portable[name] = rebase(value)
    return portable


def _write_jsonl_atomic(path: str, lines: list, raw: bool = False) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines((line if raw else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- commands


def passrate_command(args) -> int:
    import ovr_hpc.eval.config  # noqa: F401 - registers the eval stage
    from ovr_hpc import dist
    from ovr_hpc.config import load_config

    dist.catch_stop_signals()
    cfg = load_config("eval", args.config, args.overrides)
    check_passrate_config(cfg)
    try:
        result = run_passrate(cfg)
    finally:
        dist.shutdown()
        dist.ignore_stop_signals()
    return dist.EXIT_REQUEUE if result["status"] == "preempted" else 0


def loss_scores_command(args) -> int:
    from ovr_hpc import dist
    from ovr_hpc.config import load_config
    from ovr_hpc.data.loss import score_losses

    dist.catch_stop_signals()
    cfg = load_config("coldstart", args.config, args.overrides)
    try:
        result = score_losses(cfg, args.out)
    finally:
        dist.shutdown()
        dist.ignore_stop_signals()
    return dist.EXIT_REQUEUE if result["status"] == "preempted" else 0


def filter_command(args) -> int:
    missing = [f for f in [*args.files, *args.pass_rates, *args.loss_scores] if not os.path.isfile(f)]
    if missing:
        print(f"ovr-hpc data filter: {', '.join(missing)}: no such file", file=sys.stderr)
        return 2
    try:
        report = filter_records(args.files, args.out, pass_rates=args.pass_rates, min_pass_rate=args.min_pass_rate,
                                max_pass_rate=args.max_pass_rate, drop_unsolved=args.drop_unsolved,
                                drop_solved=args.drop_solved, drop_proofs=args.drop_proofs,
                                loss_scores=args.loss_scores, drop_highest=args.drop_highest,
                                by_source=args.by_source, report_path=args.report)
    except ValueError as e:
        print(f"ovr-hpc data filter: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
