"""`ovr-hpc data loss-scores CONFIG --out DIR`: each cold-start sample's mean token loss under a model.

CONFIG is a cold-start config: model.path is the scoring model (e.g. the pretrained Qwen2.5-VL), data.* reads
and tokenizes the records exactly as the cold start does (ovr_hpc/data/dataset.py: chat template, loss on the
assistant's tokens, data.max_seq_len / data.overlong, the tokenized cache), and the loss is the fused log-prob
kernel's (ovr_hpc.models.loading.TokenLogprobs), in fp32 sums: loss = -sum(log p(target)) / loss tokens over
the sample's loss tokens. Samples are packed into rows of at most data.max_seq_len tokens in file order
(positions restart per sample: the same per-sample log-probs as one at a time).

Data-parallel and resumable like the eval runner: the samples not yet in DIR are split over the ranks (i % W),
each rank appends one line per sample to DIR/loss_scores.rank{R}.jsonl after every row, flushed and fsynced
(a torn last line is cut on restart), the ranks stop together between rows on a stop signal (exit 75, the
Slurm scripts requeue), and a rerun skips what is done; DIR/run.json holds the model and data settings, and a
rerun with others is refused. Rank 0 then merges the shards into DIR/loss_scores.jsonl, one line per sample in
record order: {"index", "where", "source", "num_loss_tokens", "loss"} (index: the record's position among all
entries of data.train_files, which `ovr-hpc data filter --loss-scores` matches).
"""

from __future__ import annotations

import json
import os
import time

from ovr_hpc import dist

SHARD_PREFIX = "loss_scores.rank"
MERGED = "loss_scores.jsonl"


def fingerprint(cfg) -> dict:
    d = cfg.data
    return {"model": os.path.realpath(cfg.model.path), "dtype": cfg.model.dtype,
            "train_files": [os.path.abspath(f) for f in d.train_files], "max_seq_len": d.max_seq_len,
            "overlong": d.overlong, "min_pixels": d.min_pixels, "max_pixels": d.max_pixels,
            "system_prompt": d.system_prompt}


def read_done(out_dir: str) -> dict[int, dict]:
    """{record index: line} over the shards and the merged file (first one wins; unreadable lines skipped)."""
    done: dict[int, dict] = {}
    if not os.path.isdir(out_dir):
        return done
    for name in sorted(os.listdir(out_dir)):
        if name != MERGED and not (name.startswith(SHARD_PREFIX) and name.endswith(".jsonl")):
            continue
        with open(os.path.join(out_dir, name), "rb") as f:
            for raw in f:
                try:
                    line = json.loads(raw)
                    done.setdefault(int(line["index"]), line)
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def sample_losses(logprobs, targets, lengths: list[int]) -> list[tuple[int, float]]:
    """(loss tokens, mean token loss) per sample of a packed row: -mean log p over its loss positions."""
    from ovr_hpc.data.dataset import IGNORE_INDEX

    out, start = [], 0
    for n in lengths:
        mask = targets[start : start + n] != IGNORE_INDEX
        count = int(mask.sum())
        total = -float(logprobs[start : start + n][mask].double().sum())
        out.append((count, total / count if count else float("nan")))
        start += n
    return out


