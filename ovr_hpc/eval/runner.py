"""`ovr-hpc eval CONFIG`: generate and score a model's answers on benchmarks; resumable, data-parallel.

For each benchmark, in order:
1. load its samples through the adapter (bad rows reported with file:row and counted; the run stops
   before generating if their share passes `max_bad_fraction`);
2. check that OUTPUT_DIR/<label>/run.json (model, prompt, sampling) matches: answers produced under
   another setting are never mixed in;
3. read every OUTPUT_DIR/<label>/samples*.jsonl: what is there is done and kept; the rest is split over
   the ranks (question i of the pending list -> rank i % world_size);
4. each rank generates its share `rollout.batch_size` questions at a time, scores the answers through the
   RL reward (a RewardPool), and appends one line per answer to its own samples.rank{R}.jsonl, flushed
   and fsynced after every batch: a preempted eval loses at most one batch per rank. With several ranks
   the batches run in lockstep (a rank out of questions passes an empty batch), because the vLLM engine
   generates as groups of ranks; images are decoded before each batch, so an unreadable one fails only
   its question (scored 0, reason "bad_image", never dropped);
5. rank 0 merges the shards into samples.jsonl and writes metrics.json.
Then rank 0 writes OUTPUT_DIR/summary.md and summary.json beside the paper's numbers.

Stop signals (SIGUSR1/SIGUSR2/SIGTERM, ovr_hpc.dist.StopRequest) are read between batches (agreed over
the ranks, as in the trainers): every rank stops at the same batch and `run_eval` returns
status "preempted" (the Slurm scripts requeue on it; the next run continues where this one stopped).
Greedy resumes give exactly the answers an uninterrupted run gives; sampled ones draw the remaining
answers afresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from collections import Counter
from typing import Any, Optional

from ovr_hpc import dist
from ovr_hpc.config import ConfigError
from ovr_hpc.data.prompts import prompt_body, rollout_prompt, stop_strings
from ovr_hpc.data.errors import BadRecord
from ovr_hpc.eval.benchmarks import BENCHMARKS, Benchmark, EvalSample, paper_numbers
from ovr_hpc.eval.config import EvalConfig
from ovr_hpc.grading import RewardPool, extract_last_boxed
from ovr_hpc.stage import caught_stop_signals

SHARD_PREFIX = "samples.rank"
MERGED = "samples.jsonl"


# ----------------------------------------------------------------------------- model


def resolve_model(path: str) -> tuple[str, Optional[int]]:
    """(Hugging Face model directory, training step or None) for a model dir, a run or a checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    from ovr_hpc.checkpoint import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model.path {path} is neither a model directory (no config.json) nor a training run with a "
            "complete checkpoint"
        ) from None
    hf = os.path.join(ckpt, "hf")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        raise FileNotFoundError(
            f"{hf} holds no weights: the run was saved with checkpoint.save_hf_weights=false; resume it for one "
            "step with checkpoint.save_hf_weights=true"
        )
    step = None
    try:
        with open(os.path.join(ckpt, "train_state.json")) as f:
            step = int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        name = os.path.basename(ckpt)
        step = int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None
    return hf, step


def build_engine(cfg: EvalConfig, model_dir: str):
    """The rollout engine named by rollout.engine, serving the model at model_dir (its weights read from
    there). Every rank calls it (the vLLM engine's construction is collective when its tensor-parallel
    groups span several ranks)."""
    from ovr_hpc.rollout.build import build_rollout_engine

    ro = cfg.rollout
    # max_model_len 0: the prompt (text + up to 1280 visual tokens per image) + the response budget
    return build_rollout_engine(ro, model_dir, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                                min_pixels=ro.min_pixels, max_pixels=ro.max_pixels, seed=cfg.sampling.seed,
                                max_model_len=cfg.sampling.max_new_tokens + 8192, load_format="auto")


# ----------------------------------------------------------------------------- result files


