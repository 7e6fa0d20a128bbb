"""The one place that builds models and processors from a Hugging Face directory.

Everything loads by path, exactly as Qwen/Qwen2.5-VL-7B-Instruct would be loaded: the tiny test
model goes through the same code.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# Transformers (>= 4.52, and 5.x) names Qwen2.5-VL's modules differently in memory than the released
# checkpoints do; vLLM's loader and exported checkpoints use the checkpoint names. In-memory prefix ->
# checkpoint prefix, first match wins; names already in checkpoint form pass through.
_HF_TO_CHECKPOINT_PREFIX = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("lm_head.", "lm_head."),
    ("model.", "model."),
    ("visual.", "visual."),
)


def checkpoint_name(hf_name: str) -> str:
    """A Qwen2.5-VL parameter name (in-memory or checkpoint form) -> its name in the released checkpoints
    (what vLLM's loader expects), e.g. model.language_model.layers.0.mlp.up_proj.weight ->
    model.layers.0.mlp.up_proj.weight, model.visual.blocks.0.attn.qkv.weight -> visual.blocks.0.attn.qkv.weight."""
    for src, dst in _HF_TO_CHECKPOINT_PREFIX:
        if hf_name.startswith(src):
            return dst + hf_name[len(src):]
    raise KeyError(
        f"{hf_name!r} is not a Qwen2.5-VL parameter name (expected it to start with one of "
        f"{sorted({s for s, _ in _HF_TO_CHECKPOINT_PREFIX})})"
    )


def resolve_attn_implementation(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    from transformers import AutoProcessor

    kwargs = {}
    if min_pixels is not None:
        kwargs.update(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = AutoProcessor.from_pretrained(path, **kwargs)
    if not hasattr(processor, "image_processor"):
        raise RuntimeError(
            f"AutoProcessor.from_pretrained({path!r}) returned only a tokenizer: torchvision is probably "
            "missing or broken (it must be the build matching torch; see README, Versions)"
        )
    return processor


def load_vlm(path: str, dtype: str = "float32", attn_implementation: str = "auto", freeze_vision: bool = False,
             gradient_checkpointing: bool = False) -> nn.Module:
    """A Qwen2.5-VL-style image-text-to-text model from `path`, on the CPU (engines move it)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=resolve_attn_implementation(attn_implementation)
    )
    if freeze_vision:
        for p in vision_tower(model).parameters():
            p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def vision_tower(model: nn.Module) -> nn.Module:
    return model.model.visual


def lm_head(model: nn.Module) -> nn.Module:
    return model.lm_head


def last_hidden_states(model: nn.Module, input_ids, position_ids, pixel_values=None, image_grid_thw=None):
    """[T, H] hidden states of a packed row, without the [T, V] logits.

    Positions are passed explicitly with a leading text-position row ([4, 1, T]) and no attention
    mask: transformers then treats each restart of the text positions as a new sample (block-causal
    mask on sdpa/eager, varlen flash-attention on GPUs).
    """
    out = model.model(
        input_ids=input_ids,
        position_ids=position_ids,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        use_cache=False,  # a cache object turns off transformers' packed-sample detection
    )
    return out.last_hidden_state[0]


class TokenLogprobs(nn.Module):
    """Wraps the VLM: forward(**batch.model_inputs()) -> fp32 log p(target) per position (and entropy),
    via the fused kernel. Plain tensor arguments: engines may inspect them (AutoTP checks that a
    tensor-parallel group got identical inputs).

    The LM head's weight is read directly (no logits tensor); engines that partition parameters
    (ZeRO-3) must register it as an external parameter of this module.
    """

    def __init__(self, model: nn.Module, tp_group=None):
        super().__init__()
        self.model = model
        self.tp_group = tp_group

    def forward(self, input_ids, position_ids, targets, pixel_values=None, image_grid_thw=None,
                temperature: float = 1.0, return_entropy: bool = False):
        from ovr_hpc.kernels import fused_logprobs

        hidden = last_hidden_states(self.model, input_ids, position_ids, pixel_values, image_grid_thw)
        return fused_logprobs(hidden, lm_head(self.model).weight, targets, temperature=temperature,
                              return_entropy=return_entropy, tp_group=self.tp_group)


class TokenValues(nn.Module):
    """The critic: the same backbone with a bias-free linear value head on the last hidden state.

    forward(...) -> fp32 value per position [T]; the value at position p is the critic's estimate
    for the state before token p+1, aligned with TokenLogprobs' log-prob of token p+1.
    The head keeps PyTorch's default Linear init (kaiming-uniform, a=sqrt(5)), as ORZ does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        hidden = model.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, bias=False, dtype=next(model.parameters()).dtype)

    def forward(self, input_ids, position_ids, targets=None, pixel_values=None, image_grid_thw=None):
        hidden = last_hidden_states(self.model, input_ids, position_ids, pixel_values, image_grid_thw)
        return self.value_head(hidden).squeeze(-1).float()


def load_critic(path: str, dtype: str = "float32", attn_implementation: str = "auto", freeze_vision: bool = False,
                gradient_checkpointing: bool = False, seed: int = 0) -> TokenValues:
    model = load_vlm(path, dtype, attn_implementation, freeze_vision, gradient_checkpointing)
    model.lm_head = None  # the critic never produces tokens: no vocabulary-sized weight to keep
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the value head's init depends on the seed only
        return TokenValues(model)
