"""What a model reads: kept free of torch so the CPU decode tasks can resize without importing it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


def from_processor_config(processor: dict[str, Any]) -> InputSpec:
    """A Hugging Face `preprocessor_config.json` (image processor part) -> InputSpec.

    `size` may be an int (square) or `{"height", "width"}`; `shortest_edge` configs (which resize and
    then crop) are refused, because the decode tasks would not reproduce the processor's pixels.
    """
    size = processor.get("size", 224)
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, dict) and "height" in size and "width" in size:
        height, width = int(size["height"]), int(size["width"])
    else:
        raise ValueError(f"unsupported processor size {size!r}: textseg needs a fixed height and width")
    if processor.get("do_center_crop"):
        raise ValueError("processors that center-crop are not supported: the mask must cover the whole image")
    mean = processor.get("image_mean", [0.0, 0.0, 0.0]) if processor.get("do_normalize", True) else [0.0] * 3
    std = processor.get("image_std", [1.0, 1.0, 1.0]) if processor.get("do_normalize", True) else [1.0] * 3
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    return InputSpec(
        size=(height, width),
        resample=int(processor.get("resample", 2)),
        rescale_factor=rescale,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
    )
