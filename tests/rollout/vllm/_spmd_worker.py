"""One rank of the SPMD test (started by test_spmd.py with the torchrun variables set): builds the
engine inside an already-initialised gloo process group, pushes weights, generates this rank's own
prompts, pushes another model's weights, generates again; writes what it got to OUT/rank<r>.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys


def main(model_dir: str, other_dir: str, out_dir: str, tp: int, red: str, wide: str) -> None:
    from ovr_hpc import dist
    from ovr_hpc.models.loading import load_vlm
    from ovr_hpc.data.prompts import Prompt
    from ovr_hpc.rollout.base import SamplingParams
    from ovr_hpc.rollout.vllm import VLLMRolloutEngine
    from tests.rollout.vllm.conftest import ENGINE, ENGINE_ARGS
    from tests.rollout.vllm.test_spmd import rank_prompts, rank_params

    info = dist.init_distributed()
    engine = VLLMRolloutEngine(model_dir, dataclasses.replace(ENGINE, tensor_parallel_size=tp), **ENGINE_ARGS)
    prompts = [Prompt(**p) for p in rank_prompts(info.rank, red, wide)]
    result = {"group": engine.group_index, "groups": engine.num_groups}

    engine.load_weights(load_vlm(model_dir, "float32", "sdpa").state_dict().items())
    sampled = engine.generate(prompts, SamplingParams(**rank_params(info.rank)))
    result["sampled"] = [[(c.prompt_ids, c.token_ids, c.logprobs, c.finish_reason) for c in g] for g in sampled]

    # a stop check is a collective: every rank must ask at the same engine iterations
    import ovr_hpc.rollout.vllm as vllm_engine
    from ovr_hpc.rollout.base import RolloutInterrupted

    vllm_engine.STOP_CHECK_ITERATIONS = 2
    asked = []

    def should_stop(stop_at):
        asked.append(1)
        return dist.all_reduce_max(float(info.rank == 0 and len(asked) == stop_at)) > 0

    again = engine.generate(prompts, SamplingParams(**rank_params(info.rank)), should_stop=lambda: should_stop(0))
    result["asked"], result["same_when_not_stopped"] = len(asked), again == sampled
    asked.clear()
    try:
        engine.generate(prompts, SamplingParams(**rank_params(info.rank)), should_stop=lambda: should_stop(2))
        result["interrupted_after"] = None
    except RolloutInterrupted:
        result["interrupted_after"] = len(asked)
    after_stop = engine.generate(prompts, SamplingParams(**rank_params(info.rank)))
    result["same_after_stop"] = after_stop == sampled
    vllm_engine.STOP_CHECK_ITERATIONS = 32

    # a rank with nothing to generate still takes part
    if info.rank == 1:
        assert engine.generate([], SamplingParams(**rank_params(info.rank))) == []
    else:
        engine.generate(prompts[:1], SamplingParams(**rank_params(info.rank)))

    engine.load_weights(load_vlm(other_dir, "float32", "sdpa").state_dict().items())
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    result["greedy_other"] = [g[0].token_ids for g in greedy]
    with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
