"""metrics.jsonl (always), TensorBoard and wandb (when asked), a progress bar on rank 0.

Only rank 0 writes. On resume, lines past the resumed step (written after the last checkpoint by the
interrupted run) are dropped, so the log of a resumed run equals that of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys


class MetricsLogger:
    def __init__(self, output_dir: str, is_main: bool, cfg, total_steps: int, resume_step: int = 0,
                 run_config: dict | None = None):
        self.is_main = is_main
        self.cfg = cfg
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = self.wandb = self.bar = None
        if not is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._truncate_after(resume_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1)
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, dir=output_dir, config=run_config, resume="allow",
                                    id=os.path.basename(os.path.abspath(output_dir)))
        if cfg.progress_bar:
            from tqdm import tqdm

            # not a terminal (Slurm logs): update rarely instead of drawing
            self.bar = tqdm(total=total_steps, initial=resume_step, dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def log(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if "loss" in values:
                self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if step % self.cfg.every_steps:
            return
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
