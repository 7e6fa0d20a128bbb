"""A tiny, randomly initialised Qwen2.5-VL checkpoint for tests and CPU demos.

`build_tiny_model` writes a directory that loads by path exactly like
``Qwen/Qwen2.5-VL-7B-Instruct``:

* ``config.json`` / ``model.safetensors`` / ``generation_config.json``: a
  `Qwen2_5_VLForConditionalGeneration` with the real architecture (windowed
  vision tower with 2x2 patch merger, 3-D M-RoPE text decoder, GQA, untied
  head) at toy sizes;
* a byte-level BPE tokenizer trained here with the `tokenizers` library on a
  small built-in corpus (English words, math and LaTeX, ``<think>`` tags),
  digits always split one per token, with the Qwen2.5-VL special tokens;
* a `Qwen2_5_VLProcessor` (image processor, video processor, tokenizer) and a
  chat template written for this project that renders the Qwen2.5-VL chat
  format (``<|im_start|>role\\n...<|im_end|>\\n``, a default system message,
  ``<|vision_start|><|image_pad|><|vision_end|>`` for images).

The text decoder's head_dim is 32 (hidden / heads), the smallest head size the
vLLM CPU attention backend accepts, so the same directory can also be served by
vLLM on the CPU.

Nothing in this module downloads anything; a build takes about a second plus
the imports.
"""

from __future__ import annotations

import json
import pathlib
import random

__all__ = ["build_tiny_model", "SPECIAL_TOKENS", "EXTRA_TOKENS", "CHAT_TEMPLATE", "DEFAULT_SYSTEM_MESSAGE"]

#: The head size vLLM's CPU attention needs (it accepts 32, 64, 80, ...; 16 fails at the first generate).
REQUIRED_HEAD_DIM = 32

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."

