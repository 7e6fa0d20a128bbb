"""The cold-start dataset: records -> tokenized samples (cached on disk) -> packed rows -> micro-batches.

Preparation is split over the ranks (rank r tokenizes records r, r+W, ...), written to a cache
folder keyed by the data files, the tokenizer and the settings, and memory-mapped by every rank: a
requeued job or a second run on the same data does not tokenize again. Every rank then holds the same
samples, the same rows and the same report, so all decisions (threshold, packing, order) agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ovr_hpc.data.cache import cache_key, wait_for_file
from ovr_hpc.data.errors import BadRecord
from ovr_hpc.data.packing import one_per_row, pack_best_fit
from ovr_hpc.data.prompts import to_chat_messages
from ovr_hpc.data.records import DataReport, read_records
from ovr_hpc.data.templates import IMAGE_PAD, TokenizedSample, tokenize_chat, truncate
from ovr_hpc.data.vision import MERGE_SIZE, load_image, num_image_tokens

CACHE_VERSION = 1
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- preparation


def _cache_key(cfg, processor, model_path: str, record_meta: bool = False) -> str:
    tok = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    # caches written before samples kept their record's source and index lack them: a run that needs them
    # (source weights, loss scores) gets a cache of its own, the others keep theirs
    extra = ["record-meta"] if record_meta else []
    return cache_key(cfg.train_files, [
        CACHE_VERSION, os.path.abspath(model_path), len(tok), tok.name_or_path, cfg.max_seq_len, cfg.overlong,
        cfg.min_pixels, cfg.max_pixels, cfg.system_prompt, getattr(processor, "chat_template", None) or ""] + extra)


def tokenize_records(records, processor, cfg, report: DataReport, origins: list | None = None) -> list[TokenizedSample]:
    """Tokenized samples of the usable records; `origins` (when given) gets (source, record index) per sample."""
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    samples = []
    for rec in records:
        try:
            messages = to_chat_messages(rec.data["messages"], len(rec.images), cfg.system_prompt)
            sample = tokenize_chat(processor, messages, rec.image_sizes, where=rec.where, images=rec.images)
        except BadRecord as e:
            report.add_bad(rec.where, e.kind, e.message)
            continue
        if len(sample.input_ids) > cfg.max_seq_len:
            cut = truncate(sample, cfg.max_seq_len, pad_id) if cfg.overlong == "truncate" else None
            if cut is None:
                report.num_dropped_overlong += 1
                continue
            report.num_truncated += 1
            sample = cut
        samples.append(sample)
        if origins is not None:
            origins.append((str(rec.data.get("source", "unknown")), rec.index))
    return samples


def _save_shard(path: str, samples: list[TokenizedSample], report: DataReport, origins: list | None = None) -> None:
    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    np.save(os.path.join(tmp, "tokens.npy"), np.array([t for s in samples for t in s.input_ids], dtype=np.int32))
    np.save(os.path.join(tmp, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    meta = [{"where": s.where, "spans": s.loss_spans, "images": s.images, "image_sizes": s.image_sizes} for s in samples]
    for m, (source, index) in zip(meta, origins or []):
        m.update(source=source, index=index)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"samples": meta, "report": report.to_json()}, f)
    if os.path.exists(path):  # prepared meanwhile by an identical run: keep theirs
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)


@dataclass
class Shard:
    tokens: np.ndarray  # int32, memory-mapped
    offsets: np.ndarray
    meta: list[dict]


class SFTDataset:
    """Tokenized samples of all shards, in record order, and the merged report."""

    def __init__(self, shards: list[Shard], report: DataReport, world: int):
        # shard r holds records r, r+W, ...: interleave back into record order
        self.index: list[tuple[int, int]] = []
        longest = max((len(s.meta) for s in shards), default=0)
        for j in range(longest):
            for r in range(world):
                if j < len(shards[r].meta):
                    self.index.append((r, j))
        self.shards = shards
        self.report = report
        self.lengths = [int(shards[r].offsets[j + 1] - shards[r].offsets[j]) for r, j in self.index]
        self.has_images = any(m["images"] for s in shards for m in s.meta)
        # each sample's record: its `source` field and its index among the records of the files (caches
        # prepared without record_meta do not hold them: "unknown" and -1)
        self.sources = [shards[r].meta[j].get("source", "unknown") for r, j in self.index]
        self.record_index = [int(shards[r].meta[j].get("index", -1)) for r, j in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, i: int) -> TokenizedSample:
        r, j = self.index[i]
        shard = self.shards[r]
        m = shard.meta[j]
        ids = shard.tokens[shard.offsets[j] : shard.offsets[j + 1]].tolist()
        return TokenizedSample(ids, [tuple(s) for s in m["spans"]], m["images"], [tuple(x) for x in m["image_sizes"]],
                               m["where"])


def prepare_sft_dataset(cfg, processor, model_path: str, cache_root: str, rank: int = 0, world: int = 1,
                        record_meta: bool = False) -> SFTDataset:
    """Tokenize (split over ranks, cached) and load the dataset. All ranks must call it. With `record_meta`
    (implied by data.source_weights) every sample keeps its record's source and index."""
    from ovr_hpc.dist import barrier

    record_meta = record_meta or bool(getattr(cfg, "source_weights", None))
    cache = os.path.join(cache_root, _cache_key(cfg, processor, model_path, record_meta) + f"_w{world}")
    shard_path = os.path.join(cache, f"shard_{rank:05d}")
    if not os.path.exists(os.path.join(shard_path, "meta.json")):
        os.makedirs(cache, exist_ok=True)
        records, report = read_records(
            cfg.train_files, kind="sft", check_images=True, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
            select=lambda i: i % world == rank, image_dir=os.path.join(cache_root, "images"),
        )
        origins: list = []
        samples = tokenize_records(records, processor, cfg, report, origins)
        _save_shard(shard_path, samples, report, origins)
    barrier()
    shards, report = [], DataReport()
    for r in range(world):
        path = os.path.join(cache, f"shard_{r:05d}")
        wait_for_file(os.path.join(path, "meta.json"))
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        shards.append(Shard(np.load(os.path.join(path, "tokens.npy"), mmap_mode="r"),
                            np.load(os.path.join(path, "offsets.npy")), meta["samples"]))
        report.merge(DataReport.from_json(meta["report"]))
    return SFTDataset(shards, report, world)


