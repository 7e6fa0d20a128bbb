import glob
import os
import subprocess
import sys

import pytest

from ovr_hpc.config import ColdStartConfig, ConfigError, load_config, parse_overrides
from tests.conftest import REPO

BASE = ["model.path=m", "data.train_files=[d.jsonl]", "checkpoint.output_dir=o"]


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=2e-4", "d=[1, 2]", "e=null", "f=true", "g=hello"]) == {
        "a": {"b": 1, "c": "2e-4"},
        "d": [1, 2], "e": None, "f": True, "g": "hello"}


def test_defaults_and_types():
    cfg = load_config("coldstart", None, BASE + ["optimizer.lr=2e-4", "schedule.max_steps=5"])
    assert isinstance(cfg, ColdStartConfig)
    assert cfg.optimizer.lr == pytest.approx(2e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.schedule.max_steps == 5 and cfg.parallel.zero_stage == 3


@pytest.mark.parametrize("override, message", [
    ("model.pth=x", "unknown key 'model.pth': section 'model' has path, dtype"),
    ("modle.path=x", "unknown key 'modle'"),
    ("parallel.zero_stage=two", "parallel.zero_stage = 'two': expected an integer"),
    ("model.dtype=fp8", "model.dtype = 'fp8': expected one of 'bfloat16', 'float16', 'float32'"),
    ("model.freeze_vision=1", "model.freeze_vision = 1: expected true or false"),
    ("parallel.zero_stage=4", "parallel.zero_stage (4) must be 1, 2 or 3"),
    ("optimizer.lr=-1", "optimizer.lr (-1.0) must be > 0"),
    ("data.train_files=[x.csv]", "data.train_files[0] = 'x.csv': expected a .jsonl or .parquet file"),
    ("parallel.autotp_size=2", "needs parallel.zero_stage <= 2"),
    ("data.max_pixels=10", "data.max_pixels (10) must be >= min_pixels"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("coldstart", None, BASE + [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("rollout.sleep_level=3", "rollout.sleep_level (3) must be 1 or 2"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization (1.5) must be in (0, 1]"),
    ("rollout.max_num_seqs=0", "rollout.max_num_seqs (0) must be > 0"),
    ("rollout.kv_cache_mb=-1", "rollout.kv_cache_mb (-1) must be >= 0"),
    ("rollout.max_model_len=-5", "rollout.max_model_len (-5) must be >= 0"),
])
def test_rollout_engine_keys_are_checked_in_both_stages(override, message, tmp_path):
    """The engine keys RL and eval share (RolloutEngineConfig) are checked by the one section."""
    import ovr_hpc.cli  # noqa: F401 - registers the eval stage

    (tmp_path / "config.json").write_text("{}")
    for stage, base in (("rl", BASE), ("eval", [f"model.path={tmp_path}", "output_dir=o",
                                                "benchmarks=[{name: math500}]"])):
        with pytest.raises(ConfigError) as e:
            load_config(stage, None, base + ["rollout.engine=hf", override])
        assert message in str(e.value), stage


def test_missing_required():
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config("coldstart", None, ["data.train_files=[d.jsonl]", "checkpoint.output_dir=o"])


def test_world_size_layout():
    cfg = load_config("coldstart", None, BASE + ["parallel.global_batch_size=12", "parallel.micro_batch_size=2"])
    cfg.parallel.validate_world(6)
    assert cfg.parallel.grad_accum_steps(6) == 1 and cfg.parallel.grad_accum_steps(2) == 3
    with pytest.raises(ConfigError, match=r"global_batch_size \(12\) must be divisible by data-parallel size \(4\)"):
        cfg.parallel.validate_world(4)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("coldstart", str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("coldstart", str(tmp_path / "none.yaml"))
    # a key given twice (PyYAML would keep the last one silently), at the top level and inside a section
    for text, key, lines in (("model:\n  path: a\nmodel:\n  path: b\n", "model", "1 and 3"),
                             ("model:\n  path: a\n  dtype: float32\n  dtype: bfloat16\n", "dtype", "3 and 4")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"key '{key}' appears twice in one mapping \\(lines {lines}\\)"):
            load_config("coldstart", str(bad))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))))
def test_shipped_configs_validate(path):
    import ovr_hpc.cli  # noqa: F401 - registers every stage, eval included

    import importlib.util

    import yaml

    stage = os.path.splitext(os.path.basename(path))[0]
    stage = {"passrate": "eval"}.get(stage, stage)  # `ovr-hpc data passrate` reads an eval config
    engine = (yaml.safe_load(open(path)).get("rollout") or {}).get("engine")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        # a vLLM config where vLLM is not installed fails validation, saying how to fix it
        with pytest.raises(ConfigError, match="vLLM is not installed"):
            load_config(stage, path)
        load_config(stage, path, ["rollout.engine=hf"])
        return
    load_config(stage, path)



def test_partial_rollouts_with_vllm(monkeypatch):
    """rollout.partial works with either engine; with vllm an explicit max_model_len must hold a carried
    response (it goes back in as a prompt), 0 (the stage's rule) always does."""
    import importlib.util

    from ovr_hpc.config import PartialRolloutConfig, RolloutConfig

    real_find_spec = importlib.util.find_spec   # vLLM "installed": its own venv runs it, not this one
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    partial = PartialRolloutConfig(enabled=True)
    lengths = [[0, 64], [3, 128]]
    for engine, max_model_len in (("hf", 0), ("vllm", 0), ("vllm", 129), ("hf", 100)):
        RolloutConfig(engine=engine, partial=partial, max_response_len=lengths, max_model_len=max_model_len).validate("rollout")
    with pytest.raises(ConfigError, match=r"rollout.max_model_len \(128\) above the longest max_response_len \(128\)"):
        RolloutConfig(engine="vllm", partial=partial, max_response_len=lengths, max_model_len=128).validate("rollout")
    RolloutConfig(engine="vllm", max_response_len=lengths, max_model_len=128).validate("rollout")   # partial off


def test_check_cli_rejects_fast():
    """`ovr-hpc check` runs without importing torch and fails with the config system's message."""
    code = ("import sys; from ovr_hpc.cli import main; rc = main(['check', 'coldstart', "
            f"'{REPO}/configs/tiny/coldstart.yaml', 'parallel.zero_stage=7']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "config error: parallel.zero_stage (7) must be 1, 2 or 3" in proc.stderr


def test_check_cli_overrides_after_options(capsys, tmp_path):
    from ovr_hpc.cli import main
    from tests.test_preflight import inputs

    rc = main(["check", "coldstart", f"{REPO}/configs/tiny/coldstart.yaml", *inputs(tmp_path), "--world-size", "2",
               "parallel.global_batch_size=3"])
    assert rc == 2
    assert "parallel.global_batch_size (3) must be divisible" in capsys.readouterr().err


def test_megatron_refuses_deepspeed_offload():
    with pytest.raises(ConfigError, match="offload_optimizer is DeepSpeed's"):
        load_config("rl", None, ["model.path=m", "data.train_files=[d.jsonl]", "checkpoint.output_dir=o",
                                 "parallel.engine=megatron", "parallel.offload_optimizer=true"])


def test_tensor_parallel_must_split_whole_heads(tiny_model_dir, tmp_path):
    """A model-dependent check: ovr_hpc.preflight's (load_config reads no model files)."""
    from ovr_hpc import preflight
    from tests.test_preflight import fake_data

    cfg = load_config("coldstart", None, [f"model.path={tiny_model_dir}", f"data.train_files=[{fake_data(tmp_path)}]",
                                          "checkpoint.output_dir=o", "parallel.autotp_size=2", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"parallel.autotp_size \(2\) must divide the model's num_key_value_heads \(1"):
        preflight.check("coldstart", cfg)


@pytest.mark.parametrize("stage", ["coldstart", "rl", "eval"])
def test_readme_documents_every_key(stage):
    import dataclasses

    import ovr_hpc.cli  # noqa: F401 - registers every stage
    from ovr_hpc.config import STAGES

    readme = open(os.path.join(REPO, "README.md")).read()

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value) and f"`{key}.*`" not in readme:
                yield from keys(value, key + ".")
            elif not dataclasses.is_dataclass(value):
                yield key

    for key in keys(STAGES[stage]()):
        assert f"`{key}`" in readme, f"README.md does not document {stage} key {key}"


# ----------------------------------------------------------------------------- megatron layouts

# Qwen2.5-VL language models: hidden, layers, attention heads, KV heads, MLP intermediate size
QWEN25VL_TEXT = {
    "7b": (3584, 28, 28, 4, 18944),
    "32b": (5120, 64, 40, 8, 27648),
    "72b": (8192, 80, 64, 8, 29568),
}


def qwen25vl_dir(root, size, nested=True):
    """A model directory holding only a Qwen2.5-VL config.json with `size`'s text sizes: nested under
    `text_config` (as transformers writes it now) or at the top level (the hub's original files)."""
    import json

    hidden, layers, heads, kv, ffn = QWEN25VL_TEXT[size]
    text = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": 152064,
            "model_type": "qwen2_5_vl_text"}
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "tie_word_embeddings": False,
              "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "out_hidden_size": hidden}}
    config.update({"text_config": text} if nested else text)
    path = os.path.join(str(root), f"qwen25vl_{size}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    for name in ("model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):  # stand-ins
        open(os.path.join(path, name), "w").close()
    return path


def megatron(model_path, tp, pp=1, stage="coldstart", extra=()):
    """The config after every pre-run check (the layout against the model is preflight's)."""
    from ovr_hpc import preflight
    from tests.test_preflight import fake_data

    data = fake_data(os.path.dirname(model_path), "sft" if stage == "coldstart" else "rl")
    overrides = [f"model.path={model_path}", f"data.train_files=[{data}]", "checkpoint.output_dir=o",
                 "parallel.engine=megatron", f"parallel.tensor_parallel_size={tp}",
                 f"parallel.pipeline_parallel_size={pp}", *extra]
    cfg = load_config(stage, None, overrides)
    preflight.check(stage, cfg)
    return cfg


@pytest.mark.parametrize("nested", [True, False], ids=["text_config", "top_level"])
def test_megatron_tp_must_divide_kv_heads(tmp_path, nested):
    model = qwen25vl_dir(tmp_path, "7b", nested)
    with pytest.raises(ConfigError) as e:
        megatron(model, tp=8)
    assert "parallel.tensor_parallel_size (8)" in str(e.value) and "4 KV heads" in str(e.value)
    cfg = megatron(model, tp=4)
    assert cfg.parallel.model_parallel_size == 4


@pytest.mark.parametrize("stage", ["coldstart", "rl"])
def test_megatron_pp_must_not_exceed_layers(tmp_path, stage):
    model = qwen25vl_dir(tmp_path, "7b")
    extra = ["rollout.engine=hf"] if stage == "rl" else []
    with pytest.raises(ConfigError, match=r"parallel.pipeline_parallel_size \(29\).*exceeds the model's 28 layers"):
        megatron(model, tp=1, pp=29, stage=stage, extra=extra)
    megatron(model, tp=4, pp=28, stage=stage, extra=extra)  # one layer per stage is allowed


@pytest.mark.parametrize("size, tp, pp", [("32b", 8, 2), ("72b", 8, 4), ("32b", 8, 1), ("72b", 4, 3)])
def test_megatron_large_layouts_accepted(tmp_path, size, tp, pp):
    cfg = megatron(qwen25vl_dir(tmp_path, size), tp, pp)
    assert cfg.parallel.model_parallel_size == tp * pp


@pytest.mark.parametrize("size", ["32b", "72b"])
def test_megatron_large_tp16_rejected(tmp_path, size):
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel_size \(16\).*8 KV heads"):
        megatron(qwen25vl_dir(tmp_path, size), tp=16)


@pytest.mark.parametrize("stage", ["coldstart", "rl"])
@pytest.mark.parametrize("overrides, message", [
    (["parallel.tensor_parallel_size=2"], "set parallel.engine=megatron"),
    (["parallel.pipeline_parallel_size=2"], "set parallel.engine=megatron"),
    (["parallel.engine=megatron", "parallel.autotp_size=2"],
     "parallel.autotp_size (2) is DeepSpeed's: with parallel.engine=megatron use parallel.tensor_parallel_size"),
    (["parallel.engine=megatron", "parallel.tensor_parallel_size=0"], "parallel.tensor_parallel_size (0) must be > 0"),
    (["parallel.engine=megatron", "parallel.megatron_spec=apex"], "parallel.megatron_spec = 'apex': expected one of"),
])
def test_engine_keys_belong_to_their_engine(stage, overrides, message):
    extra = ["rollout.engine=hf"] if stage == "rl" else []
    with pytest.raises(ConfigError) as e:
        load_config(stage, None, BASE + extra + overrides)
    assert message in str(e.value)


def test_megatron_world_size_layout():
    cfg = load_config("coldstart", None, BASE + ["parallel.engine=megatron", "parallel.tensor_parallel_size=2",
                                                 "parallel.pipeline_parallel_size=2", "parallel.global_batch_size=8",
                                                 "parallel.micro_batch_size=2"])
    assert cfg.parallel.data_parallel_size(8) == 2
    cfg.parallel.validate_world(8)
    assert cfg.parallel.grad_accum_steps(8) == 2 and cfg.parallel.grad_accum_steps(4) == 4
    cfg.parallel.global_batch_size = 6  # not a multiple of dp 2 x micro 2
    with pytest.raises(ConfigError, match=r"global_batch_size \(6\) must be divisible by data-parallel size \(2\) x "
                                          r"parallel.micro_batch_size \(2\) = 4"):
        cfg.validate_world(8)
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel_size x parallel.pipeline_parallel_size \(4\) "
                                          r"must divide the world size \(6\)"):
        cfg.validate_world(6)


def test_megatron_rl_world_size_layout():
    cfg = load_config("rl", None, BASE + ["rollout.engine=hf", "parallel.engine=megatron",
                                          "parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2",
                                          "rollout.prompts_per_step=6"])
    assert cfg.parallel.data_parallel_size(12) == 3
    cfg.validate_world(12)
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step \(6\) must be divisible by the data-parallel "
                                          r"size \(4\)"):
        cfg.validate_world(16)
    with pytest.raises(ConfigError, match=r"\(4\) must divide the world size \(6\)"):
        cfg.validate_world(6)


