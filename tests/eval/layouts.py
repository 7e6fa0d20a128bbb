"""Small fixture files in each benchmark's published layout (field names and file arrangement only)."""

from __future__ import annotations

import csv
import io
import json
import os

from PIL import Image


def png(path=None, color=(200, 30, 30), size=(56, 56)):
    """Write a PNG to path, or return its bytes when path is None."""
    image = Image.new("RGB", size, color)
    if path is None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def mathvista_parquet(root):
    img = {"bytes": png(), "path": "images/1.jpg"}
    rows = [
        {"pid": "1", "question": "Which shape is red?", "image": "images/1.jpg", "decoded_image": img,
         "choices": ["circle", "square", "triangle"], "unit": None, "precision": None, "answer": "square",
         "question_type": "multi_choice", "answer_type": "text"},
        {"pid": "2", "question": "What is the length of the bar?", "image": "images/2.jpg", "decoded_image": img,
         "choices": None, "unit": "cm", "precision": 1.0, "answer": "2.5", "question_type": "free_form",
         "answer_type": "float"},
        {"pid": "3", "question": "How many dots?", "image": "images/3.jpg", "decoded_image": img, "choices": None,
         "unit": None, "precision": None, "answer": "7", "question_type": "free_form", "answer_type": "integer"},
        {"pid": "4", "question": "Which one?", "image": "images/4.jpg", "decoded_image": img, "choices": ["a", "b"],
         "unit": None, "precision": None, "answer": "c", "question_type": "multi_choice", "answer_type": "text"},
    ]
    return write_parquet(os.path.join(root, "MathVista", "data", "testmini-00000-of-00001.parquet"), rows)


def mathvista_json(root):
    png(os.path.join(root, "mv_json", "images", "1.jpg"))
    data = {"1": {"pid": "1", "question": "How many?", "image": "images/1.jpg", "choices": None, "unit": None,
                  "precision": None, "answer": "3", "question_type": "free_form", "answer_type": "integer"},
            "2": {"pid": "2", "question": "Missing image", "image": "images/nope.jpg", "choices": None,
                  "answer": "3", "question_type": "free_form", "answer_type": "integer"}}
    return write_json(os.path.join(root, "mv_json", "testmini.json"), data)


def mathvision_jsonl(root):
    png(os.path.join(root, "MathVision", "images", "1.jpg"))
    png(os.path.join(root, "MathVision", "images", "2.jpg"))
    rows = [
        {"id": "1", "question": "<image1>\nWhich option is largest?", "options": ["1", "2", "3", "4", "5"],
         "image": "images/1.jpg", "answer": "E", "solution": None, "level": 2, "subject": "arithmetic"},
        {"id": "2", "question": "<image1>\nFind the angle in degrees.", "options": [], "image": "images/2.jpg",
         "answer": "40", "solution": None, "level": 3, "subject": "metric geometry - angle"},
        '{"id": "3", "question": broken json',
    ]
    return write_jsonl(os.path.join(root, "MathVision", "test.jsonl"), rows)


def mathverse_json(root):
    for i in (1, 2, 3):
        png(os.path.join(root, "MathVerse", "images", f"image_{i}.png"))
    rows = []
    versions = [("Vision Only", "multi-choice", "B"), ("Text Dominant", "multi-choice", "B"),
                ("Vision Only", "free-form", "12")]
    for i, (version, qtype, answer) in enumerate(versions):
        rows.append({"sample_index": str(i + 1), "problem_index": "1", "problem_version": version,
                     "question": "" if version == "Vision Only" else "As shown, find x. Choices: A:1 B:2",
                     "image": f"image_{i + 1}.png", "answer": answer, "question_type": qtype, "metadata": {},
                     "query_wo": "...", "query_cot": "...", "question_for_eval": "..."})
    return write_json(os.path.join(root, "MathVerse", "testmini.json"), rows)


def dynamath_parquet(root, answers=(("1", "3"), ("2", "B"))):
    paths = []
    for variant in (1, 2, 3):
        rows = []
        for qid, answer in answers:
            rows.append({"id": qid, "question": f"Variant {variant} of question {qid}", "image": f"images/{qid}.png",
                         "decoded_image": {"bytes": png(), "path": None}, "ground_truth": answer,
                         "answer_type": "multiple choice" if answer.isalpha() else "float", "subject": "algebra",
                         "knowledge_level": "high school"})
        name = f"sample{variant}-00000-of-00001.parquet"
        paths.append(write_parquet(os.path.join(root, "DynaMath_Sample", "data", name), rows))
    return paths