def build_rows(dataset: SFTDataset, cfg) -> list[list[int]]:
    """Packed rows of sample ids (best-fit decreasing, or one sample per row).

    With data.source_weights the samples of each source are packed apart, so every row holds one source and
    weights apply to rows (`row_sources`, `ovr_hpc.data.weights`). Weighting samples before packing instead
    would either fix which copies share a row for the whole run (duplicates packed once) or need repacking
    every epoch, which changes the number of rows and with it the position -> row map a resume relies on;
    weighting mixed rows would weight a row's every source alike. Packing per source costs at most one
    part-filled row per source."""
    pack = (lambda lengths: pack_best_fit(lengths, cfg.max_seq_len)) if cfg.packing else one_per_row
    if not getattr(cfg, "source_weights", None):
        return pack(dataset.lengths)
    from ovr_hpc.data.weights import source_plan

    source_plan(dataset.sources, cfg.source_weights)  # names a weighted source the data lacks, before training
    rows = []
    for source in sorted(set(dataset.sources)):
        ids = [i for i, s in enumerate(dataset.sources) if s == source]
        rows += [[ids[j] for j in row] for row in pack([dataset.lengths[i] for i in ids])]
    return rows


def row_sources(dataset: SFTDataset, rows: list[list[int]]) -> list[str]:
    """The source of each row (its first sample's: with source weights, rows are packed per source)."""
    return [dataset.sources[row[0]] if row else "unknown" for row in rows]


def samples_per_source(dataset: SFTDataset, rows: list[list[int]], step_rows: list[int]) -> dict[str, int]:
    """{samples/<source>: samples of that source in the step's rows} (the cold start's per-step metric)."""
    from collections import Counter

    counts = Counter(dataset.sources[i] for r in step_rows for i in rows[r])
    return {f"samples/{s}": n for s, n in sorted(counts.items())}


# ----------------------------------------------------------------------------- order


def rows_at(position: int, count: int, num_rows: int, seed: int, shuffle: bool) -> list[int]:
    """`count` row ids from an endless stream of epochs starting at `position` (packs consumed so far).

    Epoch e is a permutation drawn from (seed, e) alone, so any position can be resumed without
    replaying the ones before it, and no row is lost at an epoch boundary.
    """
    out = []
    while len(out) < count:
        epoch, offset = divmod(position, num_rows)
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(num_rows, generator=g).tolist()
        else:
            perm = list(range(num_rows))
        take = min(count - len(out), num_rows - offset)
        out.extend(perm[offset : offset + take])
        position += take
    return out


# ----------------------------------------------------------------------------- collation


