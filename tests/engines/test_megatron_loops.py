"""The cold-start and RL loops, unchanged, on the megatron-core engine (2 gloo ranks, CPU shims in every
rank through tests/engines/mcore_cpu/site): TP 2 against DeepSpeed, exact resume at PP 2 after a real
signal, HF export, and an RL run with a critic at PP 2."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import pytest

from ovr_hpc.local import start_ranks, wait_ranks
from ovr_hpc.metrics import read_metrics
from tests.conftest import REPO, rewind_run

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

COLDSTART = os.path.join(REPO, "configs", "tiny", "coldstart.yaml")
RL = os.path.join(REPO, "configs", "tiny", "rl.yaml")
MEGATRON = ["parallel.engine=megatron", "parallel.megatron_spec=local", "model.attn_implementation=sdpa"]


@pytest.fixture(autouse=True)
def cpu_shims_in_every_rank(monkeypatch):
    site = os.path.join(REPO, "tests", "engines", "mcore_cpu", "site")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([site, REPO, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OVR_TEST_MCORE_CPU_SHIMS", "1")


def _run(stage, config, overrides, out, nprocs=2):
    return wait_ranks(start_ranks(stage, config, overrides, nprocs, os.path.join(out, "logs")))


def _sft(model_dir, data, out, *extra):
    # Adam's eps above float noise: see test_megatron_engine._configs
    return [f"model.path={model_dir}", f"data.train_files=[{data}]", f"checkpoint.output_dir={out}",
            "logging.progress_bar=false", "checkpoint.every_steps=1000", "optimizer.eps=1e-5", *extra]


def _sha(out):
    with open(os.path.join(out, "checkpoints", "latest", "hf", "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_coldstart_tp2_matches_deepspeed(tiny_model_dir_2kv, arithmetic_file, tmp_path):
    ds, mc = str(tmp_path / "ds"), str(tmp_path / "mc")
    extra = ["schedule.max_steps=4", "checkpoint.save_hf_weights=true"]
    assert _run("coldstart", COLDSTART, _sft(tiny_model_dir_2kv, arithmetic_file, ds, *extra,
                                             "parallel.zero_stage=2"), ds) == 0
    assert _run("coldstart", COLDSTART, _sft(tiny_model_dir_2kv, arithmetic_file, mc, *extra, *MEGATRON,
                                             "parallel.tensor_parallel_size=2"), mc) == 0
    a, b = [m["loss"] for m in read_metrics(ds)], [m["loss"] for m in read_metrics(mc)]
    assert b == pytest.approx(a, abs=1e-5)
    assert [m["grad_norm"] for m in read_metrics(mc)] == pytest.approx([m["grad_norm"] for m in read_metrics(ds)],
                                                                        rel=1e-4)
    # the HF export of the megatron run loads with transformers and equals DeepSpeed's weights
    from safetensors.torch import load_file

    wa = load_file(os.path.join(ds, "checkpoints", "latest", "hf", "model.safetensors"))
    wb = load_file(os.path.join(mc, "checkpoints", "latest", "hf", "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(os.path.join(mc, "checkpoints", "latest", "hf"))


def test_coldstart_pp2_stop_on_signal_and_resume_is_exact(tiny_model_dir, arithmetic_file, tmp_path):
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    extra = ["schedule.max_steps=8", *MEGATRON, "parallel.pipeline_parallel_size=2"]
    assert _run("coldstart", COLDSTART, _sft(tiny_model_dir, arithmetic_file, full, *extra), full) == 0
    procs = start_ranks("coldstart", COLDSTART, _sft(tiny_model_dir, arithmetic_file, half, *extra), 2,
                        os.path.join(half, "logs"))
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(os.path.join(half, "metrics.jsonl"))
                                          and len(read_metrics(half)) >= 3):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)  # the last stage hears it; both stages must stop at the same step
    assert wait_ranks(procs) == 75
    stopped_at = json.load(open(os.path.join(half, "checkpoints", "latest", "train_state.json")))["step"]
    assert 3 <= stopped_at < 8
    assert _run("coldstart", COLDSTART, _sft(tiny_model_dir, arithmetic_file, half, *extra), half) == 0
    assert [m["loss"] for m in read_metrics(half)] == [m["loss"] for m in read_metrics(full)]
    assert [m["step"] for m in read_metrics(half)] == list(range(1, 9))
    assert _sha(half) == _sha(full)


def test_coldstart_resumes_on_another_number_of_ranks(tiny_model_dir_2kv, arithmetic_file, tmp_path):
    """Saved on 1 rank, resumed at TP 2 on 2 ranks (a requeue on another allocation): the run continues as
    the uninterrupted one does (up to the reduction order of the two layouts)."""
    full, moved = str(tmp_path / "full"), str(tmp_path / "moved")
    extra = ["schedule.max_steps=6", "checkpoint.every_steps=3", *MEGATRON]
    assert _run("coldstart", COLDSTART, _sft(tiny_model_dir_2kv, arithmetic_file, full, *extra), full, nprocs=1) == 0
    rewind_run(full, moved, 3)
    assert _run("coldstart", COLDSTART, _sft(tiny_model_dir_2kv, arithmetic_file, moved, *extra,
                                             "parallel.tensor_parallel_size=2"), moved) == 0
    assert "was saved on fewer ranks" in open(os.path.join(moved, "logs", "rank1.log")).read()
    a, b = [m["loss"] for m in read_metrics(full)], [m["loss"] for m in read_metrics(moved)]
    assert [m["step"] for m in read_metrics(moved)] == list(range(1, 7))
    assert b == pytest.approx(a, abs=1e-5)


def test_rl_with_critic_at_pp2(tiny_model_dir, tmp_path):
    from ovr_hpc.data.synthetic import write_color_rl

    data = write_color_rl(str(tmp_path / "color.jsonl"), 24, seed=0)
    out = str(tmp_path / "rl")
    overrides = [f"model.path={tiny_model_dir}", f"data.train_files=[{data}]", f"checkpoint.output_dir={out}",
                 "logging.progress_bar=false", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                 "rollout.max_response_len=[[0,6]]", "algorithm.critic_updates_per_step=2", "algorithm.reward_workers=1",
                 "algorithm.max_tokens_per_microbatch=64", "schedule.max_steps=2", *MEGATRON,
                 "parallel.pipeline_parallel_size=2"]
    assert _run("rl", RL, overrides, out) == 0
    metrics = read_metrics(out)
    assert len(metrics) == 2
    for m in metrics:
        assert m["policy/num_tokens"] if "policy/num_tokens" in m else True
        for key in ("policy/pg_loss", "critic/vf_loss", "grad_norm", "critic/grad_norm"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        # the trainer's log-probs equal those the (HF) rollout engine sampled with: same weights after sync
        assert m["rollout_logprob_gap_max"] < 1e-4
    assert os.path.isdir(os.path.join(out, "checkpoints", "latest", "critic"))
