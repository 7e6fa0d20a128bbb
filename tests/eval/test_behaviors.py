"""Behaviour analysis: the judge path against a local OpenAI-compatible server (successes, retries, failures
counted by kind, a refused key), the offline keyword estimate, the Behaviour Transfer Rate."""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ovr_hpc.eval.behaviors import (BEHAVIORS, KEYWORD_LABEL, JudgeClient, JudgeConfigError, analyze,
                                    judge_prompt, keyword_counts, parse_count)
from ovr_hpc.eval.commands import add_parsers


class JudgeServer:
    """Speaks POST /v1/chat/completions. What it answers depends on markers in the trace it is shown:
    FLAKY (HTTP 500 on the first try), SLOW (sleeps past the client's timeout every time), GARBLED (no count),
    EMPTYBODY (200 with a body that is not a completion); otherwise <count>N</count> with N = the number of
    'wait' in the trace for backtracking, 1 for visual reflection when the trace says 'look at the image
    again', else 0. Requires `Authorization: Bearer secret` when `key` is set."""

    def __init__(self, key=None):
        self.key, self.requests, self.seen = key, [], {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self.reply(401, {"error": {"message": "invalid api key"}})
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"error": "no such route"})
                prompt = body["messages"][0]["content"]
                trace = prompt.split("<trace>")[1].split("</trace>")[0]
                server.seen[prompt] = server.seen.get(prompt, 0) + 1
                if "FLAKY" in trace and server.seen[prompt] == 1:
                    return self.reply(500, {"error": "overloaded"})
                if "SLOW" in trace:
                    time.sleep(0.6)
                if "EMPTYBODY" in trace:
                    return self.reply(200, {"unexpected": True})
                if "GARBLED" in trace:
                    text = "I think there are a few."
                elif "Behaviour: backtracking." in prompt:
                    text = f"Counted the restarts. <count>{trace.lower().count('wait')}</count>"
                elif "Behaviour: visual reflection." in prompt:
                    text = f"<count>{int('look at the image again' in trace)}</count>"
                else:
                    text = "Nothing of the kind.\n<count>0</count>"
                self.reply(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})

            def reply(self, code, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_responses(path, texts, step=None):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"benchmark": "mathvision", "label": "mathvision", "id": f"q{i}", "sample": 0,
                                "prompt": "What is shown?", "response": t, "model_step": step}) + "\n")
        f.write("{torn line\n")
    return str(path)


def quiet(*args, **kwargs):
    pass


def test_parse_count_never_guesses():
    assert parse_count("blah <count>3</count>") == 3
    assert parse_count("<count>1</count> then corrected: <count> 2 </count>") == 2  # the last one
    assert parse_count("three") is None and parse_count("<count>three</count>") is None and parse_count("") is None
    prompt = judge_prompt(BEHAVIORS["visual_verification"], "x" * 50000, "Q")
    assert "<count>N</count>" in prompt and "omitted" in prompt and len(prompt) < 30000


def test_judge_counts_rates_and_transfer(tmp_path):
    texts = ["Wait, I look at the image again. Wait, no.", "Let me look at the image again. The answer is 3.",
             "Plain answer.", "Wait."]
    path = write_responses(tmp_path / "samples.jsonl", texts, step=40)
    with JudgeServer() as server:
        judge = JudgeClient(server.url, "judge-model", timeout_s=5, max_retries=1, backoff_s=0.01)
        report = analyze(path, str(tmp_path / "out"), "judge", judge=judge,
                         behaviors=["visual_reflection", "backtracking", "verification"], concurrency=4, log=quiet)
        assert len(server.requests) == 12 and all(r[1]["model"] == "judge-model" for r in server.requests)
    b = report["behaviors"]
    assert b["backtracking"]["emergence_rate"] == pytest.approx(0.5)  # responses 0 and 3 say "wait"
    assert b["backtracking"]["mean_count"] == pytest.approx((2 + 0 + 0 + 1) / 4)
    assert b["visual_reflection"]["emergence_rate"] == pytest.approx(0.5)
    assert b["verification"]["emergence_rate"] == 0.0 and b["verification"]["judged"] == 4
    t = report["transfer"]["visual_reflection/backtracking"]
    assert t["btr"] == pytest.approx(1.0)
    assert report["step"] == 40 and report["unusable_lines"] == 1 and report["method"] == "judge"
    md = (tmp_path / "out" / "behaviors.md").read_text()
    assert "Behaviour Transfer Rate" in md and "| backtracking | linguistic | 50.0% |" in md


