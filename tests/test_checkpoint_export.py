"""The Hugging Face export streams: sharded safetensors under the released checkpoints' names."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ovr_hpc.checkpoint import save_hf_model


def _named_params(model):
    for name, p in model.named_parameters():
        yield name, p.detach().clone()


@pytest.mark.parametrize("shard_bytes", [1 << 40, 200_000])
def test_export_streams_into_shards_that_transformers_loads(tiny_model_dir, tmp_path, shard_bytes):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from ovr_hpc.models.loading import load_vlm

    model = load_vlm(tiny_model_dir, "bfloat16", "sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)                       # not the weights on disk
    out = tmp_path / "hf"
    save_hf_model(_named_params(model), tiny_model_dir, str(out), shard_bytes=shard_bytes)

    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert not any(f.startswith(".partial") for f in os.listdir(out))
    if shard_bytes > 1 << 30:
        assert files == ["model.safetensors"]
    else:
        n = len(files)
        assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
        for f in files:   # no shard over the limit unless one tensor alone is
            sizes = []
            with safe_open(str(out / f), "pt") as sf:
                sizes = [sf.get_tensor(k).numel() * 2 for k in sf.keys()]
            assert sum(sizes) <= shard_bytes or len(sizes) == 1
    # the released checkpoints' names, the same set as the tiny model's own file
    names = set()
    for f in files:
        with safe_open(str(out / f), "pt") as sf:
            names |= set(sf.keys())
    with safe_open(os.path.join(tiny_model_dir, "model.safetensors"), "pt") as sf:
        assert names == set(sf.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    loaded = AutoModelForImageTextToText.from_pretrained(str(out), dtype="auto")
    assert loaded.dtype == torch.bfloat16
    expected = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert (out / "preprocessor_config.json").exists() or (out / "processor_config.json").exists()


def test_export_walks_the_stream_on_every_rank_but_writes_on_one(tiny_model_dir, tmp_path):
    walked = []

    def stream():
        for item in [("lm_head.weight", torch.zeros(2, 2))]:
            walked.append(item[0])
            yield item

    save_hf_model(stream(), tiny_model_dir, str(tmp_path / "not_written"), write=False)
    assert walked == ["lm_head.weight"] and not (tmp_path / "not_written").exists()
    with pytest.raises(ValueError, match="produced twice"):
        save_hf_model(iter([("lm_head.weight", torch.zeros(1)), ("lm_head.weight", torch.zeros(1))]),
                      tiny_model_dir, str(tmp_path / "dup"))


def test_export_names_the_step_and_refuses_an_unknown_one(tmp_path):
    """`ovr-hpc export RUN step_N OUT` exports that step and says so; a step the run does not have is an error
    naming the complete ones, never a silent export of the latest."""
    from ovr_hpc.config import load_config
    from tests.test_preflight import TINY_SFT, fake_checkpoint, inputs

    cfg = load_config("coldstart", TINY_SFT, inputs(tmp_path))
    run = tmp_path / "run"
    for step in (2, 4):
        fake_checkpoint(run, step, cfg)
        (run / "checkpoints" / f"step_{step}" / "hf" / "step.txt").write_text(str(step))

    def export(*args):
        code = f"import sys; from ovr_hpc.cli import main; sys.exit(main({list(args)!r}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    done = export("export", str(run), "step_2", str(tmp_path / "out2"))
    assert done.returncode == 0, done.stderr
    assert f"exported step_2 ({run}/checkpoints/step_2/hf) to {tmp_path / 'out2'}" in done.stdout
    assert (tmp_path / "out2" / "step.txt").read_text() == "2"
    latest = export("export", str(run), str(tmp_path / "out4"))
    assert "exported step_4" in latest.stdout and (tmp_path / "out4" / "step.txt").read_text() == "4"
    for bad in ("anything_at_all", "step_3"):
        refused = export("export", str(run), bad, str(tmp_path / "bad"))
        assert refused.returncode == 2 and not (tmp_path / "bad").exists()
        assert "Traceback" not in refused.stderr
    assert f"{run} has no complete checkpoint step_3; complete ones: step_2, step_4" in refused.stderr
    incomplete = export("export", str(run / "checkpoints" / "step_3"), str(tmp_path / "bad"))
    assert incomplete.returncode == 2 and "is not a complete checkpoint" in incomplete.stderr
