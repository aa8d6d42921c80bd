"""Windows: the count formula, the last window, coverage, feather weights and seamless blending."""

from __future__ import annotations

import math

import numpy as np
import pytest

from textseg.image.windows import (
    Window,
    axis_starts,
    blend,
    dequantize_scores,
    feather_weights,
    grid_windows,
    overlapping,
    quantize_scores,
    tile_windows,
)


def _expected_count(size: int, tile: int, overlap: int) -> int:
    return 1 if size <= tile else math.ceil((size - tile) / (tile - overlap)) + 1


@pytest.mark.parametrize(
    ("width", "height", "tile", "overlap"),
    [
        (1000, 700, 512, 64),
        (512, 512, 512, 64),
        (513, 100, 512, 0),
        (4096, 4096, 512, 128),
        (37, 9000, 64, 63),
    ],
)
def test_window_count_follows_the_documented_formula(
    width: int, height: int, tile: int, overlap: int
) -> None:
    windows = tile_windows(width, height, tile, overlap)
    assert len(windows) == _expected_count(width, tile, overlap) * _expected_count(height, tile, overlap)
    assert len(set(windows)) == len(windows)


def test_last_window_is_flush_with_the_edge_and_full_size() -> None:
    assert axis_starts(1000, 512, 64) == [0, 448, 488]
    windows = tile_windows(1000, 1000, 512, 64)
    assert all(w.shape == (512, 512) for w in windows)
    assert max(w.x1 for w in windows) == 1000 and max(w.y1 for w in windows) == 1000
    assert windows[-1] == Window(488, 488, 512, 512)
    # An exact fit needs no shifted window: 960 = 512 + 448.
    assert axis_starts(960, 512, 64) == [0, 448]


def test_image_smaller_than_a_tile_is_one_window_of_its_own_size() -> None:
    assert tile_windows(300, 200, 512, 64) == [Window(0, 0, 300, 200)]
    assert tile_windows(1000, 200, 512, 64)[0] == Window(0, 0, 512, 200)


@pytest.mark.parametrize(("width", "height", "tile", "overlap"), [(1000, 700, 512, 64), (130, 77, 32, 8)])
def test_windows_cover_every_pixel_and_stay_inside(width: int, height: int, tile: int, overlap: int) -> None:
    covered = np.zeros((height, width), dtype=np.int32)
    for window in tile_windows(width, height, tile, overlap):
        assert 0 <= window.x0 and window.x1 <= width and 0 <= window.y0 and window.y1 <= height
        covered[window.slices] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("bad", [(512, 512), (512, -1), (0, 0)])
