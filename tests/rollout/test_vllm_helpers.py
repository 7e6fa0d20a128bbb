"""The parts of the vLLM engine that need no vLLM: weight names, buckets, the availability check. (The
engine's settings from a config: test_build.py; the engine itself: tests/rollout/vllm/, in the CPU vLLM
venv.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ovr_hpc.models.loading import checkpoint_name
from ovr_hpc.rollout import vllm as V


@pytest.mark.parametrize("hf, expected", [
    ("model.language_model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.language_model.norm.weight", "model.norm.weight"),
    ("model.visual.blocks.1.attn.qkv.bias", "visual.blocks.1.attn.qkv.bias"),
    ("model.visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight"),
    ("lm_head.weight", "lm_head.weight"),
    # checkpoint form passes through
    ("model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),
    ("visual.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
])
def test_weight_names(hf, expected):
    assert checkpoint_name(hf) == expected


def test_weight_name_unknown():
    with pytest.raises(KeyError, match="not a Qwen2.5-VL parameter"):
        checkpoint_name("critic.value_head.weight")


def test_tiny_model_names_map_to_checkpoint_names(tiny_model_dir):
    """Every in-memory name of the tiny model maps to a name in its saved checkpoint, one to one."""
    from safetensors import safe_open

    from ovr_hpc.models.loading import load_vlm

    model = load_vlm(tiny_model_dir)
    with safe_open(f"{tiny_model_dir}/model.safetensors", "pt") as f:
        on_disk = set(f.keys())
    mapped = [checkpoint_name(k) for k in model.state_dict()]
    assert len(set(mapped)) == len(mapped) and set(mapped) == on_disk


def test_buckets_bounded_lazy_and_complete():
    produced = []

    def source():
        for i in range(10):
            t = torch.full((256,), float(i))  # 1 KiB in float32
            produced.append(i)
            yield f"model.language_model.layers.{i}.mlp.up_proj.weight", t

    buckets = V.iter_buckets(source(), bucket_bytes=1536, dtype=torch.bfloat16, device="cpu")  # 512 B each
    first = next(buckets)
    assert len(first) == 3 and len(produced) == 4  # reads one tensor past a full bucket, no more
    rest = list(buckets)
    allb = [first] + rest
    assert all(sum(t.numel() * 2 for _, t in b) <= 1536 for b in allb)
    names = [n for b in allb for n, _ in b]
    assert names == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(10)]
    assert all(t.dtype == torch.bfloat16 and float(t[0]) == i for i, (_, t) in enumerate(x for b in allb for x in b))


def test_bucket_larger_tensor_alone():
    items = [("lm_head.weight", torch.zeros(1000)), ("model.norm.weight", torch.zeros(10))]
    buckets = list(V.iter_buckets(items, bucket_bytes=100, dtype=torch.float32, device="cpu"))
    assert [[n for n, _ in b] for b in buckets] == [["lm_head.weight"], ["model.norm.weight"]]


def test_check_without_vllm(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(V.VLLMUnavailableError, match="not installed.*rollout.engine: hf"):
        V.check_vllm_available(allow_cpu=False)


def test_check_cuda_build_on_cpu(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(V, "_installed", lambda dist: "0.33.0" if dist == "vllm" else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(V.VLLMUnavailableError, match="needs a CUDA GPU"):
        V.check_vllm_available(allow_cpu=False)
    with pytest.raises(V.VLLMUnavailableError, match="CUDA build"):
        V.check_vllm_available(allow_cpu=True)


def test_seed_mixing_is_deterministic_and_spread():
    seeds = {V._mix_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert V._mix_seed(3, 4) == V._mix_seed(3, 4) != V._mix_seed(4, 3)


def test_checked_weights_are_the_norm_weights(tiny_model_dir):
    """rollout.check_weights compares the RMSNorm weights (1-D, replicated, never repacked) of both towers."""
    from safetensors import safe_open

    with safe_open(f"{tiny_model_dir}/model.safetensors", "pt") as f:
        shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    checked = sorted(n for n in shapes if V.CHECKED_WEIGHTS.search(n))
    assert all(len(shapes[n]) == 1 for n in checked)
    assert "model.norm.weight" in checked and "visual.merger.ln_q.weight" in checked
    assert {n.rsplit(".", 2)[-2] for n in checked} == {"input_layernorm", "post_attention_layernorm", "norm", "norm1",
                                                        "norm2", "ln_q"}
    assert not any("proj" in n or "embed" in n or n.endswith(".bias") for n in checked)


def test_weight_checksum_is_exact():
    t = torch.linspace(-1, 1, 64)
    assert V.weight_checksum(t) == V.weight_checksum(t.clone())
    assert V.weight_checksum(t) != V.weight_checksum(torch.nextafter(t, t + 1))   # one ulp
    b = t.to(torch.bfloat16)
    assert V.weight_checksum(b) == V.weight_checksum(b.clone()) != V.weight_checksum(t)
