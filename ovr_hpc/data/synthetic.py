"""Synthetic reasoning data for the demo and the tests, in our record formats (cold start: chat
messages; RL: problem/answer):
- arithmetic word problems with a short chain of thought and a boxed answer (text);
- a colour question about a shape drawn with PIL (multimodal): the RL prompt shows only the image, so
  the model must read it. The cold start sees pictures with plain captions ("A red square."), the tiny
  model's stand-in for the visual pretraining a real Qwen2.5-VL brings, and the RL question about a
  picture answered in the right format with the right shape but a uniformly guessed colour: it leaves a
  model that answers in the format with every colour about equally often, right a quarter of the time.
  RL has to join the two: reward is the only thing that says which colour a picture shows.
"""

from __future__ import annotations

import json
import os
import random

from ovr_hpc.data.prompts import DEFAULT_INSTRUCTION

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


COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ["square", "circle", "triangle"]
COLOR_QUESTION = "What color is the shape in the picture?"


def draw_shape(path: str, color: str, shape: str, rng: random.Random, size: int = 56) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    r = rng.randint(size * 3 // 10, size * 9 // 20)  # large: the colour covers most of the visual patches
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    elif shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    image.save(path)
    return path


def _user(text: str) -> str:
    return f"{text}\n{DEFAULT_INSTRUCTION}"


def sft_record(rng: random.Random, i: int, image_dir: str | None = None) -> dict:
    """With an image_dir: a picture with a plain caption (20%), the RL colour question about a picture
    answered with a guessed colour (15%), else arithmetic; without one: the colour question with the colour
    named in the text (25%), else arithmetic."""
    u = rng.random()
    if u < 0.35 and image_dir is not None:
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        name = f"caption-{i}.png"
        draw_shape(os.path.join(image_dir, name), color, shape, rng)
        if u < 0.20:
            return {"id": f"synthetic_caption-{i}", "source": "synthetic_caption", "images": [f"images/{name}"],
                    "messages": [{"role": "user", "content": "<image>Describe the picture."},
                                 {"role": "assistant", "content": f"The {shape} is {color}."}]}
        # the answer format on the RL question, with the shape read from the picture and the colour a uniform
        # guess: the cold start teaches how to answer, never which colour a picture shows (RL must learn that)
        guess = rng.choice(sorted(COLORS))
        answer = f"<think>The {shape} is {guess}.</think> The answer is \\boxed{{{guess}}}."
        return {"id": f"synthetic_color_guess-{i}", "source": "synthetic_color_guess", "images": [f"images/{name}"],
                "messages": [{"role": "user", "content": _user(f"<image>{COLOR_QUESTION}")},
                             {"role": "assistant", "content": answer}]}
    if u < 0.25:
        ans, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        q = f"The {shape} in the picture is {ans}. {COLOR_QUESTION}"
        r, source = f"The {shape} is {ans}.", "synthetic_color_text"
    else:
        q, r, ans = arithmetic_problem(rng)
        source = "synthetic_arithmetic"
    answer = f"<think>{r}</think> The answer is \\boxed{{{ans}}}."
    return {"id": f"{source}-{i}", "source": source,
            "messages": [{"role": "user", "content": _user(q)}, {"role": "assistant", "content": answer}]}


def rl_record(rng: random.Random, i: int) -> dict:
    q, _, ans = arithmetic_problem(rng)
    return {"id": f"arith-{i}", "source": "synthetic_arithmetic", "problem": q, "answer": ans,
            "answer_type": "number"}


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_coldstart_sft(path: str, n: int, seed: int = 0, captions: bool = False) -> str:
    """Cold-start records (see sft_record); caption images go to images/ beside the file."""
    rng = random.Random(seed)
    image_dir = None
    if captions:
        image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "images")
        os.makedirs(image_dir, exist_ok=True)
    return write_jsonl(path, [sft_record(rng, i, image_dir) for i in range(n)])


def write_arithmetic_rl(path: str, n: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return write_jsonl(path, [rl_record(rng, i) for i in range(n)])


def write_color_rl(path: str, n: int, seed: int = 2) -> str:
    """Multimodal RL records: one image of a coloured shape each (written to images/ beside the file)."""
    rng = random.Random(seed)
    image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    os.makedirs(image_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    records = []
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        name = f"{stem}-{i}.png"
        draw_shape(os.path.join(image_dir, name), color, shape, rng)
        records.append({"id": f"color-{i}", "source": "synthetic_color", "images": [f"images/{name}"],
                        "problem": f"<image>{COLOR_QUESTION}", "answer": color})
    return write_jsonl(path, records)


def engine_check_samples(tokenizer, work_dir: str) -> list:
    """Tokenized samples for comparing training engines: one with a 56x112 gradient image (distinct height
    and width rope positions) and loss on the text after it, and two text samples (lengths that split
    unevenly). Used by the megatron engine tests and bench/megatron_gpu.py."""
    from PIL import Image

    from ovr_hpc.data.templates import TokenizedSample
    from ovr_hpc.data.vision import num_image_tokens

    path = os.path.join(work_dir, "wide.png")
    image = Image.new("RGB", (112, 56))
    for x in range(112):
        for y in range(56):
            image.putpixel((x, y), (2 * x, 4 * y, (x * y) % 256))
    # several ranks write the same file: each writes its own copy and renames it into place (atomic), so
    # none can read a half-written image
    tmp = f"{path}.{os.getpid()}.tmp.png"
    image.save(tmp)
    os.replace(tmp, path)
    pad, start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    before, after = tokenizer("Describe the picture:")["input_ids"], tokenizer("a gradient of red and green, wide.")["input_ids"]
    ids = before + [start] + [pad] * num_image_tokens(56, 112) + [end] + after
    samples = [TokenizedSample(ids, [(len(ids) - len(after), len(ids))], [path], [(56, 112)], "image")]
    for text in ("seven plus five is twelve, and twelve minus three is nine",
                 "the quick brown fox jumps over the lazy dog"):
        t = tokenizer(text)["input_ids"]
        samples.append(TokenizedSample(t, [(1, len(t))], [], [], "text"))
    return samples