#: Special tokens of the Qwen2.5-VL tokenizer, in Qwen's order. They are appended after the BPE vocabulary,
#: so ``<|endoftext|>`` gets the first id after the learned tokens, as in the real tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Added tokens that the real tokenizer has but does not mark special (they survive ``skip_special_tokens``).
EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Chat template (written for this project). It reproduces the Qwen2.5-VL prompt format:
#   <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n      (when the chat has no system turn)
#   <|im_start|>{role}\n{content}<|im_end|>\n                          (every turn)
#   <|im_start|>assistant\n                                             (add_generation_prompt)
# Content is a string or a list of parts; an image part ({"type": "image"}, or a dict with an "image" /
# "image_url" key) becomes <|vision_start|><|image_pad|><|vision_end|>, a video part the same with
# <|video_pad|>; `add_vision_id=True` prefixes "Picture N: " / "Video N: ". The assistant's content and its
# <|im_end|> sit in a {% generation %} block, so `return_assistant_tokens_mask=True` marks the tokens an SFT
# loss should train on. The part loop is written out twice (assistant / other turns) rather than put in a
# macro: servers such as vLLM detect "list of parts" templates by finding `for ... in message['content']`.
# Every tag trims the whitespace around it, so only the quoted strings reach the output.
_CONTENT = """\
{%- if message['content'] is string -%}
  {{- message['content'] -}}
{%- elif message['content'] is not none -%}
  {%- for part in message['content'] -%}
    {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
      {%- set counter.images = counter.images + 1 -%}
      {%- if add_vision_id -%}{{- 'Picture ' ~ counter.images ~ ': ' -}}{%- endif -%}
      {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
    {%- elif part['type'] == 'video' or 'video' in part -%}
      {%- set counter.videos = counter.videos + 1 -%}
      {%- if add_vision_id -%}{{- 'Video ' ~ counter.videos ~ ': ' -}}{%- endif -%}
      {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
    {%- elif 'text' in part -%}
      {{- part['text'] -}}
    {%- endif -%}
  {%- endfor -%}
{%- endif -%}
"""
CHAT_TEMPLATE = (
    """\
{%- set counter = namespace(images=0, videos=0) -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
  {{- '<|im_start|>system\\nDEFAULT_SYSTEM<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}
{%- if message['role'] == 'assistant' -%}
{%- generation -%}
CONTENT
{{- '<|im_end|>' -}}
{%- endgeneration -%}
{{- '\\n' -}}
{%- else -%}
CONTENT
{{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
    .replace("DEFAULT_SYSTEM", DEFAULT_SYSTEM_MESSAGE)
    .replace("CONTENT\n", _CONTENT)
)

# ---------------------------------------------------------------------------------------------------------
# Tokenizer corpus (built in, deterministic). Words that OVR-style data uses a lot should become single
# tokens: plain English, geometry/arithmetic vocabulary, LaTeX commands, and the <think> reasoning tags.
# ---------------------------------------------------------------------------------------------------------
_WORDS = """
the a an of to in on at by for with from into onto over under about above below between through during
and or but not no yes if then else so thus hence therefore because since while when where which who whom
whose what why how that this these those there here it its is are was were be been being am do does did
done has have had having can could will would shall should may might must let lets we us our you your
he she they them their his her i me my one two three four five six seven eight nine ten eleven twelve
hundred thousand million first second third fourth last next each every all any some many more most less
least few other another same different both either neither only also just very much such than as like
number numbers value values answer answers question questions problem problems solution solve solved
solving find found give given gives show shows shown see seen look looks note notice check verify
compute computed calculate calculation equal equals equation equations expression term terms factor
factors sum sums difference product quotient remainder ratio rate percent percentage fraction fractions
decimal integer integers prime even odd positive negative zero total average mean median mode range
add added adding subtract subtracting multiply multiplied multiplying divide divided dividing times plus
minus square squares squared cube cubed root roots power powers exponent log logarithm function functions
variable variables constant coefficient coefficients polynomial linear quadratic system inequality
point points line lines segment segments ray angle angles triangle triangles rectangle rectangles circle
circles radius diameter circumference area areas perimeter volume surface side sides edge edges vertex
vertices face faces length lengths width height depth base bases parallel perpendicular right acute obtuse
degree degrees center midpoint tangent chord arc sector polygon hexagon pentagon square cube sphere cylinder
cone prism pyramid diagonal coordinate coordinates axis graph slope intercept origin distance
probability chance random event events outcome outcomes sample count counting ways choose combination
image images picture pictures figure figures diagram chart table photo shown left right top bottom middle
front back inside outside near far color colors red green blue yellow black white gray orange purple
brown pink object objects shape shapes small large big little tall short long wide round object
person people man woman boy girl child children car cars dog dogs cat cats tree trees house book books
apple apples ball balls box boxes cup cups coin coins money dollar dollars cent cents price cost buy
sold sell pay paid has each per hour hours minute minutes second seconds day days week weeks year years
time speed distance meter meters centimeter centimeters kilometer kilometers gram grams kilogram liter
think thinking thought reason reasoning step steps wait hmm okay ok actually maybe perhaps correct
incorrect wrong true false final therefore conclusion conclude assume suppose recall know known need
needs want try again careful carefully consider case cases option options choice choices means so
then now get gets got make makes made take takes use uses used using write written read says said
describe description explain explanation detail details what which there following above below
following question answer option letter correct choose best
system user assistant helpful harmless honest please thank thanks sure here hello
"""

_LATEX = [
    "\\frac{1}{2}", "\\frac{a}{b}", "\\frac{3}{4}", "\\dfrac{x}{y}", "\\sqrt{2}", "\\sqrt{x}", "\\sqrt[3]{8}",
    "\\boxed{12}", "\\boxed{A}", "\\boxed{\\frac{1}{3}}", "\\times", "\\cdot", "\\div", "\\pm", "\\pi",
    "\\theta", "\\alpha", "\\beta", "\\gamma", "\\angle ABC", "\\triangle ABC", "\\le", "\\ge", "\\leq",
    "\\geq", "\\neq", "\\approx", "\\infty", "\\sum_{i=1}^{n}", "\\int_0^1", "\\left(", "\\right)",
    "\\left[", "\\right]", "x^{2}", "x^2", "a_{n}", "a_1", "90^\\circ", "\\circ", "\\text{cm}",
    "\\text{m}", "\\text{ and }", "\\quad", "\\implies", "\\Rightarrow", "\\because", "\\therefore",
    "\\overline{AB}", "\\parallel", "\\perp", "\\sin", "\\cos", "\\tan", "\\log", "\\ln", "\\mathrm{d}",
    "$x$", "$$", "\\(", "\\)", "\\[", "\\]", "\\{", "\\}", "\\%", "&", "\\\\",
]

_SYMBOLS = list("+-*/=()[]{}<>,.:;?!%$^_|'\"#&~`@\\") + ["==", "!=", "<=", ">=", "->", "...", "**", "\n\n"]

_SENTENCES = [
    "<think>\nLet me think about this step by step.\n</think>\n\nThe answer is \\boxed{{{n}}}.",
    "<think>\nFirst, we need to find the {w1} of the {w2}.\nWait, let me check again.\n</think>",
    "The {w1} of the {w2} is {n} {w3}, so the total is {n} + {m} = {k}.",
    "Question: What is the {w1} of the {w2} shown in the image?\nAnswer: \\boxed{{{n}}}",
    "Solve for x: {n}x + {m} = {k}. Therefore x = \\frac{{{k} - {m}}}{{{n}}}.",
    "In the figure, \\angle ABC = {n}^\\circ and AB = {m} \\text{{cm}}. Find the {w1}.",
    "Options: A. {n} B. {m} C. {k} D. {n}{m}\nThe correct option is C.",
    "So {n} \\times {m} = {k}, and {k} / {m} = {n}. Hence the {w1} is {k}.",
    "# Step {n}: {w1} the {w2}.\n- {w3} = {m}\n- {w1} = {k}",
    "Describe the picture: there are {n} {w1} {w2} and {m} {w3} on the table.",
]


def _corpus() -> list[str]:
    """The fixed training corpus (same every call: a private RNG with a fixed seed)."""
    words = _WORDS.split()
    rng = random.Random(20250601)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [w.capitalize() for w in words] + [f" {w}" for w in words]
    lines += [" ".join(_LATEX[i : i + 6]) for i in range(0, len(_LATEX), 6)]
    lines += [" ".join(_SYMBOLS)]
    lines += [DEFAULT_SYSTEM_MESSAGE, "system\n", "user\n", "assistant\n"] * 50
    for _ in range(3000):
        template = rng.choice(_SENTENCES)
        lines.append(
            template.format(
                w1=rng.choice(words), w2=rng.choice(words), w3=rng.choice(words),
                n=rng.randint(0, 99), m=rng.randint(0, 999), k=rng.randint(0, 9999),
            )
        )
    lines += [f"{rng.choice(words)} {rng.choice(_LATEX)} {rng.choice(words)}" for _ in range(2000)]
    return lines


def _build_tokenizer(vocab_size: int, model_max_length: int):
    """Train the byte-level BPE and wrap it as a transformers `Qwen2Tokenizer`.

    `Qwen2Tokenizer` (transformers 5.x) rebuilds its normalizer and pre-tokenizer from its own code when it
    is loaded from a directory, keeping only the vocabulary and merges. So the BPE is trained behind that
    same normalizer and pre-tokenizer (taken from a `Qwen2Tokenizer` instance, never re-typed here): what
    was trained is what loads. That pre-tokenizer isolates every digit, so numbers are spelled digit by digit.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    n_added = len(SPECIAL_TOKENS) + len(EXTRA_TOKENS)
    if vocab_size < 256 + n_added + 64:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (need >= {256 + n_added + 64})")

    reference = Qwen2Tokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = reference.normalizer
    bpe.pre_tokenizer = reference.pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]

    # Special and extra tokens get fixed ids right after the learned vocabulary (as in Qwen's tokenizer).
    for token in SPECIAL_TOKENS + EXTRA_TOKENS:
        vocab[token] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(EXTRA_TOKENS), special_tokens=False)
    for token in SPECIAL_TOKENS + EXTRA_TOKENS:  # guard: every added token kept its reserved id
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"token {token!r} got id {tokenizer.convert_tokens_to_ids(token)}, expected {vocab[token]}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    vocab_size: int = 2048,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    vision_window_size: int = 56,
    max_position_embeddings: int = 32768,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
) -> pathlib.Path:
    """Write a random-init tiny Qwen2.5-VL checkpoint (model, tokenizer, processor) to ``out_dir``.

    The directory loads like ``Qwen/Qwen2.5-VL-7B-Instruct``: ``AutoProcessor.from_pretrained(out_dir)``
    gives a `Qwen2_5_VLProcessor`, ``Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`` the model,
    and ``qwen_vl_utils.process_vision_info`` works on its chat messages.

    Args:
        out_dir: target directory (created; existing files with the same names are overwritten).
        seed: seeds the weight initialisation. The same seed (and library versions) gives identical files.
            The global torch RNG state is left untouched.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: text decoder sizes.
            ``hidden_size / num_heads`` must be 32 (vLLM's CPU attention needs head_dim >= 32 from a fixed
            list; 32 keeps the model tiny). M-RoPE sections are [8, 4, 4] (sum = head_dim / 2).
        vocab_size: size of the model's embedding and of the trained tokenizer (learned BPE tokens plus
            the 22 Qwen special/extra tokens). If the built-in corpus cannot supply that many merges the
            tokenizer ends up smaller; the model keeps ``vocab_size`` rows (as Qwen's 152064 > 151665).
        vision_depth, vision_hidden, vision_heads, vision_intermediate: vision tower sizes (patch 14,
            spatial merge 2, temporal patch 2 as in Qwen2.5-VL). The last block uses full attention, the
            others window attention. ``vision_intermediate`` defaults to ``2 * vision_hidden``.
        vision_window_size: attention window in pixels (Qwen2.5-VL uses 112; 56 makes a 112x112 image span
            four windows so window attention is exercised on small test images).
        max_position_embeddings: text context length written to the config and tokenizer.
        min_pixels, max_pixels: image processor pixel bounds (Qwen2.5-VL's defaults).
        dtype: dtype of the saved weights and of ``config.dtype`` ("float32" suits the CPU; the real
            checkpoint is "bfloat16"). ``from_pretrained`` in transformers 5 loads this dtype by default.
        tie_word_embeddings: the LM head shares the embedding matrix and the checkpoint has no
            ``lm_head.weight`` (as Qwen2.5-VL-3B; 7B and larger have their own head).

    Returns:
        ``pathlib.Path`` of ``out_dir``.

    Token counts: an image of H x W pixels (already multiples of 28, within the pixel bounds) becomes
    ``(H / 14) * (W / 14)`` patches and ``(H / 28) * (W / 28)`` ``<|image_pad|>`` tokens, e.g. 4 for 56x56
    and 16 for 112x112.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    # ---- validate sizes ---------------------------------------------------------------------------------
    if hidden_size % num_heads or hidden_size // num_heads != REQUIRED_HEAD_DIM:
        raise ValueError(
            f"hidden_size / num_heads must be {REQUIRED_HEAD_DIM} (vLLM CPU attention), "
            f"got {hidden_size} / {num_heads}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise ValueError(
            f"vision head size vision_hidden / vision_heads = {vision_hidden}/{vision_heads} must be a multiple of 4 "
            "(2-D rotary embedding over height and width)"
        )
    if vision_window_size % 28:
        raise ValueError(f"vision_window_size must be a multiple of 28 (patch 14 x merge 2), got {vision_window_size}")
    if num_layers < 1 or vision_depth < 1:
        raise ValueError("num_layers and vision_depth must be >= 1")
    # M-RoPE splits the head_dim / 2 = 16 rotary frequencies into (temporal, height, width) sections.
    mrope_section = [8, 4, 4]
    torch_dtype = getattr(torch, dtype)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer + processor --------------------------------------------------------------------------
    tokenizer = _build_tokenizer(vocab_size, max_position_embeddings)
    token_id = tokenizer.convert_tokens_to_ids
    patch, merge, temporal = 14, 2, 2
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch,
        temporal_patch_size=temporal,
        merge_size=merge,
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=patch, temporal_patch_size=temporal, merge_size=merge)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    # ---- model config -----------------------------------------------------------------------------------
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        use_cache=True,
        use_sliding_window=False,
        sliding_window=max_position_embeddings,
        max_window_layers=num_layers,
        attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        dtype=dtype,
    )
    vision_config = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_heads=vision_heads,
        hidden_act="silu",
        in_channels=3,
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=temporal,
        tokens_per_second=2,
        window_size=vision_window_size,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[vision_depth - 1],
        initializer_range=0.02,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )

    # ---- random init under a private RNG ----------------------------------------------------------------
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch_dtype)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=[token_id("<|im_end|>"), token_id("<|endoftext|>")],
        pad_token_id=token_id("<|endoftext|>"),
        do_sample=False,
    )

    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
