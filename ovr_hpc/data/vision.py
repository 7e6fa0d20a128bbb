"""Images through qwen-vl-utils, exactly as Qwen2.5-VL sees them in training, RL and evaluation.

qwen-vl-utils resizes each image (smart_resize: sides multiples of 28, pixel count within
[min_pixels, max_pixels]); the processor then cuts 14x14 patches and merges 2x2 of them into one
visual token, so an image of h x w pixels after resizing gives (h / 28) * (w / 28) tokens.
"""

from __future__ import annotations

import io
import time

from PIL import Image, UnidentifiedImageError

from ovr_hpc.data.errors import BadRecord

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE


# http(s) images: qwen-vl-utils downloads them with no time limit, so on a compute node without
# internet one reference could stall a data loader for minutes. We download them ourselves.
IMAGE_URL_TIMEOUT_S = 30.0


def _open(ref) -> Image.Image:
    """The decoded image behind a URL (bounded time); other references go to qwen-vl-utils as they are."""
    if isinstance(ref, str) and ref.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(ref, timeout=IMAGE_URL_TIMEOUT_S)
            response.raise_for_status()
        except requests.RequestException as e:
            raise OSError(f"download failed (time limit {IMAGE_URL_TIMEOUT_S:g} s): {e}; compute nodes often "
                          "have no internet: download the images and reference local files") from None
        with Image.open(io.BytesIO(response.content)) as image:
            image.load()
            return image.copy()
    return ref


# Images read while training (records were checked when the run started): a read error then is
# more likely a shared filesystem or network hiccup than a bad file, so it is tried again.
RETRY_DELAYS_S = (1.0, 5.0)


def load_image(ref, min_pixels: int, max_pixels: int, retry: bool = False) -> Image.Image:
    """Decoded, RGB, resized image; BadRecord('bad_image') for anything unreadable or corrupt.

    ``retry``: on an I/O error (not for files that are missing or not images), try again after each
    of RETRY_DELAYS_S before giving up."""
    from qwen_vl_utils import fetch_image

    delays = list(RETRY_DELAYS_S) if retry else []
    while True:
        try:
            image = fetch_image({"image": _open(ref), "min_pixels": min_pixels, "max_pixels": max_pixels})
            image.load()
            return image
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
            transient = isinstance(e, OSError) and not isinstance(
                e, (FileNotFoundError, IsADirectoryError, PermissionError, UnidentifiedImageError))
            if transient and delays:
                time.sleep(delays.pop(0))
                continue
            name = ref if isinstance(ref, str) and len(ref) < 200 else type(ref).__name__
            raise BadRecord("bad_image", f"cannot read image {name}: {type(e).__name__}: {e}") from None


def check_image(ref, min_pixels: int = 3136, max_pixels: int = 1003520) -> tuple[int, int]:
    """Decode fully (a truncated file fails here, not hours into a run); returns the resized (h, w)."""
    image = load_image(ref, min_pixels, max_pixels)
    return image.height, image.width


def num_image_tokens(height: int, width: int) -> int:
    return (height // FACTOR) * (width // FACTOR)