def test_judge_failures_are_retried_then_counted(tmp_path):
    texts = ["FLAKY but wait", "GARBLED", "SLOW", "EMPTYBODY", "wait fine"]
    path = write_responses(tmp_path / "samples.jsonl", texts)
    with JudgeServer() as server:
        judge = JudgeClient(server.url, "m", timeout_s=0.3, max_retries=2, backoff_s=0.01)
        report = analyze(path, str(tmp_path), "judge", judge=judge, behaviors=["backtracking"], concurrency=5,
                         log=quiet)
    b = report["behaviors"]["backtracking"]
    assert b["judged"] == 2 and b["failed"] == 3  # FLAKY recovered on its retry
    assert b["failures"] == {"bad_response": 1, "timeout": 1, "unparseable": 1}
    assert b["emergence_rate"] == 1.0  # over the judged responses only: failures are not guessed as 0
    lines = [json.loads(x) for x in open(tmp_path / "behaviors_judgments.jsonl")]
    by_key = {x["key"]: x for x in lines}
    assert by_key["mathvision/q0/0"]["attempts"] == 2 and by_key["mathvision/q1/0"]["attempts"] == 3

    # a rerun asks only what failed, and keeps what was judged
    with JudgeServer() as server:
        judge = JudgeClient(server.url, "m", timeout_s=0.3, max_retries=0, backoff_s=0.01)
        analyze(path, str(tmp_path), "judge", judge=judge, behaviors=["backtracking"], log=quiet)
        asked = sorted(r[1]["messages"][0]["content"].split("<trace>\n")[1].split("\n")[0] for r in server.requests)
    assert asked == ["EMPTYBODY", "GARBLED", "SLOW"]


def test_refused_key_stops_the_run(tmp_path):
    path = write_responses(tmp_path / "samples.jsonl", ["wait"] * 20)
    with JudgeServer(key="secret") as server:
        judge = JudgeClient(server.url, "m", api_key="wrong", timeout_s=2, max_retries=3, backoff_s=0.01)
        with pytest.raises(JudgeConfigError, match="HTTP 401"):
            analyze(path, str(tmp_path), "judge", judge=judge, concurrency=2, log=quiet)
        assert len(server.requests) < 20 * len(BEHAVIORS)  # stopped early, not hammered
        ok = JudgeClient(server.url, "m", api_key="secret", timeout_s=2)
        assert ok.judge("<trace>\nwait\n</trace> Behaviour: backtracking.").count == 1


def test_keyword_estimate_is_labelled(tmp_path):
    kc = keyword_counts("Wait, let me look at the image again. First, I find x. "
                        "Let me verify this by substituting back.")
    assert kc["backtracking"] >= 1 and kc["visual_reflection"] >= 1 and kc["subgoal_setting"] >= 1
    assert kc["verification"] >= 1 and kc["goal_driven_tracing"] == 0
    path = write_responses(tmp_path / "samples.jsonl", ["Wait, let me look at the image again.", "Plain."])
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["behaviors", path, "--keyword", "--out", str(tmp_path / "kw")])
    assert args.func(args) == 0
    report = json.load(open(tmp_path / "kw" / "behaviors_keyword.json"))
    assert report["method"] == "keyword" and report["label"] == KEYWORD_LABEL
    assert report["behaviors"]["backtracking"]["emergence_rate"] == 0.5
    assert KEYWORD_LABEL in (tmp_path / "kw" / "behaviors_keyword.md").read_text()


def test_cli_needs_a_judge_or_keyword(tmp_path, capsys):
    path = write_responses(tmp_path / "samples.jsonl", ["x"])
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["behaviors", path])
    assert args.func(args) == 2 and "--keyword" in capsys.readouterr().err
