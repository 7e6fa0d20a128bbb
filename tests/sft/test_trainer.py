"""The cold-start loop in one process: learning, checkpoints, crash safety, export."""

import json
import os
import shutil

import pytest
import torch

from ovr_hpc.config import load_config
from ovr_hpc.metrics import read_metrics
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "tiny", "coldstart.yaml")


def _cfg(model_dir, data, out, *extra):
    return load_config("coldstart", CONFIG, [
        f"model.path={model_dir}", f"data.train_files=[{data}]", f"checkpoint.output_dir={out}",
        "logging.progress_bar=false", "parallel.zero_stage=2", *extra])


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """One rank; the process group (and DeepSpeed's groups cached on it) lives for the whole session."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    if not torch.distributed.is_initialized():
        from ovr_hpc.local import free_port

        monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_lr_schedule():
    from ovr_hpc.config import ScheduleConfig
    from ovr_hpc.engines.base import lr_lambda

    f = lr_lambda(ScheduleConfig(warmup_steps=2, kind="cosine", min_lr_ratio=0.1), total_steps=12)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(7) == pytest.approx(0.55) and f(12) == pytest.approx(0.1)
    assert lr_lambda(ScheduleConfig(kind="constant", warmup_steps=0), 5)(4) == 1.0
    assert lr_lambda(ScheduleConfig(kind="linear", warmup_steps=0), 10)(5) == pytest.approx(0.5)


def test_train_checkpoint_export_roundtrip(tiny_model_dir, arithmetic_file, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovr_hpc.checkpoint import export_hf
    from ovr_hpc.sft.trainer import train

    out = tmp_path / "run"
    result = train(_cfg(tiny_model_dir, arithmetic_file, out, "schedule.max_steps=6", "checkpoint.every_steps=2",
                        "checkpoint.keep_last=2"))
    assert result == {"status": "completed", "step": 6, "total_steps": 6}
    losses = [m["loss"] for m in read_metrics(str(out))]
    assert len(losses) == 6 and losses[-1] < losses[0]
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["latest", "step_4", "step_6"] and os.readlink(out / "checkpoints" / "latest") == "step_6"
    assert json.load(open(out / "checkpoints" / "step_6" / "train_state.json"))["step"] == 6
    # starting a finished run again: it resumes at its end, trains nothing and saves nothing new
    saved = os.path.getmtime(out / "checkpoints" / "step_6" / "COMPLETE")
    assert train(_cfg(tiny_model_dir, arithmetic_file, out, "schedule.max_steps=6", "checkpoint.every_steps=2",
                      "checkpoint.keep_last=2"))["status"] == "completed"
    assert os.path.getmtime(out / "checkpoints" / "step_6" / "COMPLETE") == saved
    assert [m["step"] for m in read_metrics(str(out))] == list(range(1, 7))

    export_hf(str(out), str(tmp_path / "hf"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    trained = torch.load(out / "checkpoints" / "step_6" / "policy" / "engine" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    w = model.model.language_model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, trained["model.model.language_model.layers.0.mlp.down_proj.weight"].float())
    assert not torch.equal(w, Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
                           .model.language_model.layers[0].mlp.down_proj.weight)
    from ovr_hpc.models.loading import load_processor

    load_processor(str(tmp_path / "hf"))  # the processor travels with the weights


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_tied_embeddings_train_and_export_as_the_released_layout(arithmetic_file, tmp_path, zero_stage):
    """Qwen2.5-VL-3B ties its LM head to the embedding: one matrix trained, exported once (no lm_head.weight,
    as in the released files), loaded tied again."""
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovr_hpc.models.tiny import build_tiny_model
    from ovr_hpc.sft.trainer import train

    model_dir = str(build_tiny_model(tmp_path / "tied", seed=0, tie_word_embeddings=True))
    out = tmp_path / "run"
    train(_cfg(model_dir, arithmetic_file, out, "schedule.max_steps=3", f"parallel.zero_stage={zero_stage}"))
    losses = [m["loss"] for m in read_metrics(str(out))]
    assert losses[-1] < losses[0]
    hf = out / "checkpoints" / "latest" / "hf"
    with safe_open(str(hf / "model.safetensors"), "pt") as exported, \
            safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as released:
        assert set(exported.keys()) == set(released.keys()) and "lm_head.weight" not in exported.keys()
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf)
    start = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    assert trained.lm_head.weight is trained.model.language_model.embed_tokens.weight
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)


def test_crash_during_save_keeps_previous_checkpoint(tiny_model_dir, arithmetic_file, tmp_path):
    """A leftover temporary folder (crash mid-save) and a broken `latest` never count; training resumes."""
    from ovr_hpc.checkpoint import latest_checkpoint
    from ovr_hpc.sft.trainer import train

    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, arithmetic_file, out, "schedule.max_steps=4", "checkpoint.every_steps=2",
               "checkpoint.save_hf_weights=false"))
    root = out / "checkpoints"
    shutil.copytree(root / "step_4", root / ".tmp_step_6")  # a save that died before its rename
    os.remove(root / "step_4" / "COMPLETE")  # and a newest folder that never completed
    os.remove(root / "latest")
    os.symlink("step_4", root / "latest")
    assert latest_checkpoint(str(out)).endswith("step_2")
    result = train(_cfg(tiny_model_dir, arithmetic_file, out, "schedule.max_steps=4", "checkpoint.every_steps=2",
                        "checkpoint.save_hf_weights=false"))
    assert result["step"] == 4 and [m["step"] for m in read_metrics(str(out))] == [1, 2, 3, 4]


def test_a_damaged_checkpoint_names_itself_and_the_older_ones(tiny_model_dir, arithmetic_file, tmp_path):
    """A complete checkpoint whose files were damaged afterwards: the error says which and how to fall back."""
    from ovr_hpc.sft.trainer import train

    out = tmp_path / "run"
    args = (tiny_model_dir, arithmetic_file, out, "schedule.max_steps=4", "checkpoint.every_steps=2",
            "checkpoint.save_hf_weights=false")
    train(_cfg(*args))
    states = out / "checkpoints" / "step_4" / "policy" / "engine" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])   # truncated
    with pytest.raises(RuntimeError, match=r"cannot load the 'policy' state of .*step_4: .*complete ones: step_2"):
        train(_cfg(*args, "schedule.max_steps=6"))
    shutil.move(out / "checkpoints" / "step_4", tmp_path / "damaged")
    assert train(_cfg(*args, "schedule.max_steps=6"))["step"] == 6
    assert [m["step"] for m in read_metrics(str(out))][-4:] == [3, 4, 5, 6]   # steps 3-4 trained again


def test_bad_data_threshold_fails_before_training(tiny_model_dir, tmp_path):
    from ovr_hpc.sft.trainer import train

    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    "not json\n")
    with pytest.raises(ValueError, match=r"1 of 2 records are bad .*\n.*\n.*malformed_json"):
        train(_cfg(tiny_model_dir, str(data), tmp_path / "run", "data.max_bad_fraction=0.1"))
