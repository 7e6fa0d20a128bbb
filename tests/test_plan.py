"""`ovr-hpc plan`: the arithmetic against hand computations, and against what the tiny model holds on the CPU."""

import math

import pytest

from ovr_hpc import plan as P
from ovr_hpc.cli import main
from ovr_hpc.models.sizes import KNOWN_ARCHITECTURES

Q7 = P.Shapes.from_config(KNOWN_ARCHITECTURES["Qwen/Qwen2.5-VL-7B-Instruct"])
CONFIGS = [f"configs/qwen25vl_{size}/{stage}.yaml" for size in ("7b", "32b", "72b") for stage in ("coldstart", "rl")]
H100 = ["--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100"]


# ----------------------------------------------------------------------------- hand computations


def test_7b_parameter_count_by_hand():
    h, kv, inter, vocab, layers = 3584, 4 * 128, 18944, 152064, 28
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    text = vocab * h + layers * layer + h + vocab * h
    vh, vi = 1280, 3420
    block = 2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + (2 * (vh * vi + vi) + vi * vh + vh)
    vision = 3 * 2 * 14 * 14 * vh + 32 * block + vh + (4 * vh) ** 2 + 4 * vh + 4 * vh * h + h
    assert P.text_params(Q7) == text
    assert P.vision_params(Q7) == vision
    assert P.total_params(Q7) == text + vision == 8_292_166_656   # the released checkpoint's parameter count


