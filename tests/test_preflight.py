"""ovr_hpc/preflight.py: every pre-run check, each failure naming the key, file or flag and the fix; the
resolved summary of `ovr-hpc check`; resume against the checkpoint's config; `data check`'s hints.
No model is loaded: model folders here are config.json plus stand-in files (the checks look, never load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import ovr_hpc.cli  # noqa: F401 - registers every stage, eval included
from ovr_hpc import preflight
from ovr_hpc.config import ConfigError, dump_config, load_config, to_dict
from tests.conftest import REPO

TINY_SFT = os.path.join(REPO, "configs", "tiny", "coldstart.yaml")
TINY_RL = os.path.join(REPO, "configs", "tiny", "rl.yaml")
QWEN7B_SFT = os.path.join(REPO, "configs", "qwen25vl_7b", "coldstart.yaml")
QWEN7B_EVAL = os.path.join(REPO, "configs", "qwen25vl_7b", "eval.yaml")


def fake_model(root, name="model", *, heads=4, kv=2, layers=4, processor=True) -> str:
    """A Hugging Face model folder as the checks see it: a Qwen2.5-VL config.json, a weights file and the
    processor / tokenizer files (empty: nothing here loads them)."""
    path = os.path.join(str(root), name)
    os.makedirs(path, exist_ok=True)
    text = {"hidden_size": 64 * heads, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": 128, "vocab_size": 1000}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2_5_vl", "text_config": text}, f)
    files = ["model.safetensors"] + (["preprocessor_config.json", "tokenizer_config.json"] if processor else [])
    for name in files:
        open(os.path.join(path, name), "w").close()
    return path


def fake_data(root, kind="sft") -> str:
    path = os.path.join(str(root), f"{kind}.jsonl")
    record = ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}]}
              if kind == "sft" else {"problem": "1+1?", "answer": "2"})
    with open(path, "w") as f:
        f.write(json.dumps(record) + "\n")
    return path


def inputs(root, kind="sft", **model) -> list[str]:
    """Overrides that make the tiny configs pass: a model folder, a data file and an output folder."""
    return [f"model.path={fake_model(root, **model)}", f"data.train_files=[{fake_data(root, kind)}]",
            f"checkpoint.output_dir={os.path.join(str(root), 'run')}"]


def fake_checkpoint(run_dir, step, config, hf=True) -> str:
    """A complete step_N folder of `run_dir` as the checks read it: COMPLETE, config.yaml, RNG files."""
    path = os.path.join(str(run_dir), "checkpoints", f"step_{step}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(dump_config(config))
    open(os.path.join(path, "rng_rank0.pt"), "w").close()
    if hf:
        fake_model(path, "hf")
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        f.write(f"step {step}\n")
    link = os.path.join(str(run_dir), "checkpoints", "latest")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(f"step_{step}", link)
    return path


def run_check(stage, config, overrides=(), launch=None):
    return preflight.check(stage, load_config(stage, config, list(overrides)), launch)


def cli(*args, no_torch=True):
    """`ovr-hpc ARGS` in a fresh interpreter (by default asserting that it did not import torch)."""
    code = (f"import sys; from ovr_hpc.cli import main; rc = main({list(args)!r}); "
            + ("assert 'torch' not in sys.modules, 'torch imported'; " if no_torch else "") + "sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


# ----------------------------------------------------------------------------- 1. model


def test_missing_model_path_names_the_key(tmp_path):
    with pytest.raises(preflight.PreflightError) as e:
        run_check("coldstart", TINY_SFT, inputs(tmp_path) + ["model.path=/does/not/exist"])
    assert "model.path = '/does/not/exist' does not exist" in str(e.value) and e.value.check == "model"
    assert "Hugging Face model folder" in str(e.value)


def test_shipped_placeholders_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path = '/path/to/OVR-7B' is the shipped config's placeholder: "
                                          r"set model.path=\.\.\."):
        run_check("eval", QWEN7B_EVAL, ["rollout.engine=hf"])
    with pytest.raises(ConfigError, match="data_root = '/path/to/benchmarks' is the shipped config's placeholder"):
        run_check("eval", QWEN7B_EVAL, ["rollout.engine=hf", f"model.path={fake_model(tmp_path)}"])


@pytest.mark.parametrize("missing, message", [
    ("config.json", "has no config.json"),
    ("model.safetensors", "holds no weights"),
    ("preprocessor_config.json", "Unrecognized processing class"),
])
def test_model_folder_must_hold_what_the_trainers_load(tmp_path, missing, message):
    overrides = inputs(tmp_path)
    os.remove(os.path.join(str(tmp_path), "model", missing))
    with pytest.raises(ConfigError, match=message):
        run_check("coldstart", TINY_SFT, overrides)


def test_rl_from_a_run_folder_names_ovr_hpc_export(tmp_path):
    sft = load_config("coldstart", TINY_SFT, inputs(tmp_path))
    run = tmp_path / "coldstart_run"
    fake_checkpoint(run, 7, sft)
    for path in (run, run / "checkpoints" / "latest", run / "checkpoints" / "step_7"):
        with pytest.raises(ConfigError) as e:
            run_check("rl", TINY_RL, inputs(tmp_path, "rl") + [f"model.path={path}"])
        assert "is a training run (or one of its checkpoints), not a Hugging Face model folder" in str(e.value)
        assert f"`ovr-hpc export {run} step_7 OUT`" in str(e.value) and "then model.path=OUT" in str(e.value)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_known_hub_id_is_checked_against_the_shipped_table(tmp_path, empty_hub_cache):
    data = [f"data.train_files=[{fake_data(tmp_path)}]", f"checkpoint.output_dir={tmp_path / 'run'}"]
    # the 7B recipe names the hub id: TP 8 does not split its 4 KV heads, and that is not silently skipped
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel_size \(8\) is rejected: .*4 KV heads.*"
                                          r"model.path = Qwen/Qwen2.5-VL-7B-Instruct"):
        run_check("coldstart", QWEN7B_SFT, data + ["parallel.engine=megatron", "parallel.tensor_parallel_size=8"])
    with pytest.raises(ConfigError, match=r"parallel.autotp_size \(8\) must divide the model's num_attention_heads"):
        run_check("coldstart", QWEN7B_SFT, data + ["parallel.autotp_size=8", "parallel.zero_stage=2"])
    result = run_check("coldstart", QWEN7B_SFT, data + ["parallel.engine=megatron", "parallel.tensor_parallel_size=4"])
    (note,) = result.notes
    assert "is a Hugging Face hub id not in this machine's cache" in note and "huggingface-cli download" in note
    assert "checked against the shipped table" in note


def test_hub_id_in_the_local_cache_is_read_from_there(tmp_path, empty_hub_cache):
    snapshot = empty_hub_cache / "models--someone--qwen-vl" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"num_attention_heads": 6, "num_key_value_heads": 3}))
    overrides = inputs(tmp_path)[1:] + ["model.path=someone/qwen-vl", "parallel.zero_stage=2"]
    with pytest.raises(ConfigError, match=r"autotp_size \(2\) must divide the model's num_key_value_heads \(3"):
        run_check("coldstart", TINY_SFT, overrides + ["parallel.autotp_size=2"])
    assert "read from this machine's cache" in run_check("coldstart", TINY_SFT, overrides).notes[0]


def test_unknown_hub_id_is_refused_saying_nothing_was_checked(tmp_path, empty_hub_cache):
    with pytest.raises(ConfigError, match=r"model.path = 'someone/other' does not exist as a local folder.*nothing "
                                          r"about the model could be checked.*huggingface-cli download someone/other"):
        run_check("coldstart", TINY_SFT, inputs(tmp_path)[1:] + ["model.path=someone/other"])


def test_what_could_not_be_checked_is_said(tmp_path):
    overrides = inputs(tmp_path)
    with open(os.path.join(str(tmp_path), "model", "config.json"), "w") as f:
        json.dump({"model_type": "other"}, f)
    result = run_check("coldstart", TINY_SFT, overrides + ["parallel.autotp_size=2", "parallel.zero_stage=2"])
    assert result.notes == ["not checked: parallel.autotp_size against the model's attention and KV heads (the "
                            "model's config.json does not give its heads)"]


# ----------------------------------------------------------------------------- 2. data


def test_missing_data_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_check("coldstart", TINY_SFT, inputs(tmp_path) + [f"data.train_files=[{fake_data(tmp_path)}, nope.jsonl]"])
    assert "data.train_files[1] = 'nope.jsonl' does not exist" in str(e.value) and e.value.check == "data"


# ----------------------------------------------------------------------------- 4. world


def test_world_errors_name_the_ranks_and_the_node_counts_that_work(tmp_path):
    launch = preflight.Launch(ranks=24, nodes=3, tasks_per_node=8)
    with pytest.raises(ConfigError, match=r"global_batch_size \(640\) must be divisible by data-parallel size \(24\).*"
                                          r"for the job's 24 ranks \(3 nodes x 8 ranks\); node counts that work with 8 "
                                          r"ranks per node: 1, 2, 4, 5, 8, 10"):
        run_check("coldstart", TINY_SFT, inputs(tmp_path) + ["parallel.global_batch_size=640"], launch)


def test_two_ranks_on_one_gpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"8 ranks per node \(--ntasks-per-node\) but 4 GPUs per node "
                                          r"\(--gpus-per-node\): ranks would share a GPU. Give --ntasks-per-node=4"):
        run_check("coldstart", TINY_SFT, inputs(tmp_path), preflight.Launch(ranks=8, tasks_per_node=8, gpus_per_node=4))


@pytest.mark.parametrize("args, expected", [
    ("", (8, 1, 8, 8)),
    ("-N 3", (24, 3, 8, 8)),
    ("--nodes=2 --ntasks-per-node=4 --gpus-per-node=h100:4", (8, 2, 4, 4)),
    ("-N2 --gpus-per-node 4", (16, 2, 8, 4)),
    ("--ntasks=5", (5, 1, 8, 8)),
])
def test_sbatch_layout_from_the_script_and_its_options(args, expected):
    got = preflight.sbatch_launch(os.path.join(REPO, "slurm", "coldstart.sh"), args)
    assert (got.ranks, got.nodes, got.tasks_per_node, got.gpus_per_node) == expected


# ----------------------------------------------------------------------------- 5. resume


def test_resume_with_a_changed_config_lists_the_keys_and_needs_a_yes(tmp_path):
    overrides = inputs(tmp_path)
    saved = load_config("coldstart", TINY_SFT, overrides)
    fake_checkpoint(tmp_path / "run", 4, saved)
    with pytest.raises(ConfigError) as e:
        run_check("coldstart", TINY_SFT, overrides + ["optimizer.lr=2e-4", "seed=5"])
    message = str(e.value)
    assert "differs from its config.yaml: optimizer.lr: 0.003 in the checkpoint, 0.0002 now; seed: 0 in the " \
           "checkpoint, 5 now" in message
    assert "checkpoint.allow_config_change=true" in message and "checkpoint.resume=false" in message
    assert "Keys that may change on resume: checkpoint*, logging*, schedule.max_steps" in message
    result = run_check("coldstart", TINY_SFT, overrides + ["optimizer.lr=2e-4", "checkpoint.allow_config_change=true"])
    assert "optimizer.lr: 0.003 in the checkpoint, 0.0002 now" in result.notes[0]
    # what may change on resume passes without a word: a longer run, logging, another layout
    result = run_check("coldstart", TINY_SFT, overrides + ["schedule.max_steps=99", "logging.every_steps=5",
                                                           "parallel.micro_batch_size=2"], preflight.Launch(ranks=2))
    assert result.notes == [] and result.resume_from.endswith("step_4")


def test_resume_from_a_chosen_step(tmp_path):
    overrides = inputs(tmp_path)
    cfg = load_config("coldstart", TINY_SFT, overrides)
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path / "run", step, cfg)
    assert run_check("coldstart", TINY_SFT, overrides).resume_from.endswith("step_6")
    for chosen in ("step_4", "4"):
        result = run_check("coldstart", TINY_SFT, overrides + [f"checkpoint.resume_from={chosen}"])
        assert result.resume_from == str(tmp_path / "run" / "checkpoints" / "step_4")
        assert "the later checkpoints step_6 are replaced as the run saves those steps again" in result.notes[0]
    with pytest.raises(ConfigError, match=r"checkpoint.resume_from = 'step_5': .*step_5 is not a complete checkpoint.*"
                                          r"complete ones in .*: step_2, step_4, step_6"):
        run_check("coldstart", TINY_SFT, overrides + ["checkpoint.resume_from=step_5"])
    with pytest.raises(ConfigError, match=r"checkpoint.resume_from \(4\) needs checkpoint.resume=true"):
        run_check("coldstart", TINY_SFT, overrides + ["checkpoint.resume_from=4", "checkpoint.resume=false"])


@pytest.mark.slow
def test_trainer_restarts_from_the_chosen_step(tiny_model_dir, arithmetic_file, tmp_path, capsys):
    """checkpoint.resume_from reaches the loop: steps 3-4 are trained again from step_2's state, as before."""
    from ovr_hpc.sft.trainer import train
    from tests.sft.test_trainer import read_metrics

    base = [f"model.path={tiny_model_dir}", f"data.train_files=[{arithmetic_file}]",
            f"checkpoint.output_dir={tmp_path / 'run'}", "schedule.max_steps=4", "checkpoint.every_steps=2",
            "checkpoint.save_hf_weights=false", "logging.progress_bar=false", "logging.tensorboard=false"]
    assert train(load_config("coldstart", TINY_SFT, base))["step"] == 4
    before = read_metrics(str(tmp_path / "run"))
    capsys.readouterr()
    assert train(load_config("coldstart", TINY_SFT, base + ["checkpoint.resume_from=step_2"]))["step"] == 4
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step_2'} at step 2" in capsys.readouterr().out
    after = read_metrics(str(tmp_path / "run"))   # the metrics after the resumed step are written again
    assert [m["step"] for m in after] == [1, 2, 3, 4]
    assert [m["loss"] for m in after] == pytest.approx([m["loss"] for m in before], abs=1e-6)


