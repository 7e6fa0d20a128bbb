"""`ovr-hpc behaviors RESPONSES.jsonl`: cognitive behaviours in reasoning traces, and the Behaviour Transfer Rate.

The paper's four visual behaviours, each paired with the linguistic behaviour (Gandhi et al.) it
transfers from:

    visual reflection       <- backtracking
    divide-and-conquer      <- subgoal setting
    visual verification     <- verification
    goal-driven tracing     <- backward chaining

Two ways to count them:

* `judge`: a judge model behind an OpenAI-compatible endpoint (`POST {base_url}/chat/completions`; a vLLM
  server of any model, or a hosted one), one prompt per (response, behaviour) asking for the number of
  distinct instances as `<count>N</count>`. Standard library HTTP only. Timeouts, connection errors,
  HTTP 429/5xx and answers without a readable count are retried with backoff, then counted as failures
  of that kind: a failure is never turned into a guessed count. HTTP 401/403/404 stop the run (wrong
  key, model or URL). Judgments are appended to a JSONL as they come, so a rerun only asks what is
  missing or failed.
* `keyword`: an offline estimate from phrase patterns, clearly labelled as such in every output; cheap,
  biased, not comparable with the paper's judge numbers.

Rates: the emergence rate of a behaviour is the share of judged responses with count >= 1; the Behaviour
Transfer Rate of a pair is (visual emergence rate) / (linguistic emergence rate).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional

KEYWORD_LABEL = "keyword estimate (offline phrase heuristic; not the paper's judge, not comparable with it)"


@dataclass(frozen=True)
class Behavior:
    name: str
    kind: str  # "visual" | "linguistic"
    title: str
    definition: str
    keywords: tuple[str, ...]  # regexes (case-insensitive) for the offline estimate


BEHAVIORS: dict[str, Behavior] = {b.name: b for b in (
    Behavior(
        "visual_reflection", "visual", "visual reflection",
        "The model goes back to the image (figure, diagram, chart) to look at it again because it doubts or "
        "has found a problem with what it read from it before, and revises its reading.",
        (r"look(?:ing)? (?:at|back at) the (?:image|figure|diagram|graph|chart|picture) again",
         r"re-?(?:examine|check|read|inspect)(?:ing)? the (?:image|figure|diagram|graph|chart|picture)",
         r"(?:image|figure|diagram|graph|chart|picture) (?:actually|again) shows",
         r"misread (?:the )?(?:image|figure|diagram|graph|chart|picture|label|axis)",
         r"looking back at the (?:image|figure|diagram|graph|chart|picture)"),
    ),
    Behavior(
        "divide_and_conquer", "visual", "visual divide-and-conquer",
        "The model splits the image into parts (regions, panels, objects, bars, segments) and examines them "
        "one by one to solve the problem.",
        (r"(?:each|every) (?:part|region|panel|subplot|segment|section|bar|object|piece|quadrant) of the "
         r"(?:image|figure|diagram|graph|chart)",
         r"(?:break|split|divide)(?:ing)? (?:the|this) (?:image|figure|diagram|shape|graph|chart) (?:into|down)",
         r"(?:left|right|top|bottom|upper|lower) (?:part|half|panel|region) of the (?:image|figure|diagram)",
         r"(?:first|second|third|next) (?:panel|subplot|region|part) of the (?:image|figure|diagram|chart)"),
    ),
    Behavior(
        "visual_verification", "visual", "visual verification",
        "The model checks an intermediate or final result against the image (e.g. comparing a computed "
        "value, count or shape with what the figure shows) to confirm it.",
        (r"(?:check|verify|confirm)(?:ing)? (?:this |it |that )?(?:with|against|in|using) the "
         r"(?:image|figure|diagram|graph|chart|picture)",
         r"(?:image|figure|diagram|graph|chart|picture) confirms",
         r"consistent with (?:the|what the) (?:image|figure|diagram|graph|chart|picture)",
         r"matches (?:the|what the) (?:image|figure|diagram|graph|chart|picture)"),
    ),
    Behavior(
        "goal_driven_tracing", "visual", "goal-driven visual tracing",
        "The model starts from what it must find and traces through the image toward it (following a line, "
        "path, edge, arrow or curve from the target back to known elements).",
        (r"trac(?:e|ing) (?:the|this|that|along|back)",
         r"follow(?:ing)? the (?:line|path|edge|arrow|curve|route|branch)",
         r"start(?:ing)? from the (?:end|target|goal|destination)",
         r"to find (?:the )?\w+,? (?:I|we) (?:need to|must) (?:look|locate|find) .{0,40}(?:image|figure|diagram)"),
    ),
    Behavior(
        "backtracking", "linguistic", "backtracking",
        "The model notices that its current approach or a step is wrong and explicitly abandons it to go back "
        "and try something else (e.g. 'wait, that is not right, let me redo this').",
        (r"\bwait\b", r"\bactually,", r"(?:that|this) (?:is|was)(?:n't| not) (?:right|correct)",
         r"\bi made (?:a|an) (?:mistake|error)", r"let me (?:re-?think|reconsider|start over|try (?:again|another))",
         r"\bhmm\b"),
    ),
    Behavior(
        "subgoal_setting", "linguistic", "subgoal setting",
        "The model breaks the problem into smaller intermediate goals and states them (e.g. 'first I will "
        "find X, then use it to get Y').",
        (r"\bfirst,? (?:I|we|let's|let us)\b", r"\bstep \d", r"\bnext,? (?:I|we|let's)\b",
         r"\bthen,? (?:I|we) (?:can|will|need)", r"(?:I|we) need to (?:find|compute|determine|calculate) .{0,60}first"),
    ),
    Behavior(
        "verification", "linguistic", "verification",
        "The model checks an intermediate or final result (by substituting back, recomputing, or comparing "
        "with a condition of the problem).",
        (r"let me (?:double[- ])?(?:check|verify)", r"\bverif(?:y|ying|ication)\b", r"\bdouble[- ]check",
         r"\bcheck(?:ing)? (?:the|my|this|our) (?:answer|result|work|calculation)", r"plug(?:ging)? (?:it |this )?back",
         r"substitut(?:e|ing) back"),
    ),
    Behavior(
        "backward_chaining", "linguistic", "backward chaining",
        "The model reasons backward from the goal: it starts from what it must show or find and works out "
        "what would be required to get there.",
        (r"work(?:ing)? backwards?", r"\bbackward\b",
         r"to (?:find|get|determine) .{0,40}, (?:I|we) (?:need|must|have to)",
         r"(?:it|this) (?:suffices|is enough) to (?:show|find)", r"start(?:ing)? from the (?:answer|goal|end)"),
    ),
)}

PAIRS: tuple[tuple[str, str], ...] = (
    ("visual_reflection", "backtracking"),
    ("divide_and_conquer", "subgoal_setting"),
    ("visual_verification", "verification"),
    ("goal_driven_tracing", "backward_chaining"),
)

COUNT_RE = re.compile(r"<count>\s*(\d{1,6})\s*</count>", re.I)


def judge_prompt(behavior: Behavior, response: str, question: str = "", max_chars: int = 24000) -> str:
    """One behaviour, one trace; the judge must end with <count>N</count>."""
    trace = response if len(response) <= max_chars else (
        response[: max_chars // 2] + "\n[... middle of the trace omitted ...]\n" + response[-max_chars // 2 :])
    problem = question.strip()
    if len(problem) > 3000:
        problem = problem[:3000] + " [...]"
    context = "a problem about an image" if behavior.kind == "visual" else "a problem"
    return (
        f"You are analysing how a model reasoned while solving {context}. Count how many distinct times its "
        f"reasoning trace shows the behaviour below. Count a behaviour once per separate occurrence; repeated "
        f"wording of the same occurrence counts once. If the behaviour never occurs, the count is 0.\n\n"
        f"Behaviour: {behavior.title}. {behavior.definition}\n\n"
        + (f"Problem:\n<problem>\n{problem}\n</problem>\n\n" if problem else "")
        + f"Reasoning trace:\n<trace>\n{trace}\n</trace>\n\n"
        "Explain briefly which passages you counted, then give the number alone as <count>N</count> on the last line."
    )


def parse_count(text: str) -> Optional[int]:
    """The last <count>N</count> in a judge answer, or None (unparseable: never guessed)."""
    found = COUNT_RE.findall(text or "")
    return int(found[-1]) if found else None


# ----------------------------------------------------------------------------- judge client


class JudgeConfigError(RuntimeError):
    """The endpoint refuses every request (wrong URL, key or model): stop instead of counting failures."""


@dataclass
class Judgment:
    count: Optional[int]
    status: str  # ok | timeout | connection_error | http_error | unparseable | bad_response
    attempts: int
    detail: str = ""


class JudgeClient:
    """Chat completions against an OpenAI-compatible endpoint, with retries, over the standard library."""

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout_s: float = 120.0,
                 max_retries: int = 3, backoff_s: float = 2.0, max_tokens: int = 1024, temperature: float = 0.0):
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_tokens, self.temperature = max_tokens, temperature

    def complete(self, prompt: str) -> str:
        """One request; raises TimeoutError / ConnectionError / _HTTPStatus / ValueError (bad body)."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise _HTTPStatus(e.code, e.read()[:300].decode("utf-8", "replace")) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError) or "timed out" in str(e.reason):
                raise TimeoutError(str(e.reason)) from None
            raise ConnectionError(str(e.reason)) from None
        except (TimeoutError, OSError) as e:  # socket timeout while reading, reset connections
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise TimeoutError(str(e)) from None
            raise ConnectionError(str(e)) from None
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"not a chat completion: {payload[:200]!r}") from None
        if not isinstance(content, str):
            raise ValueError("message content is not text")
        return content

    def judge(self, prompt: str) -> Judgment:
        """Ask until a count is read or the retries are spent; failures keep their kind."""
        status, detail = "bad_response", ""
        for attempt in range(1, self.max_retries + 2):
            try:
                count = parse_count(self.complete(prompt))
                if count is not None:
                    return Judgment(count, "ok", attempt)
                status, detail = "unparseable", "no <count>N</count> in the answer"
            except TimeoutError as e:
                status, detail = "timeout", str(e)
            except ConnectionError as e:
                status, detail = "connection_error", str(e)
            except _HTTPStatus as e:
                if e.code in (401, 403, 404):
                    raise JudgeConfigError(f"{self.url} answered HTTP {e.code} ({e.body.strip()[:200]}): check the "
                                           "URL, the model name and the API key") from None
                status, detail = "http_error", f"HTTP {e.code}"
                if e.code not in (408, 409, 425, 429) and e.code < 500:  # other 4xx: the request itself is bad
                    return Judgment(None, status, attempt, detail)
            except ValueError as e:
                status, detail = "bad_response", str(e)
            if attempt <= self.max_retries:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 60.0))
        return Judgment(None, status, self.max_retries + 1, detail)


