"""The eval runner: resume keeps produced answers, preemption, bad images counted, summary beside the paper,
data-parallel ranks merged, config errors named."""

import json
import os
import signal
import subprocess
import sys

import pytest

import ovr_hpc.eval.config  # noqa: F401  (registers the "eval" stage)
from ovr_hpc.config import ConfigError, load_config
from ovr_hpc.data.errors import BadRecord
from ovr_hpc.eval.runner import build_engine, resolve_model, run_eval
from ovr_hpc.rollout.base import Completion
from tests.eval import layouts as L

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_config(tmp_path, model_dir, benchmarks: str, *overrides):
    return load_config("eval", None, [
        f"model.path={model_dir}", "model.dtype=float32", "model.attn_implementation=sdpa",
        f"benchmarks={benchmarks}", f"output_dir={tmp_path / 'out'}", f"data_root={tmp_path}",
        "scoring.num_workers=0", "rollout.batch_size=2", "rollout.max_pixels=50176", "sampling.max_new_tokens=6",
        *overrides])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class FakeEngine:
    """Answers from a function of (prompt, sample index); raises BadRecord for images named 'corrupt'."""

    def __init__(self, answer=lambda prompt, j: "\\boxed{0}", on_call=None):
        self.answer, self.on_call, self.calls = answer, on_call, []

    def generate(self, prompts, params):
        self.calls.append([p.text for p in prompts])
        self.last = (prompts, params)
        if self.on_call:
            self.on_call(len(self.calls))
        out = []
        for i, p in enumerate(prompts):
            if any("corrupt" in ref for ref in p.images):
                raise BadRecord("bad_image", "cannot read image corrupt.png")
            out.append([Completion(i, [1], [5, 6, 7], self.answer(p, j), "stop", [0.0] * 3) for j in range(params.n)])
        return out


class CountingEngine:
    def __init__(self, engine):
        self.engine, self.prompts = engine, 0

    def generate(self, prompts, params):
        self.prompts += len(prompts)
        return self.engine.generate(prompts, params)


@pytest.fixture
def fake_model(tmp_path):
    path = tmp_path / "fake_model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return str(path)


@pytest.fixture
def records_file(tmp_path):
    from ovr_hpc.data.synthetic import write_arithmetic_rl

    return write_arithmetic_rl(str(tmp_path / "heldout.jsonl"), 5, seed=3)


# ----------------------------------------------------------------------------- resume (the tiny model)


def test_resumed_eval_keeps_produced_answers(tmp_path, tiny_model_dir, records_file):
    cfg = make_config(tmp_path, tiny_model_dir, f"[{{name: records, path: {records_file}, label: held}}]")
    engine = CountingEngine(build_engine(cfg, tiny_model_dir))
    first = run_eval(cfg, engine=engine)
    assert first["status"] == "completed" and engine.prompts == 5
    out = tmp_path / "out" / "held"
    full = read_jsonl(out / "samples.jsonl")
    assert [line["id"] for line in full] == [f"arith-{i}" for i in range(5)]
    assert all({"prompt", "response", "extracted", "score", "reason"} <= set(line) for line in full)

    # as if preempted: three answers written (one of them edited, to see it kept), a torn fourth line
    shard = out / "samples.rank0.jsonl"
    lines = read_jsonl(shard)
    lines[1]["response"] = "KEPT \\boxed{17}"
    torn = json.dumps(lines[3])[:40]
    shard.write_text("".join(json.dumps(x) + "\n" for x in lines[:3]) + torn)
    os.remove(out / "samples.jsonl")
    engine.prompts = 0
    second = run_eval(cfg, engine=engine)
    assert second["status"] == "completed"
    assert engine.prompts == 2  # only the two missing questions were generated again
    merged = read_jsonl(out / "samples.jsonl")
    assert [line["id"] for line in merged] == [f"arith-{i}" for i in range(5)]
    assert merged[1]["response"] == "KEPT \\boxed{17}"
    assert [m["response"] for m in merged[3:]] == [f["response"] for f in full[3:]]  # greedy: the same answers
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["num_evaluated"] == 5 and metrics["data"]["unreadable_result_lines"] == 0
    assert os.path.exists(tmp_path / "out" / "summary.md")


