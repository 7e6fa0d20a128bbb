"""HF Qwen2.5-VL <-> megatron-core conversion and layout rules (plain torch, no megatron import)."""

from __future__ import annotations

import pytest
import torch

from ovr_hpc.buckets import size_bounded
from ovr_hpc.config import ConfigError
from ovr_hpc.engines.megatron.convert import (
    ConversionConfig,
    SafetensorsCheckpoint,
    canonical_hf_name,
    gate_up_from_mcore,
    iter_hf_to_mcore_shard,
    mcore_param_to_hf,
    not_a_parameter,
    qkv_from_mcore,
    qkv_to_mcore,
    tp_partition_dim,
)
from ovr_hpc.engines.megatron.layout import (
    TextDims,
    padded_vocab_size,
    pipeline_layer_split,
    validate_megatron_layout,
)

# ----------------------------------------------------------------------------- whole-model conversions
# (the package streams one parameter at a time; the tests compare whole state dicts built from those pieces)


def hf_to_mcore_shard(hf_tensors, config, tp_rank, tp_size, pp_rank, pp_size) -> dict[str, torch.Tensor]:
    """The megatron-core state dict of one (tp_rank, pp_rank)."""
    return dict(iter_hf_to_mcore_shard(hf_tensors, config, tp_rank, tp_size, pp_rank, pp_size))


def iter_mcore_to_hf(shards, config):
    """(HF name, full tensor) pairs, one megatron-core parameter at a time, from ``shards[pp][tp]`` (the
    state dict of each rank), as the engine's iter_full_params streams them."""
    pp_size = len(shards)
    for pp_rank, stage in enumerate(shards):
        for name in stage[0]:
            if not_a_parameter(name):
                continue
            pieces = [rank[name] for rank in stage]
            yield from mcore_param_to_hf(name, pieces, config, pp_rank, pp_size)


def mcore_shards_to_hf(shards, config) -> dict[str, torch.Tensor]:
    """The full HF state dict (language model + vision tower) from ``shards[pp][tp]``."""
    return dict(iter_mcore_to_hf(shards, config))


def iter_buckets(pairs, bucket_bytes):
    """(name, tensor) pairs in lists of at most `bucket_bytes` (a larger tensor alone), as the vLLM push
    and the HF export cut them."""
    return size_bounded(pairs, bucket_bytes, size=lambda pair: pair[1].numel() * pair[1].element_size())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real tiny Qwen2.5-VL: hidden 128, 4 heads / 2 KV heads (head_dim 32), 3 layers (uneven at PP 2)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovr_hpc.models.tiny import build_tiny_model

    path = build_tiny_model(
        tmp_path_factory.mktemp("mcore") / "model",
        seed=0,
        hidden_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        vocab_size=1024,
    )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path))
    return str(path), model


def _shards(hf, config, tp, pp):
    return [[hf_to_mcore_shard(hf, config, t, tp, p, pp) for t in range(tp)] for p in range(pp)]