class _HTTPStatus(Exception):
    def __init__(self, code: int, body: str):
        super().__init__(f"HTTP {code}")
        self.code, self.body = code, body


# ----------------------------------------------------------------------------- responses


@dataclass
class Response:
    key: str
    text: str
    question: str = ""
    benchmark: str = ""
    step: Optional[int] = None


def read_responses(path: str, benchmarks: Iterable[str] = (),
                   limit: Optional[int] = None) -> tuple[list[Response], list[str]]:
    """Responses from an eval's samples.jsonl (or any JSONL with a `response` / `text` field).
    Returns (responses, problems): unusable lines are listed with their line number, not dropped silently."""
    wanted = set(benchmarks)
    out, problems, seen = [], [], set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                if not isinstance(line, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                problems.append(f"{path}:{lineno}: unreadable line ({e})")
                continue
            text = line.get("response", line.get("text"))
            if not isinstance(text, str):
                problems.append(f"{path}:{lineno}: no 'response' text")
                continue
            bench = str(line.get("label") or line.get("benchmark") or "")
            if wanted and bench not in wanted and line.get("benchmark") not in wanted:
                continue
            if "id" in line:
                key = f"{line['id']}/{line.get('sample', 0)}"
                key = f"{bench}/{key}" if bench else key
            else:
                key = f"line{lineno}"
            if key in seen:
                problems.append(f"{path}:{lineno}: duplicate response {key}")
                continue
            seen.add(key)
            step = line.get("model_step")
            out.append(Response(key, text, str(line.get("prompt") or line.get("question") or ""), bench,
                                step if isinstance(step, int) else None))
            if limit is not None and len(out) >= limit:
                break
    return out, problems


# ----------------------------------------------------------------------------- counting


def keyword_counts(text: str) -> dict[str, int]:
    """Offline estimate: pattern matches per behaviour (see KEYWORD_LABEL)."""
    return {name: sum(len(re.findall(p, text, re.I)) for p in b.keywords) for name, b in BEHAVIORS.items()}


def aggregate(responses: list[Response], counts: dict[tuple[str, str], Judgment], behaviors: list[str]) -> dict:
    """Per behaviour: responses, judged, failures by kind, emergence rate, mean count; BTR per pair."""
    per: dict[str, dict] = {}
    for name in behaviors:
        judged = [counts[(r.key, name)] for r in responses if (r.key, name) in counts]
        ok = [j.count for j in judged if j.status == "ok"]
        failures = Counter(j.status for j in judged if j.status != "ok")
        per[name] = {
            "kind": BEHAVIORS[name].kind,
            "responses": len(responses),
            "judged": len(ok),
            "failed": sum(failures.values()),
            "failures": dict(sorted(failures.items())),
            "not_asked": len(responses) - len(judged),
            "emergence_rate": (sum(c >= 1 for c in ok) / len(ok)) if ok else None,
            "mean_count": (sum(ok) / len(ok)) if ok else None,
        }
    transfer = {}
    for visual, linguistic in PAIRS:
        if visual in per and linguistic in per:
            v, lg = per[visual]["emergence_rate"], per[linguistic]["emergence_rate"]
            transfer[f"{visual}/{linguistic}"] = {
                "visual": visual, "linguistic": linguistic, "visual_rate": v, "linguistic_rate": lg,
                "btr": (v / lg) if v is not None and lg else None,
            }
    return {"behaviors": per, "transfer": transfer}


def _read_judgments(path: str, judge_model: str) -> dict[tuple[str, str], Judgment]:
    found: dict[tuple[str, str], Judgment] = {}
    if not os.path.exists(path):
        return found
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a torn last line: that judgment is asked again
            if line.get("judge_model") != judge_model:
                continue
            found[(line["key"], line["behavior"])] = Judgment(line.get("count"), line["status"],
                                                               line.get("attempts", 0), line.get("detail", ""))
    return found


def analyze(responses_path: str, out_dir: Optional[str] = None, method: str = "judge", *,
            judge: Optional[JudgeClient] = None, behaviors: Iterable[str] = (), benchmarks: Iterable[str] = (),
            limit: Optional[int] = None, concurrency: int = 8, step: Optional[int] = None,
            log=print) -> dict:
    """Count behaviours in the responses of `responses_path`; writes behaviors[_keyword].json / .md
    (and the judgments JSONL) into out_dir (default: the responses' folder). Returns the report."""
    names = list(behaviors) or list(BEHAVIORS)
    unknown = [n for n in names if n not in BEHAVIORS]
    if unknown:
        raise ValueError(f"unknown behaviour(s) {unknown}: expected some of {', '.join(BEHAVIORS)}")
    if method not in ("judge", "keyword"):
        raise ValueError(f"method {method!r}: expected 'judge' or 'keyword'")
    if method == "judge" and judge is None:
        raise ValueError("method 'judge' needs a JudgeClient (judge URL and model)")
    responses, problems = read_responses(responses_path, benchmarks, limit)
    for p in problems[:20]:
        log(f"[behaviors] {p}")
    if not responses:
        raise ValueError(f"no usable responses in {responses_path} ({len(problems)} unusable lines)")
    out_dir = out_dir or os.path.dirname(os.path.abspath(responses_path))
    os.makedirs(out_dir, exist_ok=True)
    stem = "behaviors" if method == "judge" else "behaviors_keyword"

    counts: dict[tuple[str, str], Judgment] = {}
    if method == "keyword":
        for r in responses:
            kc = keyword_counts(r.text)
            for name in names:
                counts[(r.key, name)] = Judgment(kc[name], "ok", 0)
    else:
        judgments_path = os.path.join(out_dir, "behaviors_judgments.jsonl")
        keys = {r.key for r in responses}
        counts = {k: v for k, v in _read_judgments(judgments_path, judge.model).items()
                  if k[1] in names and k[0] in keys}
        todo = [(r, name) for r in responses for name in names
                if (r.key, name) not in counts or counts[(r.key, name)].status != "ok"]
        log(f"[behaviors] {len(responses)} responses x {len(names)} behaviours: "
            f"{len(responses) * len(names) - len(todo)} judged before, {len(todo)} to ask {judge.model} at {judge.url}")
        lock = threading.Lock()
        done = [0]

        def ask(item):
            r, name = item
            j = judge.judge(judge_prompt(BEHAVIORS[name], r.text, r.question))
            with lock:
                counts[(r.key, name)] = j
                with open(judgments_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": r.key, "behavior": name, "count": j.count, "status": j.status,
                                        "attempts": j.attempts, "detail": j.detail, "judge_model": judge.model}) + "\n")
                done[0] += 1
                if done[0] % 50 == 0 or done[0] == len(todo):
                    log(f"[behaviors] {done[0]}/{len(todo)} judgments")

        ex = ThreadPoolExecutor(max_workers=max(1, concurrency))
        try:
            for future in [ex.submit(ask, item) for item in todo]:
                future.result()  # re-raises JudgeConfigError (wrong URL / key / model) from a worker
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    steps = {r.step for r in responses}
    report = {
        "method": "judge" if method == "judge" else "keyword",
        "label": f"judge {judge.model}" if method == "judge" else KEYWORD_LABEL,
        "judge": {"url": judge.url, "model": judge.model} if method == "judge" else None,
        "source": os.path.abspath(responses_path),
        "step": step if step is not None else (next(iter(steps)) if len(steps) == 1 else None),
        "unusable_lines": len(problems),
        **aggregate(responses, counts, names),
    }
    by_bench = sorted({r.benchmark for r in responses if r.benchmark})
    if len(by_bench) > 1:
        report["by_benchmark"] = {b: aggregate([r for r in responses if r.benchmark == b], counts, names)
                                  for b in by_bench}
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(format_report(report))
    log(f"[behaviors] wrote {os.path.join(out_dir, stem)}.json and .md")
    return report