@pytest.mark.parametrize("size, tp, pp, world", [("32b", 8, 2, 32), ("72b", 8, 4, 64)])
@pytest.mark.parametrize("stage", ["coldstart", "rl"])
def test_large_configs_layout(tmp_path, size, tp, pp, world, stage):
    """configs/qwen25vl_{32b,72b}: megatron TP x PP, against the model's sizes, two replicas at their node count."""
    path = os.path.join(REPO, "configs", f"qwen25vl_{size}", f"{stage}.yaml")
    assert path in sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))  # test_shipped_configs_validate too
    from ovr_hpc import preflight
    from tests.test_preflight import fake_data

    overrides = [f"model.path={qwen25vl_dir(tmp_path, size)}", f"data.train_files=[{fake_data(tmp_path)}]"] + \
        (["rollout.engine=hf"] if stage == "rl" else [])
    cfg = load_config(stage, path, overrides)
    preflight.check(stage, cfg)   # the layout against the model's heads and layers
    p = cfg.parallel
    assert (p.engine, p.tensor_parallel_size, p.pipeline_parallel_size, p.megatron_spec) == ("megatron", tp, pp, "auto")
    assert p.data_parallel_size(world) == 2
    cfg.validate_world(world)
    cfg.validate_world(2 * world)
    with pytest.raises(ConfigError, match="must divide the world size"):
        cfg.validate_world(world - 8)  # one node short
    if stage == "coldstart":
        assert p.global_batch_size == 640 and p.grad_accum_steps(world) == 320


