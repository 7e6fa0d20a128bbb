"""Data curation: pass rates through the eval runner (a model that always answers X), resume, the filter's
band / proof rule / report; loss scores against a direct per-sample computation, resume, the loss filter."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import ovr_hpc.eval.config  # noqa: F401  (registers the "eval" stage)
from ovr_hpc import cli
from ovr_hpc.config import ConfigError, load_config
from ovr_hpc.data import curation, loss as loss_mod
from ovr_hpc.data.curation import filter_records, is_proof, run_passrate
from ovr_hpc.data.loss import score_losses
from ovr_hpc.rollout.base import Completion
from tests.conftest import signal_at_call, write_jsonl


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class AlwaysAnswers:
    """A model that always answers \\boxed{X}; `on_call(n)` after the n-th generate call."""

    def __init__(self, x: str, on_call=None):
        self.x, self.on_call, self.calls = x, on_call, 0

    def generate(self, prompts, params):
        self.calls += 1
        if self.on_call:
            self.on_call(self.calls)
        return [[Completion(i, [1], [5, 6], f"<think>sure</think> \\boxed{{{self.x}}}", "stop", [0.0, 0.0])
                 for _ in range(params.n)] for i in range(len(prompts))]

    def close(self):
        pass


RL_RECORDS = [
    {"id": "a1", "source": "alg", "problem": "What is 3 + 4?", "answer": "7"},
    {"id": "a2", "source": "alg", "problem": "What is 2 + 2?", "answer": "4"},
    {"id": "g1", "source": "geo", "problem": "How many sides has a heptagon?", "answer": "7"},
    {"id": "g2", "source": "geo", "problem": "Prove that the angles of a triangle sum to 180 degrees.",
     "answer": "Proof: draw the parallel line through one vertex."},
    {"id": "g3", "source": "geo", "problem": "Show that x = 7 solves x - 7 = 0, then give x.", "answer": "7"},
    {"id": "c1", "source": "chem", "problem": "Which letter?", "choices": ["7", "8"], "answer": "A"},
    "not json",
    {"id": "n1", "source": "alg", "problem": "Prove that there are infinitely many primes.", "answer": "QED"},
]
EXPECTED_RATE = {"a1": 1.0, "a2": 0.0, "g1": 1.0, "g2": 0.0, "g3": 1.0, "c1": 0.0, "n1": 0.0}


@pytest.fixture
def rl_file(tmp_path):
    (tmp_path / "data").mkdir()
    return write_jsonl(tmp_path / "data" / "rl.jsonl", RL_RECORDS)


def passrate_config(tmp_path, path, out="pr", *overrides):
    return load_config("eval", None, [
        f"model.path={tmp_path / 'fake_model'}", f"benchmarks=[{{name: records, path: {path}}}]",
        f"output_dir={tmp_path / out}", "scoring.num_workers=0", "rollout.batch_size=2", "sampling.n=4",
        "sampling.temperature=1.0", "sampling.max_new_tokens=8", "max_bad_fraction=0.5", *overrides])


@pytest.fixture
def fake_model(tmp_path):
    (tmp_path / "fake_model").mkdir()
    (tmp_path / "fake_model" / "config.json").write_text("{}")


def test_pass_rates_of_a_model_that_always_answers_7(tmp_path, rl_file, fake_model):
    cfg = passrate_config(tmp_path, rl_file)
    result = run_passrate(cfg, engine=AlwaysAnswers("7"))
    assert result["status"] == "completed"
    lines = read_jsonl(result["passrates"]["records"])
    assert {line["id"]: line["pass_rate"] for line in lines} == EXPECTED_RATE
    by_id = {line["id"]: line for line in lines}
    assert by_id["a1"] == {"id": "a1", "index": 0, "where": f"{rl_file}:1", "source": "alg", "k": 4, "passes": 4,
                           "pass_rate": 1.0, "reasons": {"correct": 4}}
    assert by_id["n1"]["index"] == 7 and by_id["a2"]["passes"] == 0


def test_pass_rates_resume_mid_run_gives_the_same_file(tmp_path, rl_file, fake_model):
    full = run_passrate(passrate_config(tmp_path, rl_file, "full"), engine=AlwaysAnswers("7"))
    stop_after_first = AlwaysAnswers("7", on_call=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGUSR1))
    cfg = passrate_config(tmp_path, rl_file, "resumed")
    first = run_passrate(cfg, engine=stop_after_first)
    assert first["status"] == "preempted" and "passrates" not in first
    shard = tmp_path / "resumed" / "records" / "samples.rank0.jsonl"
    assert len(read_jsonl(shard)) == 2 * 4  # one batch of two prompts, k = 4 each
    engine = AlwaysAnswers("7")
    second = run_passrate(cfg, engine=engine)
    assert second["status"] == "completed" and engine.calls == 3  # the 5 prompts left, 2 per batch
    with open(full["passrates"]["records"]) as a, open(second["passrates"]["records"]) as b:
        assert a.read() == b.read()


def test_passrate_refuses_other_benchmarks(tmp_path):
    cfg = load_config("eval", None, ["model.path=m", "benchmarks=[{name: math500, path: x.jsonl}]",
                                     f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="benchmarks\\[0\\].name = 'math500': pass rates are measured on RL"):
        run_passrate(cfg)


def test_proof_rule():
    assert is_proof("Prove that the angles of a triangle sum to 180.", "Proof: draw the parallel.")
    assert is_proof("PROVE the claim.", "QED")
    assert is_proof("Show that the sequence converges.", "it converges because the terms are bounded and monotone")
    assert is_proof("Justify your construction.", "\\blacksquare")
    assert not is_proof("Show that x = 7 solves x - 7 = 0, then give x.", "7")
    assert not is_proof("Prove that 2 + 2 = ? and give the value.", "4")
    assert not is_proof("What is the proof-reading time in minutes?", "Proof")  # no proof question
    assert not is_proof("An improved estimate is asked for.", "12")  # "improved" is not "prove"


def test_filter_band_proofs_and_report(tmp_path, rl_file, fake_model):
    result = run_passrate(passrate_config(tmp_path, rl_file), engine=AlwaysAnswers("7"))
    out = str(tmp_path / "kept" / "rl.kept.jsonl")
    report = filter_records([rl_file], out, pass_rates=[result["passrates"]["records"]], drop_unsolved=True,
                            drop_proofs=True)
    kept = read_jsonl(out)
    assert [r["id"] for r in kept] == ["a1", "g1", "g3"]  # g3: a "show that" with a checkable answer
    assert kept[0] == RL_RECORDS[0]  # each kept record as it was read
    assert report["total"] == 8 and report["kept"] == 3
    assert report["removed"] == {"bad_record": 1, "proof": 2, "too_hard": 2}
    assert report["by_source"] == {
        "alg": {"total": 3, "kept": 1, "too_hard": 1, "proof": 1},
        "chem": {"total": 1, "too_hard": 1},
        "geo": {"total": 3, "kept": 2, "proof": 1},
        "unknown": {"total": 1, "bad_record": 1},
    }
    assert json.load(open(out + ".report.json"))["removed"] == report["removed"]
    # the other end of the band, and an inclusive band
    report = filter_records([rl_file], out, pass_rates=[result["passrates"]["records"]], drop_solved=True)
    assert [r["id"] for r in read_jsonl(out)] == ["a2", "g2", "c1", "n1"]
    assert report["removed"] == {"bad_record": 1, "too_easy": 3}
    report = filter_records([rl_file], out, pass_rates=[result["passrates"]["records"]], min_pass_rate=0.5)
    assert report["removed"] == {"bad_record": 1, "too_hard": 4}
    # a record the pass rates do not cover is reported, not kept silently
    extra = write_jsonl(tmp_path / "data" / "more.jsonl", [{"id": "z9", "problem": "1+1?", "answer": "2"}])
    report = filter_records([rl_file, extra], out, pass_rates=[result["passrates"]["records"]], drop_unsolved=True)
    assert report["by_source"]["unknown"] == {"total": 2, "bad_record": 1, "no_pass_rate": 1}


def test_filter_rebases_relative_images(tmp_path):
    from tests.conftest import write_png

    (tmp_path / "data" / "img").mkdir(parents=True)
    write_png(tmp_path / "data" / "img" / "a.png")
    path = write_jsonl(tmp_path / "data" / "rl.jsonl", [{"id": "x", "problem": "<image>What?", "answer": "1",
                                                          "images": ["img/a.png"]}])
    out = str(tmp_path / "elsewhere" / "kept.jsonl")
    filter_records([path], out, drop_proofs=True)
    (kept,) = read_jsonl(out)
    assert kept["images"] == [os.path.join("..", "data", "img", "a.png")]
    assert os.path.isfile(os.path.join(tmp_path / "elsewhere", kept["images"][0]))


def test_filter_cli(tmp_path, rl_file, capsys):
    out = str(tmp_path / "kept.jsonl")
    assert cli.main(["data", "filter", rl_file, "--out", out, "--drop-proofs"]) == 0
    printed = capsys.readouterr().out
    assert "5 of 8 records kept" in printed and "| geo | 3 | 2 |" in printed
    assert cli.main(["data", "filter", rl_file, "--out", out, "--drop-solved"]) == 2
    assert "needs --pass-rates" in capsys.readouterr().err


# ----------------------------------------------------------------------------- loss scores


def coldstart_config(tmp_path, model_dir, files, *overrides):
    return load_config("coldstart", None, [
        f"model.path={model_dir}", "model.dtype=float32", "model.attn_implementation=sdpa",
        f"data.train_files=[{','.join(files)}]", "data.max_seq_len=512", "data.max_pixels=50176",
        f"checkpoint.output_dir={tmp_path / 'unused'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def direct_losses(model_dir, processor, cfg) -> dict[int, float]:
    """Each sample alone through the model's own forward and logits (no kernel, no packing)."""
    from ovr_hpc.data.dataset import Collator, prepare_sft_dataset
    from ovr_hpc.models.loading import load_vlm

    dataset = prepare_sft_dataset(cfg.data, processor, model_dir, str(cfg.data.cache_dir), record_meta=True)
    model = load_vlm(model_dir, "float32", "sdpa").eval()
    collator = Collator(processor, cfg.data.min_pixels, cfg.data.max_pixels)
    out = {}
    for i in range(len(dataset)):
        mb = collator([dataset.sample(i)], [i])
        with torch.no_grad():
            logits = model(input_ids=mb.input_ids, pixel_values=mb.pixel_values,
                           image_grid_thw=mb.image_grid_thw).logits[0].double()
        out[dataset.record_index[i]] = float(torch.nn.functional.cross_entropy(logits, mb.targets, ignore_index=-100))
    return out


