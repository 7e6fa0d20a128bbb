import random

import pytest
import torch

from ovr_hpc.config import DataConfig
from ovr_hpc.data.dataset import Collator, build_rows, mrope_positions, prepare_sft_dataset, rows_at
from ovr_hpc.data.packing import pack_best_fit, packing_efficiency
from ovr_hpc.data.prompts import to_chat_messages
from ovr_hpc.data.templates import tokenize_chat, truncate
from ovr_hpc.data.vision import load_image


def _dataset(path, processor, model_dir, tmp_path, **kw):
    cfg = DataConfig(train_files=[path], max_seq_len=kw.pop("max_seq_len", 256), min_pixels=3136, max_pixels=50176, **kw)
    return cfg, prepare_sft_dataset(cfg, processor, model_dir, str(tmp_path / "cache"))


def test_loss_spans_cover_assistant_turns(processor):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "More"}, {"role": "assistant", "content": "A2 \\boxed{3}"}]
    s = tokenize_chat(processor, to_chat_messages(messages, 0), [])
    tok = processor.tokenizer
    assert [tok.decode(s.input_ids[a:b]) for a, b in s.loss_spans] == ["A1<|im_end|>", "A2 \\boxed{3}<|im_end|>"]
    assert tok.decode(s.input_ids) == processor.apply_chat_template(to_chat_messages(messages, 0), tokenize=False)
    system = tokenize_chat(processor, to_chat_messages(messages[:2], 0, "Think step by step."), [])
    assert tok.decode(system.input_ids).startswith("<|im_start|>system\nThink step by step.<|im_end|>")


def test_image_tokens_match_the_processor(processor, image_records_file):
    import os

    base = os.path.dirname(image_records_file)
    messages = [{"role": "user", "content": "Compare the two pictures."}, {"role": "assistant", "content": "x"}]
    images = [load_image(os.path.join(base, n), 3136, 50176) for n in ("wide.png", "red.png")]
    chat = to_chat_messages(messages, 2)
    ours = tokenize_chat(processor, chat, [(im.height, im.width) for im in images])
    text = processor.apply_chat_template(chat, tokenize=False)
    theirs = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert ours.input_ids == theirs


def test_best_fit_places_every_sample_once():
    rng = random.Random(0)
    lengths = [min(4096, int(rng.lognormvariate(5, 1)) + 1) for _ in range(2000)]
    rows = pack_best_fit(lengths, 4096)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert all(sum(lengths[i] for i in r) <= 4096 for r in rows)
    assert packing_efficiency(rows, lengths, 4096) > 0.95
    assert rows == pack_best_fit(lengths, 4096)
    with pytest.raises(ValueError, match="max_seq_len"):
        pack_best_fit([5000], 4096)


def test_order_is_resumable_and_covers_each_epoch():
    whole = rows_at(0, 50, 7, seed=3, shuffle=True)
    assert rows_at(0, 23, 7, 3, True) + rows_at(23, 27, 7, 3, True) == whole
    for e in range(7):
        assert sorted(whole[7 * e : 7 * e + 7]) == list(range(7))
    assert rows_at(0, 7, 7, 4, True) != whole[:7]


def test_mrope_positions_match_transformers(tiny_model_dir, processor, image_records_file):
    from ovr_hpc.models.loading import load_vlm

    cfg, ds = _dataset(image_records_file, processor, tiny_model_dir, __import__("pathlib").Path(image_records_file).parent)
    model = load_vlm(tiny_model_dir, "float32", "sdpa")
    collator = Collator(processor, 3136, 50176)
    checked = 0
    for i in range(len(ds)):
        s = ds.sample(i)
        if not s.images:
            continue
        mb = collator([s])
        ids = mb.input_ids
        mm = (ids == model.config.image_token_id).int()
        expected, _ = model.model.get_rope_index(ids, mm, image_grid_thw=mb.image_grid_thw)
        grids = [tuple(g.tolist()) for g in mb.image_grid_thw]
        assert torch.equal(mrope_positions(s.input_ids, grids, model.config.image_token_id), expected[:, 0])
        checked += 1
    assert checked == 8