@pytest.mark.parametrize("saved,saved_world,overrides,world,problem", [
    ({"zero_stage": 2}, 2, ["parallel.zero_stage=2"], 1, None),            # universal conversion
    ({"zero_stage": 1}, 2, ["parallel.zero_stage=2"], 2, None),            # ZeRO-1 and 2 share a format
    ({"zero_stage": 3}, 1, ["parallel.zero_stage=3"], 2, None),
    ({"zero_stage": 2}, 2, ["parallel.zero_stage=3"], 2, "parallel.zero_stage=2, this run has 3"),
    ({"zero_stage": 3}, 2, ["parallel.zero_stage=1"], 2, "ZeRO-3 checkpoints only into ZeRO-3"),
    ({"zero_stage": 2, "autotp_size": 2}, 2, ["parallel.zero_stage=2"], 2, "autotp_size=2, this run has 1"),
    ({"zero_stage": 2}, 2, ["parallel.zero_stage=2", "parallel.autotp_size=2"], 2, "cannot reshape AutoTP"),
    ({"zero_stage": 2, "autotp_size": 2}, 2, ["parallel.zero_stage=2", "parallel.autotp_size=2"], 2, None),
    ({"zero_stage": 2, "autotp_size": 2}, 2, ["parallel.zero_stage=2", "parallel.autotp_size=2"], 4,
     "AutoTP on 2 ranks, this run has 4"),
    ({"engine": "megatron"}, 2, ["parallel.zero_stage=2"], 2, "saved by the megatron engine"),
    ({}, 2, [], 2, None),                                                     # keys left out: the defaults
])
def test_which_checkpoint_layouts_resume(saved, saved_world, overrides, world, problem):
    from ovr_hpc.checkpoint import resume_layout_problem

    parallel = load_config("coldstart", f"{REPO}/configs/tiny/coldstart.yaml", overrides).parallel
    found = resume_layout_problem(saved, parallel, saved_world, world)
    assert found is None if problem is None else problem in found


