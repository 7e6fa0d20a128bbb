"""Benchmark adapters on fixture files in each published layout; scoring rules; aggregations by hand."""

import math
import os

import pytest

from ovr_hpc.eval.benchmarks import (BENCHMARKS, MC, EvalSample, dynamath_worst_case, mme_scores, pass_at_k,
                                     sampling_metrics, wemath_four_dimensional)
from ovr_hpc.eval.config import BenchmarkSpec
from ovr_hpc.grading import score
from tests.eval import layouts as L


def load(name, root, **spec):
    samples, report, info = BENCHMARKS[name].load(BenchmarkSpec(name=name, **spec), str(root))
    return {s.id: s for s in samples}, report, info


def image_ok(ref):
    return ref.startswith("data:image;base64,") or os.path.isfile(ref)


def correct(sample: EvalSample, response: str) -> bool:
    return any(score(r, ref, answer_type=t, finished=f).correct for r, ref, t, f in sample.score_items(response, True))


def boxed(x):
    return f"<think>reasoning</think> The answer is \\boxed{{{x}}}."


# ----------------------------------------------------------------------------- adapters


def test_mathvista_parquet_and_json(tmp_path):
    L.mathvista_parquet(tmp_path)
    s, report, _ = load("mathvista", tmp_path)
    assert sorted(s) == ["1", "2", "3"]
    assert report.num_bad == 1 and report.kinds["bad_answer"] == 1
    assert "testmini-00000-of-00001.parquet:row 4" in report.examples[0]
    mc = s["1"]
    assert mc.answer == "B" and mc.answer_type == MC and mc.choices == ["circle", "square", "triangle"]
    assert "B. square" in mc.prompt_text("I", "CHOOSE") and mc.prompt_text("I", "CHOOSE").endswith("CHOOSE")
    assert correct(mc, boxed("B")) and correct(mc, boxed("square")) and not correct(mc, boxed("circle"))
    assert s["2"].answer_type == "number" and "1 decimal place" in s["2"].question
    assert correct(s["2"], boxed("2.50")) and not correct(s["2"], boxed("2.4"))
    assert all(image_ok(i) for x in s.values() for i in x.images)

    L.mathvista_json(tmp_path)
    s, report, _ = load("mathvista", tmp_path, path="mv_json/testmini.json")
    assert list(s) == ["1"] and os.path.isfile(s["1"].images[0])
    assert report.kinds["missing_image"] == 1 and "testmini.json:2" in report.examples[0]


def test_mathvision_jsonl(tmp_path):
    L.mathvision_jsonl(tmp_path)
    s, report, _ = load("mathvision", tmp_path, path="MathVision/test.jsonl")
    assert s["1"].answer == "E" and s["1"].answer_type == MC and len(s["1"].choices) == 5
    assert s["2"].answer == "40" and s["2"].answer_type == "math" and not s["2"].choices
    assert report.kinds["malformed_json"] == 1 and "test.jsonl:3" in report.examples[0]
    assert correct(s["2"], boxed("40^\\circ")) or correct(s["2"], boxed("40"))


def test_mathverse_vision_only_filter(tmp_path):
    L.mathverse_json(tmp_path)
    s, report, info = load("mathverse", tmp_path)
    assert sorted(s) == ["1", "3"] and info["skipped_rows"] == 1 and report.num_bad == 0
    assert s["1"].answer_type == MC and s["3"].answer_type == "math"
    assert "image" in s["1"].question.lower() and os.path.isfile(s["1"].images[0])
    s, _, info = load("mathverse", tmp_path, options={"versions": ["Text Dominant"]})
    assert list(s) == ["2"] and "Choices" in s["2"].question


def test_dynamath_variants_grouped(tmp_path):
    L.dynamath_parquet(tmp_path)
    s, report, _ = load("dynamath", tmp_path)
    assert sorted(s) == ["1@v1", "1@v2", "1@v3", "2@v1", "2@v2", "2@v3"]
    assert {x.group for x in s.values()} == {"1", "2"} and report.num_bad == 0
    assert s["2@v1"].answer_type == MC and s["1@v2"].answer_type == "number"
    assert all(x.images[0].startswith("data:image") for x in s.values())


