"""One listed image -> the pieces the model sees: the whole image, or the windows of a large scene.

A piece is a unit of work in the plan. How an image is cut (`WindowPlan.tiling`) depends on what it is:

- A georeferenced raster (GeoTIFF/COG, and XYZ tiles larger than the model's input) is labeled at its
  own resolution: overlapping windows that show the model as many ground metres as it was trained on.
  With the model's ground sample distance known (declared in its config as `gsd_m`, or `--gsd`) and the
  scene's computable, a window is model_side * model_gsd / scene_gsd scene pixels (a scene at twice the
  model's GSD gets half-size windows, upsampled to the model's input); otherwise a window is the model's
  input size in scene pixels. A scene no larger than one window is one piece.
- A photo (no georeference) is resized whole to the model's input, as its processor would, unless a side
  exceeds AUTO_WINDOW_ABOVE (then windows keep memory and detail bounded: AUTO_TILE_SIZE px, or the
  model's own input size for a model that reads NATIVE_WINDOW_MIN px or more, such as SAM 3's 1008).
- `--tile-size` overrides both: windows of that many image pixels for every image larger than it.

Windows travel through the plan as separate rows and are blended back by `textseg.pipeline.scenes`, on
the scene's own grid: the mask keeps the scene's size, transform and CRS whatever scale the model saw. A
TIFF is opened with rasterio when the `geo` extra is installed: a scene is then read window by window,
never whole, and its CRS and transform come along; other images are decoded by Pillow
(`textseg.image.decoding`), and XYZ tiles (`.../z/x/y.png`) are georeferenced from their path. Each
metadata row says which way its image was cut (`Tiling.describe`).
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

# Photos (no georeference) without --tile-size: windowed only with a side above 4096 px (a 1 MP photo never
# is), into 1024 px windows: large enough for context, small enough that a window's scores stay a few MB.
AUTO_WINDOW_ABOVE = 4096
AUTO_TILE_SIZE = 1024
# A model that reads at least this many pixels a side (SAM 3: 1008) gets windows of exactly its input
# size instead: it sees the scene at full resolution, with nothing resampled.
NATIVE_WINDOW_MIN = 512


@dataclass(frozen=True)
class Tiling:
    """How one image is cut: `windows` (None: one whole-image piece), and the words its row records."""

    windows: list[Window] | None
    describe: str


@dataclass(frozen=True)
class WindowPlan:
    """The run's rules for cutting images (module docstring); `tiling` applies them to one image.

    tile_size: --tile-size in image pixels, or None; overlap: --tile-overlap in the model's pixels;
    model_size: the model's input (height, width); model_gsd: metres per pixel the model was trained at
    (declared or --gsd), or None.
    """

    tile_size: int | None
    overlap: int
    model_size: tuple[int, int] = (0, 0)
    model_gsd: float | None = None

    def tiling(self, width: int, height: int, georef: GeoRef | None) -> Tiling:
        if self.tile_size is not None:
            return self._windows(width, height, self.tile_size, self.overlap, "--tile-size")
        if georef is not None and min(self.model_size) > 0:
            scene_gsd = georef.ground_sample_distance()
            side = min(self.model_size)
            at = ""
            if scene_gsd is not None and self.model_gsd is not None:
                side = max(16, round(side * self.model_gsd / scene_gsd))
                at = f" at the model's {self.model_gsd:g} m/px (scene {scene_gsd:.3g} m/px)"
            elif scene_gsd is not None:
                at = f" at the scene's {scene_gsd:.3g} m/px (the model declares no GSD)"
            # --tile-overlap counts the model's pixels here: the same share of every window at any scale.
            overlap = round(self.overlap * side / min(self.model_size))
            return self._windows(width, height, side, overlap, "native resolution" + at)
        if max(width, height) > AUTO_WINDOW_ABOVE:
            why = f"a side above {AUTO_WINDOW_ABOVE} px"
            return self._windows(width, height, self.auto_tile_size, self.overlap, why)
        return Tiling(None, self._whole())

    @property
    def auto_tile_size(self) -> int:
        """Windows of a large photo: the model's input side when it reads NATIVE_WINDOW_MIN px or more,
        else AUTO_TILE_SIZE (downsampled to a small model's input, for context)."""
        side = min(self.model_size)
        return side if side >= NATIVE_WINDOW_MIN else AUTO_TILE_SIZE

    def _windows(self, width: int, height: int, side: int, overlap: int, why: str) -> Tiling:
        if max(width, height) <= side:
            return Tiling(None, self._whole() + f" ({why}: no larger than one {side} px window)")
        overlap = min(overlap, side // 2 - 1)
        return Tiling(
            tile_windows(width, height, side, overlap),
            f"windows of {side} px, overlap {overlap} px ({why})",
        )

    def _whole(self) -> str:
        height, width = self.model_size
        return f"whole image resized to {width}x{height}" if height else "whole image"


@dataclass(frozen=True)
class Piece:
    """pixels: (h, w, 3) uint8 of the part of the image it shows (`window`), at full resolution or, for a
    JPEG resized whole, at a DCT-reduced scale (`decoding.decode_image`); after `resized`, at the model's
    input size. nodata: (window.height, window.width) bool or None."""

    pixels: np.ndarray
    window: Window
    nodata: np.ndarray | None


@dataclass(frozen=True)
class Source:
    """An opened image: its size as a viewer shows it, its georeference, and how it is cut."""

    width: int
    height: int
    georef: GeoRef | None
    tiling: Tiling
    raster: bool  # read through rasterio (a TIFF): the mask is a GeoTIFF when georeferenced

    @property
    def windows(self) -> list[Window] | None:
        """None: one whole-image piece."""
        return self.tiling.windows

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
        tiling = plan.tiling(*size, georef) if size is not None else None
        if size is not None and tiling is not None and (georef is not None or tiling.windows is not None):
            width, height = size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large (possible decompression bomb): {width}x{height} = "
                    f"{width * height:,} pixels exceeds the limit of {max_pixels:,}"
                )
            source = Source(width, height, georef, tiling, raster=True)
            return source, _raster_pieces(fs, path, source)
    tile = rasters.xyz_tile(relpath)

    def cut(width: int, height: int) -> tuple[Tiling, GeoRef | None]:
        georef = rasters.xyz_georef(*tile, width, height) if tile is not None else None
        return plan.tiling(width, height, georef), georef

    def reduce_for(width: int, height: int) -> tuple[int, int] | None:
        """A whole image is only ever seen at the model's size: decode no more than that."""
        model_height, model_width = plan.model_size
        whole = cut(width, height)[0].windows is None
        return (model_width, model_height) if whole and model_height > 0 else None

    decoded = decode_image(storage.read_bytes(fs, path), max_pixels=max_pixels, reduce_for=reduce_for)
    tiling, georef = cut(decoded.width, decoded.height)
    source = Source(decoded.width, decoded.height, georef, tiling, raster=False)

    def pil_pieces() -> Iterator[Piece]:
        rgb = np.asarray(decoded.image)
        if decoded.full_size is not None:  # decoded at a reduced scale: one whole-image piece
            yield Piece(rgb, Window(0, 0, source.width, source.height), None)
            return
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