def _synthetic(dims: TextDims, layers: int = 1) -> dict[str, torch.Tensor]:
    """An HF language-model state dict whose rows are numbered, so layouts can be written out by hand."""
    hd, h = dims.head_dim, dims.hidden_size
    sd = {}

    def rows(n, base, cols=h):
        return (torch.arange(n, dtype=torch.float32) + base)[:, None].repeat(1, cols)

    sd["model.language_model.embed_tokens.weight"] = rows(dims.vocab_size, 0)
    sd["lm_head.weight"] = rows(dims.vocab_size, 500)
    sd["model.language_model.norm.weight"] = torch.ones(h)
    for i in range(layers):
        p = f"model.language_model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rows(dims.num_heads * hd, 0)
        sd[p + "self_attn.k_proj.weight"] = rows(dims.num_kv_heads * hd, 100)
        sd[p + "self_attn.v_proj.weight"] = rows(dims.num_kv_heads * hd, 200)
        sd[p + "self_attn.q_proj.bias"] = torch.arange(dims.num_heads * hd, dtype=torch.float32)
        sd[p + "self_attn.k_proj.bias"] = torch.arange(dims.num_kv_heads * hd, dtype=torch.float32) + 100
        sd[p + "self_attn.v_proj.bias"] = torch.arange(dims.num_kv_heads * hd, dtype=torch.float32) + 200
        sd[p + "self_attn.o_proj.weight"] = torch.arange(dims.num_heads * hd, dtype=torch.float32)[None].repeat(h, 1)
        sd[p + "mlp.gate_proj.weight"] = rows(dims.ffn_hidden_size, 0)
        sd[p + "mlp.up_proj.weight"] = rows(dims.ffn_hidden_size, 10)
        sd[p + "mlp.down_proj.weight"] = torch.arange(dims.ffn_hidden_size, dtype=torch.float32)[None].repeat(h, 1)
        sd[p + "input_layernorm.weight"] = torch.full((h,), 2.0)
        sd[p + "post_attention_layernorm.weight"] = torch.full((h,), 3.0)
    return sd


HAND = TextDims(hidden_size=8, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2, ffn_hidden_size=4, vocab_size=6)

# ----------------------------------------------------------------------------- round trips on a real model