def test_wemath_groups_and_keys(tmp_path):
    L.wemath_json(tmp_path)
    s, report, _ = load("wemath", tmp_path)
    assert len(s) == 8 and report.num_bad == 0
    assert s["10_2steps_multi"].group == "10" and s["10_2steps_multi"].meta["key"] == "2steps_multi"
    assert "B. 45" in s["10_2steps_1"].prompt_text("I", "C") and os.path.isfile(s["20_3steps_1"].images[0])


def test_logicvista_letter_sets(tmp_path):
    L.logicvista_json(tmp_path)
    s, _, _ = load("logicvista", tmp_path)
    assert s["v1_1"].answer == "A, C" and s["v1_1"].answer_type == MC
    assert correct(s["v1_1"], boxed("C, A")) and not correct(s["v1_1"], boxed("A"))
    assert os.path.isfile(s["v1_0"].images[0])


def test_mmmu_pro_standard_and_vision(tmp_path):
    L.mmmu_pro_parquet(tmp_path)
    s, _, _ = load("mmmu_pro", tmp_path)
    (x,) = s.values()
    assert x.answer == "C" and x.choices[2] == "Cubism" and len(x.images) == 1 and x.meta["setting"] == "standard"
    assert correct(x, boxed("Cubism")) and correct(x, boxed("(C)"))
    s, _, _ = load("mmmu_pro", tmp_path, path="MMMU_Pro/vision", label="mmmu_pro_vision")
    (x,) = s.values()
    assert x.meta["setting"] == "vision" and not x.show_choices and "A. Baroque" not in x.prompt_text("I", "C")


def test_charxiv_reasoning_and_descriptive(tmp_path):
    _, _, templates = L.charxiv(tmp_path)
    s, _, _ = load("charxiv_reasoning", tmp_path)
    assert s["0"].answer == "Joint-CNN" and s["0"].images[0].endswith(os.path.join("CharXiv", "images", "0.jpg"))
    assert correct(s["0"], boxed("\\text{Joint-CNN}"))
    s, report, _ = load("charxiv_descriptive", tmp_path, options={"templates": templates})
    assert sorted(s) == ["0_0", "0_1"] and report.kinds["no_question_text"] == 1  # qid 99 has no template
    assert "row 1 and column 2" in s["0_0"].question
    _, report, _ = load("charxiv_descriptive", tmp_path)  # no templates: every row reported, none guessed
    assert report.num_bad == 2 and "options.templates" in report.examples[0]


def test_text_benchmarks(tmp_path):
    L.math500_jsonl(tmp_path)
    L.aime(tmp_path)
    L.gpqa_csv(tmp_path)
    s, report, _ = load("math500", tmp_path)
    assert sorted(s) == ["test/algebra/1.json", "test/algebra/2.json"] and report.kinds["missing_field"] == 1
    assert correct(s["test/algebra/2.json"], boxed("0.5")) and correct(s["test/algebra/2.json"], boxed("\\dfrac{1}{2}"))
    s, _, _ = load("aime24", tmp_path)
    assert s["60"].answer == "204"
    s, _, _ = load("aime25", tmp_path)  # rows without ids: numbered per file
    assert sorted(s) == ["aime2025-I:1", "aime2025-I:2", "aime2025-II:1"]
    s, report, _ = load("gpqa_diamond", tmp_path)
    (q,) = s.values()
    assert q.choices[ord(q.answer) - 65] == "electron" and report.kinds["missing_field"] == 1
    s2, _, _ = load("gpqa_diamond", tmp_path)  # the shuffle is fixed by the record id
    assert next(iter(s2.values())).choices == q.choices
    assert correct(q, boxed(q.answer)) and correct(q, boxed("electron")) and not correct(q, boxed("proton"))