def format_report(report: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [f"# Cognitive behaviours: {report['label']}", "", f"Responses: {report['source']}"
             + (f" (step {report['step']})" if report.get("step") is not None else ""), ""]
    if report["method"] == "keyword":
        lines += [f"**{KEYWORD_LABEL}.**", ""]
    lines += ["| behaviour | kind | emergence rate | mean count | judged | failed (by kind) |",
              "|---|---|---:|---:|---:|---|"]
    for name, b in report["behaviors"].items():
        fails = ", ".join(f"{k} {v}" for k, v in b["failures"].items()) or "0"
        mean = "-" if b["mean_count"] is None else f"{b['mean_count']:.2f}"
        lines.append(f"| {BEHAVIORS[name].title} | {b['kind']} | {pct(b['emergence_rate'])} | {mean} | "
                     f"{b['judged']}/{b['responses']} | {fails} |")
    if report["transfer"]:
        lines += ["", "Behaviour Transfer Rate = visual emergence rate / linguistic emergence rate:", "",
                  "| visual <- linguistic | visual rate | linguistic rate | BTR |", "|---|---:|---:|---:|"]
        for t in report["transfer"].values():
            lines.append(f"| {BEHAVIORS[t['visual']].title} <- {BEHAVIORS[t['linguistic']].title} | "
                         f"{pct(t['visual_rate'])} | {pct(t['linguistic_rate'])} | {pct(t['btr'])} |")
    return "\n".join(lines) + "\n"
