"""`ovr-hpc plot`: training curves of several runs overlaid, behaviour rates and benchmark scores over
checkpoints, written as PNGs."""

import argparse
import json
import math

from PIL import Image

from ovr_hpc.eval.commands import add_parsers
from ovr_hpc.eval.plots import find_runs, pick_key, plot_runs


def fake_run(folder, rl: bool, scale: float):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, 31):
            line = {"step": step, "loss": scale * math.exp(-step / 10), "lr": 1e-5}
            if rl:
                line.update({"reward/mean": 0.2 + 0.01 * step, "response_length/mean": 500 + 10 * step,
                             "response_length/max": 4000, "policy/entropy": 1 / step, "grad_norm": float("nan")})
            f.write(json.dumps(line) + "\n")
        f.write('{"step": 31, "lo')  # a run still being written
    for step, rate in ((100, 0.1), (200, 0.3)):
        eval_dir = folder / "eval" / f"step_{step}" / "mathvision"
        eval_dir.mkdir(parents=True)
        json.dump({"method": "judge", "step": step, "behaviors": {
            "visual_reflection": {"emergence_rate": rate}, "backtracking": {"emergence_rate": 2 * rate}}},
            open(eval_dir / "behaviors.json", "w"))
        json.dump({"method": "keyword", "step": step, "behaviors": {"backtracking": {"emergence_rate": rate}}},
                  open(eval_dir / "behaviors_keyword.json", "w"))
        json.dump({"label": "mathvision", "headline": ["accuracy"], "model_step": step,
                   "metrics": {"accuracy": 0.2 + rate}}, open(eval_dir / "metrics.json", "w"))


def test_plot_runs_overlaid(tmp_path):
    fake_run(tmp_path / "a" / "coldstart", rl=False, scale=1.0)
    fake_run(tmp_path / "b" / "coldstart", rl=True, scale=2.0)
    assert sorted(find_runs([str(tmp_path / "a"), str(tmp_path / "b")])) == ["a/coldstart", "b/coldstart"]
    written = plot_runs([str(tmp_path / "a"), str(tmp_path / "b" / "coldstart")], str(tmp_path / "plots"),
                        smooth=0.5, extra_metrics=("lr",), log=lambda *a: None)
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["behaviors.png", "behaviors_keyword.png", "entropy.png", "eval.png", "loss.png", "lr.png",
                     "response_length.png", "reward.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_pick_key_prefers_known_names():
    recs = [{"step": 1, "reward_std": 1.0, "critic/rewards/mean": 0.3, "response_length/max": 9}]
    assert pick_key(recs, ("reward", "critic/rewards/mean"), "reward") == "critic/rewards/mean"
    assert pick_key(recs, ("response_length",), "response") is None  # only a max is logged


def test_plot_command(tmp_path):
    fake_run(tmp_path / "run", rl=True, scale=1.0)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plot", str(tmp_path / "run")])
    assert args.func(args) == 0
    assert (tmp_path / "run" / "plots" / "reward.png").exists()
    args = parser.parse_args(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "p")])
    (tmp_path / "empty").mkdir()
    assert args.func(args) == 1
