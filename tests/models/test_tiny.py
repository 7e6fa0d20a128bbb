"""Tests for the tiny random-init Qwen2.5-VL checkpoint (ovr_hpc.models.tiny)."""

import json

import pytest
import torch
from PIL import Image

from ovr_hpc.models.tiny import DEFAULT_SYSTEM_MESSAGE, SPECIAL_TOKENS, build_tiny_model

transformers = pytest.importorskip("transformers")
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


def _image_chat(size=(56, 56), answer="A red square."):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", size, "red")},
                {"type": "text", "text": "What is shown?"},
            ],
        },
        {"role": "assistant", "content": answer},
    ]


# --------------------------------------------------------------------------------------------------------
# Files and config
# --------------------------------------------------------------------------------------------------------
def test_writes_hf_layout_and_consistent_config(tiny_dir, processor):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_dir / name).is_file(), name
    total = sum(f.stat().st_size for f in tiny_dir.iterdir())
    assert total < 5_000_000

    cfg = json.loads((tiny_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert text["hidden_size"] // text["num_attention_heads"] == 32
    assert sum(text["rope_parameters"]["mrope_section"]) == 16
    assert text["rope_parameters"]["rope_theta"] == 1e6
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)
    assert cfg["tie_word_embeddings"] is False

    tok = processor.tokenizer
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg["vision_end_token_id"] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert text["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(tok) <= text["vocab_size"]

    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert gen["pad_token_id"] == tok.pad_token_id


def test_auto_processor_is_full_qwen_processor(processor):
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    assert processor.video_processor is not None
    tok = processor.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids
    assert processor.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")


# --------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_digit_split(processor):
    tok = processor.tokenizer
    text = "So 12 \\times 345 = 4140, hence \\boxed{12}.\n<think>\nx^2 + \\frac{1}{2}\n</think>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in tok("4140 and 12345", add_special_tokens=False)["input_ids"]]
    digits = [p for p in pieces if p.strip().isdigit()]
    assert digits == list("4140") + list("12345")  # one token per digit
    # common words are single tokens: the corpus makes typical text compact
    for word in (" the", " answer", " triangle", " image", "boxed"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    # special tokens are atomic and skipped on decode
    chat_ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert chat_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(chat_ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_matches_qwen_format(processor):
    convo = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    assert processor.apply_chat_template(convo, tokenize=False) == expected
    assert processor.tokenizer.apply_chat_template(convo, tokenize=False) == expected

    prompt = processor.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == expected.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"

    own_system = [{"role": "system", "content": "Be brief."}] + convo[:1]
    assert processor.apply_chat_template(own_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    )

    image_prompt = processor.apply_chat_template(_image_chat()[:1], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n" in image_prompt
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    assert processor.apply_chat_template(two_images, tokenize=False, add_vision_id=True).endswith(
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>and"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    )


def test_assistant_tokens_mask(processor):
    """The template's {% generation %} block marks the assistant reply (+ <|im_end|>) for SFT label masks."""
    convo = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "The answer is 5."}]
    for renderer in (processor, processor.tokenizer):
        out = renderer.apply_chat_template(
            convo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
        )
        ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
        assert processor.tokenizer.decode(ids[mask]) == "The answer is 5.<|im_end|>"


@pytest.mark.skipif(
    tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24),
    # Seen on 5.16 and 5.17: the processor returns an all-zero mask once image tokens are expanded (5.24 is fine;
    # 5.18-5.23 not checked). Text-only chats work everywhere (test above).
    reason="this transformers' processor loses the assistant mask when images are expanded",
)
def test_assistant_tokens_mask_with_image(processor):
    out = processor.apply_chat_template(
        _image_chat(), tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert processor.tokenizer.decode(ids[mask]) == "A red square.<|im_end|>"


# --------------------------------------------------------------------------------------------------------
# Model forward / generate
# --------------------------------------------------------------------------------------------------------
def test_text_only_forward_and_generate(processor, model):
    convo = [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "\\boxed{19}"}]
    inputs = processor(text=[processor.apply_chat_template(convo, tokenize=False)], return_tensors="pt")
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)

    prompt = processor.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]
    assert gen.shape[1] <= inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("size,n_tokens", [((56, 56), 4), ((112, 112), 16)])
def test_image_forward_and_generate(processor, model, size, n_tokens):
    convo = _image_chat(size)
    text = processor.apply_chat_template(convo, tokenize=False)
    inputs = processor(text=[text], images=[convo[0]["content"][0]["image"]], return_tensors="pt")
    n_pad = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_pad == int(inputs["image_grid_thw"].prod()) // 4 == n_tokens
    assert inputs["pixel_values"].shape == (n_tokens * 4, 3 * 2 * 14 * 14)

    model.zero_grad()
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grad = model.model.visual.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad()

    prompt = processor.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[convo[0]["content"][0]["image"]], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_process_vision_info_with_pil_and_path(processor, model, tmp_path):
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils")
    path = tmp_path / "green.png"
    Image.new("RGB", (112, 112), "green").save(path)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (56, 56), "red")},
                {"type": "image", "image": str(path)},
                {"type": "text", "text": "Compare the two pictures."},
            ],
        }
    ]
    images, videos = qwen_vl_utils.process_vision_info(messages)
    assert videos is None and [im.size for im in images] == [(56, 56), (112, 112)]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4 + 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_packed_rows_match_separate_forwards(processor, model):
    """Sequence packing recipe: (4, B, T) position ids (row 0: text positions restarting per sample, rows 1-3:
    M-RoPE from get_rope_index), no attention mask, use_cache=False -> block-diagonal attention."""
    text_chat = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]
    image_chat = _image_chat()
    samples = [
        processor(text=[processor.apply_chat_template(text_chat, tokenize=False)], return_tensors="pt"),
        processor(text=[processor.apply_chat_template(image_chat, tokenize=False)],
                  images=[image_chat[0]["content"][0]["image"]], return_tensors="pt"),
    ]
    with torch.no_grad():
        ref = torch.cat([model(**s, use_cache=False).logits[0] for s in samples])
        rope = [model.model.get_rope_index(s["input_ids"], s["mm_token_type_ids"], image_grid_thw=s.get("image_grid_thw"))[0]
                for s in samples]
        text_pos = torch.cat([torch.arange(s["input_ids"].shape[1]) for s in samples])[None, None]
        position_ids = torch.cat([text_pos, torch.cat(rope, dim=-1)], dim=0)
        assert position_ids.shape == (4, 1, ref.shape[0])
        packed = model(
            input_ids=torch.cat([s["input_ids"] for s in samples], dim=1),
            pixel_values=samples[1]["pixel_values"],
            image_grid_thw=samples[1]["image_grid_thw"],
            position_ids=position_ids,
            use_cache=False,
        ).logits[0]
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Determinism, validation, other sizes
# --------------------------------------------------------------------------------------------------------
def test_same_seed_same_files_and_rng_untouched(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    rng_before = torch.get_rng_state()
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = build_tiny_model(tmp_path / "other", seed=1)
    c = load_file(other / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_rejects_head_dim_other_than_32(tmp_path):
    with pytest.raises(ValueError, match="32"):
        build_tiny_model(tmp_path / "bad", hidden_size=64, num_heads=4)


def test_larger_demo_size(tmp_path):
    out = build_tiny_model(tmp_path / "bigger", hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=4,
                           intermediate_size=256)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    cfg = model.config.text_config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (128, 4, 4)
    assert model.config.vision_config.out_hidden_size == 128
    processor = AutoProcessor.from_pretrained(out)
    convo = _image_chat()
    inputs = processor(text=[processor.apply_chat_template(convo, tokenize=False)],
                       images=[convo[0]["content"][0]["image"]], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)
