"""`ovr-hpc average`: streamed, fp32-accumulated weight averaging; the keep_every policy that keeps its inputs."""

import gc
import json
import os
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ovr_hpc import average as avg
from ovr_hpc.checkpoint import COMPLETE, WEIGHTS_ONLY, WEIGHTS_ONLY_KEEPS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models built once: fp32 seeds 0-2, bf16 seeds 0-2, tied seeds 0-1, one with another depth."""
    from ovr_hpc.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("avg_models")
    out = {}
    for seed in range(3):
        out[f"f32_{seed}"] = str(build_tiny_model(root / f"f32_{seed}", seed=seed))
        out[f"bf16_{seed}"] = str(build_tiny_model(root / f"bf16_{seed}", seed=seed, dtype="bfloat16"))
    for seed in range(2):
        out[f"tied_{seed}"] = str(build_tiny_model(root / f"tied_{seed}", seed=seed, tie_word_embeddings=True))
    out["deeper"] = str(build_tiny_model(root / "deeper", seed=0, num_layers=3))
    return out


def tensors(folder) -> dict:
    """Every tensor of a Hugging Face folder (single file or sharded)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def copy_of(model_dir, dest) -> str:
    shutil.copytree(model_dir, dest)
    return str(dest)


def checkpoint(run, step, model_dir, complete=True, engine=True) -> str:
    """A step_N folder as save_checkpoint leaves it: engine state, RNG file, train_state.json, config.yaml, hf/."""
    path = os.path.join(str(run), "checkpoints", f"step_{step}")
    os.makedirs(path)
    if model_dir is not None:
        shutil.copytree(model_dir, os.path.join(path, "hf"))
    if engine:
        os.makedirs(os.path.join(path, "policy", "engine"))
        with open(os.path.join(path, "policy", "engine", "optim_states.pt"), "w") as f:
            f.write("adam moments")
        os.makedirs(os.path.join(path, "policy.universal"))
        open(os.path.join(path, "rng_rank0.pt"), "w").close()
    with open(os.path.join(path, "train_state.json"), "w") as f:
        json.dump({"step": step}, f)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write("seed: 0\n")
    if complete:
        with open(os.path.join(path, COMPLETE), "w") as f:
            f.write(f"step {step}\n")
    return path


def run_average(paths, out, weights=None, steps=None, shard_bytes=avg.DEFAULT_SHARD_MB * 2**20) -> str:
    return avg.average(avg.resolve_inputs([str(p) for p in paths], steps), str(out), weights,
                       shard_bytes=shard_bytes, log=lambda m: None)


def cli(*args) -> int:
    from ovr_hpc.cli import main

    return main(["average", *map(str, args)])


# ----------------------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_the_average_of_identical_checkpoints_is_bitwise_the_input(models, tmp_path, weights):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    copies = [copy_of(models["bf16_0"], tmp_path / f"copy{i}") for i in range(3)]
    out = run_average(copies, tmp_path / "avg", weights, shard_bytes=300_000)   # several shards
    got, want = tensors(out), tensors(models["bf16_0"])
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    meta = json.load(open(os.path.join(out, avg.METADATA)))
    assert [i["path"] for i in meta["inputs"]] == copies and meta["dtype"] == "bfloat16"
    expected = [1 / 3] * 3 if weights is None else [1 / 8, 2 / 8, 5 / 8]
    assert [i["weight"] for i in meta["inputs"]] == pytest.approx(expected)
    assert all(i["weight_files"] == {"model.safetensors": os.path.getsize(os.path.join(models["bf16_0"],
                                                                                         "model.safetensors"))}
               and len(i["header_sha256"]) == 64 for i in meta["inputs"])
    assert not any(n.endswith(".partial") for n in os.listdir(tmp_path))


def _within_fp32_rounding(got, ref64, *inputs):
    """|got - ref| within a few fp32 ulps of the largest input (a running mean rounds at each of its steps)."""
    scale = torch.stack([x.double().abs() for x in inputs]).amax(0)
    return bool(((got.double() - ref64).abs() <= 4 * torch.finfo(torch.float32).eps * scale + 1e-45).all())