def mrope_positions(input_ids: list[int], image_grids: list[tuple[int, int, int]], image_pad_id: int,
                    merge_size: int = MERGE_SIZE) -> torch.Tensor:
    """Qwen2-VL's 3-D rotary positions (temporal, height, width) of one sample: [3, L].

    Text tokens advance all three together; an image's tokens take their grid coordinates offset by
    the position before it, and the text after resumes at one past the largest position used.
    """
    out = torch.empty(3, len(input_ids), dtype=torch.long)
    cur, i, img = 0, 0, 0
    ids = torch.tensor(input_ids)
    n = len(input_ids)
    while i < n:
        if input_ids[i] == image_pad_id:
            t, h, w = image_grids[img]
            gh, gw = h // merge_size, w // merge_size
            count = t * gh * gw
            tt = torch.arange(t).repeat_interleave(gh * gw)
            hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
            ww = torch.arange(gw).repeat(t * gh)
            out[:, i : i + count] = torch.stack([tt, hh, ww]) + cur
            cur = int(out[:, i : i + count].max()) + 1
            i += count
            img += 1
        else:
            nxt = (ids[i:] == image_pad_id).nonzero()
            end = i + int(nxt[0]) if len(nxt) else n
            out[:, i:end] = torch.arange(cur, cur + end - i)
            cur += end - i
            i = end
    return out


@dataclass
class MicroBatch:
    """One packed row: samples concatenated, positions restarting per sample (varlen / block-causal)."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [4, 1, T]: text positions (sample boundaries) + 3 mrope rows
    targets: torch.Tensor  # [T]: next token where it carries loss, else IGNORE_INDEX
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    num_loss_tokens: int
    num_tokens: int
    sample_ids: list[int]

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "targets": self.targets,
                "pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}

    def to(self, device) -> "MicroBatch":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.position_ids), move(self.targets), move(self.pixel_values),
                          move(self.image_grid_thw), self.num_loss_tokens, self.num_tokens, self.sample_ids)


class Collator:
    """Builds MicroBatches from samples; images are loaded and processed here, as in the processor."""

    def __init__(self, processor, min_pixels: int, max_pixels: int, always_run_vision: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.vision_start_id = self.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = self.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        # Under ZeRO-3 every rank must run the vision tower in every forward (its parameters are
        # gathered collectively): a micro-batch without images gets a tiny dummy image, no loss.
        self.always_run_vision = always_run_vision

    def _process_images(self, images):
        # images are already resized by qwen-vl-utils within the processor's pixel bounds: no resize here
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def dummy_sample(self) -> tuple[TokenizedSample, object]:
        from PIL import Image

        image = Image.new("RGB", (56, 56))
        n = num_image_tokens(56, 56)
        ids = [self.vision_start_id] + [self.image_pad_id] * n + [self.vision_end_id]
        return TokenizedSample(ids, [], ["<dummy>"], [(56, 56)], "<dummy>"), image

    def __call__(self, samples: list[TokenizedSample], sample_ids: list[int] | None = None) -> MicroBatch:
        loaded = []
        for s in samples:
            for ref, (h, w) in zip(s.images, s.image_sizes):
                image = load_image(ref, self.min_pixels, self.max_pixels, retry=True)
                if (image.height, image.width) != (h, w):
                    raise RuntimeError(f"{s.where}: image {ref} changed since the data was prepared")
                loaded.append(image)
        if self.always_run_vision and not loaded:
            dummy, image = self.dummy_sample()
            samples = list(samples) + [dummy]
            loaded.append(image)
        pixel_values = grid = None
        grids: list[tuple[int, int, int]] = []
        if loaded:
            pixel_values, grid = self._process_images(loaded)
            grids = [tuple(int(x) for x in g) for g in grid]
        ids, text_pos, rope, targets = [], [], [], []
        n_loss, g = 0, 0
        for s in samples:
            k = len(s.images)
            sample_grids = grids[g : g + k]
            g += k
            expected = sum(num_image_tokens(h, w) for h, w in s.image_sizes)
            if sum(t * hh * ww // MERGE_SIZE**2 for t, hh, ww in sample_grids) != expected:
                raise RuntimeError(f"{s.where}: processor image tokens differ from the prepared data")
            L = len(s.input_ids)
            ids.extend(s.input_ids)
            text_pos.append(torch.arange(L))
            rope.append(mrope_positions(s.input_ids, sample_grids, self.image_pad_id))
            tgt = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
            sample_ids_t = torch.tensor(s.input_ids)
            for a, b in s.loss_spans:
                # position p predicts token p+1: the span's tokens are targets of the positions before them
                tgt[a - 1 : b - 1] = sample_ids_t[a:b]
                n_loss += b - a
            targets.append(tgt)
        input_ids = torch.tensor(ids, dtype=torch.long)[None]
        position_ids = torch.cat([torch.cat(text_pos)[None], torch.cat(rope, dim=1)], dim=0)[:, None, :]
        return MicroBatch(input_ids, position_ids, torch.cat(targets), pixel_values, grid, n_loss, len(ids),
                          list(sample_ids or []))
