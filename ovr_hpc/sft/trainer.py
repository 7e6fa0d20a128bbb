"""THE COLD-START LOOP: supervised fine-tuning on long chain-of-thought data, top to bottom.

build (ranks, data, model, engine) -> resume -> for each step: rows -> micro-batches -> token-mean
loss through the fused log-prob kernel -> optimizer step -> metrics -> checkpoint / stop on request.
"""

from __future__ import annotations

import math
import os
import time

from ovr_hpc import stage as stages
from ovr_hpc.config import ColdStartConfig, to_dict
from ovr_hpc.data.dataset import Collator, build_rows, prepare_sft_dataset, row_sources, samples_per_source
from ovr_hpc.data.weights import weighted_rows_at
from ovr_hpc.engines.base import build_engine
from ovr_hpc.metrics import MetricsLogger
from ovr_hpc.models.loading import load_processor


def train(cfg: ColdStartConfig) -> dict:
    # ---- where we are: ranks, every pre-run check, the stop flag, seeds (ovr_hpc/stage.py)
    stage = stages.start(cfg, cfg.checkpoint.output_dir)
    info, log, out_dir = stage.info, stage.log, stage.out_dir

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
    engines = {"policy": engine}
    state = stage.resume(engines)
    step, tokens_seen = state.get("step", 0), state.get("tokens_seen", 0)
    metrics = MetricsLogger(out_dir, info.is_main, cfg.logging, total_steps, resume_step=step,
                            run_config=to_dict(cfg))

    def save() -> None:
        stage.save(engines, {"step": step, "tokens_seen": tokens_seen, "rows_consumed": step * global_batch})

    # ---- the loop
    status: str | None = None  # stays None when a resumed run had already finished
    while step < total_steps:
        t0 = time.perf_counter()
        # the endless seeded stream of rows, weighted by data.source_weights (ovr_hpc/data/weights.py)
        step_rows = weighted_rows_at(step * global_batch, global_batch, row_sources(dataset, rows),
                                     cfg.data.source_weights, cfg.seed, cfg.data.shuffle)
        my_rows = step_rows[engine.dp_rank * rows_per_rank : (engine.dp_rank + 1) * rows_per_rank]
        micro_batches = []
        for i in range(0, len(my_rows), cfg.parallel.micro_batch_size):
            ids = [s for r in my_rows[i : i + cfg.parallel.micro_batch_size] for s in rows[r]]
            micro_batches.append(collator([dataset.sample(s) for s in ids], ids))
        # token-mean over the whole global batch: every rank needs the global loss-token count up front
        local_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
        local_real = sum(mb.num_tokens for mb in micro_batches)
        global_loss_tokens, global_real = engine.dp_sum([local_tokens, local_real])

        def token_mean_loss(j, output):
            token_loss_sum = -output[0].sum()
            return token_loss_sum * engine.loss_scale_for_mean() / global_loss_tokens, {"loss_sum": token_loss_sum}

        stats = engine.forward_backward(micro_batches, token_mean_loss)
        engine.step()
        (loss_sum,) = engine.dp_sum([sum(s["loss_sum"] for s in stats)])
        step += 1
        tokens_seen += int(global_real)
        seconds = time.perf_counter() - t0
        metrics.log(step, {
            "loss": loss_sum / global_loss_tokens,
            "lr": engine.lr(),
            "grad_norm": engine.grad_norm(),
            "tokens_per_second": global_real / seconds,
            "loss_tokens": int(global_loss_tokens),
            "packing_efficiency": global_real / (global_batch * cfg.data.max_seq_len),
            "step_seconds": seconds,
            **dataset.report.as_metrics(),
            **samples_per_source(dataset, rows, step_rows),
        })
        status = stage.end_of_step(step, total_steps, save)
        if status:
            break
    result = stage.finish(status, step, total_steps, save)
    metrics.close()
    return result
