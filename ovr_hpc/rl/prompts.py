"""RL prompts: records -> validated prompts with their token lengths, in the configured template
(the templates, stop strings and prompt text are ovr_hpc.data.prompts')."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ovr_hpc.data.cache import cache_key, wait_for_file
from ovr_hpc.data.prompts import Prompt, prompt_body, prompt_text, rollout_prompt
from ovr_hpc.data.prompts import stop_strings as template_stop_strings
from ovr_hpc.data.records import DataReport, read_records
from ovr_hpc.data.vision import num_image_tokens


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
    index: int = 0  # position among the records of all train files (the prompt order)


def to_rollout_prompt(p: RLPrompt, data_cfg) -> Prompt:
    """The prompt of an RL record in data.prompt_template, with data.instruction and data.system_prompt."""
    body = prompt_body(data_cfg.prompt_template, p.problem, data_cfg.instruction)
    return rollout_prompt(data_cfg.prompt_template, body, p.images, data_cfg.system_prompt)


def stop_strings(data_cfg, rollout_cfg) -> list[str]:
    """The RL stage's stop strings: rollout.stop, then data.prompt_template's."""
    return template_stop_strings(data_cfg.prompt_template, rollout_cfg.stop)


PROMPTS_CACHE_VERSION = 1


def load_rl_prompts(data_cfg, processor, model_path: str, cache_root: str, rank: int = 0, world: int = 1
                    ) -> tuple[list[RLPrompt], DataReport]:
    """Every usable prompt in file order, the same list on every rank (all ranks call it); bad records and
    over-long prompts are reported and counted. The checking (every image decoded, every prompt tokenized:
    most of an hour for OVR's ~300k prompts on one rank) is split over the ranks and cached under
    `cache_root` (see ovr_hpc.data.cache): a requeued job reads it back. Images embedded in Parquet records
    are written under `cache_root`/images."""
    from ovr_hpc.dist import barrier

    tok = processor.tokenizer
    key = cache_key(data_cfg.train_files, [
        PROMPTS_CACHE_VERSION, os.path.abspath(model_path), len(tok), tok.name_or_path,
        getattr(processor, "chat_template", None) or "", data_cfg.prompt_template, data_cfg.instruction,
        data_cfg.system_prompt, data_cfg.min_pixels, data_cfg.max_pixels, data_cfg.max_prompt_len])
    folder = os.path.join(cache_root, f"rl_prompts_{key}_w{world}")
    prepare_prompt_shard(data_cfg, processor, cache_root, folder, rank, world)
    barrier()
    prompts, report = [], DataReport()
    for r in range(world):
        path = os.path.join(folder, f"shard_{r:05d}.json")
        wait_for_file(path)
        with open(path) as f:
            shard = json.load(f)
        prompts += [RLPrompt(**{**p, "image_sizes": [tuple(hw) for hw in p["image_sizes"]]}) for p in shard["prompts"]]
        report.merge(DataReport.from_json(shard["report"]))
    prompts.sort(key=lambda p: p.index)
    return prompts, report


def prepare_prompt_shard(data_cfg, processor, cache_root: str, folder: str, rank: int, world: int) -> None:
    """This rank's share (records rank, rank + world, ...) checked into folder/shard_<rank>.json, unless there."""
    path = os.path.join(folder, f"shard_{rank:05d}.json")
    if os.path.exists(path):
        return
    records, report = read_records(data_cfg.train_files, kind="rl", check_images=True,
                                   min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels,
                                   select=lambda i: i % world == rank, image_dir=os.path.join(cache_root, "images"))
    tokenizer = processor.tokenizer
    prompts = []
    for rec in records:
        d = rec.data
        p = RLPrompt(str(d.get("id", rec.where)), str(d.get("source", "unknown")), d["problem"], d["answer"],
                     d.get("answer_type"), rec.images, rec.image_sizes, rec.where, index=rec.index)
        text_tokens = len(tokenizer(prompt_text(processor, to_rollout_prompt(p, data_cfg)),
                                    add_special_tokens=False)["input_ids"])
        p.num_tokens = text_tokens - len(p.images) + sum(num_image_tokens(h, w) for h, w in p.image_sizes)
        if p.num_tokens > data_cfg.max_prompt_len:
            report.add_bad(rec.where, "prompt_too_long", f"{p.num_tokens} tokens > data.max_prompt_len")
            continue
        prompts.append(p)
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        json.dump({"prompts": [dataclasses.asdict(p) for p in prompts], "report": report.to_json()}, f)
    os.replace(partial, path)
