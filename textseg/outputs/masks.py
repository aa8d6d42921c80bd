"""Labels -> mask file bytes: a single-channel 8-bit palette PNG, pixel value = class index; and mask
bytes (PNG, or the GeoTIFF `textseg label` writes for georeferenced rasters) -> labels."""

from __future__ import annotations

import io
import json

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


MASK_SUFFIXES = (".png", ".tif", ".tiff")  # what `textseg label` writes under DEST/masks/, any case
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF


def is_tiff(data: bytes) -> bool:
    return data[:4] in _TIFF_MAGIC


def decode_mask(data: bytes) -> np.ndarray:
    """PNG or GeoTIFF mask bytes -> (H, W) uint8 class indices (see `decode_mask_with_names`)."""
    return decode_mask_with_names(data)[0]


def decode_mask_with_names(data: bytes) -> tuple[np.ndarray, list[str] | None]:
    """PNG or GeoTIFF mask bytes -> ((H, W) uint8 class indices, the class names the file records).

    A TIFF (by its bytes, whatever the name) is read with rasterio (the `geo` extra: MissingGeoDependency,
    an ImportError, names the install command): band 1, which must be 8-bit; its names are the GDAL
    metadata item `class_names` that `rasters.write_geotiff_mask` writes (None when absent). A PNG names no
    classes. Raises ValueError for a mask of another kind.
    """
    if not is_tiff(data):
        return decode_png_mask(data), None
    from textseg.image.rasters import MASK_CLASS_NAMES_TAG, lazy_import

    rasterio_io = lazy_import("rasterio.io")
    errors = lazy_import("rasterio.errors")
    try:
        with rasterio_io.MemoryFile(data) as memory, memory.open() as dataset:
            if dataset.count != 1 or dataset.dtypes[0] != "uint8":
                raise ValueError(
                    f"a class mask must be a single-band uint8 GeoTIFF, got {dataset.count} band(s) of "
                    f"{dataset.dtypes[0]}"
                )
            labels = dataset.read(1)
            names = dataset.tags().get(MASK_CLASS_NAMES_TAG)
    except errors.RasterioError as err:
        raise ValueError(f"GDAL cannot read the TIFF: {err}") from err
    try:
        parsed = json.loads(names) if names else None
    except json.JSONDecodeError:
        parsed = None
    valid = isinstance(parsed, list) and all(isinstance(n, str) for n in parsed)
    return np.ascontiguousarray(labels, dtype=np.uint8), parsed if valid else None
