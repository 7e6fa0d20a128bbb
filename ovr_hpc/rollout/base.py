"""The rollout-engine interface: prompts (with images) in; token ids, text, finish reason and sampled
log-probs out. `hf.py` runs transformers' generate (CPU, tests, the demo); the colocated vLLM engine
plugs in behind the same surface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

import torch


@dataclass
class Prompt:
    """A user turn: text (with `<image>` placeholders or not) and its images (paths/URLs/base64).

    raw=True: `text` is the whole prompt (e.g. ORZ's plain template), not put in the chat template;
    its `<image>` placeholders (or, without any, the start) receive the vision tokens.
    """

    text: str
    images: list[str] = field(default_factory=list)
    system: str | None = None
    raw: bool = False


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