def test_bad_tiling_is_refused(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        tile_windows(1000, 1000, *bad)


def test_window_arithmetic() -> None:
    a, b = Window(0, 0, 10, 10), Window(5, 8, 10, 10)
    assert a.intersection(b) == Window(5, 8, 5, 2)
    assert a.intersection(Window(10, 0, 5, 5)) is None  # touching edges share no pixel
    assert b.relative_to(a) == b and a.relative_to(b) == Window(-5, -8, 10, 10)
    assert a.shift(3, 4) == Window(3, 4, 10, 10) and (a.x1, a.y1) == (10, 10)
    assert a.contains(Window(2, 2, 3, 3)) and not a.contains(b)
    assert np.zeros((20, 30))[b.slices].shape == b.shape == (10, 10)
    rio = b.to_rasterio()
    assert (rio.col_off, rio.row_off, rio.width, rio.height) == (5, 8, 10, 10)
    with pytest.raises(ValueError):
        Window(0, 0, 0, 5)


def test_grid_windows_tile_the_image_without_overlap() -> None:
    blocks = grid_windows(1100, 600, 512)
    assert (
        len(blocks) == 3 * 2
        and blocks[2] == Window(1024, 0, 76, 512)
        and blocks[-1] == Window(1024, 512, 76, 88)
    )
    covered = np.zeros((600, 1100), dtype=np.int32)
    for block in blocks:
        covered[block.slices] += 1
    assert (covered == 1).all()


def test_feather_weights_are_positive_and_full_on_image_borders() -> None:
    width = height = 1000
    for window in tile_windows(width, height, 512, 64):
        weights = feather_weights(window, width, height, 64)
        assert weights.shape == window.shape and weights.dtype == np.float32
        assert weights.min() > 0 and weights.max() == 1.0
    corner = feather_weights(Window(0, 0, 512, 512), width, height, 64)
    assert corner[0, :448].min() == 1.0 and corner[:448, 0].min() == 1.0  # image border: full weight
    assert corner[0, -1] == pytest.approx(1 / 128) and corner[-1, -1] == pytest.approx(1 / 128**2)
    # Neighbours' ramps sum to exactly 1 across a standard overlap (a partition of unity).
    left, right = (
        feather_weights(Window(0, 0, 512, 1), 960, 1, 64),
        feather_weights(Window(448, 0, 512, 1), 960, 1, 64),
    )
    np.testing.assert_allclose(left[0, 448:] + right[0, :64], 1.0, rtol=1e-6)
    assert (feather_weights(Window(100, 100, 50, 50), 1000, 1000, 0) == 1).all()


def _gradient_field(width: int, height: int) -> np.ndarray:
    """(2, H, W) smooth float scores in [0, 1]: a diagonal ramp and a slow wave."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx + yy) / (width + height)
    wave = 0.5 + 0.4 * np.sin(xx / 97.0) * np.cos(yy / 61.0)
    return np.stack([ramp, wave]).astype(np.float32)


@pytest.mark.parametrize("quantized", [True, False])
def test_blending_windows_of_a_smooth_field_reproduces_it_without_seams(quantized: bool) -> None:
    width, height, tile, overlap, block_size = 1000, 700, 256, 48, 300
    field = _gradient_field(width, height)
    windows = tile_windows(width, height, tile, overlap)
    pieces = []
    for window in windows:
        scores = field[(slice(None), *window.slices)]
        pieces.append((window, quantize_scores(scores) if quantized else scores.copy()))
    stitched = np.zeros_like(field)
    for block in grid_windows(width, height, block_size):
        needed = [(w, s) for w, s in pieces if w in set(overlapping(block, windows))]
        assert len(needed) < len(pieces)  # bounded: only the block's neighbourhood
        stitched[(slice(None), *block.slices)] = blend(block, needed, width, height, overlap)
    error = float(np.abs(stitched - field).max())
    print(f"max abs blend error ({'uint8' if quantized else 'float32'} pieces): {error:.2e}")
    assert error <= (1 / 255 if quantized else 1e-6)


def test_blend_of_disagreeing_windows_has_no_step_at_the_cut() -> None:
    """Two windows that disagree (0 vs 1) blend into a ramp: every step between neighbours is small."""
    width, tile, overlap = 960, 512, 64
    left, right = Window(0, 0, 512, 1), Window(448, 0, 512, 1)
    pieces = [(left, np.zeros((1, 1, 512), np.float32)), (right, np.ones((1, 1, 512), np.float32))]
    row = blend(Window(0, 0, width, 1), pieces, width, 1, overlap)[0, 0]
    assert row[0] == 0 and row[-1] == 1
    assert np.abs(np.diff(row)).max() <= 1 / overlap + 1e-6
    assert tile - overlap == 448


def test_blend_refuses_a_block_with_uncovered_pixels() -> None:
    with pytest.raises(ValueError, match="no piece covers"):
        blend(Window(0, 0, 10, 10), [(Window(0, 0, 5, 10), np.zeros((1, 10, 5), np.float32))], 10, 10, 0)


def test_quantization_round_trip_is_within_half_a_level() -> None:
    scores = np.linspace(0, 1, 1001, dtype=np.float32)
    assert np.abs(dequantize_scores(quantize_scores(scores)) - scores).max() <= 0.5 / 255 + 1e-7
    assert quantize_scores(np.array([-0.5, 1.5])).tolist() == [0, 255]
