"""`ovr-hpc demo`: the tiny two-stage pipeline on this machine, end to end, with a report.

1. a tiny Qwen2.5-VL (random init, real architecture) and synthetic arithmetic word problems;
2. greedy accuracy on held-out problems before training;
3. the cold start through the real trainer, as 2 local ranks (DeepSpeed ZeRO-3 on gloo);
4. export the checkpoint to a Hugging Face model and measure held-out accuracy again;
5. DIR/report.json and DIR/coldstart_loss.png.
"""

from __future__ import annotations

import json
import os
import time

DEMO_MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384)
NUM_TRAIN, NUM_HELDOUT = 4000, 200
HERE = os.path.dirname(os.path.abspath(__file__))


def _config_path(name: str) -> str:
    """configs/ ships beside the package in a checkout; fall back to the copy installed with it."""
    for root in (os.path.join(HERE, "..", "configs"), os.path.join(HERE, "configs")):
        path = os.path.join(root, "tiny", name)
        if os.path.exists(path):
            return os.path.abspath(path)
    raise FileNotFoundError(f"configs/tiny/{name} not found next to the package")


def heldout_accuracy(model_dir: str, records: list[dict], max_new_tokens: int = 48) -> tuple[float, list[dict]]:
    """Greedy accuracy with the reward's equivalence check; also returns the scored samples."""
    import torch

    from ovr_hpc.models.loading import load_processor, load_vlm
    from ovr_hpc.rl.reward import score
    from ovr_hpc.rollout.base import Prompt, SamplingParams
    from ovr_hpc.rollout.hf import HFRolloutEngine

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    processor = load_processor(model_dir, 3136, 50176)
    engine = HFRolloutEngine(load_vlm(model_dir, "float32", "sdpa"), processor, 3136, 50176, batch_size=50)
    prompts = [Prompt(r["problem"], r.get("images", [])) for r in records]
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    scored = []
    for r, (c,) in zip(records, outputs):
        result = score(c.text, r["answer"], answer_type=r.get("answer_type"), finished=c.finish_reason == "stop")
        scored.append({"id": r["id"], "response": c.text, "answer": r["answer"], "score": result.score,
                       "reason": result.reason})
    return sum(s["score"] for s in scored) / len(scored), scored


def plot_curve(steps: list[int], values: list[float], ylabel: str, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_coldstart(out: str, nprocs: int) -> dict:
    from ovr_hpc.checkpoint import export_hf
    from ovr_hpc.data.synthetic import write_arithmetic_rl, write_arithmetic_sft
    from ovr_hpc.local import run_local
    from ovr_hpc.metrics import read_metrics
    from ovr_hpc.models.tiny import build_tiny_model

    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    model_dir = os.path.join(out, "tiny_model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_model(model_dir, seed=0, **DEMO_MODEL)
    train_file = write_arithmetic_sft(os.path.join(out, "data", "coldstart.jsonl"), NUM_TRAIN, seed=0)
    heldout_file = write_arithmetic_rl(os.path.join(out, "data", "heldout.jsonl"), NUM_HELDOUT, seed=12345)
    with open(heldout_file) as f:
        heldout = [json.loads(line) for line in f]

    before, _ = heldout_accuracy(model_dir, heldout)
    print(f"[demo] held-out accuracy before the cold start: {before:.3f}")

    run_dir = os.path.join(out, "coldstart")
    t0 = time.time()
    code = run_local("coldstart", _config_path("coldstart.yaml"), [
        f"model.path={model_dir}", f"data.train_files=[{train_file}]", f"checkpoint.output_dir={run_dir}",
        "logging.progress_bar=false", "schedule.epochs=4", "parallel.global_batch_size=8",
    ], nprocs=nprocs, log_dir=os.path.join(run_dir, "logs"))
    seconds = time.time() - t0
    if code != 0:
        raise RuntimeError(f"cold start failed (exit {code}); see {run_dir}/logs")
    exported = os.path.join(out, "coldstart_model")
    if os.path.exists(exported):
        import shutil

        shutil.rmtree(exported)
    export_hf(run_dir, exported)
    after, samples = heldout_accuracy(exported, heldout)
    print(f"[demo] held-out accuracy after the cold start: {after:.3f} ({seconds:.0f} s of training)")
    with open(os.path.join(out, "coldstart_heldout.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    metrics = read_metrics(run_dir)
    plot_curve([m["step"] for m in metrics], [m["loss"] for m in metrics], "loss (per assistant token)",
               "Linguistic cold start (tiny model)", os.path.join(out, "coldstart_loss.png"))
    return {"heldout_accuracy_before": before, "heldout_accuracy_after": after, "steps": metrics[-1]["step"],
            "seconds": round(seconds, 1), "final_loss": metrics[-1]["loss"], "model": exported}


def run_demo(out: str = "runs/demo", nprocs: int = 2) -> dict:
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    report = {"coldstart": run_coldstart(out, nprocs)}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"[demo] wrote {out}/report.json")
    return report
