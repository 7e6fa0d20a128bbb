import hashlib
import json
import os
import subprocess
import sys

import pytest

from ovr_hpc.data.records import read_records
from tests.conftest import write_jsonl, write_png

GOOD = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}]}


@pytest.fixture
def messy_file(tmp_path):
    write_png(tmp_path / "ok.png")
    with open(tmp_path / "truncated.png", "wb") as f:  # a PNG cut in the middle
        f.write(open(tmp_path / "ok.png", "rb").read()[:60])
    (tmp_path / "text.png").write_text("not an image")
    lines = [
        json.dumps(GOOD),
        '{"messages": [ broken',
        json.dumps({"id": 3}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
        json.dumps({**GOOD, "images": ["truncated.png"]}),
        json.dumps({**GOOD, "images": ["text.png"]}),
        json.dumps({**GOOD, "images": ["missing.png"]}),
        json.dumps({"messages": [{"role": "user", "content": "<image><image>two?"},
                                 {"role": "assistant", "content": "x"}], "images": ["ok.png"]}),
        json.dumps({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({**GOOD, "images": ["ok.png"]}),
        "[1, 2, 3]",
        "",
    ]
    path = tmp_path / "messy.jsonl"
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b'{"messages": "\xff\xfe bad bytes"}\n')
    return str(path)


def test_bad_records_reported_with_file_line_and_kind(messy_file):
    records, report = read_records([messy_file])
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["1", "10"]
    assert records[1].image_sizes == [(56, 56)]
    assert report.num_total == 12 and report.num_bad == 10
    assert report.kinds == {"malformed_json": 2, "missing_field": 1, "empty_answer": 1, "bad_image": 3,
                            "image_count_mismatch": 1, "bad_message": 1, "non_utf8": 1}
    text = report.format()
    assert f"{messy_file}:2: malformed_json" in text
    assert f"{messy_file}:5: bad_image" in text and "truncated.png" in text
    assert f"{messy_file}:13: non_utf8" in text
    with pytest.raises(ValueError, match="10 of 12 records are bad"):
        report.check_threshold(0.5)
    report.check_threshold(0.9)


def test_parquet_and_sharded_reading(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {"messages": []}, GOOD, GOOD]
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(r["messages"])} for r in rows]), tmp_path / "x.parquet")
    # messages stored as JSON strings are not lists: each is reported, none dropped silently
    records, report = read_records([str(tmp_path / "x.parquet")])
    assert report.num_total == 4 and report.num_bad == 4 and "x.parquet:row 2" in report.format()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "y.parquet")
    records, report = read_records([str(tmp_path / "y.parquet")])
    assert len(records) == 3 and report.kinds == {"bad_message": 1}
    part0, r0 = read_records([str(tmp_path / "y.parquet")], select=lambda i: i % 2 == 0)
    part1, r1 = read_records([str(tmp_path / "y.parquet")], select=lambda i: i % 2 == 1)
    assert len(part0) + len(part1) == 3 and r0.num_total + r1.num_total == 4


