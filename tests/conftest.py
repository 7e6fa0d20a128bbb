"""Shared fixtures: one tiny Qwen2.5-VL per session, small data sets written on the fly."""

from __future__ import annotations

import json
import os
import signal

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a run exports for torch.distributed (dist.init_distributed, launch.export_rank_env): a test that runs
# one in-process must not hand its rank to the next test (an in-process eval then thought it was rank 1 of 2).
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _rank_env_restored():
    before = {key: os.environ.get(key) for key in RANK_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from ovr_hpc.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def tiny_model_dir_2kv(tmp_path_factory) -> str:
    """Two KV heads, so tensor parallelism of 2 splits whole heads."""
    from ovr_hpc.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny2kv") / "model", seed=0, num_kv_heads=2))


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from ovr_hpc.models.loading import load_processor

    return load_processor(tiny_model_dir, 3136, 50176)


def write_png(path, size=(56, 56), color=(200, 30, 30)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return str(path)


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def arithmetic_file(tmp_path) -> str:
    from ovr_hpc.data.synthetic import write_coldstart_sft

    return write_coldstart_sft(str(tmp_path / "arith.jsonl"), 64, seed=0)


@pytest.fixture
def image_records_file(tmp_path) -> str:
    """Text-only and image records mixed (different sizes, placeholder and no-placeholder forms)."""
    write_png(tmp_path / "red.png", (56, 56))
    write_png(tmp_path / "wide.png", (112, 56), (0, 90, 200))
    records = []
    for i in range(12):
        if i % 3 == 0:
            records.append({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                         {"role": "assistant", "content": f"<think>{i}+1</think> \\boxed{{{i + 1}}}"}]})
        elif i % 3 == 1:
            records.append({"images": ["red.png"], "messages": [
                {"role": "user", "content": "<image>What color is this?"},
                {"role": "assistant", "content": "<think>look</think> \\boxed{red}"}]})
        else:
            records.append({"images": ["wide.png", "red.png"], "messages": [
                {"role": "user", "content": "Compare the two pictures."},
                {"role": "assistant", "content": "<think>two</think> \\boxed{blue, red}"}]})
    return write_jsonl(tmp_path / "mixed.jsonl", records)


def rewind_run(src: str, dst: str, step: int) -> None:
    """A copy of the run in `src` at `dst` as if it had been preempted right after its step-`step`
    checkpoint: later checkpoints and metrics gone, `latest` pointing at step_`step`."""
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    root = os.path.join(dst, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("step_") and int(name.split("_")[1].split(".")[0]) > step:
            shutil.rmtree(os.path.join(root, name))
    os.remove(os.path.join(root, "latest"))
    os.symlink(f"step_{step}", os.path.join(root, "latest"))
    metrics = os.path.join(dst, "metrics.jsonl")
    kept = [line for line in open(metrics).read().splitlines() if json.loads(line).get("step", 0) <= step]
    with open(metrics, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def signal_at_call(fn, n: int, sig=signal.SIGUSR1):
    """`fn`, sending this process `sig` at its n-th call: a preemption at a chosen moment of a run."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), sig)
        return fn(*args, **kwargs)

    return wrapper
