"""`ovr-hpc plot RUN_DIR...`: training curves and behaviour rates as PNGs, several runs overlaid.

A run is a folder with a metrics.jsonl (a cold-start or RL output_dir); a folder without one stands for
the runs one level below it (e.g. the demo's folder: coldstart/, rl/). Written into OUT_DIR:

    loss.png, reward.png, response_length.png, entropy.png   over steps (those some run logged)
    <key>.png                                                 any extra metrics asked for
    behaviors.png                                             emergence rates over checkpoints, from the
                                                              `ovr-hpc behaviors` reports (judge) found
                                                              under the run folders
    behaviors_keyword.png                                     the same for the offline keyword estimate
    eval.png                                                  benchmark headline scores over checkpoints,
                                                              from `ovr-hpc eval` metrics.json files
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

# Each curve: y label and the metric keys it is read from, in order of preference (the cold start logs
# "loss"; the RL loop's names are matched by these or by the word itself).
CURVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss": ("loss", ("loss", "train/loss", "policy/loss", "actor/loss", "policy_loss", "actor/pg_loss")),
    "reward": ("reward (mean)", ("reward", "reward/mean", "rollout/reward", "reward_mean", "train/reward",
                                 "rewards/mean", "critic/rewards/mean")),
    "response_length": ("response length (tokens)", ("response_length", "response_length/mean",
                                                     "rollout/response_length", "response_length_mean",
                                                     "rollout/response_length_mean")),
    "entropy": ("entropy", ("entropy", "policy/entropy", "actor/entropy", "entropy/mean")),
}
MAX_WALK_DEPTH = 4


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def find_runs(run_dirs: list[str]) -> dict[str, str]:
    """{label: folder with metrics.jsonl}; labels are the folders' last path parts, as many as make them unique."""
    folders = []
    for d in run_dirs:
        if os.path.exists(os.path.join(d, "metrics.jsonl")):
            folders.append(d)
        elif os.path.isdir(d):
            folders += sorted(os.path.join(d, n) for n in os.listdir(d)
                              if os.path.exists(os.path.join(d, n, "metrics.jsonl")))
    folders = list(dict.fromkeys(os.path.abspath(f).rstrip("/") for f in folders))
    depth = 1
    while len({"/".join(f.split("/")[-depth:]) for f in folders}) < len(folders):
        depth += 1
    return {"/".join(f.split("/")[-depth:]): f for f in folders}


def read_metric_lines(folder: str) -> list[dict]:
    out = []
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line of a run still being written
    return out


def pick_key(records: list[dict], candidates: tuple[str, ...], word: str) -> Optional[str]:
    """The first candidate key logged with numbers; else the shortest numeric key containing `word`."""
    numeric = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for c in candidates:
        if c in numeric:
            return c
    loose = sorted((k for k in numeric if word in k.lower() and not any(s in k.lower() for s in ("std", "max", "min"))),
                   key=len)
    return loose[0] if loose else None


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def ema(values: list[float], alpha: float) -> list[float]:
    out, prev = [], None
    for v in values:
        prev = v if prev is None else alpha * prev + (1 - alpha) * v
        out.append(prev)
    return out


def plot_series(lines: dict[str, tuple[list[float], list[float]]], ylabel: str, title: str, path: str,
                xlabel: str = "step", smooth: float = 0.0, percent: bool = False) -> str:
    """One PNG: each (label -> (x, y)) a line; smoothed (EMA) over a faint raw line when smooth > 0."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, (xs, ys) in lines.items():
        ys = [100 * y for y in ys] if percent else ys
        if smooth > 0 and len(ys) > 2:
            (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
            ax.plot(xs, ema(ys, smooth), color=raw.get_color(), label=label)
        else:
            ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _walk_json(folder: str, names: tuple[str, ...]) -> list[str]:
    found = []
    base_depth = os.path.abspath(folder).rstrip("/").count("/")
    for root, dirs, files in os.walk(folder):
        if os.path.abspath(root).count("/") - base_depth >= MAX_WALK_DEPTH:
            dirs[:] = []
        dirs[:] = [d for d in dirs if d not in ("checkpoints", "tensorboard", "data_cache")]
        found += [os.path.join(root, n) for n in files if n in names]
    return sorted(found)


def behavior_points(folder: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{method: {behaviour: [(step, emergence rate)]}} from the behaviour reports under a run folder."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for path in _walk_json(folder, ("behaviors.json", "behaviors_keyword.json")):
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            continue
        if report.get("step") is None or "behaviors" not in report:
            continue
        method = report.get("method", "judge")
        for name, b in report["behaviors"].items():
            if b.get("emergence_rate") is not None:
                out.setdefault(method, {}).setdefault(name, []).append((int(report["step"]), b["emergence_rate"]))
    return out


def eval_points(folder: str) -> dict[str, list[tuple[int, float]]]:
    """{benchmark/metric: [(step, score)]} from eval metrics.json files under a run folder."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in _walk_json(folder, ("metrics.json",)):
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict) or m.get("model_step") is None or "headline" not in m:
            continue
        for key in m["headline"]:
            v = m.get("metrics", {}).get(key)
            if v is not None:
                out.setdefault(f"{m['label']} {key}", []).append((int(m["model_step"]), v))
    return out


