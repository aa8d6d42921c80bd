"""A large image -> overlapping windows; feather weights; blending window scores back into blocks.

Why windows: a model sees a few hundred pixels a side, and a satellite scene has 10k-40k. The scene is cut
into overlapping `Window`s of `tile_size` pixels (the model runs on each), and the per-window score maps are
blended back into the scene one output block at a time. Two rules keep the stitching seamless and bounded:

- Model scores are least reliable at a window's edges, where the model saw no context. Each window's scores
  are weighted by `feather_weights`: a ramp from nearly 0 to 1 across the `overlap` pixels of every side that
  another window overlaps, full weight elsewhere and on sides at the scene border (no other window covers
  those pixels, so they must keep their full say). The weights are strictly positive, so a weighted mean
  never divides by zero. With the standard stride, the ramps of two neighbours sum to exactly 1 across their
  overlap (a partition of unity); where the last window is shifted back the overlap is wider than the ramp,
  and normalising by the summed weights keeps the mean exact there too.
- `blend` produces one output block (a `Window`, e.g. a GeoTIFF tile of the mask) from the windows that
  overlap it, so memory is bounded by the block and those pieces, never by the scene. Raster Vision discards
  a fixed halo instead (`discard_prediction_edges`); feathering keeps every pixel's best estimate and leaves
  no step at the cut.

Everything here is pure numpy: it runs in CPU tasks and in tests without a model, rasterio or Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import rasterio.windows

SCORE_LEVELS = 255  # uint8 scores: 0..255 <-> 0.0..1.0, a step of 1/255 (half a step of rounding error)


@dataclass(frozen=True)
class Window:
    """A pixel box in a scene: columns x0 .. x0 + width - 1, rows y0 .. y0 + height - 1 (half-open at x1, y1).

    A value type (hashable, comparable) in the spirit of Raster Vision's `Box`, so that window arithmetic is
    written once, here, and never as loose tuples whose order (row/col, x/y) a reader must guess.
    """

    x0: int
    y0: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"a window needs a positive width and height, got {self.width} x {self.height}")

    @property
    def x1(self) -> int:
        """One past the last column."""
        return self.x0 + self.width

    @property
    def y1(self) -> int:
        """One past the last row."""
        return self.y0 + self.height

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width), the numpy shape of a 2-D array covering the window."""
        return (self.height, self.width)

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices: `array[window.slices]` is the window's part of a full-scene (H, W) array."""
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def to_rasterio(self) -> rasterio.windows.Window:
        """The same box as a `rasterio.windows.Window` (col_off, row_off, width, height), for windowed I/O."""
        from rasterio.windows import Window as RasterioWindow  # rasterio is the optional `geo` extra

        return RasterioWindow(self.x0, self.y0, self.width, self.height)

    def intersection(self, other: Window) -> Window | None:
        """The box both windows cover, or None when they share no pixel (touching edges share none)."""
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return Window(x0, y0, x1 - x0, y1 - y0)

    def shift(self, dx: int, dy: int) -> Window:
        """The same size moved by (dx, dy) pixels."""
        return Window(self.x0 + dx, self.y0 + dy, self.width, self.height)

    def relative_to(self, origin: Window) -> Window:
        """This window in the pixel frame of `origin` (whose top-left becomes (0, 0)).

        `piece[window.relative_to(piece_window).slices]` selects this window's part of an array that covers
        `piece_window`.
        """
        return self.shift(-origin.x0, -origin.y0)

    def contains(self, other: Window) -> bool:
        """Whether every pixel of `other` is inside this window."""
        return self.x0 <= other.x0 and self.y0 <= other.y0 and other.x1 <= self.x1 and other.y1 <= self.y1


def axis_starts(size: int, tile_size: int, overlap: int) -> list[int]:
    """Window offsets along one axis of `size` pixels; see `tile_windows` for the rule and the count."""
    _check_tiling(tile_size, overlap)
    if size < 1:
        raise ValueError(f"an image axis needs at least one pixel, got {size}")
    if size <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = math.ceil((size - tile_size) / stride) + 1
    return [min(i * stride, size - tile_size) for i in range(count)]


def tile_windows(width: int, height: int, tile_size: int, overlap: int) -> list[Window]:
    """Overlapping `tile_size` windows covering every pixel of a width x height image, row by row.

    Along each axis of `size` pixels, with stride = tile_size - overlap:

        count = 1                                          if size <= tile_size
        count = ceil((size - tile_size) / stride) + 1      otherwise

    and the windows start at 0, stride, 2 * stride, ..., except the last, which starts at
    size - tile_size: it is shifted back to lie flush with the far edge, so every window is full size
    (the model always sees tile_size pixels, no padding) and overlaps its neighbour by at least `overlap`.
    The number of windows is count(width) * count(height). An axis shorter than tile_size gets one window
    of the image's own length. Example: width 1000, tile 512, overlap 64 -> stride 448, ceil(488 / 448) + 1
    = 3 windows at x = 0, 448, 488.

    overlap: 0 <= overlap < tile_size. Windows are ordered row-major (all of the top row first).
    """
    xs = axis_starts(width, tile_size, overlap)
    ys = axis_starts(height, tile_size, overlap)
    tile_w, tile_h = min(tile_size, width), min(tile_size, height)
    return [Window(x, y, tile_w, tile_h) for y in ys for x in xs]