def test_bad_image_is_counted_not_dropped(tmp_path, tiny_model_dir):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    L.png(str(tmp_path / "ok.png"))
    rows = [{"id": "a", "problem": "<image>How many?", "answer": "1", "images": ["ok.png"]},
            {"id": "b", "problem": "<image>How many?", "answer": "2", "images": ["corrupt.png"]},
            {"id": "c", "problem": "What is 1+1?", "answer": "2"}]
    path = L.write_jsonl(str(tmp_path / "img.jsonl"), rows)
    cfg = make_config(tmp_path, tiny_model_dir, f"[{{name: records, path: {path}}}]", "rollout.batch_size=3")
    result = run_eval(cfg, engine=build_engine(cfg, tiny_model_dir))
    assert result["status"] == "completed"
    merged = {x["id"]: x for x in read_jsonl(tmp_path / "out" / "records" / "samples.jsonl")}
    assert sorted(merged) == ["a", "b", "c"]
    assert merged["b"]["reason"] == "bad_image" and merged["b"]["score"] == 0.0 and "corrupt" in merged["b"]["error"]
    assert merged["a"]["reason"] != "bad_image" and merged["c"]["reason"] != "bad_image"
    metrics = json.load(open(tmp_path / "out" / "records" / "metrics.json"))
    assert metrics["reasons"]["bad_image"] == 1 and metrics["num_evaluated"] == 3


# ----------------------------------------------------------------------------- with a scripted engine


def test_stop_signal_preempts_then_resumes(tmp_path, fake_model):
    L.math500_jsonl(tmp_path)
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "unique_id": f"q{i}"} for i in range(6)]
    L.write_jsonl(str(tmp_path / "MATH-500" / "test.jsonl"), rows)
    cfg = make_config(tmp_path, fake_model, "[{name: math500}]")
    previous = signal.getsignal(signal.SIGUSR1)

    def preempt(call):
        if call == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    answer = lambda p, j: "\\boxed{" + str(2 * int(p.text.split("What is ")[1].split("+")[0])) + "}"
    result = run_eval(cfg, engine=FakeEngine(answer, preempt))
    assert result["status"] == "preempted"
    assert signal.getsignal(signal.SIGUSR1) == previous  # the runner gives the handlers back
    assert len(read_jsonl(tmp_path / "out" / "math500" / "samples.rank0.jsonl")) == 2
    assert not os.path.exists(tmp_path / "out" / "math500" / "metrics.json")

    engine = FakeEngine(answer)
    result = run_eval(cfg, engine=engine)
    assert result["status"] == "completed" and sum(len(c) for c in engine.calls) == 4
    assert result["results"]["math500"]["accuracy"] == 1.0


def test_summary_beside_paper_numbers(tmp_path, fake_model):
    L.math500_jsonl(tmp_path)
    L.wemath_json(tmp_path)
    answers = {"What is $1+1$?": "\\boxed{2}", "Simplify $\\frac{2}{4}$.": "\\boxed{0.4}"}
    engine = FakeEngine(lambda p, j: answers.get(p.text.split("\n")[0], "\\boxed{A}"))
    cfg = make_config(tmp_path, fake_model, "[{name: math500}, {name: wemath, images: We-Math/images}]",
                      "max_bad_fraction=0.5")
    result = run_eval(cfg, engine=engine)
    assert result["results"]["math500"] == {"accuracy": 0.5}
    md = open(tmp_path / "out" / "summary.md").read()
    assert "| MATH500 | accuracy | 50.0 | 95.3 | 67.4 |" in md
    assert "1 bad rows" in md  # the row without an answer is reported
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    wemath = {r["metric"]: r for r in summary["rows"] if r["benchmark"] == "wemath"}
    assert wemath["score_strict"]["ovr_7b_paper"] == 44.6 and wemath["score_loose"]["ovr_7b_paper"] == 64.8
    # every answer is A: problem 10 (answer B) is all wrong -> IK, problem 20 (answer A) all right -> CM
    assert wemath["score_strict"]["ours"] == pytest.approx(0.5)