def plot_behaviors(points_by_run: dict[str, dict[str, list[tuple[int, float]]]], method: str, path: str) -> str:
    from ovr_hpc.eval.behaviors import BEHAVIORS, KEYWORD_LABEL, PAIRS

    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), sharex=True)
    for col, (visual, linguistic) in enumerate(PAIRS):
        for row, name in enumerate((visual, linguistic)):
            ax = axes[row][col]
            for label, points in points_by_run.items():
                pts = sorted(points.get(name, []))
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", markersize=3, label=label)
            ax.set_title(f"{BEHAVIORS[name].title} ({BEHAVIORS[name].kind})", fontsize=9)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("emergence rate (%)")
            if row == 1:
                ax.set_xlabel("checkpoint step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        if len(ax.get_legend_handles_labels()[0]) > len(handles):
            handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    title = "Behaviour emergence over checkpoints"
    fig.suptitle(title + (f"\n{KEYWORD_LABEL}" if method == "keyword" else " (judge)"), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str], out_dir: str, smooth: float = 0.0, extra_metrics: tuple[str, ...] = (),
              log=print) -> list[str]:
    """Every plot the runs support; returns the PNG paths written."""
    runs = find_runs(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    records = {label: read_metric_lines(folder) for label, folder in runs.items()}
    curves = dict(CURVES)
    for key in extra_metrics:
        curves[key.replace("/", "_")] = (key, (key,))
    for name, (ylabel, candidates) in curves.items():
        lines = {}
        for label, recs in records.items():
            key = pick_key(recs, candidates, name.split("_")[0] if name in CURVES else "\0")
            if key:
                xs, ys = series(recs, key)
                if xs:
                    lines[label if key in candidates[:1] else f"{label} ({key})"] = (xs, ys)
        if lines:
            path = os.path.join(out_dir, f"{name}.png")
            written.append(plot_series(lines, ylabel, f"{ylabel} over training steps", path, smooth=smooth))
    # behaviour and eval reports live under the runs; a folder given without any run below it (e.g. an
    # eval output_dir) is searched too
    def holds_a_run(d: str) -> bool:
        d = os.path.abspath(d).rstrip("/")
        return any(f == d or f.startswith(d + "/") for f in runs.values())

    roots = list(runs.values()) + [os.path.abspath(d) for d in run_dirs if not holds_a_run(d)]
    labels = {folder: label for label, folder in runs.items()}
    behaviors: dict[str, dict[str, dict]] = {}
    evals: dict[str, tuple[list, list]] = {}
    for folder in dict.fromkeys(roots):
        label = labels.get(folder, os.path.basename(os.path.abspath(folder)))
        for method, points in behavior_points(folder).items():
            behaviors.setdefault(method, {})[label] = points
        for key, pts in eval_points(folder).items():
            pts = sorted(set(pts))
            evals[f"{label}: {key}"] = ([p[0] for p in pts], [p[1] for p in pts])
    for method, by_run in behaviors.items():
        written.append(plot_behaviors(by_run, method, os.path.join(
            out_dir, "behaviors.png" if method == "judge" else "behaviors_keyword.png")))
    if evals:
        written.append(plot_series(evals, "score (%)", "Benchmarks over checkpoints", os.path.join(out_dir, "eval.png"),
                                   xlabel="checkpoint step", percent=True))
    if not written:
        log(f"[plot] nothing to draw: no metrics.jsonl, behaviour reports or eval metrics under {run_dirs}")
    for p in written:
        log(f"[plot] wrote {p}")
    return written


def plot_outcomes(stages: dict[str, dict], classes: list[str], title: str, path: str) -> str:
    """Per-class accuracy and the answer distribution at each stage (stage -> answer_breakdown), side by
    side: a policy collapsed onto one answer shows as one tall bar on the right and near-zero classes on
    the left."""
    plt = _plt()
    fig, (acc_ax, dist_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(stages))
    answers = classes + ["(other)"]
    for k, (stage, b) in enumerate(stages.items()):
        xs = [i + (k - (len(stages) - 1) / 2) * width for i in range(len(answers))]
        acc_ax.bar(xs[:-1], [100 * b["per_class"].get(c, 0.0) for c in classes], width, label=stage)
        shares = [b["answers"].get(c, 0.0) for c in classes]
        dist_ax.bar(xs, [100 * s for s in shares + [max(0.0, 1 - sum(shares))]], width, label=stage)
    acc_ax.set_xticks(range(len(classes)), classes)
    acc_ax.set_ylabel("held-out accuracy per reference (%)")
    acc_ax.set_ylim(0, 100)
    dist_ax.set_xticks(range(len(answers)), answers)
    dist_ax.set_ylabel("share of held-out answers (%)")
    dist_ax.set_ylim(0, 100)
    for ax in (acc_ax, dist_ax):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