@pytest.mark.parametrize("always_run_vision", [False, True])
def test_packed_row_equals_samples_one_by_one(tiny_model_dir, processor, image_records_file, tmp_path,
                                             always_run_vision):
    from ovr_hpc.models.loading import TokenLogprobs, load_vlm

    cfg, ds = _dataset(image_records_file, processor, tiny_model_dir, tmp_path, max_seq_len=400)
    rows = build_rows(ds, cfg)
    assert len(rows) < len(ds)
    model = TokenLogprobs(load_vlm(tiny_model_dir, "float32", "sdpa")).eval()
    collator = Collator(processor, 3136, 50176, always_run_vision=always_run_vision)
    with torch.no_grad():
        for row in rows:
            packed, _ = model(**collator([ds.sample(i) for i in row]).model_inputs())
            offset = 0
            for i in row:
                alone, _ = model(**collator([ds.sample(i)]).model_inputs())
                n = len(ds.sample(i).input_ids)
                torch.testing.assert_close(packed[offset : offset + n], alone[:n], atol=2e-5, rtol=0)
                offset += n


def test_overlong_samples_are_counted(processor, tiny_model_dir, arithmetic_file, tmp_path):
    # samples are 82-101 tokens, their prompts 61-80: at 90 some are cut, each keeps part of its answer
    _, dropped = _dataset(arithmetic_file, processor, tiny_model_dir, tmp_path / "a", max_seq_len=90, overlong="drop")
    _, cut = _dataset(arithmetic_file, processor, tiny_model_dir, tmp_path / "b", max_seq_len=90, overlong="truncate")
    assert 0 < dropped.report.num_dropped_overlong < 64 and dropped.report.num_truncated == 0
    assert cut.report.num_truncated == dropped.report.num_dropped_overlong and len(cut) == 64
    assert max(cut.lengths) == 90
    # a limit below every prompt leaves nothing to learn: dropped even when truncating, and counted
    _, none = _dataset(arithmetic_file, processor, tiny_model_dir, tmp_path / "c", max_seq_len=40, overlong="truncate")
    assert len(none) == 0 and none.report.num_dropped_overlong == 64


def test_truncation_never_splits_an_image(processor):
    from ovr_hpc.data.templates import TokenizedSample

    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sample = TokenizedSample([1, 2, pad, pad, pad, 3, 4, 5], [(5, 8)])
    assert truncate(sample, 4, pad) is None
    assert truncate(sample, 7, pad).input_ids == [1, 2, pad, pad, pad, 3, 4]
    assert truncate(sample, 5, pad) is None  # nothing left to learn


def test_embedded_parquet_images_train_like_image_files(processor, tiny_model_dir, image_records_file, tmp_path):
    """The same records as Parquet with the images' bytes inside (as `datasets` writes them) give the same
    tokens and pixels; the bytes live in the data cache as files, one per distinct image."""
    import json
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    base = os.path.dirname(image_records_file)
    rows = []
    for line in open(image_records_file):
        record = json.loads(line)
        images = [{"bytes": open(os.path.join(base, n), "rb").read(), "path": n} for n in record.get("images", [])]
        rows.append({"messages": record["messages"], "images": images})
    parquet = tmp_path / "embedded.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    _, from_files = _dataset(image_records_file, processor, tiny_model_dir, tmp_path / "files")
    _, embedded = _dataset(str(parquet), processor, tiny_model_dir, tmp_path / "embedded")
    assert len(embedded) == len(from_files) == 12 and embedded.report.num_bad == 0
    assert sum(p.is_file() for p in (tmp_path / "embedded" / "cache" / "images").rglob("*")) == 2
    collator = Collator(processor, 3136, 50176)
    for i in range(len(embedded)):
        a, b = collator([from_files.sample(i)]), collator([embedded.sample(i)])
        assert torch.equal(a.input_ids, b.input_ids)
        assert (a.pixel_values is None) == (b.pixel_values is None)
        if a.pixel_values is not None:
            assert torch.equal(a.pixel_values, b.pixel_values)
