"""One listed image -> the pieces the model sees: the whole image, or the windows of a large scene.

A piece is a unit of work in the plan. Most images are one piece. An image with a side above the window
threshold (`--tile-size`, or AUTO_WINDOW_ABOVE) is cut into overlapping windows
(`textseg.image.windows`) that travel through the plan as separate rows and are blended back by
`textseg.pipeline.scenes`. A TIFF is opened with rasterio when the `geo` extra is installed: a scene is
then read window by window, never whole, and its CRS and transform come along; other images are decoded
by Pillow (`textseg.image.decoding`), and XYZ tiles
(`.../z/x/y.png`) are georeferenced from their path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np

from textseg import storage
from textseg.image import rasters
from textseg.image.decoding import ImageDecodeError, decode_image, resize_for_model
from textseg.image.rasters import GeoRef
from textseg.image.windows import Window, tile_windows
from textseg.models.input_spec import InputSpec

# Without --tile-size, images with a side above 4096 px are windowed (a 1 MP photo never is), into 1024 px
# windows: large enough for context, small enough that a window's scores stay a few MB.
AUTO_WINDOW_ABOVE = 4096
AUTO_TILE_SIZE = 1024


@dataclass(frozen=True)
class WindowPlan:
    tile_size: int | None  # --tile-size; None: AUTO_* above
    overlap: int

    def windows(self, width: int, height: int) -> list[Window] | None:
        """The windows of a width x height image, or None when it is labeled whole."""
        above = self.tile_size or AUTO_WINDOW_ABOVE
        if max(width, height) <= above:
            return None
        tile = self.tile_size or AUTO_TILE_SIZE
        return tile_windows(width, height, tile, min(self.overlap, tile // 2 - 1))


@dataclass(frozen=True)
class Piece:
    """pixels: (h, w, 3) uint8 at the model's input size; window: the part of the image it shows;
    nodata: (window.height, window.width) bool or None."""

    pixels: np.ndarray
    window: Window
    nodata: np.ndarray | None


@dataclass(frozen=True)
class Source:
    """An opened image: its size as a viewer shows it, its georeference, and how it is cut."""

    width: int
    height: int
    georef: GeoRef | None
    windows: list[Window] | None  # None: one whole-image piece
    raster: bool  # read through rasterio (a TIFF): the mask is a GeoTIFF when georeferenced

    @property
    def mask_suffix(self) -> str:
        return ".tif" if self.raster and self.georef is not None else ".png"


def open_source(
    fs: fsspec.AbstractFileSystem, path: str, relpath: str, plan: WindowPlan, max_pixels: int
) -> tuple[Source, Iterator[Piece]]:
    """Open one image: what it is, and a lazy iterator over its full-resolution pieces (a raster scene's
    windows are read only as the iterator reaches them). Raises `ImageDecodeError` or a storage error."""
    if path.lower().endswith((".tif", ".tiff")) and _has_rasterio():
        size = rasters.scene_size(fs, path)
        georef = rasters.read_georef(fs, path) if size is not None else None
        if size is not None and (georef is not None or plan.windows(*size) is not None):
            width, height = size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large (possible decompression bomb): {width}x{height} = "
                    f"{width * height:,} pixels exceeds the limit of {max_pixels:,}"
                )
            source = Source(width, height, georef, plan.windows(width, height), raster=True)
            return source, _raster_pieces(fs, path, source)
    decoded = decode_image(storage.read_bytes(fs, path), max_pixels=max_pixels)
    tile = rasters.xyz_tile(relpath)
    georef = rasters.xyz_georef(*tile, decoded.width, decoded.height) if tile is not None else None
    source = Source(decoded.width, decoded.height, georef, plan.windows(decoded.width, decoded.height), False)

    def pil_pieces() -> Iterator[Piece]:
        rgb = np.asarray(decoded.image)
        for window in source.windows or [Window(0, 0, source.width, source.height)]:
            nodata = None if decoded.nodata is None else decoded.nodata[window.slices]
            yield Piece(np.ascontiguousarray(rgb[window.slices]), window, nodata)

    return source, pil_pieces()


def resized(piece: Piece, spec: InputSpec) -> Piece:
    """The piece with its pixels resized to the model's input (exactly as the model's processor does)."""
    from PIL import Image

    pixels = resize_for_model(Image.fromarray(piece.pixels), spec.size, spec.resample)
    return Piece(pixels, piece.window, piece.nodata)


def _raster_pieces(fs: fsspec.AbstractFileSystem, path: str, source: Source) -> Iterator[Piece]:
    windows = source.windows or [Window(0, 0, source.width, source.height)]
    # One value range for the whole scene, so windows of 16-bit or float scenes scale alike (no seams).
    value_range = rasters.scene_value_range(fs, path) if len(windows) > 1 else None
    for window in windows:
        rgb, nodata = rasters.read_window_rgb(fs, path, window, value_range)
        yield Piece(rgb, window, nodata)


def _has_rasterio() -> bool:
    try:
        rasters.lazy_import("rasterio")
    except rasters.MissingGeoDependency:
        return False
    return True
