"""Synthetic reasoning data for the demo and the tests: arithmetic word problems with a short chain of
thought and a boxed answer, in our record formats (cold start: chat messages; RL: problem/answer).
"""

from __future__ import annotations

import json
import random

NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Ben", "Eva", "Raj", "Zoe", "Max"]
THINGS = ["apples", "coins", "books", "cards", "pens", "shells", "stamps", "marbles"]


def arithmetic_problem(rng: random.Random) -> tuple[str, str, str]:
    """(question, reasoning, answer) with one of +, -, x on one-digit numbers."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    op = rng.choice("+-*")
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if op == "+":
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        r, ans = f"{a} + {b} = {a + b}", a + b
    elif op == "-":
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        r, ans = f"{a} - {b} = {a - b}", a - b
    else:
        q = f"{name} has {a} bags with {b} {thing} in each. How many {thing} in all?"
        r, ans = f"{a} * {b} = {a * b}", a * b
    return q, r, str(ans)


def sft_record(rng: random.Random, i: int) -> dict:
    q, r, ans = arithmetic_problem(rng)
    answer = f"<think>{r}</think> The answer is \\boxed{{{ans}}}."
    return {"id": f"arith-{i}", "source": "synthetic_arithmetic",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}


def rl_record(rng: random.Random, i: int) -> dict:
    q, _, ans = arithmetic_problem(rng)
    return {"id": f"arith-{i}", "source": "synthetic_arithmetic", "problem": q, "answer": ans,
            "answer_type": "number"}


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_arithmetic_sft(path: str, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return write_jsonl(path, [sft_record(rng, i) for i in range(n)])


def write_arithmetic_rl(path: str, n: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return write_jsonl(path, [rl_record(rng, i) for i in range(n)])
