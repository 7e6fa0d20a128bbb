"""What a model answers, not only how often it is right: per-reference accuracy and the answer
distribution of scored samples (a policy collapsed onto one answer is right for one class only)."""

from __future__ import annotations

from collections import Counter


def answer_breakdown(samples: list[dict]) -> dict:
    """Scored samples (the eval runner's samples.jsonl rows: reference, extracted, score) ->
    {"n", "accuracy", "per_class": {reference: accuracy}, "class_counts": {reference: n},
     "answers": {extracted answer or "(none)": share}, "top_answer", "top_answer_share"}."""
    n = len(samples)
    counts, correct = Counter(), Counter()
    answers = Counter()
    for s in samples:
        ref = str(s["reference"])
        counts[ref] += 1
        correct[ref] += float(s["score"]) >= 1.0
        answers[s["extracted"] if s.get("extracted") is not None else "(none)"] += 1
    top, top_n = answers.most_common(1)[0] if answers else (None, 0)
    return {
        "n": n,
        "accuracy": sum(correct.values()) / n if n else 0.0,
        "per_class": {ref: correct[ref] / counts[ref] for ref in sorted(counts)},
        "class_counts": dict(sorted(counts.items())),
        "answers": {a: k / n for a, k in answers.most_common()},
        "top_answer": top,
        "top_answer_share": top_n / n if n else 0.0,
    }


def format_breakdown(name: str, b: dict, max_answers: int = 5) -> str:
    """One line: accuracy, per-class accuracy (up to 8 classes) and the most common answers."""
    per_class = " ".join(f"{c}={a:.2f}" for c, a in list(b["per_class"].items())[:8])
    answers = " ".join(f"{a}:{s:.0%}" for a, s in list(b["answers"].items())[:max_answers])
    return f"{name}: accuracy {b['accuracy']:.3f} | per class {per_class} | answers {answers}"