def test_mmlu_and_mmlu_pro(tmp_path):
    L.mmlu_parquet(tmp_path)
    L.mmlu_pro_parquet(tmp_path)
    s, report, _ = load("mmlu", tmp_path)
    heart = s["test-00000-of-00001:1"]
    assert heart.answer == "B" and heart.answer_type == MC and heart.meta == {"category": "anatomy"}
    assert "B. heart" in heart.prompt_text("I", "CHOOSE")
    assert correct(heart, boxed("B")) and correct(heart, boxed("heart")) and not correct(heart, boxed("lung"))
    assert s["test-00000-of-00001:3"].answer == "A"
    assert report.kinds == {"bad_answer": 1} and "row 2: bad_answer: answer index 7 outside 4 options" in \
        report.examples[0]
    s, report, _ = load("mmlu_pro", tmp_path)
    assert sorted(s) == ["70", "71"] and s["70"].answer == "C" and len(s["70"].choices) == 6
    assert correct(s["71"], boxed("newton")) and correct(s["71"], boxed("(B)")) and not correct(s["71"], boxed("A"))
    assert report.kinds == {"missing_field": 1}


def test_limit_and_missing_files(tmp_path):
    L.math500_jsonl(tmp_path)
    s, _, _ = load("math500", tmp_path, limit=1)
    assert len(s) == 1
    with pytest.raises(FileNotFoundError, match="no data files"):
        load("aime24", tmp_path)


# ----------------------------------------------------------------------------- aggregation


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(16, 3, 4) == pytest.approx(1 - math.comb(13, 4) / math.comb(16, 4))


