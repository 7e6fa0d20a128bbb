"""Hazards of an engine that lives beside the trainer and gets new weights every step, on the CPU build:
stale vision-encoder outputs and caches that grow with every step, weights that silently do not land
(rollout.check_weights), and per-parameter RPC overhead of the push (one collective_rpc per push)."""

from __future__ import annotations

import pytest

from ovr_hpc.data.prompts import Prompt
from ovr_hpc.rollout.base import SamplingParams
from tests.rollout.vllm.test_engine import hf_greedy, state_of

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def cache_entries(engine) -> dict[str, int]:
    """Entries of vLLM 0.32's in-process multimodal caches: the scheduler's encoder-cache bookkeeping, the
    model runner's encoder outputs, the renderer's processor cache (sender) and the engine core's receiver
    cache."""
    llm_engine = engine.llm.llm_engine
    core = llm_engine.engine_core.engine_core
    processor_cache = llm_engine.renderer._mm_processor_cache
    receiver_cache = core.mm_receiver_cache
    return {"scheduler": len(core.scheduler.encoder_cache_manager.cached),
            "runner": sum(engine.llm.collective_rpc(lambda worker: len(worker.model_runner.encoder_cache))),
            "processor": len(processor_cache._cache) if processor_cache is not None else 0,
            "receiver": len(receiver_cache._cache) if receiver_cache is not None else 0}


def with_vision_of(model, other) -> list:
    """model's state with the vision tower (visual.*) of `other`."""
    theirs = dict(state_of(other))
    return [(k, theirs[k] if ".visual." in f".{k}" else v) for k, v in state_of(model)]


def test_new_vision_tower_answers_after_a_push(engine, hf_model, processor, images, other_model_dir):
    """The same image prompt before and after a push that changes only the vision tower: the answer after
    it is the new tower's (an encoder output cached from the old weights would give the old answer)."""
    from ovr_hpc.models.loading import load_vlm

    prompt = Prompt("<image>What color is this?", [images["red"]])
    engine.load_weights(state_of(hf_model))
    before = engine.generate([prompt], GREEDY)[0][0].token_ids
    assert cache_entries(engine)["runner"] > 0, "the encoder output is cached"
    mixed = load_vlm(other_model_dir, "float32", "sdpa").eval()
    state = with_vision_of(hf_model, mixed)
    mixed.load_state_dict(dict(state))
    engine.load_weights(state)
    after = engine.generate([prompt], GREEDY)[0][0].token_ids
    assert after == hf_greedy(mixed, processor, prompt, 8)
    assert after != before, "the new vision tower should change the greedy answer"


def test_caches_emptied_by_a_push_and_bounded_over_steps(engine, hf_model, tmp_path):
    from tests.conftest import write_png

    state = state_of(hf_model)
    engine.load_weights(state)
    sizes = []
    for step in range(4):
        pics = [write_png(tmp_path / f"s{step}_{j}.png", (56, 56), (40 * step + j, 90, 200 - j)) for j in range(3)]
        engine.generate([Prompt("<image>Describe.", [p]) for p in pics], GREEDY)
        after_generate = cache_entries(engine)
        assert all(0 < n <= 3 for n in after_generate.values()), after_generate   # this step's images only
        engine.reset_caches()
        assert set(cache_entries(engine).values()) == {0}, "reset_caches leaves entries"
        engine.generate([Prompt("<image>Describe.", [pics[0]])], GREEDY)
        engine.load_weights(state)   # the next step's push
        sizes.append(cache_entries(engine))
    assert all(set(s.values()) == {0} for s in sizes), sizes


def test_check_weights_passes_a_push_and_catches_one_that_did_not_land(engine, hf_model, monkeypatch):
    from ovr_hpc.rollout.vllm import WeightSyncError

    monkeypatch.setattr(engine, "check_weights", True)
    state = state_of(hf_model)
    norms = [k for k, v in state if v.dim() == 1 and k.endswith("norm.weight")]
    stats = engine.load_weights(state)
    assert stats.checked >= len(norms) > 0, stats

    # the next push changes a norm weight, but the reload drops it (the served one stays the old value)
    lost = "model.language_model.layers.0.post_attention_layernorm.weight"
    assert lost in norms
    changed = [(k, v + 0.5 if k == lost else v) for k, v in state]
    real_rpc = engine.llm.collective_rpc

    def reload_skipping_one(method, *args, **kwargs):
        if method == "reload_weights":
            weights = kwargs["kwargs"]["weights_iterator"]
            kwargs["kwargs"]["weights_iterator"] = ((n, t) for n, t in weights
                                                    if n != "model.layers.0.post_attention_layernorm.weight")
        return real_rpc(method, *args, **kwargs)

    monkeypatch.setattr(engine.llm, "collective_rpc", reload_skipping_one)
    with pytest.raises(WeightSyncError, match=r"model\.layers\.0\.post_attention_layernorm\.weight differs"):
        engine.load_weights(changed)
    monkeypatch.setattr(engine.llm, "collective_rpc", real_rpc)
    assert engine.load_weights(changed).checked == stats.checked   # a push that lands passes again


@pytest.mark.parametrize("bucket_bytes", [16 << 10, 512 << 20])
@pytest.mark.parametrize("check", [False, True])
def test_one_rpc_per_push_whatever_the_buckets(engine, hf_model, monkeypatch, bucket_bytes, check):
    from ovr_hpc.rollout.vllm import iter_buckets, served_checksums

    state = state_of(hf_model)
    expected_buckets = len(list(iter_buckets(state, bucket_bytes, engine.dtype, "cpu")))
    calls = []
    real_rpc = engine.llm.collective_rpc
    monkeypatch.setattr(engine.llm, "collective_rpc",
                        lambda method, *a, **k: calls.append(method) or real_rpc(method, *a, **k))
    monkeypatch.setattr(engine, "weight_bucket_bytes", bucket_bytes)
    monkeypatch.setattr(engine, "check_weights", check)
    stats = engine.load_weights(state)
    assert calls == ["reload_weights"] + ([served_checksums] if check else [])
    assert stats.buckets == expected_buckets and stats.tensors == len(state)
    assert (stats.buckets > 10) == (bucket_bytes == 16 << 10)