@pytest.fixture
def sft_files(tmp_path, image_records_file):
    from ovr_hpc.data.synthetic import write_coldstart_sft

    arith = write_coldstart_sft(str(tmp_path / "arith.jsonl"), 10, seed=1)
    return [image_records_file, arith]


def test_loss_scores_equal_a_direct_per_sample_computation(tmp_path, tiny_model_dir, processor, sft_files):
    cfg = coldstart_config(tmp_path, tiny_model_dir, sft_files)
    result = score_losses(cfg, str(tmp_path / "scores"))
    assert result["status"] == "completed"
    lines = read_jsonl(result["path"])
    assert [line["index"] for line in lines] == list(range(22))  # 12 mixed (images) + 10 arithmetic, in order
    assert lines[0]["where"] == f"{sft_files[0]}:1" and lines[12]["where"] == f"{sft_files[1]}:1"
    expected = direct_losses(tiny_model_dir, processor, cfg)
    for line in lines:
        assert line["num_loss_tokens"] > 0
        assert line["loss"] == pytest.approx(expected[line["index"]], rel=1e-4, abs=1e-5)


def test_loss_scores_resume_gives_the_same_file(tmp_path, tiny_model_dir, sft_files, monkeypatch):
    full = score_losses(coldstart_config(tmp_path, tiny_model_dir, sft_files), str(tmp_path / "full"))
    cfg = coldstart_config(tmp_path, tiny_model_dir, sft_files, "data.max_seq_len=256")
    # max_seq_len is part of the tokenization: compare with a full run of the same settings
    full = score_losses(cfg, str(tmp_path / "full256"))
    real = loss_mod.sample_losses
    monkeypatch.setattr(loss_mod, "sample_losses", signal_at_call(real, 1))  # a stop after the first row
    out = str(tmp_path / "resumed")
    first = score_losses(cfg, out)
    assert first["status"] == "preempted"
    written = read_jsonl(os.path.join(out, "loss_scores.rank0.jsonl"))
    assert 0 < len(written) < 22
    with open(os.path.join(out, "loss_scores.rank0.jsonl"), "a") as f:
        f.write('{"index": 99, "wher')  # a torn last line, as a kill mid-write leaves it
    monkeypatch.setattr(loss_mod, "sample_losses", real)
    second = score_losses(cfg, out)
    assert second["status"] == "completed"
    with open(full["path"]) as a, open(second["path"]) as b:
        assert a.read() == b.read()
    # another model or other data settings in the same folder are refused
    with pytest.raises(ConfigError, match="max_seq_len"):
        score_losses(coldstart_config(tmp_path, tiny_model_dir, sft_files, "data.max_seq_len=300"), out)


