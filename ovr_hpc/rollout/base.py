"""The rollout-engine interface: prompts (ovr_hpc.data.prompts.Prompt, with images) in; token ids, text, finish reason and sampled
log-probs out. `hf.py` runs transformers' generate (CPU, tests, the demo); the colocated vLLM engine
plugs in behind the same surface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

import torch

from ovr_hpc.data.prompts import Prompt


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class Completion:
    prompt_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (hit max_new_tokens)
    logprobs: list[float]  # log p(token) under the sampling distribution at `temperature`
    finish_s: float = 0.0  # seconds from the start of the generate call to this completion's last token


@dataclass
class SampleRequest:
    """One sequence to generate (engines' `generate_samples`, partial rollouts): the prompt, the response
    tokens it already has (continued from them, under the weights served now) and how many more it may
    generate in this call."""

    prompt: Prompt
    prefix_ids: list[int]
    max_new_tokens: int


class RolloutInterrupted(Exception):
    """`generate` dropped its unfinished work because its `should_stop` said so."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[Prompt], params: SamplingParams,
                 should_stop: Optional[Callable[[], bool]] = None) -> list[list[Completion]]:
        """n completions per prompt, in prompt order.

        `should_stop`, when given, is called every so often while generating, at the same points on every
        rank (so it may be a collective: the trainer passes its agreement on a stop signal); when it returns
        True the engine drops what is unfinished and raises RolloutInterrupted. A preempted RL step then
        stops in seconds instead of after its rollouts (minutes at 48k tokens)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Serve these (Hugging Face-named, full) weights from now on."""

    def sleep(self) -> None:
        """Free what generation holds (vLLM sleep mode: weights and KV cache) while the trainer updates or
        saves; the next load_weights / generate wakes it. A no-op for engines that hold nothing extra."""

    def close(self) -> None:
        """Release the engine for good (processes, memory)."""
