"""A report's preview of one labeled image: its thumbnail, its mask over it, and the legend of its classes.

Thumbnails are JPEG data URIs, so the page is one file that opens anywhere (no server, no internet) and a
card costs ~40 KB at 256 px whatever the image's size. The image is read through the project's one decode
path (`read_image`: orientation and modes as `textseg label` saw them), the mask with `read_mask`, and
the colours are those of the palette the image's run wrote its mask with. An image or mask that cannot be
read (gone from SOURCE since, access lost) gives a card that says why, not a failed report.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from textseg import storage
from textseg.datasets.labeled_dest import read_image, read_mask
from textseg.datasets.report_stats import ImageRecord
from textseg.errors import describe_exception

# How much of a labeled pixel's colour is the class colour: the image stays readable under the mask.
OVERLAY_ALPHA = 0.45
# JPEG at this quality keeps class edges legible at a third of the PNG's bytes.
JPEG_QUALITY = 85


@dataclass(frozen=True)
class LegendEntry:
    """One class an image holds: its colour (`#rrggbb`), pixel share of the image and mean score."""

    name: str
    color: str
    share: float
    score: float | None


@dataclass(frozen=True)
class Preview:
    """A preview card's content. image_src and overlay_src are data URIs, None when `problem` says why
    the image or its mask could not be shown."""

    record: ImageRecord
    legend: list[LegendEntry]
    image_src: str | None
    overlay_src: str | None
    problem: str | None


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same image with its longer side at most `size` px, aspect kept."""
    picture = Image.fromarray(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(picture)


def overlay(thumb: np.ndarray, mask: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """thumb: (h, w, 3) uint8; mask: (H, W) uint8 class indices at any size; palette: 768 ints (mask
    value -> RGB). Returns (h, w, 3) uint8: every non-background pixel blended with its class colour
    (OVERLAY_ALPHA); no-data (255) takes the palette's colour for it too."""
    height, width = thumb.shape[:2]
    labels = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    colors = np.asarray(palette, dtype=np.float32).reshape(256, 3)[labels]
    blended = thumb.astype(np.float32)
    labeled = labels != 0
    blended[labeled] = (1 - OVERLAY_ALPHA) * blended[labeled] + OVERLAY_ALPHA * colors[labeled]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def jpeg_data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def preview(
    record: ImageRecord, palette: Sequence[int], size: int, storage_options: Mapping[str, Any]
) -> Preview:
    """The card of one image; `palette` is its run's (`Ontology.palette`)."""
    legend = [
        LegendEntry(name, hex_color(palette[3 * index : 3 * index + 3]), fraction, score)
        for index, (name, fraction, score) in enumerate(
            zip(record.class_names, record.fractions, record.scores, strict=True)
        )
        if index > 0 and fraction > 0
    ]
    try:
        thumb = thumbnail(read_image(record.source_uri, storage_options), size)
        mask = read_mask(record.mask_uri, storage_options)
    except (OSError, ValueError, storage.StorageError) as err:
        return Preview(record, legend, None, None, f"cannot show the image: {describe_exception(err)}")
    return Preview(record, legend, jpeg_data_uri(thumb), jpeg_data_uri(overlay(thumb, mask, palette)), None)


def hex_color(rgb: Sequence[int]) -> str:
    """(r, g, b) -> '#rrggbb', as CSS and SVG take a colour."""
    red, green, blue = rgb
    return f"#{red:02x}{green:02x}{blue:02x}"
