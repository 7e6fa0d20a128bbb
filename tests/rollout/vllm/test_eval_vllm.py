"""The eval stage with rollout.engine: vllm, from its typed rollout keys (the same RolloutEngineConfig as
the RL stage's), in its own process (an engine of its own beside the session's): greedy answers equal the
hf engine's."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.slow]


def _answers(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "held", "samples.jsonl")) as f:
        return {line["id"]: line["response"] for line in map(json.loads, f) if line}


def test_eval_with_vllm_matches_hf(tiny_model_dir, tmp_path):
    from ovr_hpc.config import load_config
    from ovr_hpc.data.synthetic import write_arithmetic_rl
    from ovr_hpc.eval.runner import run_eval
    from ovr_hpc.local import start_ranks, wait_ranks

    records = write_arithmetic_rl(str(tmp_path / "heldout.jsonl"), 4, seed=3)
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
model: {{path: {tiny_model_dir}, dtype: float32, attn_implementation: sdpa}}
benchmarks: [{{name: records, path: {records}, label: held}}]
sampling: {{max_new_tokens: 6}}
scoring: {{num_workers: 0}}
rollout: {{engine: hf, batch_size: 2, max_pixels: 50176}}
""")
    vllm = ["rollout.engine=vllm", "rollout.vllm_allow_cpu=true", "rollout.kv_cache_mb=64",
            "rollout.enforce_eager=true", "rollout.max_num_seqs=16", "rollout.max_model_len=512",
            f"output_dir={tmp_path / 'vllm'}"]
    assert wait_ranks(start_ranks("eval", str(config), vllm, 1, str(tmp_path / "logs"))) == 0
    hf = load_config("eval", str(config), [f"output_dir={tmp_path / 'hf'}"])
    assert run_eval(hf)["status"] == "completed"
    assert _answers(str(tmp_path / "vllm")) == _answers(str(tmp_path / "hf"))
