"""Rollouts with transformers' generate: the CPU engine (tests, the demo, evaluation without vLLM)."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from ovr_hpc.data.prompts import Prompt, prompt_text
from ovr_hpc.data.vision import load_image
from ovr_hpc.rollout.base import Completion, RolloutInterrupted, SampleRequest, SamplingParams


class _TokenTimes:
    """A stopping criterion that never stops: the time each token of a generate call came out (the k-th
    call = the k-th new token of every row), for per-sample finish times."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def trim_completion(ids: list[int], end_ids: list[int], stop: list[str], decode: Callable[[list[int]], str]
                    ) -> tuple[list[int], str, str]:
    """A generated row -> (the completion's tokens, its text, finish reason). generate keeps a finished row
    going with pad tokens while other rows generate: the completion ends at the first end-of-turn token or
    at the token that completes a stop string, whichever comes first (its text cut right after the stop
    string, as vLLM's include_stop_str_in_output does); with neither it is "length" (truncated)."""
    end = next((j + 1 for j, t in enumerate(ids) if t in end_ids), None)
    finish, ids = ("stop", ids[:end]) if end is not None else ("length", ids)
    text = decode(ids)
    if not any(s in text for s in stop):
        return ids, text, finish
    lo, hi = 1, len(ids)  # the shortest prefix holding a stop string: containment only grows with the prefix
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    text = decode(ids[:lo])
    cut = min(text.index(s) + len(s) for s in stop if s in text)
    return ids[:lo], text[:cut], "stop"


class HFRolloutEngine:
    def __init__(self, model, processor, min_pixels: int, max_pixels: int, batch_size: int = 16):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.batch_size = batch_size
        tok = self.tokenizer
        self.end_ids = [i for i in {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} if i is not None]
        # the model must never emit vision placeholders itself
        self.suppress_ids = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams,
                 should_stop: Callable[[], bool] | None = None) -> list[list[Completion]]:
        """`should_stop` is asked between batches of `batch_size` prompts (ranks pass equally many prompts)."""
        results: list[list[Completion]] = [[] for _ in prompts]
        generator_seed = params.seed
        for start in range(0, len(prompts), self.batch_size):
            if start and should_stop is not None and should_stop():
                raise RolloutInterrupted(f"stopped after {start} of {len(prompts)} prompts")
            chunk = list(range(start, min(start + self.batch_size, len(prompts))))
            torch.manual_seed(generator_seed + start)
            for i, completion in self._generate_chunk([prompts[i] for i in chunk], chunk, params):
                results[i].append(completion)
        return results

    @torch.no_grad()
    def generate_samples(self, requests: list[SampleRequest], params: SamplingParams,
                         should_stop: Callable[[], bool] | None = None) -> list[Completion]:
        """One completion per request, continued from its prefix_ids for at most its max_new_tokens (then
        "length"); the completion's token_ids and log-probs are the new tokens only, its text the whole
        response (prefix included), finish_s its last token's time. Batches of `batch_size` rows, each
        sampled from params.seed + its first row; `should_stop` between batches, as in generate."""
        results: list[Completion] = []
        t0 = time.perf_counter()
        for start in range(0, len(requests), self.batch_size):
            if start and should_stop is not None and should_stop():
                raise RolloutInterrupted(f"stopped after {start} of {len(requests)} sequences")
            torch.manual_seed(params.seed + start)
            results += self._continue_chunk(requests[start:start + self.batch_size], params, t0)
        return results

    def _continue_chunk(self, requests: list[SampleRequest], params: SamplingParams, t0: float) -> list[Completion]:
        prompts = [r.prompt for r in requests]
        texts = [prompt_text(self.processor, p) for p in prompts]
        images = [load_image(ref, self.min_pixels, self.max_pixels, retry=True) for p in prompts for ref in p.images]
        self.tokenizer.padding_side = "left"
        inputs = dict(self.processor(text=texts, images=images or None, return_tensors="pt", padding=True))
        prompt_rows = [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
        per_token = [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape == inputs["input_ids"].shape
                     and k not in ("input_ids", "attention_mask")]
        extra = {k: [v[m.bool()].tolist() for v, m in zip(inputs[k], inputs["attention_mask"])] for k in per_token}
        inputs["input_ids"], inputs["attention_mask"] = _left_padded(
            [row + r.prefix_ids for row, r in zip(prompt_rows, requests)], self.tokenizer.pad_token_id)
        for k in per_token:   # per-token side inputs (e.g. token types): the prefix is text
            inputs[k], _ = _left_padded([row + [0] * len(r.prefix_ids) for row, r in zip(extra[k], requests)], 0)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        limit = max(r.max_new_tokens for r in requests)
        clock = _TokenTimes()
        out = self.model.generate(
            **inputs, do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None,
            num_return_sequences=1, max_new_tokens=limit, eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.pad_token_id, suppress_tokens=self.suppress_ids,
            stop_strings=params.stop or None, tokenizer=self.tokenizer if params.stop else None,
            output_logits=True, return_dict_in_generate=True, stopping_criteria=[clock])
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        logits = torch.stack(out.logits, dim=1).float() / params.temperature
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens[..., None])[..., 0]
        completions = []
        for row, r in enumerate(requests):
            prefix = list(r.prefix_ids)

            def decode(ids: list[int]) -> str:   # the whole response: a stop string may span the prefix
                return self.tokenizer.decode(prefix + ids, skip_special_tokens=True)

            ids, text, finish = trim_completion(new_tokens[row].tolist()[: r.max_new_tokens], self.end_ids,
                                                params.stop, decode)
            finish_s = clock.times[max(0, len(ids) - 1)] - t0 if clock.times else 0.0
            completions.append(Completion(row, prompt_rows[row], ids, text, finish,
                                          token_logprobs[row, :len(ids)].tolist(), finish_s))
        return completions

    def _generate_chunk(self, prompts, indices, params: SamplingParams):
        texts = [prompt_text(self.processor, p) for p in prompts]
        images = [load_image(ref, self.min_pixels, self.max_pixels, retry=True)
                  for p in prompts for ref in p.images]
        self.tokenizer.padding_side = "left"
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        greedy = params.temperature == 0
        out = self.model.generate(
            **inputs,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None,
            num_return_sequences=params.n,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            suppress_tokens=self.suppress_ids,
            stop_strings=params.stop or None,
            tokenizer=self.tokenizer if params.stop else None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:]
        # log-probs of the sampled tokens under the raw distribution at the sampling temperature
        logits = torch.stack(out.logits, dim=1).float()
        if not greedy:
            logits = logits / params.temperature
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens[..., None])[..., 0]

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        for row in range(new_tokens.shape[0]):
            p = row // params.n
            ids, text, finish = trim_completion(new_tokens[row].tolist(), self.end_ids, params.stop, decode)
            prompt_ids = inputs["input_ids"][p][inputs["attention_mask"][p].bool()].tolist()
            yield indices[p], Completion(indices[p], prompt_ids, ids, text, finish,
                                         token_logprobs[row, :len(ids)].tolist())

    def sleep(self) -> None:
        """Nothing to free: the model stays in memory between steps."""

    def close(self) -> None:
        self.model = None

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = dict(named_tensors)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or (missing and len(missing) == len(self.model.state_dict())):
            raise KeyError(f"weights do not match the rollout model: unexpected {unexpected[:5]}, "
                           f"missing {missing[:5]}")
