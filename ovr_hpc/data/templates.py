"""Chat records -> token ids with a loss mask, through the model's own chat template.

The assistant turns are found by rendering the conversation prefix by prefix, so any chat template
works (Qwen's official one has no `{% generation %}` markers). Each piece of text is tokenized on its
own: the assistant text starts right after `<|im_start|>assistant\\n`, exactly as at generation time.
Loss is on the assistant content and its end-of-turn token (the model must learn to stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ovr_hpc.data.errors import BadRecord
from ovr_hpc.data.vision import num_image_tokens

IMAGE_PAD = "<|image_pad|>"


@dataclass
class TokenizedSample:
    input_ids: list[int]
    loss_spans: list[tuple[int, int]]  # [start, end) token ranges that carry loss
    images: list[str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    where: str = ""

    @property
    def num_loss_tokens(self) -> int:
        return sum(e - s for s, e in self.loss_spans)


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_chat(
    processor,
    messages: list[dict],
    image_sizes: list[tuple[int, int]],
    *,
    where: str = "",
    images: list[str] | None = None,
) -> TokenizedSample:
    """Tokenize a chat (HF format, image parts in place) with loss spans on the assistant turns.

    `image_sizes` are the resized (h, w) of the images in order: each image's single pad token in the
    rendered text becomes h/28 * w/28 pad tokens, as the processor would expand it.
    """
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    full = render(processor, messages)
    pieces: list[tuple[str, bool]] = []  # (text, carries loss)
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(processor, messages[:i], add_generation_prompt=True)
        upto = render(processor, messages[: i + 1]).rstrip("\n")
        if not (full.startswith(prompt) and full.startswith(upto) and len(prompt) <= len(upto)):
            raise BadRecord("template", f"chat template does not render messages[{i}] as a prefix of the chat")
        pieces.append((full[cursor : len(prompt)], False))
        pieces.append((full[len(prompt) : len(upto)], True))
        cursor = len(upto)
    pieces.append((full[cursor:], False))

    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    expected = [num_image_tokens(h, w) for h, w in image_sizes]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    seen_images = 0
    for text, trained in pieces:
        start = len(ids)
        for tok in _encode(tokenizer, text):
            if tok == pad_id:
                if seen_images >= len(expected):
                    raise BadRecord("image_count_mismatch", "more image slots in the chat than images")
                ids.extend([pad_id] * expected[seen_images])
                seen_images += 1
            else:
                ids.append(tok)
        if trained and len(ids) > start:
            spans.append((start, len(ids)))
    if seen_images != len(expected):
        raise BadRecord("image_count_mismatch", f"{seen_images} image slots in the chat but {len(expected)} images")
    return TokenizedSample(ids, spans, list(images or []), list(image_sizes), where)


def truncate(sample: TokenizedSample, max_len: int, image_pad_id: int) -> TokenizedSample | None:
    """Cut a sample to max_len tokens; None when the cut would split an image or leave no loss token."""
    if len(sample.input_ids) <= max_len:
        return sample
    if image_pad_id in sample.input_ids[max_len:]:
        return None
    spans = [(s, min(e, max_len)) for s, e in sample.loss_spans if s < max_len]
    if not spans:
        return None
    return TokenizedSample(sample.input_ids[:max_len], spans, sample.images, sample.image_sizes, sample.where)
