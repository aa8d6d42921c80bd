"""Labels -> mask file bytes: a single-channel 8-bit palette PNG, pixel value = class index."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# PNG level 1 is 2.7x faster to encode than the default for 1.7x the bytes: right for masks.
PNG_COMPRESS_LEVEL = 1


def encode_png_mask(labels: np.ndarray, palette: list[int]) -> bytes:
    """labels: (H, W) uint8 class indices -> palette-mode PNG bytes of exactly that size."""
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D uint8 array, got {labels.dtype} {labels.shape}")
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels).tobytes())
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_png_mask(data: bytes) -> np.ndarray:
    """Mask bytes -> (H, W) uint8 class indices (the palette is ignored; values are the classes)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"a class mask must be a palette or grayscale PNG, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8).copy()