# ----------------------------------------------------------------------------- `ovr-hpc check`


def test_check_prints_the_resolved_run_before_the_yaml(tmp_path):
    proc = cli("check", "coldstart", TINY_SFT, *inputs(tmp_path), "--world-size", "2",
               "parallel.global_batch_size=8", "parallel.micro_batch_size=2", "schedule.max_steps=30")
    assert proc.returncode == 0, proc.stderr
    head = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    assert head[:7] == [
        "# ovr-hpc check coldstart: passed",
        "# ranks            2 = data-parallel 2 x model-parallel 1",
        "# per step         8 rows of <= 512 tokens (<= 4,096 tokens, packed)",
        "# per rank         4 rows = accumulation 2 x micro-batch 2",
        "# steps            30 (schedule.max_steps)",
        f"# checkpoints      every 50 steps and at the end, newest 2 kept, in {tmp_path}/run/checkpoints",
        "# resume           none yet (a new run)",
    ]
    assert proc.stdout.startswith("# ovr-hpc check")
    cfg = load_config("coldstart", TINY_SFT, inputs(tmp_path) + ["parallel.micro_batch_size=2",
                                                                  "schedule.max_steps=30"])
    assert yaml.safe_load(proc.stdout) == to_dict(cfg)   # the summary is YAML comments: the output stays a config


