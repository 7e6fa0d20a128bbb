"""`ovr-hpc demo`: the tiny two-stage pipeline on this machine, end to end, with a report.

1. a tiny Qwen2.5-VL (random init, real architecture) and synthetic data (ovr_hpc/data/synthetic.py):
   arithmetic word problems, captioned pictures, and the colour question about a picture answered in
   format with a guessed colour (cold start); the colour question about a picture alone (RL);
2. cold start through the real trainer as 2 local ranks (DeepSpeed ZeRO-3 on gloo), exported;
3. RL: PPO + GAE with a critic on the picture-only colour question, 2 local ranks, exported;
4. greedy held-out outcomes of both tasks before the cold start, after it and after RL (accuracy,
   per-class accuracy, answer distribution: a collapse onto one answer is visible at a glance), printed
   and in DIR/report.json, with PNGs (outcomes.png; loss; reward and response length, like the paper's).
"""

from __future__ import annotations

import json
import os
import time

from ovr_hpc.data.synthetic import COLORS
from ovr_hpc.eval.plots import plot_series

DEMO_MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384)
NUM_TRAIN, NUM_HELDOUT = 5000, 200
RL_STEPS = 30
HERE = os.path.dirname(os.path.abspath(__file__))


def _config_path(name: str) -> str:
    """configs/ ships beside the package in a checkout; fall back to the copy installed with it."""
    for root in (os.path.join(HERE, "..", "configs"), os.path.join(HERE, "configs")):
        path = os.path.join(root, "tiny", name)
        if os.path.exists(path):
            return os.path.abspath(path)
    raise FileNotFoundError(f"configs/tiny/{name} not found next to the package")


def heldout_accuracy(model_dir: str, data_file: str, max_new_tokens: int = 48) -> tuple[float, list[dict]]:
    """Greedy accuracy through `ovr-hpc eval` (prompts built exactly as in RL, the reward's equivalence
    check); also returns the scored samples. Results: <model_dir's folder>/eval/<model>/<data file stem>/."""
    import shutil

    import torch

    from ovr_hpc.eval.config import (BenchmarkSpec, EvalConfig, EvalModelConfig, EvalRolloutConfig,
                                     SamplingConfig, ScoringConfig)
    from ovr_hpc.eval.runner import run_eval

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    label = os.path.splitext(os.path.basename(data_file))[0]
    model_dir = os.path.abspath(model_dir)
    out_dir = os.path.join(os.path.dirname(model_dir), "eval", os.path.basename(model_dir))
    shutil.rmtree(os.path.join(out_dir, label), ignore_errors=True)  # a rerun of the demo retrains: no old answers
    cfg = EvalConfig(
        model=EvalModelConfig(path=model_dir, dtype="float32", attn_implementation="sdpa"),
        benchmarks=[BenchmarkSpec(name="records", path=data_file, label=label)],
        output_dir=out_dir,
        sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens),
        rollout=EvalRolloutConfig(engine="hf", batch_size=50, min_pixels=3136, max_pixels=50176),
        scoring=ScoringConfig(num_workers=0),
    )
    cfg.validate()
    result = run_eval(cfg)
    with open(os.path.join(out_dir, label, "samples.jsonl")) as f:
        scored = [json.loads(line) for line in f]
    return result["results"][label]["accuracy"], scored


def train_and_export(stage: str, model_dir: str, train_file: str, run_dir: str, exported: str, nprocs: int,
                     overrides: list[str]) -> float:
    """Run a stage of the tiny config as `nprocs` local ranks, export its model; returns the seconds."""
    import shutil

    from ovr_hpc.checkpoint import export_hf
    from ovr_hpc.local import run_local

    t0 = time.time()
    code = run_local(stage, _config_path(f"{stage}.yaml"), [
        f"model.path={model_dir}", f"data.train_files=[{train_file}]", f"checkpoint.output_dir={run_dir}",
        "logging.progress_bar=false", *overrides], nprocs=nprocs, log_dir=os.path.join(run_dir, "logs"))
    seconds = time.time() - t0
    if code != 0:
        raise RuntimeError(f"{stage} failed (exit {code}); see {run_dir}/logs")
    shutil.rmtree(exported, ignore_errors=True)
    export_hf(run_dir, exported)
    return seconds