@pytest.mark.parametrize("hub", list(KNOWN_ARCHITECTURES))
def test_parameter_count_equals_the_transformers_model(hub):
    """The table's sizes built as a Qwen2.5-VL on the meta device (no memory): numel == the plan's count."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    entry = dict(KNOWN_ARCHITECTURES[hub])
    vision = entry.pop("vision_config")
    tied = entry.pop("tie_word_embeddings", False)
    config = Qwen2_5_VLConfig(text_config=entry, vision_config=vision, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    shapes = P.Shapes.from_config(KNOWN_ARCHITECTURES[hub])
    assert sum(p.numel() for p in model.parameters()) == P.total_params(shapes)
    assert sum(p.numel() for p in model.model.visual.parameters()) == P.vision_params(shapes)


def test_7b_zero3_on_64_gpus_by_hand():
    n = 8_292_166_656
    frozen = P.vision_params(Q7)
    params = P.rank_params(Q7, "deepspeed", freeze_vision=True)
    assert (params.total, params.trainable) == (n, n - frozen)
    st = P.model_state_bytes(params, "deepspeed", "bfloat16", zero_stage=3, dp=64)
    assert st == {"params": 2 * n / 64, "grads": 2 * (n - frozen) / 64, "optimizer": 12 * (n - frozen) / 64}
    assert round(st["params"] / 1e6) == 259                   # MB of bf16 weights per GPU
    z1 = P.model_state_bytes(params, "deepspeed", "bfloat16", zero_stage=1, dp=64)
    assert z1["params"] == 2 * n and z1["grads"] == 2 * (n - frozen) and z1["optimizer"] == 12 * (n - frozen) / 64
    z2 = P.model_state_bytes(params, "deepspeed", "bfloat16", zero_stage=2, dp=64)
    assert z2["params"] == 2 * n and z2["grads"] == 2 * (n - frozen) / 64


def test_kv_cache_per_token_by_hand():
    assert P.kv_bytes_per_token(Q7) == 2 * 28 * 4 * 128 * 2 == 57344
    assert P.kv_bytes_per_token(Q7, tp=2) == 57344 // 2
    assert P.kv_bytes_per_token(Q7, tp=8) == 57344 // 4        # TP beyond the 4 KV heads replicates them
    q72 = P.Shapes.from_config(KNOWN_ARCHITECTURES["Qwen/Qwen2.5-VL-72B-Instruct"])
    assert P.kv_bytes_per_token(q72, tp=8) == 2 * 80 * 1 * 128 * 2


def test_megatron_72b_tp8_pp4_by_hand():
    q72 = P.Shapes.from_config(KNOWN_ARCHITECTURES["Qwen/Qwen2.5-VL-72B-Instruct"])
    layer = P.decoder_layer_params(q72)
    first = 20 * layer / 8 + 152064 * 8192 / 8 + P.vision_params(q72)
    assert P.rank_params(q72, "megatron", tp=8, pp=4).total == int(first)
    st = P.model_state_bytes(P.rank_params(q72, "megatron", tp=8, pp=4), "megatron", "bfloat16", 3, dp=2)
    assert st["params"] == 4 * int(first) and st["optimizer"] == 8 * int(first) / 2


def test_activation_formula_by_hand():
    per_token = 2 * 8 * 3584 + 4 * 3584 + 4 * 512 + 8 * 18944 + 8 + 4 * 28      # bf16
    assert P.layer_activation_bytes_per_token(Q7) == per_token == 225_400
    t = 65536
    with_ckpt = t * (28 * 2 * 3584 + per_token + 8 * 18944)
    without = t * (28 * per_token + 8 * 18944)
    assert P.activation_bytes(Q7, t, 28, checkpointing=True) == with_ckpt
    assert P.activation_bytes(Q7, t, 28, checkpointing=False) == without


# ----------------------------------------------------------------------------- the reports


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_configs_give_a_report(config, capsys):
    rc = main(["plan", config, *H100])
    out = capsys.readouterr().out
    for line in ("model ", "layout ", "activations ", "memory ", "disk ", "verdict ", "assumptions"):
        assert line in out
    if config.endswith("rl.yaml"):
        assert out.count("stage ") >= 3 and "KV for" in out and "critic optimizer" in out
    assert rc == (1 if "72b/rl" in config else 0), out


def test_7b_recipe_fits_on_8x8_h100():
    stage, cfg = P.load_plan_config("configs/qwen25vl_7b/rl.yaml")
    shapes, _ = P.resolve_shapes(cfg.model.path, "configs/qwen25vl_7b/rl.yaml")
    plan = P.make_plan(stage, cfg, shapes, 8, 8, P.GPUS["h100"])
    assert plan.fits and [p.name for p in plan.phases] == ["generation", "training"]
    assert plan.values["kv_bytes_per_token"] == 57344
    first = plan.values["stages"][0]
    assert first["kv_needed"] == 128 * (8192 + 24576) * 57344
    assert first["room"] == int(plan.values["kv_space"] // ((8192 + 24576) * 57344))


def test_what_to_change_first(capsys):
    rc = main(["plan", "configs/qwen25vl_7b/coldstart.yaml", "model.gradient_checkpointing=false", *H100])
    out = capsys.readouterr().out
    assert rc == 1 and "does not fit: first change model.gradient_checkpointing=true" in out
    rc = main(["plan", "configs/qwen25vl_72b/rl.yaml", *H100])
    assert rc == 1 and "first change parallel.pipeline_parallel_size=8" in capsys.readouterr().out
    assert main(["plan", "configs/qwen25vl_72b/rl.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h200"]) == 0
    capsys.readouterr()
    rc = main(["plan", "configs/qwen25vl_7b/rl.yaml", "rollout.gpu_memory_utilization=0.95", *H100])
    out = capsys.readouterr().out
    assert rc == 1 and "first change rollout.gpu_memory_utilization=0." in out


def test_unknown_gpu_and_model_are_named(capsys):
    assert main(["plan", "configs/qwen25vl_7b/coldstart.yaml", "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu", "v100"]) == 2
    assert "--gpu v100: expected one of a100, h100, h200, b200" in capsys.readouterr().err
    assert main(["plan", "configs/tiny/coldstart.yaml", "model.path=nowhere", "--nodes", "1", "--gpus-per-node",
                 "2", "--gpu", "h100"]) == 2
    assert "give --model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- measured on the tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ovr_hpc.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_heads=4, num_kv_heads=2, hidden_size=128,
                            intermediate_size=192, num_layers=3)


def _load(path, dtype="float32"):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa",
                                                             dtype=getattr(torch, dtype))


def _tiny_shapes(path):
    import json

    with open(path / "config.json") as f:
        return P.Shapes.from_config(json.load(f))


def test_tiny_params_grads_and_adamw_states_as_measured(tiny_dir):
    """One AdamW step on the tiny model (float32, vision frozen as the cold start has it): the bytes of its
    parameters, gradients and optimizer states, from the tensors' sizes, equal the plan's."""
    import torch

    model = _load(tiny_dir)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-3)
    ids = torch.randint(0, 1000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = {
        "params": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in trained),
        "optimizer": sum(t.numel() * t.element_size() for s in opt.state.values()
                         for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")),
    }
    shapes = _tiny_shapes(tiny_dir)
    planned = P.model_state_bytes(P.rank_params(shapes, "deepspeed", freeze_vision=True), "deepspeed", "float32",
                                  zero_stage=1, dp=1)
    assert measured == planned


def _saved_bytes(model, ids, checkpointing):
    """Bytes of the distinct storages autograd saves for backward in a decoder forward (parameters excluded)."""
    import torch

    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.language_model(input_ids=ids)
    return sum(b for ptr, b in seen.items() if ptr not in params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_activations_as_measured(tiny_dir, dtype):
    """Saved-tensor accounting of the Hugging Face decoder (SDPA, one causal sequence) against the plan's
    per-layer formula: the difference between 3 layers and 1 layer isolates the layers; exact to a few bytes
    per token (the final norm, rotary tables and position ids are outside the layers)."""
    shapes = _tiny_shapes(tiny_dir)
    e = P.DTYPE_BYTES[dtype]
    import torch

    ids = torch.randint(0, 1000, (1, 512))
    full = _saved_bytes(_load(tiny_dir, dtype), ids, checkpointing=False)
    ckpt = _saved_bytes(_load(tiny_dir, dtype), ids, checkpointing=True)
    layers = shapes.layers
    per_layer = P.layer_activation_bytes_per_token(shapes, e)
    outside = full / 512 - layers * per_layer        # final norm (4 + 2e) x hidden + rotary tables, small
    assert 0 <= outside <= (4 + 2 * e) * shapes.hidden + 4 * shapes.head_dim * e + 64, (full / 512, per_layer)
    kept = ckpt / 512 - layers * e * shapes.hidden
    assert 0 <= kept <= (4 + 2 * e) * shapes.hidden + 4 * shapes.head_dim * e + 64, (ckpt / 512,)


def test_tiny_kv_cache_as_measured(tiny_dir):
    import torch

    model = _load(tiny_dir).eval()
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    measured = sum(t.numel() * t.element_size() for t in tensors) / 40
    assert measured == P.kv_bytes_per_token(_tiny_shapes(tiny_dir), dtype_bytes=4)


# ----------------------------------------------------------------------------- the long tail (bench/rollout_tail.py)


def test_fifo_decode_steps_by_hand():
    # 2 slots: 5 | 3 -> the 3rd (4) starts at 3 in slot 2 (ends 7), the 4th (1) at 5 in slot 1 (ends 6)
    assert P.fifo_decode_steps([5, 3, 4, 1], 2) == 7
    assert P.fifo_decode_steps([5, 3, 4, 1], 4) == 5      # all at once: the longest
    assert P.fifo_decode_steps([5, 3, 4, 1], 1) == 13     # one at a time: the sum
    assert P.fifo_decode_steps([1, 1, 1, 9], 3) == 10     # a long one admitted late ends the step late
    assert P.fifo_decode_steps([], 4) == 0
    # intervals [0,5) [0,3) [3,7) [5,6): two decoding until step 6, then one
    assert P.fifo_decode_profile([5, 3, 4, 1], 2) == [(6, 2), (1, 1)]
    assert P.fifo_decode_profile([1, 1, 1, 9], 3) == [(1, 3), (9, 1)]


def test_partial_decode_steps_by_hand():
    # budget 2, one slot: step 0 gets [3, 1] -> requests [2, 1]: 3 token steps, the 1 finishes;
    # step 1 gets [2]: the carried 3 (2 done) first -> requests [1, 2]: 3 steps, both finish
    s0, s1 = P.partial_decode_steps([[3, 1], [2]], slots=1, budget=2)
    assert (sum(n for n, _ in s0.profile), s0.finished, s0.continued, s0.prefix_tokens, s0.staleness) == (3, 1, 0, 0, [0])
    assert (sum(n for n, _ in s1.profile), s1.finished, s1.continued, s1.prefix_tokens, s1.staleness) == (3, 2, 1, 2, [1, 0])
    # a budget at the cap is the synchronous step
    lengths = [[7, 2, 5], [1, 6, 3]]
    assert [s.profile for s in P.partial_decode_steps(lengths, 2, 7)] == [P.fifo_decode_profile(n, 2) for n in lengths]
