"""Images through qwen-vl-utils, exactly as Qwen2.5-VL sees them in training, RL and evaluation.

qwen-vl-utils resizes each image (smart_resize: sides multiples of 28, pixel count within
[min_pixels, max_pixels]); the processor then cuts 14x14 patches and merges 2x2 of them into one
visual token, so an image of h x w pixels after resizing gives (h / 28) * (w / 28) tokens.
"""

from __future__ import annotations

from PIL import Image

from ovr_hpc.data.records import BadRecord

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE


def load_image(ref, min_pixels: int, max_pixels: int) -> Image.Image:
    """Decoded, RGB, resized image; BadRecord('bad_image') for anything unreadable or corrupt."""
    from qwen_vl_utils import fetch_image

    try:
        image = fetch_image({"image": ref, "min_pixels": min_pixels, "max_pixels": max_pixels})
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
        name = ref if isinstance(ref, str) and len(ref) < 200 else type(ref).__name__
        raise BadRecord("bad_image", f"cannot read image {name}: {type(e).__name__}: {e}") from None
    return image


def check_image(ref, min_pixels: int = 3136, max_pixels: int = 1003520) -> tuple[int, int]:
    """Decode fully (a truncated file fails here, not hours into a run); returns the resized (h, w)."""
    image = load_image(ref, min_pixels, max_pixels)
    return image.height, image.width


def num_image_tokens(height: int, width: int) -> int:
    return (height // FACTOR) * (width // FACTOR)