def test_the_average_of_two_known_checkpoints_is_their_mean_within_fp32_rounding(models, tmp_path):
    a, b = tensors(models["f32_0"]), tensors(models["f32_1"])
    mean = tensors(run_average([models["f32_0"], models["f32_1"]], tmp_path / "mean"))
    weighted = tensors(run_average([models["f32_0"], models["f32_1"]], tmp_path / "weighted", [1.0, 3.0]))
    for name in a:
        assert mean[name].dtype == torch.float32
        assert _within_fp32_rounding(mean[name], (a[name].double() + b[name].double()) / 2, a[name], b[name]), name
        ref = 0.25 * a[name].double() + 0.75 * b[name].double()
        assert _within_fp32_rounding(weighted[name], ref, a[name], b[name]), name
    assert not torch.equal(mean["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_bf16_inputs_stay_bf16_accumulated_in_fp32(models, tmp_path):
    paths = [models[f"bf16_{s}"] for s in range(3)]
    inputs = [tensors(p) for p in paths]
    out = run_average(paths, tmp_path / "avg", [1.0, 1.0, 2.0])
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    got = tensors(out)
    exact = total = 0
    for name in inputs[0]:
        assert got[name].dtype == torch.bfloat16, name
        ref = (inputs[0][name].double() + inputs[1][name].double() + 2 * inputs[2][name].double()) / 4
        rounded = ref.to(torch.bfloat16)
        # fp32 accumulation: at most one bf16 rounding step off the exact mean, almost always the same value
        ulp = (rounded.double().abs() * 2.0**-7).clamp_min(1e-30)
        assert ((got[name].double() - ref).abs() <= ulp).all(), name
        exact += int((got[name] == rounded).sum())
        total += rounded.numel()
    assert exact / total > 0.999


def test_tied_embeddings_stay_tied(models, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert "lm_head.weight" not in tensors(models["tied_0"])
    out = run_average([models["tied_0"], models["tied_1"]], tmp_path / "avg")
    got = tensors(out)
    assert "lm_head.weight" not in got
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.tie_word_embeddings
    embed = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert torch.equal(embed, got["model.embed_tokens.weight"])
    assert AutoProcessor.from_pretrained(out).tokenizer is not None


def test_a_head_saved_beside_tied_embeddings_is_left_out(models, tmp_path):
    """A tied input that does hold lm_head.weight (some writers keep it): the output is as the export writes it."""
    withhead = copy_of(models["tied_1"], tmp_path / "withhead")
    t = tensors(withhead)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, os.path.join(withhead, "model.safetensors"), metadata={"format": "pt"})
    assert "lm_head.weight" not in tensors(run_average([models["tied_0"], withhead], tmp_path / "avg"))


# ----------------------------------------------------------------------------------------- memory


def test_one_input_tensor_is_held_at_a_time(models, tmp_path, monkeypatch):
    """Streaming: when a tensor is read, no tensor read before it is alive any more (each is folded into the
    fp32 accumulator and dropped), so the inputs cost one tensor, not a model each."""
    alive, most, reads = [], [0], [0]
    real = avg.read_tensor

    def counting(handle, name):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        t = real(handle, name)
        alive.append(weakref.ref(t))
        reads[0] += 1
        return t

    monkeypatch.setattr(avg, "read_tensor", counting)
    paths = [models[f"f32_{s}"] for s in range(3)]
    out = run_average(paths, tmp_path / "avg", shard_bytes=100_000)
    assert reads[0] == 3 * len(tensors(out)) and most[0] == 0


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage a Python object still refers to (garbage collected first)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor):
                continue
            storage = obj.untyped_storage()
        except Exception:
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def test_memory_is_one_shard_and_a_tensor_not_a_model(models, tmp_path, monkeypatch):
    """A 24 MB model (24 tensors of 1 MB) averaged over 3 inputs into 4 MB shards: at every read, the tensors
    alive (the shard being filled, the accumulator) are a fraction of one model, whatever the input count."""
    name = "model.layers.{}.mlp.up_proj.weight"
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        folder = copy_of(models["f32_0"], tmp_path / f"m{i}")
        save_file({name.format(k): torch.randn(512, 512, generator=generator) + i for k in range(24)},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        paths.append(folder)
    model_bytes = 24 * 512 * 512 * 4
    gc.collect()
    baseline, peak = _live_tensor_bytes(), [0]
    real = avg.read_tensor

    def measuring(handle, tensor_name):
        peak[0] = max(peak[0], _live_tensor_bytes() - baseline)
        return real(handle, tensor_name)

    monkeypatch.setattr(avg, "read_tensor", measuring)
    out = run_average(paths, tmp_path / "avg", shard_bytes=4 * 2**20)
    assert 0 < peak[0] <= 4 * 2**20 + 2 * 2**20 < model_bytes / 2, (peak[0], model_bytes)  # shard + 2 tensors
    inputs = [tensors(p)[name.format(5)] for p in paths]
    ref = sum(x.double() for x in inputs) / 3
    assert _within_fp32_rounding(tensors(out)[name.format(5)], ref, *inputs)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) == 6


# ----------------------------------------------------------------------------------------- refusals


def test_another_architecture_is_refused_naming_the_input(models, tmp_path):
    with pytest.raises(avg.AverageError, match=r"deeper is another architecture than .*f32_0: its config.json "
                                                r"\(.*deeper\) has .*text_config.num_hidden_layers=3 \(not 2\)"):
        run_average([models["f32_0"], models["deeper"]], tmp_path / "out")
    with pytest.raises(avg.AverageError, match="tie_word_embeddings"):
        run_average([models["f32_0"], models["tied_0"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_dtype_shape_or_tensor_set_is_refused_naming_file_and_tensor(models, tmp_path):
    base = tensors(models["f32_0"])
    name = "model.layers.0.mlp.up_proj.weight"

    def variant(label, change):
        folder = copy_of(models["f32_1"], tmp_path / label)
        t = tensors(folder)
        change(t)
        save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder

    half = variant("half", lambda t: t.update({name: t[name].half()}))
    with pytest.raises(avg.AverageError, match=rf"half/model.safetensors \(.*half\): tensor {name} is F16 "
                                                r"\[128, 64\], in .*f32_0/model.safetensors it is F32 \[128, 64\]"):
        run_average([models["f32_0"], half], tmp_path / "out")
    wide = variant("wide", lambda t: t.update({name: torch.zeros(128, 65)}))
    with pytest.raises(avg.AverageError, match=rf"wide/model.safetensors .*tensor {name} is F32 \[128, 65\]"):
        run_average([models["f32_0"], wide], tmp_path / "out")
    fewer = variant("fewer", lambda t: t.pop(name))
    with pytest.raises(avg.AverageError, match=rf"fewer .* lacks 1 tensor\(s\) of .*f32_0 \({name}\)"):
        run_average([models["f32_0"], fewer], tmp_path / "out")
    assert len(base) and not (tmp_path / "out").exists()


def test_inputs_and_weights_are_checked(models, tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 2, models["f32_0"])
    checkpoint(run, 3, models["f32_1"], complete=False)
    with pytest.raises(avg.AverageError, match=r"step_3 is not a complete checkpoint .*complete ones in .*: step_2"):
        avg.resolve_inputs([str(run / "checkpoints" / "step_3")])
    with pytest.raises(avg.AverageError, match="step_3 is not a complete checkpoint"):
        avg.resolve_inputs([str(run / "checkpoints" / "step_3" / "hf")])
    with pytest.raises(avg.AverageError, match=r"is a training run: .*--steps A:B:S; complete ones: step_2"):
        avg.resolve_inputs([str(run)])
    with pytest.raises(avg.AverageError, match="the same weights"):
        avg.resolve_inputs([str(run / "checkpoints" / "step_2"), str(run / "checkpoints" / "step_2" / "hf")])
    with pytest.raises(FileNotFoundError, match="no such file"):
        avg.resolve_inputs([str(tmp_path / "nothing")])
    with pytest.raises(avg.AverageError, match="gives 1 weight"):
        avg.normalise_weights([1.0], 2)
    with pytest.raises(avg.AverageError, match="positive"):
        avg.normalise_weights([1.0, 0.0], 2)
    assert avg.normalise_weights([1, 3], 2) == [0.25, 0.75]
    assert avg.parse_steps("600:900:100") == [600, 700, 800, 900] and avg.parse_steps("4,8") == [4, 8]
    for bad in ("9:3:1", "1:5:0", "a:b"):
        with pytest.raises(avg.AverageError, match="--steps"):
            avg.parse_steps(bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError):
        run_average([models["f32_0"], models["f32_1"]], tmp_path / "full")


def test_steps_select_a_runs_checkpoints_and_the_command_names_them(models, tmp_path, capsys):
    run = tmp_path / "run"
    for step, model in ((2, "f32_0"), (4, "f32_1"), (6, "f32_2"), (8, "f32_0")):
        checkpoint(run, step, models[model])
    assert cli(run, "--steps", "4:8:2", "--out", tmp_path / "avg", "--weights", "1,1", "2") == 0
    printed = capsys.readouterr()
    assert f"input {run} step_4: {run}/checkpoints/step_4/hf (weight 0.25)" in printed.out
    assert f"wrote the average of 3 input(s) to {tmp_path / 'avg'}" in printed.out
    meta = json.load(open(tmp_path / "avg" / avg.METADATA))
    assert [(i["step"], i["checkpoint"]) for i in meta["inputs"]] == [
        (n, str(run / "checkpoints" / f"step_{n}")) for n in (4, 6, 8)]
    expected = tensors(run_average([run / "checkpoints" / f"step_{n}" for n in (4, 6, 8)], tmp_path / "by_name",
                                   [1, 1, 2]))
    got = tensors(tmp_path / "avg")
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    assert cli(run, "--steps", "4:8:1", "--out", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert f"--steps 4:8:1: {run} has no complete checkpoint step_5; complete ones: step_2, step_4, step_6, " \
           "step_8" in err and "Traceback" not in err
    assert cli(run, "--steps", "4:8:2", "--out", tmp_path / "bad", "--weights", "1", "2") == 2
    assert "gives 2 weight(s) for 3 input(s)" in capsys.readouterr().err
    assert cli(models["f32_0"], models["deeper"], "--out", tmp_path / "bad") == 2
    assert "another architecture" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_sbatch_script_runs_the_command_on_a_cpu_node(models, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    script = os.path.join(REPO, "slurm", "average.sh")
    header = [line for line in open(script) if line.startswith("#SBATCH")]
    assert any("--cpus-per-task=" in line for line in header) and not any("gpu" in line for line in header)
    env = {**os.environ, "OVR_PYTHON": sys.executable}
    done = subprocess.run(["bash", script, models["f32_0"], models["f32_1"], "--out", str(tmp_path / "avg")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "ovr-hpc average" in done.stdout and (tmp_path / "avg" / avg.METADATA).exists()
    refused = subprocess.run(["bash", script, models["f32_0"], "--out", str(tmp_path / "avg")], capture_output=True,
                             text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr


# ----------------------------------------------------------------------------------------- keep_every


def test_keep_every_keeps_weights_only_checkpoints_that_resume_skips_and_export_reads(models, tmp_path):
    from ovr_hpc.checkpoint import (export_hf, latest_checkpoint, prune_checkpoints, resolve_checkpoint,
                                    resume_checkpoint)
    from ovr_hpc.config import ConfigError, load_config
    from tests.test_preflight import TINY_SFT, inputs

    run = tmp_path / "run"
    root = run / "checkpoints"
    for step in range(1, 11):
        checkpoint(run, step, models["f32_0"] if step % 2 else models["f32_1"])
    shutil.rmtree(root / "step_6" / "hf")    # one saved with save_hf_weights=false
    assert prune_checkpoints(str(root), keep_last=2, keep_every=3, current=10) == ([1, 2, 4, 5, 7, 8], [3])
    assert sorted(os.listdir(root)) == ["step_10", "step_3", "step_6", "step_9"]
    assert sorted(os.listdir(root / "step_3")) == sorted(WEIGHTS_ONLY_KEEPS)
    assert (root / "step_6" / "policy").is_dir() and not (root / "step_6" / WEIGHTS_ONLY).exists()  # no hf/: whole
    assert (root / "step_9" / "policy").is_dir()         # still among the 2 newest
    # the next save (step 11 as the newest): 9 loses its engine state, 10 stays whole
    checkpoint(run, 11, models["f32_0"])
    assert prune_checkpoints(str(root), 2, 3, 11) == ([], [9])
    assert (root / "step_10" / "policy").is_dir() and not (root / "step_9" / "policy").exists()
    assert prune_checkpoints(str(root), 2, 3, 11) == ([], [])   # idempotent
    # the checkpoint just saved is never pruned, even when later (abandoned) ones exist
    assert prune_checkpoints(str(root), 1, 0, 10) == ([3, 6, 9], [])
    assert sorted(os.listdir(root)) == ["step_10", "step_11"]
    for step in (3, 6, 9):
        checkpoint(run, step, models["f32_0"])
    prune_checkpoints(str(root), 2, 3, 11)
    assert [os.path.exists(root / f"step_{s}" / WEIGHTS_ONLY) for s in (3, 6, 9)] == [True, True, True]

    # resume never picks a weights-only checkpoint; export and average read them
    os.symlink("step_9", root / "latest")
    shutil.rmtree(root / "step_10")
    shutil.rmtree(root / "step_11")
    assert latest_checkpoint(str(run)) is None
    checkpoint(run, 5, models["f32_1"])
    assert latest_checkpoint(str(run)) == str(root / "step_5")
    cfg = load_config("coldstart", TINY_SFT, inputs(tmp_path) + ["checkpoint.resume_from=step_9"])
    with pytest.raises(ConfigError, match=r"step_9 holds weights only .*resumable ones in .*: step_5"):
        resume_checkpoint(cfg)
    assert resolve_checkpoint(str(run), 9) == str(root / "step_9")
    export_hf(str(run), str(tmp_path / "exported"), step=9)
    assert torch.equal(tensors(tmp_path / "exported")["model.norm.weight"], tensors(models["f32_0"])["model.norm.weight"])
    out = run_average([run], tmp_path / "avg", steps="3:9:3")
    assert [i["step"] for i in json.load(open(os.path.join(out, avg.METADATA)))["inputs"]] == [3, 6, 9]


def test_keep_every_config_and_its_reading_from_the_run_config(tmp_path):
    from ovr_hpc.checkpoint import _keep_every_of
    from ovr_hpc.config import ConfigError, dump_config, load_config
    from tests.test_preflight import TINY_SFT, inputs

    base = inputs(tmp_path) + ["checkpoint.every_steps=50"]
    cfg = load_config("coldstart", TINY_SFT, base + ["checkpoint.keep_every=100"])
    assert cfg.checkpoint.keep_every == 100 and _keep_every_of(dump_config(cfg)) == 100
    assert load_config("coldstart", TINY_SFT, base).checkpoint.keep_every == 0
    assert _keep_every_of("seed: 0\n") == 0 and _keep_every_of(": not yaml: [") == 0
    for bad, message in (("checkpoint.keep_every=75", r"keep_every \(75\) must be a multiple of checkpoint.every_steps"),
                         ("checkpoint.keep_every=-1", "must be >= 0"),
                         ("checkpoint.save_hf_weights=false", "needs checkpoint.save_hf_weights=true")):
        extra = [bad] if "keep_every" in bad else [bad, "checkpoint.keep_every=100"]
        with pytest.raises(ConfigError, match=message):
            load_config("coldstart", TINY_SFT, base + extra)


@pytest.mark.slow
def test_a_tiny_cold_start_keeps_every_other_checkpoint_and_they_average(tiny_model_dir, arithmetic_file, tmp_path,
                                                                         monkeypatch):
    """A real run: every step saved, the 2 newest whole, steps 2 and 4 kept as weights only; resuming the finished
    run reads step_6; the kept steps average."""
    from ovr_hpc.sft.trainer import train
    from tests.sft.test_trainer import _cfg

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    if not torch.distributed.is_initialized():
        from ovr_hpc.local import free_port

        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "run"
    args = ("schedule.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=2", "checkpoint.keep_every=2")
    assert train(_cfg(tiny_model_dir, arithmetic_file, out, *args))["status"] == "completed"
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_2", "step_4", "step_5", "step_6"]
    for step in (2, 4):
        assert sorted(os.listdir(root / f"step_{step}")) == sorted(WEIGHTS_ONLY_KEEPS)
    assert (root / "step_5" / "policy").is_dir() and os.readlink(root / "latest") == "step_6"
    assert train(_cfg(tiny_model_dir, arithmetic_file, out, *args))["status"] == "completed"
    averaged = tensors(run_average([out], tmp_path / "avg", steps="2:6:2"))
    kept = [tensors(root / f"step_{s}" / "hf") for s in (2, 4, 6)]
    name = "model.layers.0.mlp.up_proj.weight"
    ref = sum(k[name].double() for k in kept) / 3
    assert _within_fp32_rounding(averaged[name], ref, *(k[name] for k in kept))
