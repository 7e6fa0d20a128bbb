"""The cold start on 2 gloo ranks: ZeRO-3 exact resume after a real signal, AutoTP, images under ZeRO-3."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ovr_hpc.local import start_ranks, wait_ranks
from ovr_hpc.metrics import read_metrics
from tests.conftest import REPO, rewind_run

CONFIG = os.path.join(REPO, "configs", "tiny", "coldstart.yaml")
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _overrides(model_dir, data, out, *extra):
    return [f"model.path={model_dir}", f"data.train_files=[{data}]", f"checkpoint.output_dir={out}",
            "logging.progress_bar=false", "checkpoint.every_steps=1000", *extra]


def _run(overrides, out, nprocs=2, timeout=600):
    procs = start_ranks("coldstart", CONFIG, overrides, nprocs, os.path.join(out, "logs"))
    try:
        return _wait(procs, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _wait(procs, timeout):
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    assert all(p.poll() is not None for p in procs), "ranks hung"
    return wait_ranks(procs)


def _weights_sha(out):
    with open(os.path.join(out, "checkpoints", "latest", "hf", "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_zero3_stop_on_signal_and_resume_is_exact(tiny_model_dir, arithmetic_file, tmp_path):
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    extra = ["schedule.max_steps=14", "parallel.zero_stage=3"]
    assert _run(_overrides(tiny_model_dir, arithmetic_file, full, *extra), full) == 0

    procs = start_ranks("coldstart", CONFIG, _overrides(tiny_model_dir, arithmetic_file, half, *extra), 2,
                        os.path.join(half, "logs"))
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(os.path.join(half, "metrics.jsonl")) and len(read_metrics(half)) >= 3:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)  # only one rank hears it: they must still agree
    assert _wait(procs, 300) == 75
    stopped_at = json.load(open(os.path.join(half, "checkpoints", "latest", "train_state.json")))["step"]
    assert 3 <= stopped_at < 14

    assert _run(_overrides(tiny_model_dir, arithmetic_file, half, *extra), half) == 0
    assert [m["loss"] for m in read_metrics(half)] == [m["loss"] for m in read_metrics(full)]
    assert [m["step"] for m in read_metrics(half)] == list(range(1, 15))
    assert _weights_sha(half) == _weights_sha(full)


def test_autotp_matches_data_parallel(tiny_model_dir_2kv, arithmetic_file, tmp_path):
    tiny_model_dir = tiny_model_dir_2kv
    dp, tp = str(tmp_path / "dp"), str(tmp_path / "tp")
    extra = ["schedule.max_steps=4", "parallel.zero_stage=2", "checkpoint.save_hf_weights=true"]
    assert _run(_overrides(tiny_model_dir, arithmetic_file, dp, *extra), dp) == 0
    assert _run(_overrides(tiny_model_dir, arithmetic_file, tp, *extra, "parallel.autotp_size=2"), tp) == 0
    a, b = [m["loss"] for m in read_metrics(dp)], [m["loss"] for m in read_metrics(tp)]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    wa = load_file(os.path.join(dp, "checkpoints", "latest", "hf", "model.safetensors"))
    wb = load_file(os.path.join(tp, "checkpoints", "latest", "hf", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and (wa[k] - wb[k]).abs().max() < 1e-4, k

    # DeepSpeed cannot load it at another AutoTP size: refused before any data or model is loaded
    moved = subprocess.run([sys.executable, "-m", "ovr_hpc.cli", "coldstart", CONFIG,
                            *_overrides(tiny_model_dir, arithmetic_file, tp, *extra)],
                           capture_output=True, text=True, timeout=120)
    assert moved.returncode == 2
    assert "it was saved with parallel.autotp_size=2, this run has 1" in moved.stderr


def test_zero3_with_images_on_some_ranks_only(tiny_model_dir, image_records_file, tmp_path):
    """Micro-batches with and without images on different ranks: no collective mismatch (dummy image)."""
    out = str(tmp_path / "img")
    extra = ["schedule.max_steps=3", "parallel.zero_stage=3", "data.max_seq_len=200", "parallel.global_batch_size=4",
             "data.packing=false", "data.shuffle=false", "checkpoint.save_hf_weights=false"]
    assert _run(_overrides(tiny_model_dir, image_records_file, out, *extra), out, timeout=300) == 0
    assert len(read_metrics(out)) == 3


@pytest.mark.parametrize("zero_stage,saved_on,resumed_on", [(2, 2, 1), (3, 1, 2)])
def test_zero_resumes_on_another_number_of_ranks(tiny_model_dir, arithmetic_file, tmp_path, zero_stage, saved_on,
                                                 resumed_on):
    """A requeue on another allocation: the step-3 checkpoint of a run on `saved_on` ranks resumes on
    `resumed_on` ranks through DeepSpeed's universal checkpoint, and continues as the uninterrupted run does
    (up to the reduction order of the two layouts)."""
    full, moved = str(tmp_path / "full"), str(tmp_path / "moved")
    extra = ["schedule.max_steps=6", "checkpoint.every_steps=3", f"parallel.zero_stage={zero_stage}"]
    assert _run(_overrides(tiny_model_dir, arithmetic_file, full, *extra), full, nprocs=saved_on) == 0
    rewind_run(full, moved, 3)
    root = os.path.join(moved, "checkpoints")

    assert _run(_overrides(tiny_model_dir, arithmetic_file, moved, *extra), moved, nprocs=resumed_on) == 0
    rank0_log = open(os.path.join(moved, "logs", "rank0.log")).read()
    assert f"saved on {saved_on} ranks, this run has {resumed_on}" in rank0_log
    assert os.path.exists(os.path.join(root, "step_3", "policy.universal", "CONVERTED"))
    if resumed_on > saved_on:
        assert "was saved on fewer ranks" in open(os.path.join(moved, "logs", "rank1.log")).read()
    a, b = [m["loss"] for m in read_metrics(full)], [m["loss"] for m in read_metrics(moved)]
    assert [m["step"] for m in read_metrics(moved)] == list(range(1, 7))
    assert b == pytest.approx(a, abs=1e-5)