def test_sampled_avg_and_pass_at_k(tmp_path, fake_model):
    L.write_jsonl(str(tmp_path / "MATH-500" / "test.jsonl"),
                  [{"problem": "P1", "answer": "1", "unique_id": "a"},
                   {"problem": "P2", "answer": "2", "unique_id": "b"}])
    # question a: samples 0 and 2 right; question b: never
    engine = FakeEngine(lambda p, j: "\\boxed{1}" if p.text.startswith("P1") and j % 2 == 0 else "\\boxed{9}")
    cfg = make_config(tmp_path, fake_model, "[{name: math500}]", "sampling.n=4", "sampling.temperature=1.0",
                      "sampling.pass_k=[1,2]")
    run_eval(cfg, engine=engine)
    m = json.load(open(tmp_path / "out" / "math500" / "metrics.json"))["metrics"]
    assert m["avg@4"] == pytest.approx(0.25) and m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6) / 2) and m["pass@4"] == pytest.approx(0.5)
    assert len(read_jsonl(tmp_path / "out" / "math500" / "samples.jsonl")) == 8


def test_changed_setting_refuses_to_mix(tmp_path, fake_model):
    L.math500_jsonl(tmp_path)
    cfg = make_config(tmp_path, fake_model, "[{name: math500}]", "max_bad_fraction=0.5")
    run_eval(cfg, engine=FakeEngine())
    cfg = make_config(tmp_path, fake_model, "[{name: math500}]", "max_bad_fraction=0.5", "prompt.instruction=Answer.")
    with pytest.raises(ConfigError, match="different prompt"):
        run_eval(cfg, engine=FakeEngine())


def test_bad_rows_over_threshold_stop_before_generating(tmp_path, fake_model):
    L.math500_jsonl(tmp_path)  # one of three rows has no answer
    engine = FakeEngine()
    with pytest.raises(ValueError, match="test.jsonl:3: missing_field"):
        run_eval(make_config(tmp_path, fake_model, "[{name: math500}]"), engine=engine)
    assert engine.calls == []


def test_prompts_are_built_as_the_rl_stage_builds_them(tmp_path, fake_model, records_file):
    from ovr_hpc.config import RLDataConfig
    from ovr_hpc.eval.benchmarks import BENCHMARKS
    from ovr_hpc.eval.runner import prompt_of
    from ovr_hpc.data.prompts import ORZ_STOP
    from ovr_hpc.rl.prompts import RLPrompt, to_rollout_prompt

    for template in ("chat", "orz"):
        cfg = make_config(tmp_path, fake_model, f"[{{name: records, path: {records_file}}}]",
                          f"prompt.template={template}", f"output_dir={tmp_path / template}")
        samples, _, _ = BENCHMARKS["records"].load(cfg.benchmarks[0])
        data = RLDataConfig(train_files=[records_file], prompt_template=template)
        for s in samples:
            expected = to_rollout_prompt(RLPrompt(s.id, "", s.question, s.answer, None, [], [], ""), data)
            assert prompt_of(cfg, s) == expected.text
        engine = FakeEngine()
        run_eval(cfg, engine=engine)
        prompts, params = engine.last
        assert all(p.raw == (template == "orz") for p in prompts)
        assert params.stop == (ORZ_STOP if template == "orz" else [])


# ----------------------------------------------------------------------------- models, configs


def test_resolve_model_from_a_training_run(tmp_path, fake_model):
    assert resolve_model(fake_model) == (fake_model, None)
    step = tmp_path / "run" / "checkpoints" / "step_7"
    (step / "hf").mkdir(parents=True)
    (step / "hf" / "config.json").write_text("{}")
    (step / "train_state.json").write_text('{"step": 7}')
    (step / "COMPLETE").write_text("step 7\n")
    for path in (tmp_path / "run", step):
        assert resolve_model(str(path)) == (str(step / "hf"), 7)
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        resolve_model(str(tmp_path / "nothing"))


