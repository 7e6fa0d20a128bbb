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


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))))
def test_shipped_configs_validate(path):
    import ovr_hpc.cli  # noqa: F401 - registers every stage, eval included

    import importlib.util

    import yaml

    stage = os.path.splitext(os.path.basename(path))[0]
    engine = (yaml.safe_load(open(path)).get("rollout") or {}).get("engine")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        # a vLLM config where vLLM is not installed fails validation, saying how to fix it
        with pytest.raises(ConfigError, match="vLLM is not installed"):
            load_config(stage, path)
        load_config(stage, path, ["rollout.engine=hf"])
        return
    load_config(stage, path)


def test_check_cli_rejects_fast():
    """`ovr-hpc check` runs without importing torch and fails with the config system's message."""
    code = ("import sys; from ovr_hpc.cli import main; rc = main(['check', 'coldstart', "
            f"'{REPO}/configs/tiny/coldstart.yaml', 'parallel.zero_stage=7']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "config error: parallel.zero_stage (7) must be 1, 2 or 3" in proc.stderr


def test_tensor_parallel_must_split_whole_heads(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"parallel.autotp_size \(2\) must divide the model's num_key_value_heads \(1"):
        load_config("coldstart", None, [f"model.path={tiny_model_dir}", "data.train_files=[d.jsonl]",
                                        "checkpoint.output_dir=o", "parallel.autotp_size=2", "parallel.zero_stage=2"])


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