def test_avg_and_pass_at_k_over_questions():
    scores = {"a": [1, 0, 0, 0], "b": [1, 1, 1, 1], "c": [0, 0, 0, 0]}
    m = sampling_metrics(scores, 4, [1, 2])
    assert m["accuracy"] == pytest.approx((0.25 + 1 + 0) / 3) and m["avg@4"] == m["accuracy"]
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    assert m["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)  # a: 1 - C(3,2)/C(4,2) = 0.5
    assert m["pass@4"] == pytest.approx(2 / 3)
    greedy = sampling_metrics({"a": [1.0], "b": [0.0]}, 1)
    assert greedy == {"accuracy": 0.5, "num_questions": 2}


def test_dynamath_worst_case_by_hand():
    samples = [EvalSample(f"{q}@v{v}", "", "1", "math", group=q) for q in ("A", "B", "C") for v in (1, 2, 3)]
    right = {"A": [1, 1, 1], "B": [1, 0, 1], "C": [0, 0, 0]}
    scores = {f"{q}@v{v + 1}": [float(r[v])] for q, r in right.items() for v in range(3)}
    m = dynamath_worst_case(samples, scores)
    assert m["worst_case"] == pytest.approx(1 / 3)  # only A is right in every variant
    assert m["average_case"] == pytest.approx(5 / 9)
    assert m["num_seed_questions"] == 3 and m["variants_per_question"] == [3, 3]
    # two samples per variant: worst case per sample index, then averaged
    scores2 = {k: [v[0], 1.0] for k, v in scores.items()}
    assert dynamath_worst_case(samples, scores2)["worst_case"] == pytest.approx((1 / 3 + 1) / 2)


def _wemath(problems):
    """problems: {id: (steps, [sub right...], multi right)} -> samples, scores."""
    samples, scores = [], {}
    for pid, (steps, subs, multi) in problems.items():
        for part, right in [*enumerate(subs, start=1), ("multi", multi)]:
            key = f"{steps}steps_{part}"
            samples.append(EvalSample(f"{pid}_{key}", "", "A", MC, group=pid, meta={"key": key}))
            scores[samples[-1].id] = [float(right)]
    return samples, scores


def test_wemath_strict_and_loose_by_hand():
    samples, scores = _wemath({
        "p1": (2, [1, 1], 1),  # CM (strict and loose)
        "p2": (2, [1, 0], 1),  # RM strict, CM loose (one sub right)
        "p3": (3, [0, 0, 0], 1),  # RM strict and loose
        "p4": (2, [1, 1], 0),  # IG
        "p5": (3, [1, 0, 1], 0),  # IK
    })
    samples.append(EvalSample("p6_2steps_1", "", "A", MC, group="p6", meta={"key": "2steps_1"}))  # incomplete
    scores["p6_2steps_1"] = [1.0]
    m = wemath_four_dimensional(samples, scores)
    assert m["num_problems"] == 5 and m["incomplete_problems"] == 1
    assert m["IK_rate"] == pytest.approx(0.2) and m["IG_rate"] == pytest.approx(0.2)
    assert m["CM_strict_rate"] == pytest.approx(0.2) and m["RM_strict_rate"] == pytest.approx(0.4)
    assert m["CM_loose_rate"] == pytest.approx(0.4) and m["RM_loose_rate"] == pytest.approx(0.2)
    # (N - 0.5 IG - RM - IK) / N
    assert m["score_strict"] == pytest.approx((5 - 0.5 - 2 - 1) / 5)
    assert m["score_loose"] == pytest.approx((5 - 0.5 - 1 - 1) / 5)


def test_wemath_adapter_aggregate(tmp_path):
    L.wemath_json(tmp_path)
    samples, _, _ = BENCHMARKS["wemath"].load(BenchmarkSpec(name="wemath"), str(tmp_path))
    scores = {s.id: [1.0] for s in samples}
    scores["20_3steps_2"] = [0.0]  # problem 20: a sub wrong, composite right -> RM strict, CM loose
    m = BENCHMARKS["wemath"].aggregate(samples, scores, 1)
    assert m["num_problems"] == 2 and m["score_strict"] == pytest.approx(0.5) and m["score_loose"] == 1.0
    assert m["accuracy"] == pytest.approx(7 / 8)


def test_mmbench_circular_evaluation(tmp_path):
    tsv = L.mmbench(tmp_path)
    s, report, _ = load("mmbench_en", tmp_path)
    assert sorted(s) == ["1", "1000001", "2", "2000001"] and report.kinds == {"bad_answer": 1}
    assert [s[i].answer for i in ("1", "1000001", "2000001")] == ["B", "C", "D"]
    assert {s[i].group for i in ("1", "1000001", "2000001")} == {"1"} and s["2"].choices == ["red", "blue"]
    assert s["2"].question.startswith("Hint: Look closely.\n") and all(image_ok(i) for x in s.values() for i in x.images)
    assert correct(s["1000001"], boxed("C")) and correct(s["1000001"], boxed("dog")) and not correct(s["1"], boxed("A"))
    scores = {"1": [1.0], "1000001": [1.0], "2000001": [0.0], "2": [1.0]}
    m = BENCHMARKS["mmbench_en"].aggregate(list(s.values()), scores, 1)
    assert m["circular"] == 0.5 and m["accuracy"] == 0.75 and m["num_circular_questions"] == 2
    s, report, _ = load("mmbench_en", tmp_path, path=tsv)   # the TSV: base64 images, "nan" cells
    assert list(s) == ["2"] and s["2"].choices == ["red", "blue"] and s["2"].question == "What color is it?"
    assert s["2"].images[0].startswith("data:image;base64,") and report.num_bad == 0


def test_mme_scores(tmp_path):
    L.mme_parquet(tmp_path)
    s, report, _ = load("mme", tmp_path)
    assert len(s) == 6 and report.kinds == {"bad_answer": 1}
    first = s["test-00000-of-00001:1"]
    assert first.answer == "Yes" and first.group == "existence/000.jpg" and first.meta == {"category": "existence"}
    assert correct(first, boxed("yes")) and correct(first, boxed("\\text{Yes}")) and not correct(first, boxed("No"))
    right = {"test-00000-of-00001:1": 1.0, "test-00000-of-00001:2": 1.0, "test-00000-of-00001:3": 1.0,
             "test-00000-of-00001:4": 0.0, "test-00000-of-00001:5": 0.0, "test-00000-of-00001:6": 1.0}
    m = mme_scores(list(s.values()), {k: [v] for k, v in right.items()})
    # existence: acc 3/4 + acc+ 1/2; code reasoning: acc 1/2 + acc+ 0
    assert m["existence_score"] == 1.25 and m["code_reasoning_score"] == 0.5
    assert m["perception"] == 1.25 and m["cognition"] == 0.5
    assert "count" in m["perception_missing_subtasks"] and "text_translation" in m["cognition_missing_subtasks"]
