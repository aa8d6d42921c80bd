"""Synthetic map data with exact ground truth: XYZ tile pyramids and large georeferenced GeoTIFF scenes.

Why: the map features of textseg (windows over large scenes, georeferencing, polygons merged across tile
borders) need imagery that is georeferenced, large, and labeled exactly, without downloads or licences.
Both writers draw with `textseg.training.synth.render_scene` (its classes: building, road, water, tree) and
write the ground truth beside the imagery, so a test can compare textseg's output with the truth.

- `write_xyz_pyramid`: one scene cut into slippy-map tiles, so objects cross tile borders the way real
  buildings and roads do (what `vectors.merge_across_borders` must undo).
- `write_geotiff_scene`: a tiled, compressed GeoTIFF of any size with a real CRS and transform, and its
  ground-truth mask as a GeoTIFF on the same grid. Rendered block by block, so memory stays bounded.

Layouts follow `write_synth_dataset`: DEST/images/<relpath>, DEST/masks/<relpath>, DEST/ontology.yaml
(usable as `--ontology`), so `textseg label DEST/images OUT` finds the images with the relpaths the
georeferencing reads (`z/x/y.png` for tiles).
"""

from __future__ import annotations

import io
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image

from textseg.image.rasters import DEFAULT_BLOCK_SIZE, GeoRef, write_geotiff_mask, write_geotiff_rgb, xyz_tile
from textseg.image.windows import Window, grid_windows
from textseg.outputs.masks import encode_png_mask
from textseg.storage import filesystem_for, write_bytes_atomic
from textseg.training.synth import (
    IMAGE_PNG_COMPRESS_LEVEL,
    MIN_SIZE,
    render_scene,
    synth_ontology,
    write_dataset_files,
)

XYZ_TILE_SIZE = 256  # the slippy-map standard; retina tiles are 512
# Rendering cost grows faster than the area (0.8 s at 1024 px, 5 s at 2048 px): 1024 px blocks keep a
# scene's cost roughly linear in its area while objects still span many GeoTIFF tiles.
RENDER_BLOCK_SIZE = 1024


