"""The vLLM engine's generate_samples (partial rollouts) on the CPU build: a sequence continued from its
tokens equals one generated whole (text and image prompts), per-request budgets, the sampling
distribution's log-probs, a stop string across the prefix boundary, finish times, a stop request."""

from __future__ import annotations

import time

import pytest
import torch

from ovr_hpc.data.prompts import Prompt
from ovr_hpc.rollout.base import Completion, SampleRequest, SamplingParams
from tests.rollout.vllm.test_engine import hf_greedy, prompts, reference_logprobs, state_of

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture
def policy(engine, hf_model):
    engine.load_weights(state_of(hf_model))
    return engine


def test_continued_greedy_equals_one_call(policy, hf_model, processor, images):
    """Text, one-image and two-image prompts in one batch, each cut after a different k: the second call
    continues from the first's tokens and gives the rest of the one-call answer, prompt ids and text."""
    ps = prompts(images)
    whole = [g[0] for g in policy.generate(ps, GREEDY)]
    assert [c.token_ids for c in whole] == [hf_greedy(hf_model, processor, p, 12) for p in ps]
    assert all(len(c.token_ids) == 12 for c in whole), "the test needs answers that run to the limit"
    cuts = [3, 5, 8]
    first = policy.generate_samples([SampleRequest(p, [], k) for p, k in zip(ps, cuts)], GREEDY)
    assert [c.token_ids for c in first] == [c.token_ids[:k] for c, k in zip(whole, cuts)]
    assert [c.finish_reason for c in first] == ["length"] * 3
    rest = policy.generate_samples([SampleRequest(p, f.token_ids, 12 - k) for p, f, k in zip(ps, first, cuts)], GREEDY)
    for w, f, r, k in zip(whole, first, rest, cuts):
        assert f.token_ids + r.token_ids == w.token_ids
        assert r.text == w.text, "text is the whole response, prefix included"
        assert f.prompt_ids == r.prompt_ids == w.prompt_ids, "image placeholders expanded as in generate"
        assert len(r.logprobs) == 12 - k and torch.allclose(torch.tensor(f.logprobs + r.logprobs),
                                                            torch.tensor(w.logprobs), atol=1e-5)
    assert [c.prompt_index for c in rest] == [0, 1, 2]


def test_budgets_and_sampling_logprobs(policy, hf_model, processor, images):
    """Sampled continuations: each request's max_new_tokens holds ("length" at exactly that many tokens,
    0 included), and the log-probs are those of the tempered distribution without the banned tokens."""
    ps = prompts(images)
    params = SamplingParams(temperature=0.9, seed=4)
    prefixes = [c.token_ids for c in policy.generate_samples([SampleRequest(p, [], 4) for p in ps], params)]
    budgets = [1, 6, 0]
    out = policy.generate_samples([SampleRequest(p, pre, b) for p, pre, b in zip(ps, prefixes, budgets)], params)
    worst = 0.0
    for p, pre, b, c in zip(ps, prefixes, budgets, out):
        assert len(c.token_ids) == len(c.logprobs) <= b
        assert c.finish_reason == "stop" or (c.finish_reason == "length" and len(c.token_ids) == b)
        assert c.text == processor.tokenizer.decode(pre + c.token_ids, skip_special_tokens=True)
        if not c.token_ids:
            continue
        whole = Completion(0, c.prompt_ids, pre + c.token_ids, "", "length", [])
        ref = reference_logprobs(hf_model, processor, p, whole, params.temperature)[len(pre):]
        worst = max(worst, float((torch.tensor(c.logprobs) - ref).abs().max()))
    assert out[2].token_ids == [] and out[2].finish_reason == "length"
    assert worst <= 1e-5, f"continued log-probs differ from transformers float32 by {worst}"
    # per-request seeds: the same call samples the same tokens
    again = policy.generate_samples([SampleRequest(p, pre, b) for p, pre, b in zip(ps, prefixes, budgets)], params)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]


def boundary_stop(tok, ids: list[int]) -> tuple[int, str]:
    """(k, s): a place k in `ids` and a 4-character string s made of the last two characters of the text of
    ids[:k] and the first two of what ids[k] adds, found in neither part alone."""
    for k in range(2, len(ids) - 1):
        head, joined = tok.decode(ids[:k]), tok.decode(ids[: k + 1])
        tail = tok.decode(ids[k:])
        added = joined[len(head):]
        if joined.startswith(head) and len(head) >= 2 and len(added) >= 2:
            s = head[-2:] + added[:2]
            if s not in head and s not in tail:
                return k, s
    raise AssertionError(f"no usable boundary in {ids}")


def test_stop_string_across_the_prefix_boundary(policy, processor):
    prompt = Prompt("What is 2 + 3?")
    whole = policy.generate([prompt], GREEDY)[0][0]
    k, stop = boundary_stop(processor.tokenizer, whole.token_ids)
    params = SamplingParams(temperature=0.0, stop=[stop])
    out = policy.generate_samples([SampleRequest(prompt, whole.token_ids[:k], 6)], params)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == [whole.token_ids[k]] and len(out.logprobs) == 1
    assert out.text.endswith(stop) and out.text == whole.text[: whole.text.index(stop) + len(stop)]


def test_finish_times(policy, images):
    """finish_s: the time of the step each request finished in, in the call's clock: later for longer
    answers, within the call."""
    ps = prompts(images)[:1] * 4
    budgets = [2, 5, 9, 14]
    t0 = time.perf_counter()
    out = policy.generate_samples([SampleRequest(p, [], b) for p, b in zip(ps, budgets)], GREEDY)
    took = time.perf_counter() - t0
    assert [len(c.token_ids) for c in out] == budgets
    times = [c.finish_s for c in out]
    assert times == sorted(times) and times[0] < times[-1]
    assert 0 < times[0] and times[-1] <= took


def test_no_requests(policy):
    assert policy.generate_samples([], GREEDY) == []


def test_should_stop_drops_the_work(policy, images, monkeypatch):
    import ovr_hpc.rollout.vllm as vllm_engine
    from ovr_hpc.rollout.base import RolloutInterrupted

    monkeypatch.setattr(vllm_engine, "STOP_CHECK_ITERATIONS", 2)
    requests = [SampleRequest(p, [], 16) for p in prompts(images)]
    params = SamplingParams(temperature=1.0, seed=5)
    never_asked = policy.generate_samples(requests, params)
    calls = []
    with pytest.raises(RolloutInterrupted, match="stopped after 4 engine iterations"):
        policy.generate_samples(requests, params, should_stop=lambda: calls.append(1) or len(calls) == 2)
    assert not policy.llm.llm_engine.has_unfinished_requests()
    again = policy.generate_samples(requests, params)
    assert [c.token_ids for c in again] == [c.token_ids for c in never_asked]
