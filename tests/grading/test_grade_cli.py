"""`ovr-hpc grade`: verdict counts over a JSONL of (response, reference) pairs, and the reference audit."""

import json

from ovr_hpc.cli import main
from ovr_hpc.grading.audit import grade_file

LINES = [
    {"response": "so \\boxed{5}", "answer": "5"},
    {"response": "so \\boxed{6}", "answer": "5"},
    {"response": "no box at all", "answer": "5"},
    "not json {",
    {"response": "\\boxed{3}", "answer": "\\boxed{3} apples and \\boxed{7} pears"},  # a partial answer
    {"answer": "5"},  # no response
    {"response": "\\boxed{(C)}", "answer": "C", "answer_type": "multiple_choice"},
    {"response": "\\boxed{14916}", "answer": "14,\\!916"},
    {"response": "\\boxed{1}", "answer": ""},
]


def write(tmp_path, lines, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def test_grade_counts_and_verdicts(tmp_path, capsys):
    path = write(tmp_path, LINES)
    out = tmp_path / "verdicts.jsonl"
    rc = main(["grade", path, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 1  # malformed lines
    assert "9 lines" in text
    for line in ("correct: 3", "wrong: 2", "no_boxed: 1", "timeout: 0", "malformed: 2", "bad_reference: 1"):
        assert line in text, (line, text)
    assert f"{path}:4: malformed" in text and f"{path}:6: malformed: no 'response'" in text
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{path}:{i}" for i in range(1, 10)]
    assert [r["verdict"] for r in rows] == ["correct", "wrong", "no_boxed", "malformed", "wrong", "malformed",
                                           "correct", "correct", "bad_reference"]
    assert rows[0]["score"] == 1.0 and rows[0]["answer"] == "5"


def test_grade_other_keys(tmp_path, capsys):
    path = write(tmp_path, [{"output": "\\boxed{B}", "gold": "B", "kind": "choice"},
                            {"output": "\\boxed{B or C}", "gold": "B", "kind": "choice"}])
    rc = main(["grade", path, "--response-key", "output", "--reference-key", "gold", "--answer-type-key", "kind"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "correct: 1" in text and "wrong: 1" in text and "malformed: 0" in text


def test_references_only(tmp_path, capsys):
    path = write(tmp_path, [
        {"answer": "5"},
        {"answer": "\\boxed{3} apples and \\boxed{7} pears"},
        {"answer": "   "},
        {"answer": "\\frac{"},
        {"answer": "\\boxed{5"},
        {"answer": "Paris"},
        {"answer": "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}"},
        {"answer": 12},
        {"question": "no answer"},
    ])
    rc = main(["grade", path, "--references-only"])
    text = capsys.readouterr().out
    assert rc == 1
    for line in ("ok: 4", "multi_box: 1", "empty: 1", "unparsed: 1", "unbalanced: 1", "malformed: 1"):
        assert line in text, (line, text)
    assert f"{path}:2: multi_box" in text and f"{path}:9: malformed" in text
    report = grade_file(path, references_only=True, out=str(tmp_path / "refs.jsonl"))
    rows = [json.loads(ln) for ln in (tmp_path / "refs.jsonl").read_text().splitlines()]
    assert rows[1] == {"where": f"{path}:2", "verdict": "multi_box", "parts": 2}
    assert report.num_lines == 9


def test_references_only_clean_file_exits_0(tmp_path, capsys):
    path = write(tmp_path, [{"answer": "5"}, {"answer": "\\frac{1}{2}"}, {"answer": "C"}])
    assert main(["grade", path, "--references-only"]) == 0
    assert "ok: 3" in capsys.readouterr().out


def test_a_missing_file_is_named_without_a_traceback(tmp_path, capsys):
    from ovr_hpc.cli import main

    assert main(["grade", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "Traceback" not in err