def grid_windows(width: int, height: int, block_size: int) -> list[Window]:
    """Non-overlapping `block_size` blocks covering the image, row-major; the last ones are cut short.

    The output side of stitching: blocks aligned with a GeoTIFF's internal tiles, so each tile is compressed
    once, and small enough that a block of blended scores stays in memory.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if width < 1 or height < 1:
        raise ValueError(f"an image needs a positive width and height, got {width} x {height}")
    return [
        Window(x, y, min(block_size, width - x), min(block_size, height - y))
        for y in range(0, height, block_size)
        for x in range(0, width, block_size)
    ]


def overlapping(block: Window, windows: Iterable[Window]) -> list[Window]:
    """The windows that share at least one pixel with `block`: the pieces `blend` needs for it."""
    return [window for window in windows if block.intersection(window) is not None]


def feather_weights(window: Window, width: int, height: int, overlap: int) -> np.ndarray:
    """(window.height, window.width) float32 blending weights of `window` in a width x height image.

    On each side that lies inside the image (so another window overlaps it), the weight ramps linearly over
    `overlap` pixels: (i + 0.5) / overlap at the i-th pixel from that side, so 1 / (2 * overlap) at the edge
    and 1 from `overlap` pixels in. Sides on the image border keep weight 1: no other window covers those
    pixels. The weight is the product of the column ramp and the row ramp, strictly positive everywhere.
    With overlap 0 every weight is 1 (windows abut; nothing to blend).
    """
    return np.outer(
        _axis_ramp(window.y0, window.height, height, overlap),
        _axis_ramp(window.x0, window.width, width, overlap),
    )


def blend(
    block: Window, pieces: Sequence[tuple[Window, np.ndarray]], width: int, height: int, overlap: int
) -> np.ndarray:
    """Blend window scores into one block of the scene: (C, block.height, block.width) float32.

    pieces: (window, scores) pairs, scores (C, window.height, window.width), uint8 quantized 0..255 (see
    `quantize_scores`) or float in [0, 1]. Pieces that miss the block are ignored, so a caller may pass
    every window it holds. Each block pixel gets sum(w_i * s_i) / sum(w_i) over the pieces covering it,
    w_i = `feather_weights` of piece i there. Memory: the block's accumulators plus one piece-sized slice
    at a time. Raises ValueError when a block pixel is covered by no piece (a window is missing upstream)
    or when the pieces disagree on C.
    """
    accumulated: np.ndarray | None = None
    weight_sum = np.zeros(block.shape, dtype=np.float32)
    for window, scores in pieces:
        common = block.intersection(window)
        if common is None:
            continue
        if scores.ndim != 3 or scores.shape[1:] != window.shape:
            raise ValueError(
                f"scores for {window} must be (C, {window.height}, {window.width}), got {scores.shape}"
            )
        if accumulated is None:
            accumulated = np.zeros((scores.shape[0], *block.shape), dtype=np.float32)
        elif scores.shape[0] != accumulated.shape[0]:
            raise ValueError(
                f"pieces disagree on the number of channels: {scores.shape[0]} and {accumulated.shape[0]}"
            )
        in_piece = common.relative_to(window)
        in_block = common.relative_to(block)
        # Only the slice of the ramps this piece contributes: never a full window of weights per block.
        weights = np.outer(
            _axis_ramp(window.y0, window.height, height, overlap)[in_piece.slices[0]],
            _axis_ramp(window.x0, window.width, width, overlap)[in_piece.slices[1]],
        )
        values = scores[(slice(None), *in_piece.slices)]
        values = dequantize_scores(values) if values.dtype == np.uint8 else values.astype(np.float32)
        accumulated[(slice(None), *in_block.slices)] += weights * values
        weight_sum[in_block.slices] += weights
    if accumulated is None or not (weight_sum > 0).all():
        raise ValueError(f"no piece covers every pixel of block {block}; pass all windows overlapping it")
    accumulated /= weight_sum
    return accumulated


def quantize_scores(scores: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] (any shape, float) -> uint8 0..255, rounded: a quarter of float32's bytes.

    Per-window score maps travel between workers and wait for their neighbours before blending; uint8 keeps
    that traffic and memory small for an error of at most 0.5 / 255. Values outside [0, 1] are clipped.
    """
    return np.rint(np.clip(scores, 0.0, 1.0) * SCORE_LEVELS).astype(np.uint8)


def dequantize_scores(scores: np.ndarray) -> np.ndarray:
    """uint8 0..255 (any shape) -> float32 in [0, 1], the inverse of `quantize_scores` up to rounding."""
    if scores.dtype != np.uint8:
        raise ValueError(f"quantized scores must be uint8, got {scores.dtype}")
    return scores.astype(np.float32) * np.float32(1.0 / SCORE_LEVELS)


def _axis_ramp(start: int, length: int, size: int, overlap: int) -> np.ndarray:
    """(length,) float32 weights along one axis; see `feather_weights`."""
    weights = np.ones(length, dtype=np.float32)
    if overlap <= 0:
        return weights
    position = np.arange(length, dtype=np.float32)
    ramp = np.minimum((position + 0.5) / overlap, 1.0)
    if start > 0:  # a window before this one covers the leading pixels
        weights = np.minimum(weights, ramp)
    if start + length < size:  # a window after this one covers the trailing pixels
        weights = np.minimum(weights, ramp[::-1])
    return weights


def _check_tiling(tile_size: int, overlap: int) -> None:
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(
            f"overlap must be in [0, tile_size), got overlap {overlap} for tile_size {tile_size}"
        )
