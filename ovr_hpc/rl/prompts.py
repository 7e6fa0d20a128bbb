"""RL prompts: records -> validated prompts with their token lengths, in the configured template."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ovr_hpc.data.records import DataReport, read_records
from ovr_hpc.data.vision import num_image_tokens
from ovr_hpc.rollout.base import Prompt
from ovr_hpc.rollout.hf import prompt_text

# ORZ-style plain template (our wording of its structure): no chat template, the answer in \boxed{}.
ORZ_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question; the Assistant first reasons "
    "about it inside <think> </think>, then answers inside <answer> </answer>, with the final result in "
    "\\boxed{{}}.\nUser: {problem}\nAssistant: <think>"
)
ORZ_STOP = ["User:", "</answer>"]


@dataclass
class RLPrompt:
    id: str
    source: str
    problem: str
    answer: str
    answer_type: str | None
    images: list[str]
    image_sizes: list[tuple[int, int]]
    where: str
    num_tokens: int = 0
    extra: dict = field(default_factory=dict)


def to_rollout_prompt(p: RLPrompt, data_cfg) -> Prompt:
    if data_cfg.prompt_template == "orz":
        return Prompt(ORZ_TEMPLATE.format(problem=p.problem), p.images, raw=True)
    text = p.problem if not data_cfg.instruction else f"{p.problem}\n{data_cfg.instruction}"
    return Prompt(text, p.images, system=data_cfg.system_prompt)


def stop_strings(data_cfg, rollout_cfg) -> list[str]:
    return list(rollout_cfg.stop) + (ORZ_STOP if data_cfg.prompt_template == "orz" else [])


def load_rl_prompts(data_cfg, processor, cache_root: str) -> tuple[list[RLPrompt], DataReport]:
    """Every usable prompt in file order; bad records and over-long prompts are reported and counted.
    Images embedded in Parquet records are written under `cache_root`/images."""
    records, report = read_records(data_cfg.train_files, kind="rl", check_images=True,
                                   min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels,
                                   image_dir=os.path.join(cache_root, "images"))
    tokenizer = processor.tokenizer
    prompts = []
    for rec in records:
        d = rec.data
        p = RLPrompt(str(d.get("id", rec.where)), str(d.get("source", "unknown")), d["problem"], d["answer"],
                     d.get("answer_type"), rec.images, rec.image_sizes, rec.where)
        text_tokens = len(tokenizer(prompt_text(processor, to_rollout_prompt(p, data_cfg)),
                                    add_special_tokens=False)["input_ids"])
        p.num_tokens = text_tokens - len(p.images) + sum(num_image_tokens(h, w) for h, w in p.image_sizes)
        if p.num_tokens > data_cfg.max_prompt_len:
            report.add_bad(rec.where, "prompt_too_long", f"{p.num_tokens} tokens > data.max_prompt_len")
            continue
        prompts.append(p)
    return prompts, report