def wemath_json(root):
    png(os.path.join(root, "We-Math", "images", "p.png"))
    rows = []
    for key in ("2steps_1", "2steps_2", "2steps_multi"):
        rows.append({"ID": "10", "split": "testmini", "knowledge concept": "angles", "question": f"Q {key}",
                     "option": "A. 30; B. 45; C. 60", "answer": "B", "image_path": "p.png", "key": key})
    for key in ("3steps_1", "3steps_2", "3steps_3", "3steps_multi"):
        rows.append({"ID": "20", "split": "testmini", "knowledge concept": "area", "question": f"Q {key}",
                     "option": "A. 1; B. 2", "answer": "A", "image_path": "p.png", "key": key})
    rows.append({"ID": "30", "split": "testmini", "knowledge concept": "units", "question": "one step",
                 "option": "A. x; B. y", "answer": "A", "image_path": "p.png", "key": "1step"})
    return write_json(os.path.join(root, "We-Math", "testmini.json"), rows)


def logicvista_json(root):
    png(os.path.join(root, "LogicVista", "data", "images", "v1_0.png"))
    png(os.path.join(root, "LogicVista", "data", "images", "v1_1.png"))
    data = {"v1_0": {"imagename": "v1_0.png", "question": "Which choice (A, B, C, or D) completes the pattern?",
                     "answer": "C", "reasoning": "...", "skill": ["inductive"], "capability": ["diagram"]},
            "v1_1": {"imagename": "v1_1.png", "question": "Which choices (A-D) belong to the green group?",
                     "answer": "A, C", "reasoning": "...", "skill": ["inductive"], "capability": ["diagram"]}}
    return write_json(os.path.join(root, "LogicVista", "data", "dataset.json"), data)


def mmmu_pro_parquet(root):
    img = {"bytes": png(), "path": "x.png"}
    standard = [{"id": "validation_Art_1", "question": "<image 1> Which period is this painting from?",
                 "options": "['Baroque', 'Rococo', 'Cubism', 'Impressionism']", "explanation": "",
                 "image_1": img, "image_2": None, "image_3": None, "image_4": None, "image_5": None,
                 "image_6": None, "image_7": None, "img_type": "['Paintings']", "answer": "C",
                 "topic_difficulty": "Easy", "subject": "Art"}]
    vision = [{"id": "validation_Art_1", "image": img, "options": "['Baroque', 'Rococo', 'Cubism', 'Impressionism']",
               "answer": "C", "subject": "Art"}]
    name = "test-00000-of-00001.parquet"
    return (write_parquet(os.path.join(root, "MMMU_Pro", "standard (10 options)", name), standard),
            write_parquet(os.path.join(root, "MMMU_Pro", "vision", name), vision))


def charxiv(root):
    png(os.path.join(root, "CharXiv", "images", "0.jpg"))
    png(os.path.join(root, "CharXiv", "images", "2.jpg"))
    reasoning = write_json(os.path.join(root, "CharXiv", "data", "reasoning_val.json"), {
        "0": {"figure_id": 0, "query": "Which model declines most?", "answer": "Joint-CNN", "inst_category": 1,
              "qa_source": 1},
        "2": {"figure_id": 2, "query": "How many lines cross?", "answer": "3", "inst_category": 4, "qa_source": 3}})
    descriptive = write_json(os.path.join(root, "CharXiv", "data", "descriptive_val.json"), {
        "0": {"figure_id": 0, "num_subplots": 2, "subplot_loc": [1, 2], "qids": [2, 7],
              "answers": ["Epoch", "60"]},
        "2": {"figure_id": 2, "num_subplots": 1, "subplot_loc": [0, 0], "qids": [2, 99], "answers": ["W_H", "1"]}})
    templates = write_json(os.path.join(root, "templates.json"), {"2": "What is the x-axis label of {subplot}?",
                                                                  "7": "What is the highest y tick of {subplot}?"})
    return reasoning, descriptive, templates


