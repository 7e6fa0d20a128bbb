"""The colocated vLLM engine on the CPU build, in one process: text and image prompts with n samples,
log-probs against a transformers float32 forward, weight pushes (a new policy, a training step, bounded
buckets, a checkpoint's weights after a resume), the banned image token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ovr_hpc.data.prompts import Prompt
from ovr_hpc.rollout.base import SamplingParams
from tests.rollout.vllm.conftest import ENGINE, ENGINE_ARGS, MAX_PIXELS, MIN_PIXELS

BANNED = ("<|image_pad|>", "<|video_pad|>")


def forward_kwargs(inputs, n_new: int = 0) -> dict:
    """The processor's extras for a forward over the prompt plus `n_new` generated tokens. transformers 5
    needs mm_token_type_ids to place the image's 3-D M-RoPE positions (without it the positions are
    silently those of text)."""
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], n_new)], dim=1)
    return extra


def hf_inputs(processor, prompt: Prompt):
    from ovr_hpc.data.vision import load_image
    from ovr_hpc.data.prompts import prompt_text

    images = [load_image(ref, MIN_PIXELS, MAX_PIXELS) for ref in prompt.images]
    return processor(text=[prompt_text(processor, prompt)], images=images or None, return_tensors="pt")


@torch.no_grad()
def reference_logprobs(model, processor, prompt: Prompt, completion, temperature: float) -> torch.Tensor:
    """log p(token) of a completion under `model` in float32, at `temperature`, with the banned
    placeholder tokens removed from the distribution (what the engine samples from)."""
    inputs = hf_inputs(processor, prompt)
    assert inputs["input_ids"][0].tolist() == completion.prompt_ids, "vLLM and the HF processor tokenised differently"
    ids = torch.tensor([completion.prompt_ids + completion.token_ids])
    extra = forward_kwargs(inputs, len(completion.token_ids))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
    n_prompt = len(completion.prompt_ids)
    logits = logits[n_prompt - 1 : -1].clone()
    logits[:, [processor.tokenizer.convert_tokens_to_ids(t) for t in BANNED]] = float("-inf")
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]


@torch.no_grad()
def hf_greedy(model, processor, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers (no cache), banned tokens suppressed, stop at end of turn."""
    inputs = hf_inputs(processor, prompt)
    tok = processor.tokenizer
    banned = [tok.convert_tokens_to_ids(t) for t in BANNED]
    ends = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    ids = inputs["input_ids"]
    n_prompt = ids.shape[1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        extra = forward_kwargs(inputs, ids.shape[1] - n_prompt)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].float()
        logits[banned] = float("-inf")
        t = int(logits.argmax())
        out.append(t)
        if t in ends:
            break
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


def prompts(images) -> list[Prompt]:
    return [Prompt("What is 2 + 3?"),
            Prompt("<image>What color is this?", [images["red"]]),
            Prompt("Compare the two pictures.", [images["wide"], images["red"]])]


def state_of(model):
    return [(k, v.detach().clone()) for k, v in model.state_dict().items()]


def test_generate_refuses_dummy_weights(engine_state):
    _, before_push = engine_state
    assert "load_weights" in before_push


def test_text_and_image_prompts_n_samples_logprobs(engine, hf_model, processor, images):
    stats = engine.load_weights(state_of(hf_model))
    assert stats.tensors == len(hf_model.state_dict()) and stats.version >= 1
    ps = prompts(images)
    params = SamplingParams(n=3, temperature=0.9, max_new_tokens=12, seed=7)
    out = engine.generate(ps, params)
    assert [len(g) for g in out] == [3, 3, 3]
    tok = processor.tokenizer
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert [g[0].prompt_ids.count(image_pad) for g in out] == [0, 4, 8 + 4]  # 56x56 -> 4, 112x56 -> 8
    worst = 0.0
    for i, group in enumerate(out):
        assert len({tuple(c.token_ids) for c in group}) > 1, "n samples should differ"
        for c in group:
            assert c.prompt_index == i and c.finish_reason in ("stop", "length")
            assert len(c.token_ids) == len(c.logprobs) <= 12
            assert c.finish_reason == "stop" or len(c.token_ids) == 12
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            assert all(lp <= 0 for lp in c.logprobs)
            ref = reference_logprobs(hf_model, processor, ps[i], c, params.temperature)
            worst = max(worst, float((torch.tensor(c.logprobs) - ref).abs().max()))
    assert worst <= 1e-5, f"vLLM vs transformers float32 log-probs differ by {worst}"
    # per-request seeds: the same call gives the same samples
    again = engine.generate(ps, params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]