def repair_tail(path: str) -> int:
    """Cut a torn last line (a process killed mid-write); returns the bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        f.truncate(keep)
        return len(data) - keep


def result_files(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir)
                  if n == MERGED or (n.startswith(SHARD_PREFIX) and n.endswith(".jsonl")))


def read_results(out_dir: str) -> tuple[dict[tuple[str, int], dict], int]:
    """{(id, sample index): line} over all result files (first one wins) and the number of unreadable lines."""
    found: dict[tuple[str, int], dict] = {}
    unreadable = 0
    for path in result_files(out_dir):
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    key = (str(line["id"]), int(line["sample"]))
                except (ValueError, KeyError, TypeError):
                    unreadable += 1
                    continue
                found.setdefault(key, line)
    return found, unreadable


def fingerprint(cfg: EvalConfig, spec, model_dir: str) -> dict:
    """What must not change between a run and its resumption (else answers of two settings would mix)."""
    return {
        "model": os.path.realpath(model_dir),
        "benchmark": spec.name,
        "path": spec.path or BENCHMARKS[spec.name].default_path,
        "options": spec.options,
        "prompt": dataclasses.asdict(cfg.prompt),
        "sampling": {k: getattr(cfg.sampling, k) for k in ("n", "temperature", "top_p", "max_new_tokens", "seed")},
        "require_finished": cfg.scoring.require_finished,
    }


def check_fingerprint(out_dir: str, expected: dict) -> bool:
    """True when run.json exists (and matches); raises ConfigError naming what differs."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        found = json.load(f)
    differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if differ:
        details = "; ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in differ)
        raise ConfigError(
            f"{out_dir} holds answers produced with a different {', '.join(differ)} ({details}); "
            "use another output_dir (or a benchmark label) or delete that folder"
        )
    return True


def display_images(images: list[str]) -> list[str]:
    return ["<embedded image>" if ref.startswith("data:") else ref for ref in images]


# ----------------------------------------------------------------------------- generation and scoring


def image_errors(samples: list[EvalSample], min_pixels: int, max_pixels: int) -> list[Optional[str]]:
    """Decode every image of the batch first: an unreadable one fails only its own question (reported and
    scored 0), and the batch the engine sees is the same on every rank of a generation group."""
    from ovr_hpc.data.vision import check_image

    errors: list[Optional[str]] = []
    for s in samples:
        try:
            for ref in s.images:
                check_image(ref, min_pixels, max_pixels)
            errors.append(None)
        except BadRecord as e:
            errors.append(f"{e.kind}: {e.message}")
    return errors


def score_chunk(pool, samples: list[EvalSample], outputs: list[list], require_finished: bool) -> list[list[tuple]]:
    """(score, reason, extracted) per completion; a question counts right when any of its items is."""
    items, owners = [], []
    for qi, (s, completions) in enumerate(zip(samples, outputs)):
        for ci, c in enumerate(completions):
            finished = c.finish_reason == "stop" or not require_finished
            for item in s.score_items(c.text, finished):
                items.append(item)
                owners.append((qi, ci))
    results = pool.score_batch(items) if items else []
    grouped: dict[tuple[int, int], list] = {}
    for owner, r in zip(owners, results):
        grouped.setdefault(owner, []).append(r)
    scored = []
    for qi, completions in enumerate(outputs):
        row = []
        for ci, c in enumerate(completions):
            rs = grouped[(qi, ci)]
            best = next((r for r in rs if r.correct), rs[0])
            content, status = extract_last_boxed(c.text)
            extracted = content[:200] if status == "ok" and content is not None else None
            row.append((best.score, best.reason, extracted))
        scored.append(row)
    return scored


def prompt_of(cfg: EvalConfig, s: EvalSample) -> str:
    """The user text (chat template) or the whole prompt (orz), built as the RL stage builds its prompts."""
    if cfg.prompt.template == "orz":
        return prompt_body("orz", s.prompt_text())
    return s.prompt_text(cfg.prompt.instruction, cfg.prompt.choice_instruction)


def chunk_seed(base: int, chunk: list[EvalSample]) -> int:
    return (base + zlib.crc32(chunk[0].id.encode())) % (2**31)


# ----------------------------------------------------------------------------- one benchmark


class _Run:
    """State shared by the benchmarks of one eval: ranks, stop flag, lazily built engine and reward pool."""

    def __init__(self, cfg: EvalConfig, engine=None):
        self.cfg = cfg
        self.info = dist.detect_rank_info()
        if self.info.world_size > 1:
            self.info = dist.init_distributed()
        # the stop flag; the caller's signal handlers come back at close() (tests, the demo run evals in-process)
        self._signals = caught_stop_signals()
        self.stop = self._signals.__enter__()
        self.model_dir, self.model_step = resolve_model(cfg.model.path)
        self._engine, self._own_engine = engine, engine is None
        self._pool = None

    def log(self, msg: str, all_ranks: bool = False) -> None:
        if self.info.is_main or all_ranks:
            prefix = f"[eval rank {self.info.rank}]" if all_ranks and self.info.world_size > 1 else "[eval]"
            print(f"{prefix} {msg}", flush=True)

    @property
    def engine(self):
        if self._engine is None:
            t0 = time.time()
            self._engine = build_engine(self.cfg, self.model_dir)
            self.log(f"{self.cfg.rollout.engine} engine on {self.model_dir} ready in {time.time() - t0:.0f} s",
                     all_ranks=True)
        return self._engine

    @property
    def pool(self):
        if self._pool is None:
            self._pool = RewardPool(self.cfg.scoring.num_workers, self.cfg.scoring.timeout_s)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._own_engine and self._engine is not None:
            self._engine.close()
        self._signals.__exit__(None, None, None)