@pytest.mark.parametrize("override,message", [
    ("benchmarks=[{name: mathvistaa}]", "expected one of"),
    ("sampling.n=4", "needs sampling.temperature > 0"),
    ("sampling.pass_k=[2]", "sampling.pass_k[0] = 2"),
    ("benchmarks=[{name: math500}, {name: math500}]", "give one of them a different"),
    ("benchmarks=[{name: mathverse, options: {version: x}}]", "unknown option(s) version"),
    ("benchmarks=[{name: records}]", "benchmarks[0].path is required"),
    ("rollout.engine=tpu", "rollout.engine"),
    ("benchmarks=[]", "benchmarks is empty"),
    ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size (0) must be > 0"),
    # the old untyped options of the vLLM engine: the error names the keys that replaced them
    ("rollout.options={tensor_parallel_size: 2, kv_cache_memory_bytes: 67108864, allow_cpu: true}",
     "rollout.options is gone: the vLLM engine's settings are typed keys of rollout now; write "
     "rollout.tensor_parallel_size: 2, rollout.kv_cache_mb: 64, rollout.vllm_allow_cpu: true"),
])
def test_config_errors_name_the_key(override, message, fake_model):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config("eval", None, [f"model.path={fake_model}", "output_dir=/tmp/x", "benchmarks=[{name: math500}]",
                                   override])


def test_shipped_configs_load():
    import importlib.util

    # the 7B config generates with vLLM: where it is not installed, validation says so (tested in
    # tests/test_config.py); the rest of the config is checked with the hf engine
    hf = [] if importlib.util.find_spec("vllm") else ["rollout.engine=hf"]
    for name in ("tiny", "qwen25vl_7b"):
        cfg = load_config("eval", os.path.join(REPO, "configs", name, "eval.yaml"), hf)
        assert cfg.benchmarks
        cfg.validate_world(8)
    if not hf:  # the rollout TP check belongs to the vllm engine
        cfg = load_config("eval", os.path.join(REPO, "configs", "qwen25vl_7b", "eval.yaml"),
                          ["rollout.tensor_parallel_size=4"])
        with pytest.raises(ConfigError, match="must divide the number of ranks"):
            cfg.validate_world(6)


def test_vllm_engine_unavailable_is_explained(tmp_path, fake_model):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match="vLLM is not installed"):  # at validation, before any model
        make_config(tmp_path, fake_model, "[{name: math500}]", "rollout.engine=vllm")


# ----------------------------------------------------------------------------- data parallel


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_split_and_merge(tmp_path, tiny_model_dir, records_file):
    from ovr_hpc.local import free_port

    config = tmp_path / "eval.yaml"
    config.write_text(f"""
model: {{path: {tiny_model_dir}, dtype: float32, attn_implementation: sdpa}}
benchmarks: [{{name: records, path: {records_file}, label: held}}]
output_dir: {tmp_path / 'out'}
sampling: {{max_new_tokens: 4}}
rollout: {{batch_size: 2, max_pixels: 50176}}
scoring: {{num_workers: 0}}
""")
    # destroyed before exit as run_stage does: gloo's threads otherwise abort the process at exit now and then
    script = ("import sys, json; import ovr_hpc.eval.config; from ovr_hpc import dist; "
              "from ovr_hpc.config import load_config; from ovr_hpc.eval.runner import run_eval; "
              "result = run_eval(load_config('eval', sys.argv[1])); dist.shutdown(); "
              "print('RESULT', json.dumps(result))")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(config)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"))
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    out = tmp_path / "out" / "held"
    shards = [read_jsonl(out / f"samples.rank{r}.jsonl") for r in range(2)]
    assert [len(s) for s in shards] == [3, 2]  # pending questions i -> rank i % 2
    assert not {x["id"] for x in shards[0]} & {x["id"] for x in shards[1]}
    merged = read_jsonl(out / "samples.jsonl")
    assert [x["id"] for x in merged] == [f"arith-{i}" for i in range(5)]
    # a rerun on one rank finds everything done and loads no model
    cfg = load_config("eval", str(config))
    engine = FakeEngine()
    assert run_eval(cfg, engine=engine)["status"] == "completed" and engine.calls == []
