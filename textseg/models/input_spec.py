"""What a model reads: kept free of torch so the CPU decode tasks can resize without importing it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSpec:
    """How a decoded RGB image becomes the model's `pixel_values`.

    The CPU decode tasks resize to `size` with `resample` (a Pillow filter number, as in Hugging Face
    processor configs); the model actor then rescales and normalizes on its device, so only small
    uint8 arrays travel between stages.
    """

    size: tuple[int, int]  # (height, width) the model reads
    resample: int = 2  # Pillow filter number: 2 = bilinear, 3 = bicubic (HF processors use the same codes)
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
