"""data.source_weights: the weighted stream is deterministic, resumes exactly anywhere, realises the weights in
expectation, removes a source at weight 0, and is rows_at's stream without weights."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from ovr_hpc.config import ConfigError, load_config
from ovr_hpc.data.dataset import rows_at
from ovr_hpc.data.weights import source_counts, weighted_rows_at

SOURCES = ["a"] * 7 + ["b"] * 3 + ["c"] * 5 + ["d"] * 1
WEIGHTS = {"a": 0.5, "b": 2.25, "c": 0, "d": 1.7}


def test_no_weights_or_all_ones_is_the_unweighted_stream():
    for shuffle in (True, False):
        expected = rows_at(0, 100, len(SOURCES), 4, shuffle)
        assert weighted_rows_at(0, 100, SOURCES, {}, 4, shuffle) == expected
        assert weighted_rows_at(0, 100, SOURCES, {"a": 1, "b": 1.0}, 4, shuffle) == expected


def test_deterministic_and_resumes_exactly_at_any_position():
    full = weighted_rows_at(0, 2000, SOURCES, WEIGHTS, 7, True)
    assert full == weighted_rows_at(0, 2000, SOURCES, WEIGHTS, 7, True)
    assert full != weighted_rows_at(0, 2000, SOURCES, WEIGHTS, 8, True)  # the seed matters
    for position in list(range(0, 60)) + [97, 500, 1234, 1900]:
        for count in (1, 5, 16, 64):
            assert weighted_rows_at(position, count, SOURCES, WEIGHTS, 7, True) == full[position : position + count]
    # step by step, as a trainer consumes it (any global batch size)
    steps = [weighted_rows_at(s * 12, 12, SOURCES, WEIGHTS, 7, True) for s in range(100)]
    assert [i for step in steps for i in step] == full[:1200]


@pytest.mark.parametrize("shuffle", [True, False])
def test_weights_realised_in_expectation(shuffle):
    n = 60_000
    ids = weighted_rows_at(0, n, SOURCES, WEIGHTS, 3, shuffle)
    per_item = Counter(ids)
    counts = Counter(SOURCES[i] for i in ids)
    sizes = Counter(SOURCES)
    mass = {s: WEIGHTS.get(s, 1.0) * sizes[s] for s in sizes}
    total = sum(mass.values())
    for s in sizes:
        assert abs(counts[s] / n - mass[s] / total) < 0.005, (s, counts[s] / n, mass[s] / total)
    # every item of a source is drawn about equally often (the fractional extras rotate over the items)
    epochs = n / total
    for i, s in enumerate(SOURCES):
        if WEIGHTS.get(s, 1.0):
            assert abs(per_item[i] / epochs - WEIGHTS.get(s, 1.0)) < 0.1, (i, s, per_item[i] / epochs)


def test_weight_zero_removes_a_source():
    ids = weighted_rows_at(0, 5000, SOURCES, {"c": 0}, 0, True)
    assert not [i for i in ids if SOURCES[i] == "c"]
    assert {SOURCES[i] for i in ids} == {"a", "b", "d"}


def test_whole_weights_are_exact_per_epoch():
    ids = weighted_rows_at(0, 7 * 3 + 3 + 5 + 1, SOURCES, {"a": 3}, 1, True)  # one epoch
    assert Counter(ids) == Counter({**{i: 3 for i in range(7)}, **{i: 1 for i in range(7, 16)}})


def test_unknown_source_and_nothing_left_are_errors():
    with pytest.raises(ConfigError, match="'z'.*the records' sources are 'a', 'b', 'c', 'd'"):
        weighted_rows_at(0, 4, SOURCES, {"z": 2.0}, 0, True)
    with pytest.raises(ConfigError, match="weight 0"):
        weighted_rows_at(0, 4, ["a", "b"], {"a": 0, "b": 0}, 0, True)


def test_source_counts():
    assert source_counts([0, 1, 8, 15], SOURCES, "prompts") == {"prompts/a": 2, "prompts/b": 1, "prompts/d": 1}


@pytest.mark.parametrize("stage", ["coldstart", "rl"])
def test_config_validates_source_weights(tmp_path, stage):
    base = [f"data.train_files=[{tmp_path}/x.jsonl]", "model.path=m", f"checkpoint.output_dir={tmp_path}/run"]
    cfg = load_config(stage, None, base + ["data.source_weights={a: 2, b: 0.5, c: 0}"])
    assert cfg.data.source_weights == {"a": 2, "b": 0.5, "c": 0}
    with pytest.raises(ConfigError, match=r"data.source_weights.b = -1: a weight must be >= 0"):
        load_config(stage, None, base + ["data.source_weights={a: 2, b: -1}"])
    with pytest.raises(ConfigError, match=r"data.source_weights.a = 'x': expected a number"):
        load_config(stage, None, base + ["data.source_weights={a: x}"])
    with pytest.raises(ConfigError, match=r"data.source_weights = \[1\]: expected a mapping"):
        load_config(stage, None, base + ["data.source_weights=[1]"])


def test_rl_step_prompts_follow_the_weighted_stream():
    from ovr_hpc.rl.trainer import step_prompt_ids, step_prompts

    prompts = [SimpleNamespace(source=s, index=i) for i, s in enumerate(SOURCES)]
    cfg = SimpleNamespace(rollout=SimpleNamespace(prompts_per_step=8), seed=5,
                          data=SimpleNamespace(source_weights=WEIGHTS, shuffle=True))
    expected = weighted_rows_at(3 * 8, 8, SOURCES, WEIGHTS, 5, True)
    assert step_prompt_ids(prompts, 3, cfg) == expected
    shares = [step_prompts(prompts, 3, cfg, SimpleNamespace(dp_size=2, dp_rank=r)) for r in (0, 1)]
    assert [p.index for share in shares for p in share] == expected


def test_coldstart_rows_packed_per_source_with_weights(tmp_path, processor, tiny_model_dir):
    from tests.conftest import write_jsonl

    from ovr_hpc.data.dataset import build_rows, prepare_sft_dataset, row_sources, samples_per_source

    records = [{"source": "aa" if i % 3 else "bb", "messages": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"<think>{i}+1</think> \\boxed{{{i + 1}}}"}]} for i in range(12)]
    path = write_jsonl(tmp_path / "src.jsonl", records)
    cfg = load_config("coldstart", None, [f"data.train_files=[{path}]", "model.path=m",
                                          f"checkpoint.output_dir={tmp_path}/run", "data.max_seq_len=256",
                                          "data.source_weights={bb: 3}"]).data
    dataset = prepare_sft_dataset(cfg, processor, tiny_model_dir, str(tmp_path / "cache"))
    assert dataset.sources == ["bb" if i % 3 == 0 else "aa" for i in range(12)]
    assert dataset.record_index == list(range(12))
    rows = build_rows(dataset, cfg)
    assert sorted(i for r in rows for i in r) == list(range(12))
    assert all(len({dataset.sources[i] for i in r}) == 1 for r in rows)  # one source per row
    sources = row_sources(dataset, rows)
    step_rows = weighted_rows_at(0, 4, sources, cfg.source_weights, 0, True)
    counts = samples_per_source(dataset, rows, step_rows)
    assert sum(counts.values()) == sum(len(rows[r]) for r in step_rows)
    assert set(counts) <= {"samples/aa", "samples/bb"}
    cfg.source_weights = {"zz": 1.0}
    with pytest.raises(ConfigError, match="'zz'"):
        build_rows(dataset, cfg)