def test_filter_drops_the_highest_loss_share(tmp_path):
    records = [{"id": f"{s}{i}", "source": s, "messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": f"a{i}"}]}
               for s, n in (("x", 10), ("y", 5)) for i in range(n)]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    # x: losses 0..9, y: losses 100..104 (all of y above all of x)
    scores = [{"index": i, "where": f"{path}:{i + 1}", "source": r["source"], "num_loss_tokens": 3,
               "loss": float(i if r["source"] == "x" else 100 + i)} for i, r in enumerate(records)]
    scores_file = write_jsonl(tmp_path / "loss_scores.jsonl", scores[:-1])  # the last sample was never scored
    out = str(tmp_path / "kept.jsonl")
    report = filter_records([path], out, loss_scores=[scores_file], drop_highest=0.2, by_source=True)
    # per source: x drops floor(0.2 * 10) = 2 (x9, x8); y has 4 scored: floor(0.8) = 0
    assert report["by_source"] == {"x": {"total": 10, "kept": 8, "high_loss": 2},
                                   "y": {"total": 5, "kept": 4, "no_loss_score": 1}}
    assert [r["id"] for r in read_jsonl(out)] == [f"x{i}" for i in range(8)] + ["y0", "y1", "y2", "y3"]
    report = filter_records([path], out, loss_scores=[scores_file], drop_highest=0.2)  # overall: 14 scored -> 2
    assert report["by_source"]["y"] == {"total": 5, "kept": 2, "high_loss": 2, "no_loss_score": 1}
    assert report["removed"] == {"high_loss": 2, "no_loss_score": 1}
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "q"}] + records)
    with pytest.raises(ValueError, match="computed on other files"):
        filter_records([other], out, loss_scores=[scores_file])


def test_cli_lists_the_curation_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "--help"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("passrate", "loss-scores", "filter"))
    assert curation.PASSRATES == "passrates.jsonl"