def write_xyz_pyramid(
    dest: str,
    z: int,
    x0: int,
    y0: int,
    nx: int,
    ny: int,
    seed: int,
    tile_size: int = XYZ_TILE_SIZE,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write nx x ny slippy-map tiles z/x0..x0+nx-1/y0..y0+ny-1 and their masks; return their relpaths.

    One scene of (ny * tile_size, nx * tile_size) pixels is rendered from `numpy.random.default_rng(seed)`
    and cut into tiles, so roads, rivers and buildings run across tile borders. Writes DEST/images/z/x/y.png
    (RGB), DEST/masks/z/x/y.png (palette PNG, value = class index) and DEST/ontology.yaml. Relpaths are
    `z/x/y.png`, row by row. The whole scene is in memory while it is cut: meant for tens of tiles (8 x 8
    tiles of 256 px render in ~5 s), not a city.
    """
    if nx < 1 or ny < 1:
        raise ValueError(f"a pyramid needs at least one tile each way, got nx={nx}, ny={ny}")
    if tile_size * min(nx, ny) < MIN_SIZE:
        raise ValueError(
            f"the scene must be at least {MIN_SIZE} px a side; raise tile_size or the tile count"
        )
    last = f"{z}/{x0 + nx - 1}/{y0 + ny - 1}.png"
    if min(x0, y0) < 0 or xyz_tile(f"{z}/{x0}/{y0}.png") is None or xyz_tile(last) is None:
        raise ValueError(f"tiles {z}/{x0}/{y0} to {last} do not all exist: x and y must be in [0, 2**z)")
    image, mask = render_scene(np.random.default_rng(seed), ny * tile_size, nx * tile_size)
    palette = synth_ontology().palette()
    fs, root = filesystem_for(dest, storage_options)
    root = root.rstrip("/")
    relpaths = []
    for row in range(ny):
        for col in range(nx):
            window = Window(col * tile_size, row * tile_size, tile_size, tile_size)
            relpath = f"{z}/{x0 + col}/{y0 + row}.png"
            write_bytes_atomic(fs, f"{root}/images/{relpath}", _encode_png_rgb(image[window.slices]))
            write_bytes_atomic(fs, f"{root}/masks/{relpath}", encode_png_mask(mask[window.slices], palette))
            relpaths.append(relpath)
    write_dataset_files(fs, root)
    return relpaths


def write_geotiff_scene(
    dest: str,
    width: int,
    height: int,
    seed: int,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500000.0, 6000000.0),
    pixel_size: float = 0.5,
    name: str = "scene.tif",
    block_size: int = DEFAULT_BLOCK_SIZE,
    render_block_size: int = RENDER_BLOCK_SIZE,
    distinct_blocks: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> GeoRef:
    """Write a georeferenced synthetic scene and its ground truth; return the scene's GeoRef.

    Files: DEST/images/<name>, an RGB uint8 GeoTIFF, tiled block_size x block_size, deflate-compressed;
    DEST/masks/<name>, the class mask as a GeoTIFF on the same grid (`rasters.write_geotiff_mask`: a
    COG with palette, class names, nodata 255); DEST/ontology.yaml. Grid: `crs`, top-left corner
    `origin` (x, y in crs units), square pixels of `pixel_size` crs units, north up (defaults: UTM 33N,
    0.5 m, in the Baltic near 54 N).
    The scene is rendered in render_block_size blocks (a multiple of block_size), each from
    `default_rng([seed, block_row, block_col])`: a mosaic of independent scenes whose roads do not meet
    at block edges. `distinct_blocks` = N renders only N blocks and fills the scene with them under random
    rotations and flips (8 variants each), for very large scenes in seconds (rendering every block of a
    16k scene takes minutes). Memory: a block and the compressed mask blocks (masks compress ~50x), never
    the scene.
    """
    if width < 1 or height < 1:
        raise ValueError(f"a scene needs a positive width and height, got {width} x {height}")
    if render_block_size < MIN_SIZE or render_block_size % block_size:
        raise ValueError(
            f"render_block_size must be a multiple of block_size ({block_size}) and >= {MIN_SIZE}, "
            f"got {render_block_size}"
        )
    if distinct_blocks is not None and distinct_blocks < 1:
        raise ValueError(f"distinct_blocks must be >= 1 or None, got {distinct_blocks}")
    georef = GeoRef(crs, (pixel_size, 0.0, origin[0], 0.0, -pixel_size, origin[1]), width, height)
    fs, root = filesystem_for(dest, storage_options)
    root = root.rstrip("/")
    masks: deque[tuple[Window, bytes]] = deque()

    def image_blocks() -> Iterator[tuple[Window, np.ndarray]]:
        for window, image, mask in _render_blocks(width, height, seed, render_block_size, distinct_blocks):
            masks.append((window, zlib.compress(mask.tobytes(), 1)))  # the mask waits for its own file
            yield window, image

    def mask_blocks() -> Iterator[tuple[Window, np.ndarray]]:
        while masks:
            window, packed = masks.popleft()
            yield window, np.frombuffer(zlib.decompress(packed), dtype=np.uint8).reshape(window.shape)

    write_geotiff_rgb(fs, f"{root}/images/{name}", georef, image_blocks(), block_size)
    ontology = synth_ontology()
    write_geotiff_mask(
        fs,
        f"{root}/masks/{name}",
        georef,
        mask_blocks(),
        ontology.palette(),
        block_size,
        class_names=ontology.class_names,
    )
    write_dataset_files(fs, root)
    return georef


def _render_blocks(
    width: int, height: int, seed: int, render_block_size: int, distinct_blocks: int | None
) -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
    """(window, image (h, w, 3), mask (h, w)) for each render block of the scene, row by row."""
    pool: list[tuple[np.ndarray, np.ndarray]] = []
    if distinct_blocks is not None:
        side = render_block_size
        pool = [render_scene(np.random.default_rng([seed, i]), side, side) for i in range(distinct_blocks)]
    choices = np.random.default_rng([seed, 2**31 - 1])
    for window in grid_windows(width, height, render_block_size):
        if pool:
            image, mask = pool[int(choices.integers(len(pool)))]
            turns, flip = int(choices.integers(4)), bool(choices.integers(2))
            image, mask = np.rot90(image, turns), np.rot90(mask, turns)
            if flip:
                image, mask = image[:, ::-1], mask[:, ::-1]
        else:
            row, col = window.y0 // render_block_size, window.x0 // render_block_size
            # Edge blocks may be thinner than a scene can be drawn: draw the minimum and crop.
            rendered_h, rendered_w = max(window.height, MIN_SIZE), max(window.width, MIN_SIZE)
            image, mask = render_scene(np.random.default_rng([seed, row, col]), rendered_h, rendered_w)
        crop = (slice(0, window.height), slice(0, window.width))
        yield window, np.ascontiguousarray(image[crop]), np.ascontiguousarray(mask[crop])


def _encode_png_rgb(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(
        buffer, format="PNG", compress_level=IMAGE_PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()
