"""Prompts, all in one place: the templates (the model's chat template, ORZ's plain text), the default
instructions, the stop strings, and the exact text a rollout engine generates from.

The RL stage (ovr_hpc.rl.prompts), evaluation (ovr_hpc.eval.runner) and both engines (rollout/hf.py,
rollout/vllm.py) build their prompts here, and the cold start renders its records through the same chat
messages (`to_chat_messages`): a model is evaluated as it was trained. No torch import (config.py reads the
default instruction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<image>"  # where a record's (or a prompt's) images go in its text
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"  # one image; the processor expands the pad

DEFAULT_INSTRUCTION = (
    "Think it through step by step inside <think> </think>, then give the final answer in \\boxed{}."
)
# Evaluation's instruction after a multiple-choice question and its lettered options.
DEFAULT_CHOICE_INSTRUCTION = (
    "Think it through step by step inside <think> </think>, then give the letter of the correct option in \\boxed{}."
)

# ORZ-style plain template (our wording of its structure): no chat template, the answer in \boxed{}.
ORZ_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question; the Assistant first reasons "
    "about it inside <think> </think>, then answers inside <answer> </answer>, with the final result in "
    "\\boxed{{}}.\nUser: {problem}\nAssistant: <think>"
)
ORZ_STOP = ["User:", "</answer>"]


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


def prompt_body(template: str, problem: str, instruction: str = "") -> str:
    """The user turn (chat: the problem, then the instruction on its own line) or the whole prompt (orz: the
    problem in ORZ's template, no instruction)."""
    if template == "orz":
        return ORZ_TEMPLATE.format(problem=problem)
    return problem if not instruction else f"{problem}\n{instruction}"


def rollout_prompt(template: str, body: str, images: list[str], system: str | None = None) -> Prompt:
    """A prompt body (`prompt_body`) with its images, as an engine takes it (orz: raw text, no system message)."""
    if template == "orz":
        return Prompt(body, images, raw=True)
    return Prompt(body, images, system=system)


def stop_strings(template: str, extra: list[str] = ()) -> list[str]:
    """The configured stop strings, then the template's (the end-of-turn token always stops)."""
    return list(extra) + (ORZ_STOP if template == "orz" else [])


def to_chat_messages(messages: list[dict], num_images: int, system_prompt: str | None = None) -> list[dict]:
    """Our record messages -> HF chat messages with image parts in place.

    `<image>` placeholders in string contents become image parts; when a record has images but no
    placeholders, the images go at the start of the first user message.
    """
    out = []
    has_slots = any(
        (isinstance(m["content"], str) and IMAGE_PLACEHOLDER in m["content"])
        or (isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"]))
        for m in messages
    )
    if system_prompt is not None and messages[0]["role"] != "system":
        out.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    pending_images = num_images if not has_slots else 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            parts = []
            for i, chunk in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if i > 0:
                    parts.append({"type": "image"})
                if chunk:
                    parts.append({"type": "text", "text": chunk})
        else:
            parts = [dict(p) for p in content]
        if pending_images and m["role"] == "user":
            parts = [{"type": "image"} for _ in range(pending_images)] + parts
            pending_images = 0
        out.append({"role": m["role"], "content": parts})
    return out


def prompt_text(processor, prompt: Prompt) -> str:
    """The exact text a prompt is generated from (one image pad per image, expanded by the processor)."""
    if prompt.raw:
        if IMAGE_PLACEHOLDER in prompt.text:
            return prompt.text.replace(IMAGE_PLACEHOLDER, VISION_TOKENS)
        return VISION_TOKENS * len(prompt.images) + prompt.text
    messages = [{"role": "user", "content": prompt.text}]
    chat = to_chat_messages(messages, len(prompt.images), prompt.system)
    return processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
