"""The tiny learning setups that CI guards: a cold start and an RL run with fixed seeds, small enough for
a couple of minutes on 2 CPU cores. The tests (test_learning.py) and the script that regenerates their
golden curves (scripts/update-golden-curves.py) both run exactly these."""

from __future__ import annotations

import json
import os
import platform

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN_DIR = os.path.join(REPO, "tests", "assets", "golden")
CONFIGS = os.path.join(REPO, "configs", "tiny")

COLDSTART_STEPS = 300
COLDSTART_OVERRIDES = [f"schedule.max_steps={COLDSTART_STEPS}", "schedule.warmup_steps=10", "parallel.zero_stage=2",
                       "parallel.global_batch_size=8", "optimizer.lr=3e-3", "checkpoint.every_steps=1000",
                       "checkpoint.keep_last=1", "logging.progress_bar=false", "logging.tensorboard=false"]


def _isolated_rank_env() -> None:
    """One in-process rank on a free port (a test may run after another that left its rank variables)."""
    from ovr_hpc.local import free_port

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        os.environ.pop(key, None)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import torch.distributed

    if not torch.distributed.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())


def run_coldstart(work: str) -> dict:
    """Tiny model + text-only arithmetic / colour-text records, COLDSTART_STEPS steps on one rank, exported;
    returns {"losses", "model", "heldout"} (heldout: the held-out arithmetic answer breakdown, greedy)."""
    from ovr_hpc.data.synthetic import write_arithmetic_rl, write_coldstart_sft
    from ovr_hpc.eval.outcomes import answer_breakdown
    from ovr_hpc.metrics import read_metrics
    from ovr_hpc.models.tiny import build_tiny_model
    from ovr_hpc.sft.trainer import train

    _isolated_rank_env()
    os.makedirs(work, exist_ok=True)
    model = str(build_tiny_model(os.path.join(work, "tiny_model"), seed=0))
    data = write_coldstart_sft(os.path.join(work, "coldstart.jsonl"), 1200, seed=0)
    heldout = write_arithmetic_rl(os.path.join(work, "heldout_arithmetic.jsonl"), 100, seed=777)
    run, exported, samples = _train_export_eval("coldstart", train, work, model, data, COLDSTART_OVERRIDES, heldout)
    return {"losses": [m["loss"] for m in read_metrics(run)], "model": exported,
            "heldout": answer_breakdown(samples)}


def _train_export_eval(stage: str, train, work: str, model: str, data: str, overrides: list[str], heldout: str,
                       max_new_tokens: int = 48) -> tuple[str, str, list[dict]]:
    """Train `stage` (configs/tiny/<stage>.yaml + overrides) in this process, export it, answer the held-out
    file greedily; returns (run folder, exported model, scored samples)."""
    from ovr_hpc.checkpoint import export_hf
    from ovr_hpc.config import load_config
    from ovr_hpc.demo import heldout_accuracy

    run, exported = os.path.join(work, stage), os.path.join(work, f"{stage}_model")
    cfg = load_config(stage, os.path.join(CONFIGS, f"{stage}.yaml"),
                      [f"model.path={model}", f"data.train_files=[{data}]", f"checkpoint.output_dir={run}", *overrides])
    assert train(cfg)["status"] == "completed"
    export_hf(run, exported)
    _, samples = heldout_accuracy(exported, heldout, max_new_tokens=max_new_tokens)
    return run, exported, samples


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.json")


def read_golden(name: str) -> dict:
    with open(golden_path(name)) as f:
        return json.load(f)


def write_golden(name: str, curves: dict[str, list[float]], note: str) -> str:
    import torch
    import transformers

    os.makedirs(GOLDEN_DIR, exist_ok=True)
    record = {"note": note, "written_with": {"python": platform.python_version(), "torch": torch.__version__,
                                             "transformers": transformers.__version__,
                                             "machine": platform.machine()},
              "curves": curves}
    with open(golden_path(name), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return golden_path(name)


def windowed_means(values: list[float], window: int) -> list[float]:
    """Means of consecutive windows (the last one may be shorter): what a noisy curve is compared by."""
    return [sum(values[i:i + window]) / len(values[i:i + window]) for i in range(0, len(values), window)]


RL_START_MODEL = os.path.join(GOLDEN_DIR, "rl_start_model")
RL_STEPS = 12
RL_OVERRIDES = [f"schedule.max_steps={RL_STEPS}", "optimizer.lr=4e-4", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=8",
                "rollout.max_response_len=[[0,24]]", "rollout.batch_size=8", "parallel.zero_stage=2",
                "algorithm.reward_workers=0", "checkpoint.every_steps=1000", "checkpoint.keep_last=1",
                "checkpoint.save_hf_weights=true", "logging.progress_bar=false", "logging.tensorboard=false"]


def run_rl(work: str, start_model: str = RL_START_MODEL) -> dict:
    """PPO + GAE on the picture-only colour question from the demo's cold-start model (written by
    scripts/update-golden-curves.py: the demo's cold start, seed 0), RL_STEPS steps on one rank, exported;
    returns {"rewards", "before", "after"} (held-out colour answer breakdowns, greedy)."""
    from ovr_hpc.data.synthetic import write_color_rl
    from ovr_hpc.demo import heldout_accuracy
    from ovr_hpc.eval.outcomes import answer_breakdown
    from ovr_hpc.metrics import read_metrics
    from ovr_hpc.rl.trainer import train

    _isolated_rank_env()
    os.makedirs(work, exist_ok=True)
    data = write_color_rl(os.path.join(work, "rl_color.jsonl"), 256, seed=2)
    heldout = write_color_rl(os.path.join(work, "heldout_color.jsonl"), 64, seed=4242)
    import shutil

    start = os.path.join(work, "start_model")  # a copy: the eval writes its results beside the model
    shutil.copytree(start_model, start, dirs_exist_ok=True)
    _, before = heldout_accuracy(start, heldout, max_new_tokens=24)
    run, _, after = _train_export_eval("rl", train, work, start, data, RL_OVERRIDES, heldout, max_new_tokens=24)
    return {"rewards": [m["reward"] for m in read_metrics(run)], "before": answer_breakdown(before),
            "after": answer_breakdown(after)}