def evaluate(out: str, model_dir: str, heldout: dict[str, str], stage: str, outcomes: dict) -> None:
    """Greedy held-out outcomes of one model on every task: accuracy, per-class accuracy and the answer
    distribution (outcomes[task][stage]), printed as one line per task."""
    from ovr_hpc.eval.outcomes import answer_breakdown, format_breakdown

    for task, data_file in heldout.items():
        _, samples = heldout_accuracy(model_dir, data_file)
        with open(os.path.join(out, f"{stage}_{task}_heldout.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        outcomes.setdefault(task, {})[stage] = answer_breakdown(samples)
        print(f"[demo] {format_breakdown(f'{task} held-out, {stage}', outcomes[task][stage])}")


def run_coldstart(out: str, model_dir: str, nprocs: int, seed: int) -> dict:
    from ovr_hpc.data.synthetic import write_coldstart_sft
    from ovr_hpc.metrics import read_metrics

    train_file = write_coldstart_sft(os.path.join(out, "data", "coldstart.jsonl"), NUM_TRAIN, seed=seed, captions=True)
    run_dir = os.path.join(out, "coldstart")
    exported = os.path.join(out, "coldstart_model")
    seconds = train_and_export("coldstart", model_dir, train_file, run_dir, exported, nprocs,
                               [f"seed={seed}", "schedule.epochs=4", "parallel.global_batch_size=8"])
    print(f"[demo] cold start: {seconds:.0f} s of training")
    metrics = read_metrics(run_dir)
    plot_series({"cold start": ([m["step"] for m in metrics], [m["loss"] for m in metrics])},
                "loss (per assistant token)", "Linguistic cold start (tiny model)",
                os.path.join(out, "coldstart_loss.png"))
    return {"steps": metrics[-1]["step"], "seconds": round(seconds, 1), "final_loss": metrics[-1]["loss"],
            "model": exported}


def run_rl(out: str, policy_dir: str, nprocs: int, seed: int) -> dict:
    from ovr_hpc.data.synthetic import write_color_rl
    from ovr_hpc.metrics import read_metrics

    train_file = write_color_rl(os.path.join(out, "data", "rl_color.jsonl"), 512, seed=2 + 1000 * seed)
    run_dir = os.path.join(out, "rl")
    exported = os.path.join(out, "rl_model")
    seconds = train_and_export("rl", policy_dir, train_file, run_dir, exported, nprocs,
                               [f"seed={seed}", f"schedule.max_steps={RL_STEPS}"])
    print(f"[demo] RL: {seconds:.0f} s")
    metrics = read_metrics(run_dir)
    steps = [m["step"] for m in metrics]
    plot_series({"RL": (steps, [m["reward"] for m in metrics])}, "mean reward (training rollouts)",
                "Multimodal RL (tiny model)", os.path.join(out, "rl_reward.png"))
    plot_series({"RL": (steps, [m["response_length"] for m in metrics])}, "mean response length (tokens)",
                "Multimodal RL (tiny model)", os.path.join(out, "rl_response_length.png"))
    return {"steps": steps[-1], "seconds": round(seconds, 1), "train_reward_first": metrics[0]["reward"],
            "train_reward_last": metrics[-1]["reward"], "model": exported}


def run_demo(out: str = "runs/demo", nprocs: int = 2, seed: int = 0) -> dict:
    """The whole pipeline from `seed` (model init, data, both stages' seeds); held-out sets depend on it too."""
    from ovr_hpc.data.synthetic import write_arithmetic_rl, write_color_rl
    from ovr_hpc.eval.plots import plot_outcomes, plot_runs
    from ovr_hpc.models.tiny import build_tiny_model

    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    t0 = time.time()
    model_dir = os.path.join(out, "tiny_model")
    build_tiny_model(model_dir, seed=seed, **DEMO_MODEL)
    heldout = {"arithmetic": write_arithmetic_rl(os.path.join(out, "data", "heldout_arithmetic.jsonl"), NUM_HELDOUT,
                                                 seed=12345 + 1000 * seed),
               "color": write_color_rl(os.path.join(out, "data", "heldout_color.jsonl"), 96, seed=54321 + 1000 * seed)}
    outcomes: dict = {}
    evaluate(out, model_dir, heldout, "initial", outcomes)
    report = {"seed": seed, "coldstart": run_coldstart(out, model_dir, nprocs, seed)}
    evaluate(out, report["coldstart"]["model"], heldout, "coldstart", outcomes)
    report["rl"] = run_rl(out, report["coldstart"]["model"], nprocs, seed)
    evaluate(out, report["rl"]["model"], heldout, "rl", outcomes)
    report["outcomes"] = outcomes
    report["seconds_total"] = round(time.time() - t0, 1)
    report["plots"] = plot_runs([os.path.join(out, "coldstart"), os.path.join(out, "rl")], os.path.join(out, "plots"))
    report["plots"].append(plot_outcomes(
        {"after the cold start": outcomes["color"]["coldstart"], "after RL": outcomes["color"]["rl"]}, sorted(COLORS),
        "Picture-only colour question, held out: before and after RL", os.path.join(out, "outcomes.png")))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(summary(report))
    print(f"[demo] wrote {out}/report.json")
    return report


def summary(report: dict) -> str:
    """The demo's result at a glance: accuracy, per-class accuracy and the most common answer per stage."""
    lines = [f"[demo] summary (seed {report['seed']}, {report['seconds_total']:.0f} s)"]
    for task, stages in report["outcomes"].items():
        for stage, b in stages.items():
            per_class = " ".join(f"{c}={a:.2f}" for c, a in list(b["per_class"].items())[:4]) if task == "color" else ""
            lines.append(f"  {task:<10} {stage:<9} accuracy {b['accuracy']:.3f}  top answer {b['top_answer']!s:>8} "
                         f"{b['top_answer_share']:4.0%}  {per_class}")
    return "\n".join(lines)
