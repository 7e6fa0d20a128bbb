"""The external_launcher path: the engine inside 2 gloo ranks, rollout TP=2 (one engine over both
ranks) and TP=1 x DP=2 (one engine per rank). Each rank passes its own prompts; both layouts and the
single-process engine give the same samples for them, with log-probs matching transformers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from ovr_hpc.data.prompts import Prompt
from ovr_hpc.rollout.base import SamplingParams
from tests.conftest import REPO
from tests.rollout.vllm.conftest import needs_two_devices
from tests.rollout.vllm.test_engine import hf_greedy, reference_logprobs, state_of

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, needs_two_devices()]


def rank_prompts(rank: int, red: str, wide: str) -> list[dict]:
    if rank == 0:
        return [{"text": "What is 2 + 3?"}, {"text": "<image>What color is this?", "images": [red]}]
    return [{"text": "Compare the two pictures.", "images": [wide, red]}, {"text": "Find the area of the square."},
            {"text": "<image>Describe the picture.", "images": [wide]}]


def rank_params(rank: int) -> dict:
    return {"n": 2, "temperature": 1.0, "max_new_tokens": 10, "seed": 1000 + rank}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tp: int, tiny_model_dir, other_model_dir, images, out_dir, timeout=300) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.rollout.vllm._spmd_worker", tiny_model_dir, other_model_dir, str(out_dir),
             str(tp), images["red"], images["wide"]], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            tail = open(os.path.join(out_dir, f"rank{rank}.log")).read()[-4000:]
            pytest.fail(f"rank {rank} (tp={tp}) exited with {p.returncode}:\n{tail}")
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


@pytest.fixture(scope="module")
def layouts(tiny_model_dir, other_model_dir, images, tmp_path_factory):
    return {tp: _run_ranks(tp, tiny_model_dir, other_model_dir, images, tmp_path_factory.mktemp(f"tp{tp}"))
            for tp in (2, 1)}


def test_groups(layouts):
    assert [(r["group"], r["groups"]) for r in layouts[2]] == [(0, 1), (0, 1)]
    assert [(r["group"], r["groups"]) for r in layouts[1]] == [(0, 2), (1, 2)]


def test_same_samples_in_every_layout(layouts, engine, hf_model, processor, images):
    """TP=2, TP=1 x DP=2 and the single-process engine sample the same tokens for a rank's prompts, and
    their log-probs match transformers float32."""
    engine.load_weights(state_of(hf_model))
    for rank in range(2):
        prompts = [Prompt(**p) for p in rank_prompts(rank, images["red"], images["wide"])]
        single = engine.generate(prompts, SamplingParams(**rank_params(rank)))
        expected = [[c.token_ids for c in g] for g in single]
        for tp in (2, 1):
            got = layouts[tp][rank]["sampled"]
            assert [[c[1] for c in g] for g in got] == expected, f"tp={tp} rank={rank}"
            for p, group in zip(prompts, got):
                for prompt_ids, token_ids, logprobs, finish in group:
                    c = single[0][0].__class__(0, prompt_ids, token_ids, "", finish, logprobs)
                    ref = reference_logprobs(hf_model, processor, p, c, 1.0)
                    assert torch.allclose(torch.tensor(logprobs), ref, atol=1e-5), f"tp={tp} rank={rank}"


def test_stop_checks_are_collective(layouts):
    """Every rank asks `should_stop` at the same engine iterations (the ranks' prompts differ; vLLM's
    data-parallel ranks iterate in lockstep), one rank's stop stops all, and the engine then works on."""
    for tp in (2, 1):
        ranks = layouts[tp]
        assert ranks[0]["asked"] == ranks[1]["asked"] >= 2, f"tp={tp}"
        assert [r["interrupted_after"] for r in ranks] == [2, 2], f"tp={tp}"
        assert all(r["same_when_not_stopped"] and r["same_after_stop"] for r in ranks), f"tp={tp}"


def test_weight_push_on_every_rank(layouts, other_model_dir, processor, images):
    from ovr_hpc.models.loading import load_vlm

    other = load_vlm(other_model_dir, "float32", "sdpa").eval()
    for rank in range(2):
        prompts = [Prompt(**p) for p in rank_prompts(rank, images["red"], images["wide"])]
        expected = [hf_greedy(other, processor, p, 8) for p in prompts]
        for tp in (2, 1):
            assert layouts[tp][rank]["greedy_other"] == expected, f"tp={tp} rank={rank}"