def score_losses(cfg, out_dir: str, model=None) -> dict:
    """Score every sample of cfg.data under cfg.model.path (see the module docstring). Every rank calls it.
    `model`: an already loaded VLM instead of loading model.path (tests). Returns {"status": "completed" |
    "preempted", "path": DIR/loss_scores.jsonl (rank 0, when completed), "num_samples"}."""
    import torch

    from ovr_hpc.buckets import size_bounded
    from ovr_hpc.data.dataset import Collator, prepare_sft_dataset
    from ovr_hpc.eval.runner import check_fingerprint, repair_tail
    from ovr_hpc.models.loading import TokenLogprobs, load_processor, load_vlm
    from ovr_hpc.stage import caught_stop_signals

    info = dist.detect_rank_info()
    if info.world_size > 1:
        info = dist.init_distributed()
    log = (lambda msg: print(f"[loss-scores] {msg}", flush=True)) if info.is_main else (lambda msg: None)
    os.makedirs(out_dir, exist_ok=True)
    expected = fingerprint(cfg)
    has_run_file = check_fingerprint(out_dir, expected)
    shard = os.path.join(out_dir, f"{SHARD_PREFIX}{info.rank}.jsonl")
    torn = repair_tail(shard)
    if torn:
        print(f"[loss-scores rank {info.rank}] cut a torn last line ({torn} bytes) from {shard}", flush=True)

    processor = load_processor(cfg.model.path, cfg.data.min_pixels, cfg.data.max_pixels)
    dataset = prepare_sft_dataset(cfg.data, processor, cfg.model.path,
                                  cfg.data.cache_dir or os.path.join(out_dir, "data_cache"), info.rank,
                                  info.world_size, record_meta=True)
    log(dataset.report.format())
    if info.is_main and not has_run_file:
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump(expected, f, indent=1)
    done = read_done(out_dir)
    dist.barrier()  # nobody appends before every rank has read what is done

    pending = [i for i in range(len(dataset)) if dataset.record_index[i] not in done]
    mine = pending[info.rank :: info.world_size]
    log(f"{len(dataset)} samples, {len(dataset) - len(pending)} scored before, {len(pending)} to score on "
        f"{info.world_size} rank(s)")
    stopped = False
    with caught_stop_signals() as stop:
        if pending:
            if model is None:
                model = load_vlm(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation)
            scorer = TokenLogprobs(model.to(dist.device()).eval())
            collator = Collator(processor, cfg.data.min_pixels, cfg.data.max_pixels)
            rows = list(size_bounded(mine, cfg.data.max_seq_len, dataset.lengths.__getitem__))
            num_rows = len(rows)
            if info.world_size > 1:  # stops are agreed between rows: every rank takes part in each agreement
                num_rows = int(dist.all_reduce_max(float(num_rows)))
            t0, scored = time.time(), 0
            for b in range(num_rows):
                if stop.agreed() if info.world_size > 1 else stop.requested:
                    stopped = True
                    log(f"stop requested ({stop.describe()}); {scored} of {len(mine)} samples on rank 0 written")
                    break
                if b >= len(rows):
                    continue
                samples = [dataset.sample(i) for i in rows[b]]
                mb = collator(samples, rows[b]).to(dist.device())
                with torch.no_grad():
                    logprobs, _ = scorer(**mb.model_inputs())
                results = sample_losses(logprobs, mb.targets, [len(s.input_ids) for s in samples])
                lines = [{"index": dataset.record_index[i], "where": s.where, "source": dataset.sources[i],
                          "num_loss_tokens": n, "loss": loss}
                         for i, s, (n, loss) in zip(rows[b], samples, results)]
                with open(shard, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(line) + "\n" for line in lines))
                    f.flush()
                    os.fsync(f.fileno())
                scored += len(samples)
                if info.is_main and (b + 1) % 50 == 0:
                    log(f"{scored}/{len(mine)} samples on rank 0 ({scored / max(time.time() - t0, 1e-9):.1f}/s)")
        stopped = dist.all_reduce_max(1.0 if stopped or stop.requested else 0.0) > 0
    if stopped:
        return {"status": "preempted", "path": None, "num_samples": len(dataset)}
    dist.barrier()
    path = os.path.join(out_dir, MERGED)
    if info.is_main:
        found = read_done(out_dir)
        lines = [found[dataset.record_index[i]] for i in range(len(dataset)) if dataset.record_index[i] in found]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(tmp, path)
        log(f"wrote {path} ({len(lines)} samples)")
    dist.barrier()
    return {"status": "completed", "path": path if info.is_main else None, "num_samples": len(dataset)}