def test_data_check_cli(messy_file):
    proc = subprocess.run([sys.executable, "-m", "ovr_hpc.cli", "data", "check", messy_file],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "12 records, 10 bad" in proc.stdout and "2 usable records" in proc.stdout
    assert "bad_image: 3" in proc.stdout


def test_rl_records(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [
        {"problem": "2+2?", "answer": 4}, {"problem": "x", "answer": ""}, {"answer": "1"}, {"problem": "ok", "answer": "B"},
        {"question": "3+3?", "answer": "6"}])
    records, report = read_records([path], kind="rl")
    assert [r.data["answer"] for r in records] == ["4", "B", "6"] and records[2].data["problem"] == "3+3?"
    assert report.kinds == {"empty_answer": 1, "missing_field": 1}


def test_byte_order_mark_and_non_finite_answers(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + (json.dumps({"problem": "p", "answer": "1"}) + "\n"
                                          + '{"problem": "p", "answer": NaN}\n'
                                          + '{"problem": "p", "answer": 2.5}\n').encode())
    records, report = read_records([str(path)], kind="rl", check_images=False)
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["1", "3"]
    assert records[1].data["answer"] == "2.5"
    assert report.kinds == {"empty_answer": 1}
    assert report.examples == [f"{path}:2: empty_answer: 'answer' nan is not a finite number"]


def _png_bytes(size=(56, 84), color=(10, 200, 30)) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_parquet_with_embedded_images_like_hugging_face_datasets(tmp_path):
    """`datasets` Image columns store {"bytes", "path"} structs; the bytes become files named by their hash."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_png(tmp_path / "ok.png")
    png, other = _png_bytes(), _png_bytes(color=(0, 0, 255))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"problem": "<image>a?", "answer": "1", "images": [{"bytes": png, "path": "a.png"}], "image": None},
        {"problem": "b?", "answer": "2", "images": None, "image": [{"bytes": other, "path": None}]},   # 'image'
        {"problem": "c?", "answer": "3", "images": [{"bytes": None, "path": "ok.png"}], "image": None},  # by path
        {"problem": "d?", "answer": "4", "images": [{"bytes": b"\x89PNG broken", "path": "d.png"}], "image": None},
        {"problem": "e?", "answer": "5", "images": [{"bytes": None, "path": None}], "image": None},
        {"problem": "f?", "answer": "6", "images": [{"bytes": png, "path": None}], "image": None},       # same bytes
        {"problem": "g?", "answer": "7", "images": [{"bytes": png, "path": None}],
         "image": [{"bytes": png, "path": None}]},
    ]
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()), ("images", pa.list_(image)),
                        ("image", pa.list_(image))])
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    image_dir = tmp_path / "cache" / "images"
    records, report = read_records([str(path)], kind="rl", image_dir=str(image_dir))
    assert [r.data["answer"] for r in records] == ["1", "2", "3", "6"]
    assert records[0].images == records[3].images and records[0].image_sizes == [(84, 56)]
    assert open(records[0].images[0], "rb").read() == png and records[0].images[0].startswith(str(image_dir))
    assert open(records[1].images[0], "rb").read() == other
    assert records[2].images == [str(tmp_path / "ok.png")]
    # one file per distinct image, named by its hash (the broken one's too: it was reported after writing)
    assert sorted(p.name for p in image_dir.rglob("*") if p.is_file()) == sorted(
        hashlib.sha256(b).hexdigest() for b in (png, other, b"\x89PNG broken"))
    assert report.kinds == {"bad_image": 3}
    text = report.format()
    assert f"{path}:row 4: bad_image" in text and f"{path}:row 5: bad_image" in text
    assert f"{path}:row 7: bad_image: both 'images' and 'image' are given" in text
    # without a folder (evaluation): data URIs that load the same
    records, _ = read_records([str(path)], kind="rl")
    assert records[0].images[0].startswith("data:image") and records[0].image_sizes == [(84, 56)]


def test_a_corrupt_parquet_row_group_costs_only_its_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2, compression="snappy")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)   # the answers of rows 3-4
    data = bytearray(path.read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset   # the chunk starts at its dictionary
    data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))
    records, report = read_records([str(path)], kind="rl", check_images=False)
    assert [r.data["answer"] for r in records] == ["0", "1", "4", "5"]
    assert report.num_total == 6 and report.kinds == {"unreadable_file": 2}
    assert f"{path}:row 3: unreadable_file: row group 1 cannot be decoded" in report.format()
    path.write_bytes(bytes(data[: len(data) // 2]))   # no footer: the whole file is one bad entry
    records, report = read_records([str(path)], kind="rl", check_images=False)
    assert records == [] and report.kinds == {"unreadable_file": 1}


def test_sharegpt_conversations_are_messages(tmp_path):
    write_png(tmp_path / "ok.png")
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>1+1?"},
                           {"from": "gpt", "value": "\\boxed{2}"}], "images": ["ok.png"]},
        {"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        {"conversations": []},
        {"id": 5},
    ])
    records, report = read_records([path])
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["1"]
    assert records[0].data["messages"] == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "<image>1+1?"},
                                           {"role": "assistant", "content": "\\boxed{2}"}]
    assert records[0].image_sizes == [(56, 56)]
    assert report.kinds == {"bad_message": 3, "missing_field": 1}
    text = report.format()
    assert f"{path}:2: bad_message: conversations[0].from 'robot' is not one of" in text
    assert f"{path}:3: bad_message: conversations[0] needs 'from' and 'value'" in text
    assert f"{path}:5: missing_field: no 'messages' (or ShareGPT 'conversations') field" in text


def test_rl_multiple_choice_records(tmp_path):
    """ScienceQA-style records: choices and the answer as an index, a letter or the option's text."""
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Which is a mammal?", "choices": ["shark", "whale", "trout"], "answer": 1},
        {"problem": "Pick the gas.", "options": ["ice", "steam"], "answer": "steam", "answer_type": "choice"},
        {"problem": "Largest?", "choices": ["1", "3", "2"], "answer": "(B)"},
        {"problem": "Out of range", "choices": ["a", "b"], "answer": 2},
        {"problem": "Not an option", "choices": ["a", "b"], "answer": "c"},
        {"problem": "One option", "choices": ["a"], "answer": 0},
    ])
    records, report = read_records([path], kind="rl", check_images=False)
    assert [(r.data["answer"], r.data["answer_type"]) for r in records] == [
        ("B", "multiple_choice"), ("B", "choice"), ("B", "multiple_choice")]
    assert records[0].data["problem"] == "Which is a mammal?\nA. shark\nB. whale\nC. trout"
    assert report.kinds == {"bad_answer": 2, "bad_choices": 1}
    assert f"{path}:4: bad_answer: answer index 2 outside 2 options" in report.format()