def test_megatron_checkpoints_resume_on_any_layout():
    from ovr_hpc.checkpoint import resume_layout_problem

    parallel = load_config("rl", f"{REPO}/configs/tiny/rl.yaml", ["parallel.engine=megatron",
                                                                  "parallel.zero_stage=1"]).parallel
    saved = {"engine": "megatron", "tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    assert resume_layout_problem(saved, parallel, 4, 1) is None
    assert "saved by the deepspeed engine" in resume_layout_problem({"engine": "deepspeed"}, parallel, 1, 1)


def test_check_cli_refuses_a_checkpoint_this_layout_cannot_load(tmp_path):
    """Inside the job, `check --world-size` looks at the checkpoint the run would resume from (without torch)."""
    step = tmp_path / "run" / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("step 4\n")
    (step / "config.yaml").write_text("parallel:\n  zero_stage: 2\n  autotp_size: 2\n")
    for rank in range(2):
        (step / f"rng_rank{rank}.pt").write_bytes(b"")
    from tests.test_preflight import inputs

    base = ["check", "coldstart", f"{REPO}/configs/tiny/coldstart.yaml", *inputs(tmp_path),
            f"checkpoint.output_dir={tmp_path / 'run'}", "parallel.zero_stage=2", "--quiet", "--world-size"]

    def check(*args):
        code = f"import sys; from ovr_hpc.cli import main; rc = main({base + list(args)!r}); " \
               "assert 'torch' not in sys.modules; sys.exit(rc)"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert check("2", "parallel.autotp_size=2").returncode == 0
    refused = check("4", "parallel.autotp_size=2")
    assert refused.returncode == 2
    assert f"cannot resume from {step}: it was saved with AutoTP on 2 ranks, this run has 4" in refused.stderr
    assert "ovr-hpc export" in refused.stderr
    assert check("4", "parallel.autotp_size=2", "checkpoint.resume=false").returncode == 0
    (step / "config.yaml").write_text("parallel: [unclosed\n")
    broken = check("2", "parallel.autotp_size=2")
    assert broken.returncode == 2 and f"its config {step / 'config.yaml'} is unreadable" in broken.stderr