def test_check_summary_rl(tmp_path):
    result = run_check("rl", TINY_RL, inputs(tmp_path, "rl"), preflight.Launch(ranks=2))
    lines = result.summary()
    assert lines[1] == "ranks            2 = data-parallel 2 x model-parallel 1"
    assert lines[2] == ("per step         16 prompts x 8 samples = 128 responses of <= 32 tokens at first (<= 69,632 "
                        "tokens with prompts); response lengths: 32 from step 0, 48 from step 20")
    assert lines[3] == "per rank         8 prompts (64 responses), micro-batches of <= 4096 tokens"


def test_config_module_imports_nothing_heavier_than_yaml():
    heavy = ("ovr_hpc.engines", "ovr_hpc.rollout", "ovr_hpc.models", "ovr_hpc.checkpoint", "ovr_hpc.preflight",
             "ovr_hpc.rl", "ovr_hpc.sft", "ovr_hpc.eval", "ovr_hpc.launch", "torch", "transformers")
    code = (f"import sys; import ovr_hpc.config; heavy = sorted(m for m in sys.modules if m.startswith({heavy!r})); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------- `ovr-hpc data check`


def test_data_check_hints_at_the_kind_and_names_a_missing_file(tmp_path):
    rl = fake_data(tmp_path, "rl")
    proc = cli("data", "check", rl, no_torch=False)
    assert proc.returncode == 1
    assert f"these look like rl records (problem / answer): check them with `ovr-hpc data check --kind rl {rl}`" \
        in proc.stderr
    missing = cli("data", "check", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in missing.stderr