def test_more_prompt_tokens_than_one_engine_step(engine, hf_model, images):
    """48 sequences whose prompts together exceed max_num_batched_tokens (512): several scheduler steps,
    seeded requests (the CPU build cannot rewind a seeded generator after a partial prefill)."""
    engine.load_weights(state_of(hf_model))
    ps = prompts(images) * 4
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=2)
    out = engine.generate(ps, params)
    assert sum(len(g[0].prompt_ids) for g in out) * 4 > 512
    assert [len(g) for g in out] == [4] * 12
    # the same prompt at another place in the batch, with the same seed, samples the same tokens
    first = engine.generate(ps[:3], params)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in out[:3]]


def test_should_stop_drops_the_unfinished_requests(engine, hf_model, images, monkeypatch):
    """A stop request while generating: asked every STOP_CHECK_ITERATIONS engine iterations; when it says
    stop, the requests are aborted (the engine is idle and serves the next call as if nothing happened)."""
    import ovr_hpc.rollout.vllm as vllm_engine
    from ovr_hpc.rollout.base import RolloutInterrupted

    engine.load_weights(state_of(hf_model))
    monkeypatch.setattr(vllm_engine, "STOP_CHECK_ITERATIONS", 2)
    ps = prompts(images)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=5)
    never_asked = engine.generate(ps, params)
    asked = []
    assert engine.generate(ps, params, should_stop=lambda: asked.append(1) and False) == never_asked
    assert len(asked) >= 2
    calls = []
    with pytest.raises(RolloutInterrupted, match="stopped after 4 engine iterations"):
        engine.generate(ps, params, should_stop=lambda: calls.append(1) or len(calls) == 2)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    again = engine.generate(ps, params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in never_asked]


def test_greedy_matches_transformers(engine, hf_model, processor, images):
    engine.load_weights(state_of(hf_model))
    ps = prompts(images)
    out = engine.generate(ps, SamplingParams(n=1, temperature=0.0, max_new_tokens=10))
    for p, group in zip(ps, out):
        assert group[0].token_ids == hf_greedy(hf_model, processor, p, 10)
        ref = reference_logprobs(hf_model, processor, p, group[0], 0.0)
        assert torch.allclose(torch.tensor(group[0].logprobs), ref, atol=1e-5)


def test_image_token_never_sampled(engine, hf_model, processor, images):
    """A policy that puts almost all its mass on <|image_pad|> still never emits it."""
    tok = processor.tokenizer
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    state = state_of(hf_model)
    head = dict(state)["lm_head.weight"]
    head[image_pad] = 50 * head.abs().max()  # (also makes it the top logit for almost any hidden state)
    engine.load_weights(state)
    out = engine.generate(prompts(images), SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=3))
    for group in out:
        for c in group:
            assert image_pad not in c.token_ids and tok.convert_tokens_to_ids("<|video_pad|>") not in c.token_ids