@pytest.mark.parametrize("norm_scheme", ["local", "te"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_round_trip_exact(tiny, tp, pp, norm_scheme):
    _, model = tiny
    hf = model.state_dict()
    config = ConversionConfig.from_hf_config(model.config, norm_scheme=norm_scheme)
    assert config.dims == TextDims(128, 3, 4, 2, 32, 256, 1024, tie_word_embeddings=False)
    shards = _shards(hf, config, tp, pp)

    back = mcore_shards_to_hf(shards, config)
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert torch.equal(back[name], t), name

    # the shape of each rank's state dict
    split = config.split(pp)
    assert split.layers_per_stage == ((3,) if pp == 1 else (2, 1))
    for p, stage in enumerate(shards):
        for t, sd in enumerate(stage):
            assert any(k.startswith("model.visual.") for k in sd) == (p == 0)
            assert ("embedding.word_embeddings.weight" in sd) == (p == 0)
            assert ("output_layer.weight" in sd) == ("decoder.final_layernorm.weight" in sd) == (p == pp - 1)
            n = split.layers_per_stage[p]
            assert {int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")} == set(range(n))
            norms = {k.split(".", 3)[3] for k in sd if k.startswith("decoder.layers.0.") and "norm" in k}
            assert norms == (
                {"input_layernorm.weight", "pre_mlp_layernorm.weight"}
                if norm_scheme == "local"
                else {"self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"}
            )
            if n:
                assert sd["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 32 // tp, 128)
                assert sd["decoder.layers.0.self_attention.linear_qkv.bias"].shape == ((4 + 2 * 2) * 32 // tp,)
                assert sd["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 256 // tp, 128)
                assert sd["decoder.layers.0.mlp.linear_fc2.weight"].shape == (128, 256 // tp)
                assert sd["decoder.layers.0.self_attention.linear_proj.weight"].shape == (128, 128 // tp)


def test_te_extra_state_is_skipped(tiny):
    _, model = tiny
    hf = model.state_dict()
    config = ConversionConfig.from_hf_config(model.config, norm_scheme="te")
    shards = _shards(hf, config, 1, 1)
    shards[0][0]["decoder.layers.0.self_attention.linear_qkv._extra_state"] = torch.zeros(0)
    shards[0][0]["rotary_pos_emb.inv_freq"] = torch.ones(16)
    assert set(mcore_shards_to_hf(shards, config)) == set(hf)


def test_grouped_qkv_reproduces_hf_projections(tiny):
    """Per TP rank: x @ linear_qkv^T + b, un-grouped with the local group count, equals the rank's rows of
    HF's q_proj(x), k_proj(x), v_proj(x)."""
    _, model = tiny
    config = ConversionConfig.from_hf_config(model.config)
    attn = model.model.language_model.layers[1].self_attn
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q_ref, k_ref, v_ref = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    hf = model.state_dict()
    tp = 2
    for t in range(tp):
        sd = hf_to_mcore_shard(hf, config, t, tp, 0, 1)
        w, b = sd["decoder.layers.1.self_attention.linear_qkv.weight"], sd["decoder.layers.1.self_attention.linear_qkv.bias"]
        y = x @ w.T + b
        q, k, v = qkv_from_mcore(y.T, 2 // tp, 2, 32)  # rows = output features
        torch.testing.assert_close(q.T, q_ref[:, t * 64 : (t + 1) * 64], rtol=0, atol=1e-6)
        torch.testing.assert_close(k.T, k_ref[:, t * 32 : (t + 1) * 32], rtol=0, atol=1e-6)
        torch.testing.assert_close(v.T, v_ref[:, t * 32 : (t + 1) * 32], rtol=0, atol=1e-6)


def test_tp_mlp_and_attention_output_reproduce_hf(tiny):
    """At TP 2: each rank's silu(gate_r x) * (up_r x) from its fc1 shard, through its fc2 columns, summed
    over ranks (the row-parallel all-reduce) equals HF's MLP; same for o_proj from linear_proj pieces."""
    _, model = tiny
    config = ConversionConfig.from_hf_config(model.config)
    layer = model.model.language_model.layers[2]
    hf = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 128, generator=gen)
    a = torch.randn(5, 128, generator=gen)  # attention output before o_proj (4 heads x 32)
    with torch.no_grad():
        mlp_ref, o_ref = layer.mlp(x), layer.self_attn.o_proj(a)
    tp = 2
    shards = _shards(hf, config, tp, 2)
    mlp = sum(
        (torch.nn.functional.silu(g) * u) @ sd["decoder.layers.0.mlp.linear_fc2.weight"].T
        for sd in shards[1]
        for g, u in [(x @ sd["decoder.layers.0.mlp.linear_fc1.weight"].T).chunk(2, dim=-1)]
    )
    torch.testing.assert_close(mlp, mlp_ref, rtol=1e-5, atol=1e-6)
    o = sum(a[:, t * 64 : (t + 1) * 64] @ sd["decoder.layers.0.self_attention.linear_proj.weight"].T for t, sd in enumerate(shards[1]))
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)


def test_iter_variant_matches(tiny):
    _, model = tiny
    hf = model.state_dict()
    config = ConversionConfig.from_hf_config(model.config, norm_scheme="te")
    pairs = list(iter_hf_to_mcore_shard(hf, config, 1, 2, 1, 2))
    full = hf_to_mcore_shard(hf, config, 1, 2, 1, 2)
    assert [n for n, _ in pairs] == list(full) and all(torch.equal(t, full[n]) for n, t in pairs)


def test_checkpoint_names_and_slice_reading(tiny):
    """From the safetensors file (checkpoint names: model.layers..., visual...): each rank reads only its
    own slices, and the round trip with hf_naming='checkpoint' gives back the file exactly."""
    from safetensors.torch import load_file

    path, model = tiny
    on_disk = load_file(f"{path}/model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in on_disk and "visual.merger.mlp.0.weight" in on_disk
    config = ConversionConfig.from_hf_config(model.config, hf_naming="checkpoint")
    tp, pp = 2, 2
    shards = [[None] * tp for _ in range(pp)]
    total_read = 0
    for p in range(pp):
        for t in range(tp):
            with SafetensorsCheckpoint(path) as ckpt:
                sd = shards[p][t] = hf_to_mcore_shard(ckpt, config, t, tp, p, pp)
                # nothing read beyond what the rank keeps (no padding here)
                assert ckpt.elements_read == sum(v.numel() for v in sd.values())
                total_read += ckpt.elements_read
                reads = dict(ckpt.reads)
                assert any(n.startswith("visual.") for n in reads) == (p == 0)
                assert ("model.embed_tokens.weight" in reads) == (p == 0)
                assert ("lm_head.weight" in reads) == (p == 1)
                if p == 0:
                    assert reads["model.embed_tokens.weight"] == (512, 128)  # its half of the vocabulary
                    assert reads["model.layers.0.self_attn.q_proj.weight"] == (64, 128)
                    assert reads["model.layers.0.self_attn.k_proj.weight"] == (32, 128)
                    assert reads["model.layers.0.self_attn.q_proj.bias"] == (64,)
                    assert reads["model.layers.0.mlp.gate_proj.weight"] == (128, 128)
                    assert reads["model.layers.0.mlp.down_proj.weight"] == (128, 128)  # its input columns
                    assert reads["model.layers.0.self_attn.o_proj.weight"] == (128, 64)
                    assert "model.layers.2.self_attn.q_proj.weight" not in reads  # layer 2 is on stage 1
                else:
                    assert [n for n in reads if n.startswith("model.layers.")] == [
                        n for n in reads if n.startswith("model.layers.2.")
                    ]
    # over the TP x PP grid each element is read once, replicated ones (norms, vision tower) once per TP rank
    replicated = [n for n in on_disk if n.startswith("visual.") or "norm" in n]
    assert total_read == sum(t.numel() for t in on_disk.values()) + (tp - 1) * sum(on_disk[n].numel() for n in replicated)
    assert mcore_shards_to_hf(shards, config).keys() == on_disk.keys()
    for name, t in mcore_shards_to_hf(shards, config).items():
        assert torch.equal(t, on_disk[name]), name
    # the same shards convert back to in-memory names too
    mem = mcore_shards_to_hf(shards, ConversionConfig.from_hf_config(model.config))
    assert set(mem) == set(model.state_dict())


def test_sharded_checkpoint_with_padding(tiny, tmp_path):
    """A checkpoint split over two files with an index; a padded vocabulary (1024 -> 1026 at TP 2): the
    last rank reads its 511 real rows and adds 2 zero rows; the round trip drops them again."""
    import json

    from safetensors.torch import load_file, save_file

    path, model = tiny
    on_disk = load_file(f"{path}/model.safetensors")
    names = sorted(on_disk)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: on_disk[n] for n in part}, str(tmp_path / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    config = ConversionConfig.from_hf_config(model.config, hf_naming="checkpoint", make_vocab_size_divisible_by=3)
    assert config.padded_vocab(2) == 1026
    shards = [[None, None] for _ in range(2)]
    for p in range(2):
        for t in range(2):
            with SafetensorsCheckpoint(str(tmp_path)) as ckpt:
                assert len(ckpt.files) == 2 and len(ckpt) == len(on_disk)
                shards[p][t] = hf_to_mcore_shard(ckpt, config, t, 2, p, 2)
                reads = dict(ckpt.reads)
            if (p, t) == (0, 1):
                assert reads["model.embed_tokens.weight"] == (511, 128)
                emb = shards[p][t]["embedding.word_embeddings.weight"]
                assert emb.shape == (513, 128) and emb[-2:].abs().sum() == 0
                assert torch.equal(emb[:511], on_disk["model.embed_tokens.weight"][513:])
            if (p, t) == (1, 1):
                assert shards[p][t]["output_layer.weight"].shape == (513, 128)
    back = mcore_shards_to_hf(shards, config)
    assert back.keys() == on_disk.keys() and all(torch.equal(back[n], on_disk[n]) for n in on_disk)


def test_canonical_names():
    assert canonical_hf_name("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical_hf_name("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert canonical_hf_name("model.norm.weight") == "model.language_model.norm.weight"
    assert canonical_hf_name("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert canonical_hf_name("model.visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"
    assert canonical_hf_name("lm_head.weight") == "lm_head.weight"


# ----------------------------------------------------------------------------- hand-written layouts


def test_qkv_grouping_hand_example():
    """4 query heads, 2 KV heads, head_dim 2. q rows 0..7 (head h = rows 2h, 2h+1), k rows 100..103,
    v rows 200..203. Group 0 = q heads 0, 1 + k head 0 + v head 0; group 1 = q heads 2, 3 + k 1 + v 1."""
    config = ConversionConfig(HAND)
    hf = _synthetic(HAND)
    expected_full = [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    full = hf_to_mcore_shard(hf, config, 0, 1, 0, 1)
    assert full["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist() == expected_full
    assert full["decoder.layers.0.self_attention.linear_qkv.weight"][:, 7].tolist() == expected_full
    assert full["decoder.layers.0.self_attention.linear_qkv.bias"].tolist() == expected_full
    # TP 2: each rank holds one whole group
    for t in range(2):
        sd = hf_to_mcore_shard(hf, config, t, 2, 0, 1)
        assert sd["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist() == expected_full[8 * t : 8 * t + 8]
        assert sd["decoder.layers.0.self_attention.linear_qkv.bias"].tolist() == expected_full[8 * t : 8 * t + 8]
        # row-parallel linear_proj: its half of o_proj's input columns (q features 4t .. 4t+3)
        assert sd["decoder.layers.0.self_attention.linear_proj.weight"][0].tolist() == list(range(4 * t, 4 * t + 4))
    # the pure functions, and their inverse
    q, k, v = (hf[f"model.language_model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    fused = qkv_to_mcore(q, k, v, 2, 2)
    assert fused[:, 0].tolist() == expected_full
    for a, b in zip(qkv_from_mcore(fused, 2, 2, 2), (q, k, v)):
        assert torch.equal(a, b)


def test_gate_up_per_rank_hand_example():
    """ffn 4: gate rows 0..3, up rows 10..13. TP 2: rank 0's fc1 = [gate 0, 1; up 10, 11], rank 1's =
    [gate 2, 3; up 12, 13]; TP 1: [gate; up]; row-parallel fc2 splits down_proj's input columns."""
    config = ConversionConfig(HAND)
    hf = _synthetic(HAND)
    full = hf_to_mcore_shard(hf, config, 0, 1, 0, 1)
    assert full["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    pieces = []
    for t, expected in enumerate([[0, 1, 10, 11], [2, 3, 12, 13]]):
        sd = hf_to_mcore_shard(hf, config, t, 2, 0, 1)
        assert sd["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == expected
        assert sd["decoder.layers.0.mlp.linear_fc2.weight"][0].tolist() == [2 * t, 2 * t + 1]
        pieces.append(sd["decoder.layers.0.mlp.linear_fc1.weight"])
    gate, up = gate_up_from_mcore(pieces)
    assert gate[:, 0].tolist() == [0, 1, 2, 3] and up[:, 0].tolist() == [10, 11, 12, 13]


def test_vocab_split_and_padding():
    """vocab 6 at TP 4 pads to 8: ranks hold rows [0,1], [2,3], [4,5], [pad, pad]; back to HF drops it."""
    assert ConversionConfig(HAND).padded_vocab(4) == 8
    dims4 = TextDims(hidden_size=8, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=2, ffn_hidden_size=4, vocab_size=6)
    config4 = ConversionConfig(dims4)
    hf4 = _synthetic(dims4)
    shards = [[hf_to_mcore_shard(hf4, config4, t, 4, 0, 1) for t in range(4)]]
    for t, expected in enumerate([[0, 1], [2, 3], [4, 5], [0, 0]]):
        assert shards[0][t]["embedding.word_embeddings.weight"][:, 0].tolist() == expected
    assert shards[0][3]["output_layer.weight"].abs().sum() == 0  # padded output rows are zeros
    assert shards[0][2]["output_layer.weight"][:, 0].tolist() == [504, 505]
    back = mcore_shards_to_hf(shards, config4)
    assert set(back) == set(hf4)
    for n, t in hf4.items():
        assert torch.equal(back[n], t), n
    # Megatron-LM's own padding rule, for comparison; Qwen's vocabularies need none at our default
    assert padded_vocab_size(152064, 8, 128) == 152576
    assert padded_vocab_size(152064, 8) == 152064 and padded_vocab_size(151936, 8) == 151936
    assert ConversionConfig(HAND, make_vocab_size_divisible_by=4).padded_vocab(2) == 8
    assert tp_partition_dim("embedding.word_embeddings.weight") == 0
    assert tp_partition_dim("decoder.layers.3.mlp.linear_fc2.weight") == 1
    assert tp_partition_dim("decoder.layers.3.self_attention.linear_qkv.bias") == 0
    assert tp_partition_dim("decoder.layers.3.pre_mlp_layernorm.weight") is None
    assert tp_partition_dim("model.visual.blocks.0.attn.qkv.weight") is None


def test_tied_embeddings():
    dims = TextDims(hidden_size=8, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=2, ffn_hidden_size=4,
                    vocab_size=6, tie_word_embeddings=True)
    config = ConversionConfig(dims)
    hf = _synthetic(dims, layers=2)
    del hf["lm_head.weight"]
    one = hf_to_mcore_shard(hf, config, 0, 1, 0, 1)
    assert "output_layer.weight" not in one  # megatron-core shares the embedding at PP 1
    shards = _shards(hf, config, 1, 2)
    assert torch.equal(shards[1][0]["output_layer.weight"], hf["model.language_model.embed_tokens.weight"])
    back = mcore_shards_to_hf(shards, config)
    assert set(back) == set(hf)


def test_unknown_and_missing_names():
    config = ConversionConfig(HAND)
    hf = _synthetic(HAND)
    with pytest.raises(ValueError, match="no megatron-core mapping"):
        hf_to_mcore_shard({**hf, "model.language_model.layers.0.self_attn.o_proj.bias": torch.zeros(8)}, config, 0, 1, 0, 1)
    del hf["model.language_model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="missing.*up_proj"):
        hf_to_mcore_shard(hf, config, 0, 1, 0, 1)


def test_streaming_buckets(tiny):
    _, model = tiny
    hf = model.state_dict()
    config = ConversionConfig.from_hf_config(model.config)
    shards = _shards(hf, config, 2, 2)
    limit = 200_000
    buckets = list(iter_buckets(iter_mcore_to_hf(shards, config), limit))
    assert len(buckets) > 1
    for b in buckets:
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= limit or len(b) == 1
    flat = [pair for b in buckets for pair in b]
    assert len(flat) == len(hf) and all(torch.equal(hf[n], t) for n, t in flat)


# ----------------------------------------------------------------------------- pipeline split + validation

QWEN25VL_7B = {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
               "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False}
QWEN25VL_32B = {"hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 64,
                "intermediate_size": 27648, "vocab_size": 152064, "tie_word_embeddings": False}
QWEN25VL_72B = {"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
                "intermediate_size": 29568, "vocab_size": 152064, "tie_word_embeddings": False}


def test_pipeline_split():
    assert pipeline_layer_split(28, 1).layers_per_stage == (28,)
    assert pipeline_layer_split(28, 4).layers_per_stage == (7, 7, 7, 7)
    assert pipeline_layer_split(28, 3).layers_per_stage == (9, 10, 9)
    assert pipeline_layer_split(80, 3).layers_per_stage == (27, 27, 26)
    assert pipeline_layer_split(3, 2).layers_per_stage == (2, 1)
    assert pipeline_layer_split(28, 8).layers_per_stage == (2, 4, 4, 4, 4, 4, 4, 2)
    s = pipeline_layer_split(28, 3)
    assert not s.even and "[9, 10, 9]" in s.describe()
    assert s.mcore_kwargs() == {"num_layers_in_first_pipeline_stage": 9, "num_layers_in_last_pipeline_stage": 9}
    assert list(s.stage_layers(1)) == list(range(9, 19))
    assert s.to_global(1, 0) == 9 and s.to_global(2, 8) == 27
    assert s.to_local(9) == (1, 0) and s.to_local(8) == (0, 8) and s.to_local(27) == (2, 8)
    with pytest.raises(IndexError):
        s.to_global(1, 10)
    assert pipeline_layer_split(80, 4, first_stage_layers=17, last_stage_layers=21).layers_per_stage == (17, 21, 21, 21)
    with pytest.raises(ConfigError):
        pipeline_layer_split(80, 4, first_stage_layers=17, last_stage_layers=20)
    with pytest.raises(ConfigError, match="exceeds"):
        pipeline_layer_split(2, 3)
    for n, pp in [(28, 3), (80, 3), (64, 5), (7, 6), (80, 7)]:
        s = pipeline_layer_split(n, pp)
        assert s.num_layers == n and min(s.layers_per_stage) >= 1
        assert len(set(s.layers_per_stage[1:-1])) <= 1  # expressible with first/last-stage counts


def test_validate_megatron_layout():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size \(8\) is rejected.*4 KV heads.*query groups.*TP must divide 4"):
        validate_megatron_layout(QWEN25VL_7B, tp=8, pp=1)
    assert validate_megatron_layout(QWEN25VL_7B, tp=2, pp=1, world_size=8).even
    assert validate_megatron_layout(QWEN25VL_7B, tp=4, pp=2, world_size=16).layers_per_stage == (14, 14)
    with pytest.raises(ConfigError, match="28 attention heads"):
        validate_megatron_layout(QWEN25VL_7B, tp=3, pp=1)
    with pytest.raises(ConfigError, match=r"world size 12 .*tensor_parallel_size \(2\) x parallel.pipeline_parallel_size \(4\) = 8"):
        validate_megatron_layout(QWEN25VL_7B, tp=2, pp=4, world_size=12)
    uneven = validate_megatron_layout(QWEN25VL_7B, tp=2, pp=3, world_size=6)
    assert "do not split evenly" in uneven.describe() and uneven.layers_per_stage == (9, 10, 9)
    assert validate_megatron_layout(QWEN25VL_32B, tp=8, pp=2, world_size=32).layers_per_stage == (32, 32)
    assert validate_megatron_layout(QWEN25VL_72B, tp=8, pp=4, world_size=64).layers_per_stage == (20,) * 4
    with pytest.raises(ConfigError, match=r"pipeline_parallel_size \(29\).*exceeds the model's 28 layers"):
        validate_megatron_layout(QWEN25VL_7B, tp=1, pp=29)
    with pytest.raises(ConfigError, match="tp_size"):
        validate_megatron_layout(QWEN25VL_7B, tp=8, pp=1, tp_key="tp_size")
    # the merged config.json form (top level + text_config) works as well
    nested = {"tie_word_embeddings": False, "text_config": dict(QWEN25VL_7B)}
    assert TextDims.from_hf_config(nested) == TextDims.from_hf_config(QWEN25VL_7B)
    assert TextDims.from_hf_config(QWEN25VL_7B).head_dim == 128


def test_layout_module_has_no_torch_or_megatron_import():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    code = (
        "import sys; import ovr_hpc.engines.megatron.layout; "
        "assert 'torch' not in sys.modules, 'torch'; assert not any(m.startswith('megatron') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    for f in (root / "ovr_hpc" / "engines" / "megatron" / n for n in ("__init__.py", "convert.py", "layout.py")):
        assert "import megatron" not in f.read_text() and "from megatron" not in f.read_text(), f
