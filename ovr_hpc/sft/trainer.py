"""THE COLD-START LOOP: supervised fine-tuning on long chain-of-thought data, top to bottom.

build (ranks, data, model, engine) -> resume -> for each step: rows -> micro-batches -> token-mean
loss through the fused log-prob kernel -> optimizer step -> metrics -> checkpoint / stop on request.
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch

from ovr_hpc import dist, preflight
from ovr_hpc.checkpoint import end_of_step, load_checkpoint, save_checkpoint
from ovr_hpc.config import ColdStartConfig, dump_config, to_dict
from ovr_hpc.data.dataset import Collator, build_rows, prepare_sft_dataset, rows_at
from ovr_hpc.engines.base import build_engine
from ovr_hpc.metrics import MetricsLogger
from ovr_hpc.models.loading import load_processor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: ColdStartConfig) -> dict:
    # ---- where we are, and the stop flag (set by SIGUSR1/SIGUSR2/SIGTERM, read at step boundaries)
    info = dist.init_distributed()
    checks = preflight.at_start(cfg, info.world_size)   # every pre-run check, on this machine (ovr_hpc/preflight.py)
    stop = dist.StopRequest().install()
    seed_everything(cfg.seed)
    out_dir = cfg.checkpoint.output_dir
    os.makedirs(out_dir, exist_ok=True)
    log = print if info.is_main else (lambda *a, **k: None)

    # ---- data: tokenized once (split over ranks, cached), packed into rows, same on every rank
    processor = load_processor(cfg.model.path, cfg.data.min_pixels, cfg.data.max_pixels)
    dataset = prepare_sft_dataset(cfg.data, processor, cfg.model.path,
                                  cfg.data.cache_dir or os.path.join(out_dir, "data_cache"),
                                  info.rank, info.world_size)
    log(dataset.report.format())
    dataset.report.check_threshold(cfg.data.max_bad_fraction)
    if len(dataset) == 0:
        raise ValueError(f"no usable samples in {cfg.data.train_files}")
    rows = build_rows(dataset, cfg.data)
    global_batch = cfg.parallel.global_batch_size
    total_steps = cfg.schedule.max_steps or math.ceil(cfg.schedule.epochs * len(rows) / global_batch)
    log(f"{len(dataset)} samples in {len(rows)} rows of <= {cfg.data.max_seq_len} tokens; "
        f"{total_steps} steps of {global_batch} rows")

    # ---- model and engine (DeepSpeed or Megatron-core, by parallel.engine)
    engine = build_engine("policy", cfg.model, cfg.parallel, cfg.optimizer, cfg.schedule, total_steps,
                          info.world_size)
    collator = Collator(processor, cfg.data.min_pixels, cfg.data.max_pixels, always_run_vision=dataset.has_images)
    rows_per_rank = global_batch // engine.dp_size

    # ---- resume
    step, tokens_seen = 0, 0
    resume_from = checks.resume_from
    if resume_from:
        state = load_checkpoint({"policy": engine}, resume_from)
        step, tokens_seen = state["step"], state["tokens_seen"]
        log(f"resumed from {resume_from} at step {step}")
    metrics = MetricsLogger(out_dir, info.is_main, cfg.logging, total_steps, resume_step=step,
                            run_config=to_dict(cfg))

    def save() -> None:
        save_checkpoint({"policy": engine}, out_dir, step, {"step": step, "tokens_seen": tokens_seen, "rows_consumed":
                        step * global_batch}, dump_config(cfg), cfg.model.path, cfg.checkpoint.keep_last,
                        cfg.checkpoint.save_hf_weights)

    # ---- the loop
    status: str | None = None  # stays None when a resumed run had already finished
    while step < total_steps:
        t0 = time.perf_counter()
        step_rows = rows_at(step * global_batch, global_batch, len(rows), cfg.seed, cfg.data.shuffle)
        my_rows = step_rows[engine.dp_rank * rows_per_rank : (engine.dp_rank + 1) * rows_per_rank]
        micro_batches = []
        for i in range(0, len(my_rows), cfg.parallel.micro_batch_size):
            ids = [s for r in my_rows[i : i + cfg.parallel.micro_batch_size] for s in rows[r]]
            micro_batches.append(collator([dataset.sample(s) for s in ids], ids))
        # token-mean over the whole global batch: every rank needs the global loss-token count up front
        local_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
        local_real = sum(mb.num_tokens for mb in micro_batches)
        global_loss_tokens, global_real = (x / engine.model_parallel_size
                                           for x in dist.all_reduce_sum([local_tokens, local_real]))

        def token_mean_loss(j, output):
            token_loss_sum = -output[0].sum()
            return token_loss_sum * engine.loss_scale_for_mean() / global_loss_tokens, {"loss_sum": token_loss_sum}

        stats = engine.forward_backward(micro_batches, token_mean_loss)
        engine.step()
        (loss_sum,) = dist.all_reduce_sum([sum(s["loss_sum"] for s in stats)])
        step += 1
        tokens_seen += int(global_real)
        seconds = time.perf_counter() - t0
        metrics.log(step, {
            "loss": loss_sum / engine.model_parallel_size / global_loss_tokens,
            "lr": engine.lr(),
            "grad_norm": engine.grad_norm(),
            "tokens_per_second": global_real / seconds,
            "loss_tokens": int(global_loss_tokens),
            "packing_efficiency": global_real / (global_batch * cfg.data.max_seq_len),
            "step_seconds": seconds,
            **dataset.report.as_metrics(),
        })
        status = end_of_step(step, total_steps, cfg.checkpoint.every_steps, stop, save, log)
        if status:
            break
    if status == "completed":
        save()
    metrics.close()
    dist.barrier()
    return {"status": status or "completed", "step": step, "total_steps": total_steps}