def test_weight_push_switches_policy(engine, hf_model, processor, images, other_model_dir):
    """Weights of another model (in-memory HF names, tiny buckets), then a trained step: vLLM follows."""
    from ovr_hpc.models.loading import load_vlm

    ps = prompts(images)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    engine.load_weights(state_of(hf_model))
    before = [g[0].token_ids for g in engine.generate(ps, greedy)]

    other = load_vlm(other_model_dir, "float32", "sdpa").eval()
    engine.weight_bucket_bytes = 16 << 10  # many buckets
    try:
        stats = engine.load_weights(state_of(other))
    finally:
        engine.weight_bucket_bytes = 512 << 20
    assert stats.buckets > 10, stats
    after = [g[0].token_ids for g in engine.generate(ps, greedy)]
    assert after != before
    assert after == [hf_greedy(other, processor, p, 8) for p in ps]

    # one optimizer step on a target answer, then the trained weights go in
    trained = load_vlm(other_model_dir, "float32", "sdpa")
    target = processor.tokenizer("The answer is \\boxed{5}.<|im_end|>", add_special_tokens=False)["input_ids"]
    inputs = hf_inputs(processor, ps[0])
    ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
    labels = ids.clone()
    labels[:, : inputs["input_ids"].shape[1]] = -100
    opt = torch.optim.SGD(trained.parameters(), lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        trained(input_ids=ids, labels=labels, **forward_kwargs(inputs, len(target))).loss.backward()
        opt.step()
    trained.eval()
    engine.load_weights(state_of(trained))
    out = engine.generate(ps, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=11))
    assert out[0][0].token_ids != after[0] or out[0][1].token_ids != after[0]
    for p, group in zip(ps, out):
        for c in group:
            ref = reference_logprobs(trained, processor, p, c, 1.0)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5)
    assert engine.generate(ps[:1], greedy)[0][0].token_ids == hf_greedy(trained, processor, ps[0], 8)


def test_resume_serves_the_checkpoint_weights(engine, processor, images, tmp_path, other_model_dir):
    """A checkpoint's weights, read in checkpoint-name form (as saved on disk), replace whatever the
    engine served; the repeated image prompt is not answered from stale caches."""
    from safetensors import safe_open

    from ovr_hpc.models.loading import load_vlm

    ps = prompts(images)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    engine.generate(ps, greedy)  # fill prefix and encoder caches with the current weights
    resumed = load_vlm(other_model_dir, "float32", "sdpa").eval()
    with safe_open(f"{other_model_dir}/model.safetensors", "pt") as f:
        names = list(f.keys())
        assert any(n.startswith("visual.") for n in names) and any(n.startswith("model.layers.") for n in names)
        engine.load_weights((n, f.get_tensor(n)) for n in names)  # lazily, straight from the file
    out = engine.generate(ps, greedy)
    assert [g[0].token_ids for g in out] == [hf_greedy(resumed, processor, p, 8) for p in ps]


def test_stop_strings_and_length(engine, hf_model, images):
    engine.load_weights(state_of(hf_model))
    out = engine.generate([Prompt("What is 2 + 3?")], SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=1))
    for c in out[0]:
        assert (c.finish_reason == "length") == (len(c.token_ids) == 6 and c.token_ids[-1] not in engine.end_ids)
    # a stop string the model emits: take a word from a sampled completion
    word = next(c.text.strip().split()[0] for c in out[0] if c.text.strip())
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=1, stop=[word])
    stopped = engine.generate([Prompt("What is 2 + 3?")], params)[0]
    assert any(c.finish_reason == "stop" and word in c.text for c in stopped)


def test_sleep_mode_is_cuda_only(tiny_model_dir):
    from ovr_hpc.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(ValueError, match="enable_sleep_mode needs CUDA"):
        VLLMRolloutEngine(tiny_model_dir, dataclasses.replace(ENGINE, enable_sleep_mode=True), **ENGINE_ARGS)


def test_check_vllm_available_cpu_build():
    from ovr_hpc.rollout.vllm import VLLMUnavailableError, check_vllm_available

    check_vllm_available(allow_cpu=True)
    with pytest.raises(VLLMUnavailableError, match="needs a CUDA GPU"):
        check_vllm_available(allow_cpu=False)