def run_benchmark(run: _Run, spec) -> dict:
    """Generate what is missing for one benchmark on this rank; rank 0 then merges and aggregates.
    Returns {"status": "completed" | "preempted", ...}."""
    cfg, info = run.cfg, run.info
    bench = BENCHMARKS[spec.name]
    out_dir = os.path.join(cfg.output_dir, spec.key)
    samples, report, load_info = bench.load(spec, cfg.data_root)
    if report.num_bad:
        run.log(f"{spec.key}: {report.format()}")
    try:
        report.check_threshold(cfg.max_bad_fraction)
    except ValueError as e:
        raise ValueError(f"benchmark {spec.key}: {e}\n(set max_bad_fraction to evaluate the rest)") from None
    if not samples:
        raise ValueError(f"benchmark {spec.key}: no usable samples ({report.num_total} rows read)")

    expected = fingerprint(cfg, spec, run.model_dir)
    has_run_file = check_fingerprint(out_dir, expected)
    shard = os.path.join(out_dir, f"{SHARD_PREFIX}{info.rank}.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    torn = repair_tail(shard)
    if torn:
        run.log(f"{spec.key}: cut a torn last line ({torn} bytes) from {shard}", all_ranks=True)
    dist.barrier()
    if info.is_main and not has_run_file:
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump(expected, f, indent=1)
    done, _ = read_results(out_dir)
    dist.barrier()  # nobody appends before every rank has read what is done

    n = cfg.sampling.n
    pending = [s for s in samples if any((s.id, j) not in done for j in range(n))]
    mine = pending[info.rank :: info.world_size]
    run.log(f"{spec.key}: {len(samples)} questions x {n} samples, {len(samples) - len(pending)} done before, "
            f"{len(pending)} to generate on {info.world_size} rank(s)")
    stopped = False
    if pending:
        from ovr_hpc.rollout.base import SamplingParams

        engine = run.engine  # on every rank, even one without a share: building it may be collective
        batch, t0, generated = cfg.rollout.batch_size, time.time(), 0
        num_batches = -(-len(mine) // batch)
        if info.world_size > 1:  # lockstep: engines may generate as groups of ranks; stops are agreed
            num_batches = int(dist.all_reduce_max(float(num_batches)))
        for b in range(num_batches):
            if run.stop.agreed() if info.world_size > 1 else run.stop.requested:
                stopped = True
                run.log(f"{spec.key}: stop requested ({run.stop.describe()}); {generated} of "
                        f"{len(mine)} questions written", all_ranks=True)
                break
            chunk = mine[b * batch : (b + 1) * batch]
            texts = [prompt_of(cfg, s) for s in chunk]
            errors = image_errors(chunk, cfg.rollout.min_pixels, cfg.rollout.max_pixels)
            ok = [i for i, e in enumerate(errors) if e is None]
            prompts = [rollout_prompt(cfg.prompt.template, texts[i], list(chunk[i].images), cfg.prompt.system)
                       for i in ok]
            params = SamplingParams(n=n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                    max_new_tokens=cfg.sampling.max_new_tokens, stop=stop_strings(cfg.prompt.template),
                                    seed=chunk_seed(cfg.sampling.seed, chunk) if chunk else cfg.sampling.seed)
            # a rank without questions left still takes part in a lockstep engine's generate
            generated_ok = engine.generate(prompts, params) if prompts or info.world_size > 1 else []
            if not chunk:
                continue
            outputs: list[list] = [[] for _ in chunk]
            for i, completions in zip(ok, generated_ok):
                outputs[i] = completions
            scored = score_chunk(run.pool, chunk, outputs, cfg.scoring.require_finished)
            lines = []
            for s, text, completions, results, error in zip(chunk, texts, outputs, scored, errors):
                base = {"benchmark": spec.name, "label": spec.key, "id": s.id, "group": s.group, "meta": s.meta,
                        "prompt": text, "images": display_images(s.images), "reference": s.answer,
                        "answer_type": s.answer_type, "model_step": run.model_step}
                if error is not None:  # counted as wrong, with the reason, never dropped
                    lines += [{**base, "sample": j, "response": "", "finish_reason": "error", "response_tokens": 0,
                               "extracted": None, "score": 0.0, "reason": "bad_image", "error": error}
                              for j in range(n) if (s.id, j) not in done]
                    continue
                for j, (c, (sc, reason, extracted)) in enumerate(zip(completions, results)):
                    if (s.id, j) in done:
                        continue
                    lines.append({**base, "sample": j, "response": c.text, "finish_reason": c.finish_reason,
                                  "response_tokens": len(c.token_ids), "extracted": extracted, "score": sc,
                                  "reason": reason})
            with open(shard, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            generated += len(chunk)
            rate = generated / max(time.time() - t0, 1e-9)
            run.log(f"{spec.key}: {generated}/{len(mine)} questions ({rate:.2f}/s)", all_ranks=True)

    # every rank reaches this point once per benchmark: agree on stopping, then rank 0 merges
    if dist.all_reduce_max(1.0 if stopped or run.stop.requested else 0.0) > 0:
        return {"status": "preempted", "label": spec.key}
    dist.barrier()
    result = {"status": "completed", "label": spec.key}
    if info.is_main:
        result["metrics"] = merge_and_aggregate(run, spec, bench, samples, report, load_info, out_dir)
    dist.barrier()
    return result


def merge_and_aggregate(run: _Run, spec, bench: Benchmark, samples: list[EvalSample], report, load_info: dict,
                        out_dir: str) -> dict:
    cfg, n = run.cfg, run.cfg.sampling.n
    found, unreadable = read_results(out_dir)
    ordered, scores, missing = [], {}, 0
    for s in samples:
        got = [found.get((s.id, j)) for j in range(n)]
        if any(g is None for g in got):
            missing += 1
            continue
        ordered += got
        scores[s.id] = [float(g["score"]) for g in got]
    tmp = os.path.join(out_dir, MERGED + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in ordered)
    os.replace(tmp, os.path.join(out_dir, MERGED))
    evaluated = [s for s in samples if s.id in scores]
    metrics = bench.aggregate(evaluated, scores, n, cfg.sampling.pass_k)
    reasons = Counter(line["reason"] for line in ordered)
    tokens = [line["response_tokens"] for line in ordered]
    out = {
        "benchmark": spec.name,
        "label": spec.key,
        "title": bench.title,
        "scoring": bench.scoring,
        "layout": bench.layout,
        "headline": list(bench.headline),
        "model": run.model_dir,
        "model_step": run.model_step,
        "limit": spec.limit,
        "options": spec.options,
        "sampling": dataclasses.asdict(cfg.sampling),
        "engine": cfg.rollout.engine,
        "num_questions": len(samples),
        "num_evaluated": len(scores),
        "num_missing": missing,
        "num_responses": len(ordered),
        "metrics": metrics,
        "reasons": dict(sorted(reasons.items())),
        "mean_response_tokens": sum(tokens) / len(tokens) if tokens else None,
        "truncated_fraction": sum(line["finish_reason"] == "length" for line in ordered) / len(ordered)
        if ordered else None,
        "settings": dict(Counter(str(s.meta.get("setting")) for s in samples if s.meta.get("setting"))),
        "data": {"rows": report.num_total, "bad": report.num_bad, "bad_kinds": dict(report.kinds),
                 "bad_examples": report.examples, "rows_outside_subset": load_info.get("skipped_rows", 0),
                 "unreadable_result_lines": unreadable},
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(out, f, indent=1)
    shown = ", ".join(f"{k} {100 * metrics[k]:.1f}" for k in bench.headline if metrics.get(k) is not None)
    run.log(f"{spec.key}: {shown} ({len(scores)} questions; wrote {out_dir}/metrics.json)")
    return out


# ----------------------------------------------------------------------------- summary


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _paper(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def summary_rows(all_metrics: list[dict]) -> list[dict]:
    """One row per headline metric (and pass@k), with the paper's numbers for OVR-7B and Qwen2.5-VL-7B."""
    rows = []
    for m in all_metrics:
        name, metrics = m["benchmark"], m["metrics"]
        notes = []
        if m.get("limit"):
            notes.append(f"first {m['limit']} only")
        if m.get("options"):
            notes.append(f"options {m['options']}")
        if m.get("num_missing"):
            notes.append(f"{m['num_missing']} not evaluated")
        if m["data"]["bad"]:
            notes.append(f"{m['data']['bad']} bad rows")
        if name == "mmmu_pro":
            notes.append("paper: overall (mean of standard-10 and vision)")
        if name == "mme":
            notes.append("MME points, not percent: perception max 2000, cognition max 800")
        comparable = not m.get("limit") and not m.get("options")
        keys = list(m["headline"]) + sorted(k for k in metrics if k.startswith("pass@"))
        for key in keys:
            ovr, qwen = paper_numbers(name, key) if comparable else (None, None)
            title = m["title"] if m["label"] == name else f"{m['title']} [{m['label']}]"
            rows.append({"benchmark": m["label"], "title": title, "metric": key, "ours": metrics.get(key),
                         "ovr_7b_paper": ovr, "qwen25vl_7b_paper": qwen, "questions": m["num_evaluated"],
                         "scoring": m["scoring"], "notes": "; ".join(notes)})
    settings = {next(iter(m["settings"])) : m for m in all_metrics
                if m["benchmark"] == "mmmu_pro" and len(m["settings"]) == 1}
    if {"standard", "vision"} <= set(settings):
        a, b = settings["standard"]["metrics"]["accuracy"], settings["vision"]["metrics"]["accuracy"]
        ovr, qwen = paper_numbers("mmmu_pro", "accuracy")
        rows.append({"benchmark": "mmmu_pro (overall)", "title": "MMMU-Pro (overall)", "metric": "accuracy",
                     "ours": None if a is None or b is None else (a + b) / 2, "ovr_7b_paper": ovr,
                     "qwen25vl_7b_paper": qwen, "questions": None, "scoring": "mean of the two settings",
                     "notes": ""})
    return rows


def write_summary(cfg: EvalConfig, model_dir: str, model_step: Optional[int]) -> dict:
    all_metrics = []
    for spec in cfg.benchmarks:
        path = os.path.join(cfg.output_dir, spec.key, "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                all_metrics.append(json.load(f))
    rows = summary_rows(all_metrics)
    s = cfg.sampling
    sampling = "greedy" if s.temperature == 0 else f"{s.n} samples at temperature {s.temperature}, top-p {s.top_p}"
    header = {"model": model_dir, "model_step": model_step, "sampling": sampling,
              "max_new_tokens": s.max_new_tokens, "engine": cfg.rollout.engine}
    summary = {**header, "rows": rows}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [
        f"# Evaluation: {model_dir}" + (f" (step {model_step})" if model_step is not None else ""),
        "",
        f"Sampling: {sampling}; at most {s.max_new_tokens} new tokens; engine {cfg.rollout.engine}. "
        "Scores in percent (avg@n when sampled). The paper's columns are its Tables 2/3 "
        "(its sampling settings are not stated).",
        "",
        "| benchmark | metric | ours | OVR-7B (paper) | Qwen2.5-VL-7B (paper) | questions | scoring | notes |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['title']} | {r['metric']} | {_pct(r['ours'])} | {_paper(r['ovr_7b_paper'])} | "
                     f"{_paper(r['qwen25vl_7b_paper'])} | {r['questions'] if r['questions'] is not None else '-'} | "
                     f"{r['scoring']} | {r['notes']} |")
    with open(os.path.join(cfg.output_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


# ----------------------------------------------------------------------------- entry point


def run_eval(cfg: EvalConfig, engine=None) -> dict:
    """Evaluate cfg.model on cfg.benchmarks (see the module docstring). Every rank calls it.

    `engine`: an already built RolloutEngine to use instead of building one (tests, the demo).
    Returns {"status": "completed" | "preempted", "output_dir", "results": {label: headline metrics},
    "summary": path of summary.md (rank 0)}."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    for spec in cfg.benchmarks:  # fail on a missing file before any model is loaded
        BENCHMARKS[spec.name].files(spec, cfg.data_root)
    run = _Run(cfg, engine)
    results: dict[str, Any] = {}
    status = "completed"
    try:
        for spec in cfg.benchmarks:
            out = run_benchmark(run, spec)
            if out["status"] == "preempted":
                status = "preempted"
                break
            if "metrics" in out:
                m = out["metrics"]
                results[spec.key] = {k: m["metrics"].get(k) for k in m["headline"]}
    finally:
        run.close()
    summary_path = None
    if run.info.is_main:
        write_summary(cfg, run.model_dir, run.model_step)
        summary_path = os.path.join(cfg.output_dir, "summary.md")
        run.log(f"{status}; wrote {summary_path}")
    dist.barrier()
    return {"status": status, "output_dir": cfg.output_dir, "results": results, "summary": summary_path,
            "model": run.model_dir, "model_step": run.model_step}