def math500_jsonl(root):
    return write_jsonl(os.path.join(root, "MATH-500", "test.jsonl"), [
        {"problem": "What is $1+1$?", "solution": "...", "answer": "2", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/1.json"},
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "...", "answer": "\\frac{1}{2}", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/2.json"},
        {"problem": "No answer here", "solution": "...", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/3.json"},
    ])


def aime(root):
    p24 = write_parquet(os.path.join(root, "aime_2024", "data", "train-00000-of-00001.parquet"), [
        {"id": 60, "problem": "Find n.", "solution": "...", "answer": "204", "url": "u", "year": "2024"},
        {"id": 61, "problem": "Find m.", "solution": "...", "answer": "25", "url": "u", "year": "2024"}])
    write_jsonl(os.path.join(root, "AIME2025", "aime2025-I.jsonl"), [{"question": "Q1", "answer": "70"},
                                                                     {"question": "Q2", "answer": "588"}])
    write_jsonl(os.path.join(root, "AIME2025", "aime2025-II.jsonl"), [{"question": "Q1 of II", "answer": "16"}])
    return p24


def gpqa_csv(root):
    path = os.path.join(root, "gpqa", "dataset", "gpqa_diamond.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1",
                                          "Incorrect Answer 2", "Incorrect Answer 3", "Record ID", "High-level domain"])
        w.writeheader()
        w.writerow({"Question": "Which particle is a lepton?", "Correct Answer": "electron",
                    "Incorrect Answer 1": "proton", "Incorrect Answer 2": "neutron", "Incorrect Answer 3": "pion",
                    "Record ID": "rec1", "High-level domain": "Physics"})
        w.writerow({"Question": "Which gas is noble?", "Correct Answer": "argon", "Incorrect Answer 1": "oxygen",
                    "Incorrect Answer 2": "", "Incorrect Answer 3": "nitrogen", "Record ID": "rec2"})
    return path


def mmlu_parquet(root):
    return write_parquet(os.path.join(root, "mmlu", "all", "test-00000-of-00001.parquet"), [
        {"question": "Which organ pumps blood?", "subject": "anatomy", "choices": ["lung", "heart", "liver", "skin"],
         "answer": 1},
        {"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 7},
        {"question": "Capital of France?", "subject": "geography", "choices": ["Rome", "Paris", "Oslo", "Bern"],
         "answer": 0},
    ])


def mmlu_pro_parquet(root):
    return write_parquet(os.path.join(root, "MMLU-Pro", "data", "test-00000-of-00001.parquet"), [
        {"question_id": 70, "question": "Which is a prime number?", "options": ["4", "6", "7", "8", "9", "10"],
         "answer": "C", "answer_index": 2, "cot_content": "", "category": "math", "src": "ori_mmlu-x"},
        {"question_id": 71, "question": "Unit of force?", "options": ["joule", "newton", "watt"],
         "answer": "B", "answer_index": 1, "cot_content": "", "category": "physics", "src": "stemez-x"},
        {"question_id": 72, "question": "No answer here", "options": ["a", "b"], "answer": None,
         "answer_index": None, "cot_content": "", "category": "other", "src": "x"},
    ])


def mmbench(root):
    """Question 1 in three option orders (index + k * 10^6), question 2 once; parquet and OpenCompass' TSV."""
    import base64

    image = {"bytes": png(), "path": None}
    options = [["cat", "dog", "bird", "fish"], ["fish", "cat", "dog", "bird"], ["bird", "fish", "cat", "dog"]]
    rows = [{"index": k * 1_000_000 + 1, "question": "Which animal is shown?", "hint": None,
             **dict(zip("ABCD", opts)), "answer": "ABCD"[opts.index("dog")], "category": "object", "image": image}
            for k, opts in enumerate(options)]
    rows.append({"index": 2, "question": "What color is it?", "hint": "Look closely.", "A": "red", "B": "blue",
                 "C": None, "D": None, "answer": "A", "category": "color", "image": image})
    rows.append({"index": 3, "question": "Broken", "hint": None, "A": "x", "B": "y", "C": None, "D": None,
                 "answer": "E", "category": "color", "image": image})
    write_parquet(os.path.join(root, "MMBench", "en", "dev-00000-of-00001.parquet"), rows)
    tsv = os.path.join(root, "mmbench_tsv", "MMBench_DEV_EN.tsv")
    os.makedirs(os.path.dirname(tsv), exist_ok=True)
    with open(tsv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                          "image"], delimiter="\t")
        w.writeheader()
        w.writerow({"index": 2, "question": "What color is it?", "hint": "nan", "A": "red", "B": "blue", "C": "nan",
                    "D": "", "answer": "A", "category": "color", "image": base64.b64encode(png()).decode()})
    return tsv


def mme_parquet(root):
    """existence: two images with two questions each; code_reasoning: one image; one row without a yes/no answer."""
    image = {"bytes": png(), "path": None}
    rows = [{"question_id": qid, "question": f"{q} Please answer yes or no.", "answer": a, "category": cat,
             "image": image}
            for qid, q, a, cat in [("000.jpg", "Is there a cat?", "Yes", "existence"),
                                   ("000.jpg", "Is there a dog?", "No", "existence"),
                                   ("001.jpg", "Is there a car?", "Yes", "existence"),
                                   ("001.jpg", "Is there a bus?", "No", "existence"),
                                   ("0020.png", "Does the code print 3?", "Yes", "code_reasoning"),
                                   ("0020.png", "Does the code print 4?", "No", "code_reasoning"),
                                   ("0021.png", "Maybe?", "Perhaps", "code_reasoning")]]
    return write_parquet(os.path.join(root, "MME", "data", "test-00000-of-00001.parquet"), rows)
