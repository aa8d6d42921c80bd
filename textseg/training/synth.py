"""Synthetic aerial tiles with pixel-exact ground truth, behind `textseg synth DEST --n N --seed S`.

Why: the fusion model needs labeled satellite-like imagery, and the tests need it without downloads or
licences. A seeded generator gives unlimited tiles whose masks are exact by construction, so a wrong
label is always the model's fault, never the annotator's.

Draw order defines the mask; a later layer occludes the earlier ones:

    background (soil, grass, crop fields) -> water -> roads -> buildings -> trees

Shadows (of buildings and trees) only darken what they fall on and never change its label: a shadowed
ground pixel is background, a shadowed road pixel is road. The last step makes the canvas look like a
photograph (illumination gradient, white balance, haze, sensor noise, slight blur); it moves colours
across class edges by a pixel at most and never touches the mask.

Everything is drawn at one ground resolution (a house is ~10-25 px long, a road 5-14 px wide, roughly
0.5 m/px) and object counts scale with the canvas area, so `render_scene` on a large canvas looks like
a mosaic of `render_tile`s.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

from textseg.ontology import Ontology, from_mapping
from textseg.outputs.masks import encode_png_mask
from textseg.storage import filesystem_for, write_bytes_atomic
from textseg.training.datasets import DATASET_FILE

SYNTH_CLASSES: tuple[str, ...] = ("building", "road", "water", "tree")  # mask values 1..4; 0 = background
BACKGROUND, BUILDING, ROAD, WATER, TREE = 0, 1, 2, 3, 4

TILE_AREA = 256 * 256  # object densities below are "per 256 x 256 px" and scale with the canvas area
MIN_SIZE = 32  # smaller canvases cannot hold a house next to a road
SYNTH_GSD_M = 0.5  # metres per pixel everything is drawn at (module docstring)
IMAGE_PNG_COMPRESS_LEVEL = 1  # noisy photos barely compress; level 1 is several times faster than 6

T = TypeVar("T")
Colour = tuple[float, float, float]
GRASS_COLOURS: tuple[Colour, ...] = (
    (72, 98, 48), (92, 112, 58), (110, 122, 66), (142, 136, 88), (62, 82, 44), (124, 132, 80),
)  # fmt: skip
SOIL_COLOURS: tuple[Colour, ...] = (
    (150, 124, 94), (128, 104, 80), (172, 154, 124), (112, 94, 72), (160, 140, 110),
)  # fmt: skip
FIELD_COLOURS: tuple[Colour, ...] = (
    (96, 122, 54), (140, 150, 70), (186, 170, 104), (136, 108, 78), (78, 104, 50), (168, 140, 96),
)  # fmt: skip
DEEP_WATER_COLOURS: tuple[Colour, ...] = (
    (28, 52, 78), (34, 62, 70), (36, 56, 50), (22, 40, 60), (44, 60, 52),
)  # fmt: skip
SHALLOW_WATER_COLOURS: tuple[Colour, ...] = ((62, 96, 110), (74, 100, 84), (98, 100, 76), (56, 84, 96))
SHORE_COLOURS: tuple[Colour, ...] = ((176, 160, 124), (92, 96, 60), (120, 110, 86))
ROOF_COLOURS: tuple[Colour, ...] = (
    (156, 66, 50), (178, 96, 66), (132, 58, 48),  # red / terracotta tiles
    (112, 112, 118), (84, 86, 92), (142, 142, 146),  # grey slate, dark and light metal
    (112, 84, 64), (138, 112, 88),  # brown
    (214, 212, 204), (190, 184, 170),  # white / beige membrane
)  # fmt: skip
TREE_COLOURS: tuple[Colour, ...] = (
    (38, 62, 30), (52, 78, 36), (34, 54, 32), (60, 84, 40), (76, 82, 40), (70, 96, 50),
)  # fmt: skip
MARKING_COLOURS: tuple[Colour, ...] = ((232, 232, 222), (226, 196, 70))
SHADOW_TINT = np.array([0.50, 0.54, 0.64], dtype=np.float32)  # skylight makes shadows bluish


def synth_ontology() -> Ontology:
    """The ontology of the synthetic masks: `SYNTH_CLASSES` in mask-index order, default colours."""
    classes = {name: {"prompts": [name]} for name in SYNTH_CLASSES}
    return from_mapping({"classes": classes}, default_threshold=0.5)


def render_tile(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One square tile: image (size, size, 3) uint8 RGB, mask (size, size) uint8 class indices 0..4.

    The mask is exactly what was drawn (see the module docstring for the draw order). The tile depends
    only on `rng`'s state, so `numpy.random.default_rng([seed, i])` reproduces tile i on its own.
    """
    return render_scene(rng, size, size)


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A canvas of any size: image (height, width, 3) uint8 RGB, mask (height, width) uint8 in 0..4.

    Object counts scale with the area, so a large canvas has the density of the tiles; the scene's
    style (season, roof palette, sun direction) is drawn once for the whole canvas.
    """
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"a synthetic scene needs at least {MIN_SIZE} x {MIN_SIZE}, got {height} x {width}")
    canvas = _Canvas.new(rng, height, width)
    _paint_ground(canvas)
    _paint_fields(canvas)
    _paint_water(canvas)
    roads = _paint_roads(canvas)
    _paint_buildings(canvas, roads)
    _paint_trees(canvas, roads)
    return _photograph(rng, canvas.rgb), canvas.labels


def write_synth_dataset(
    dest: str, n: int, seed: int, size: int = 256, storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Write n tiles under DEST and return their relpaths (`tile_00000.png`, ...).

    Layout: DEST/images/<relpath> (RGB PNG), DEST/masks/<relpath> (palette PNG, value = class index, the
    layout `textseg label` writes), DEST/ontology.yaml (classes in mask-index order, usable as
    `--ontology`). Tile i is rendered from `numpy.random.default_rng([seed, i])`, so the dataset is
    deterministic for (seed, n, size) and a larger n only appends tiles.
    """
    if n < 0:
        raise ValueError(f"the number of tiles must be >= 0, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"synthetic tiles need at least {MIN_SIZE} px a side, got {size}")
    palette = synth_ontology().palette()
    fs, root = filesystem_for(dest, storage_options)
    root = root.rstrip("/")
    relpaths = []
    for i in range(n):
        image, mask = render_tile(np.random.default_rng([seed, i]), size)
        relpath = f"tile_{i:05d}.png"
        write_bytes_atomic(fs, f"{root}/images/{relpath}", _encode_png_rgb(image))
        write_bytes_atomic(fs, f"{root}/masks/{relpath}", encode_png_mask(mask, palette))
        relpaths.append(relpath)
    write_dataset_files(fs, root)
    return relpaths


def write_dataset_files(fs: Any, root: str) -> None:
    """DEST/ontology.yaml (the classes in mask-index order, usable as `--ontology`) and DEST/dataset.json
    (`{"gsd_m": SYNTH_GSD_M}`): the ground sample distance everything is drawn at, which `textseg train`
    records in the model it trains, so georeferenced scenes are later labeled at that scale."""
    ontology_yaml = yaml.safe_dump(synth_ontology().to_dict(), sort_keys=False)
    write_bytes_atomic(fs, f"{root}/ontology.yaml", ontology_yaml.encode())
    write_bytes_atomic(fs, f"{root}/{DATASET_FILE}", json.dumps({"gsd_m": SYNTH_GSD_M}).encode())


# --- the canvas and small geometry / noise tools ------------------------------------------------


@dataclass
class _Canvas:
    """What the painters share while one scene is drawn (never kept between scenes)."""

    rng: np.random.Generator
    rgb: np.ndarray  # (H, W, 3) float32, 0..255 before the photo step
    labels: np.ndarray  # (H, W) uint8 class indices
    grain: np.ndarray  # (H, W) float32, fine zero-mean texture shared by roofs and asphalt
    sun: np.ndarray  # (2,) unit vector towards the sun in image coordinates (x right, y down)
    shadow_scale: float  # shadow length per px of object height (low sun = long shadows)

    @classmethod
    def new(cls, rng: np.random.Generator, height: int, width: int) -> _Canvas:
        azimuth = rng.uniform(0, 2 * math.pi)
        return cls(
            rng=rng,
            rgb=np.zeros((height, width, 3), dtype=np.float32),
            labels=np.zeros((height, width), dtype=np.uint8),
            grain=_fractal_noise(rng, height, width, 4, octaves=3),
            sun=np.array([math.cos(azimuth), math.sin(azimuth)], dtype=np.float32),
            shadow_scale=float(rng.uniform(0.4, 1.3)),
        )

    @property
    def height(self) -> int:
        return self.labels.shape[0]

    @property
    def width(self) -> int:
        return self.labels.shape[1]

    def count(self, mean_per_tile: float) -> int:
        """A Poisson count whose mean scales with the canvas area."""
        return int(self.rng.poisson(mean_per_tile * self.height * self.width / TILE_AREA))

    def somewhere(self, chance_per_tile: float) -> bool:
        """Whether a feature that a 256 px tile has with `chance_per_tile` appears on this canvas.

        A large canvas is a mosaic of tiles, so it has the feature unless all its tiles lack it.
        """
        tiles = max(self.height * self.width / TILE_AREA, 1.0)
        return self.rng.random() < 1.0 - (1.0 - chance_per_tile) ** tiles

    def shadow_offset(self, object_height: float) -> tuple[int, int]:
        """Integer (dx, dy) of the shadow of something `object_height` px tall."""
        dx, dy = -self.sun * object_height * self.shadow_scale
        return int(round(dx)), int(round(dy))

    def darken(self, shadow: np.ndarray, strength: float = 1.0) -> None:
        """Shadow colours in place; labels stay what they are."""
        factor = 1.0 - strength * (1.0 - SHADOW_TINT)
        self.rgb[shadow] *= factor


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _pick(rng: np.random.Generator, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    """One of `options`, uniformly or by weights summing to 1: 20x faster than Generator.choice."""
    if weights is None:
        return options[int(rng.integers(len(options)))]
    draw = rng.random()
    for option, weight in zip(options, weights, strict=True):
        draw -= weight
        if draw < 0:
            return option
    return options[-1]


def _grey(
    rng: np.random.Generator, level: float, tint: tuple[float, float, float], spread: float
) -> np.ndarray:
    """A grey of `level` nudged by `tint` and up to +-spread per channel (asphalt, concrete)."""
    return level + np.array(tint, dtype=np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32)


def _jitter(rng: np.random.Generator, palette: Sequence[Colour], amount: float) -> np.ndarray:
    """A palette entry with each channel moved by up to +-amount, so no two scenes share exact colours."""
    base = np.array(palette[int(rng.integers(len(palette)))], dtype=np.float32)
    return base + rng.uniform(-amount, amount, 3).astype(np.float32)


def _upsample(field: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic upsampling of a float32 grid by an integer factor."""
    grid_h, grid_w = field.shape
    big = Image.fromarray(field).resize((grid_w * factor, grid_h * factor), Image.Resampling.BICUBIC)
    return np.array(big)  # a writable copy: octaves are added in place


def _fractal_noise(
    rng: np.random.Generator,
    height: int,
    width: int,
    coarsest: int,
    octaves: int = 1,
    persistence: float = 0.6,
) -> np.ndarray:
    """(height, width) float32 value noise, unit std: octaves of features `coarsest`, coarsest/2, ... px.

    Built as a pyramid (upsample the sum by 2, add the next octave's grid) so a whole fractal costs one
    full-size resize; `coarsest` must be a power of two >= 2**(octaves - 1).
    """
    cell = coarsest
    field = rng.standard_normal(_grid_shape(height, width, cell), dtype=np.float32)
    amplitude = 1.0
    for _ in range(octaves - 1):
        cell //= 2
        amplitude *= persistence
        grid_h, grid_w = _grid_shape(height, width, cell)
        field = _upsample(field, 2)[:grid_h, :grid_w]  # drop the margin the doubling grew
        field += amplitude * rng.standard_normal(field.shape, dtype=np.float32)
    if cell > 1:
        field = _upsample(field, cell)
    # A random sub-cell crop hides the grid's phase; skipping the first cell hides bicubic's edge clamping.
    oy, ox = (int(v) for v in rng.integers(cell, 2 * cell, size=2))
    field = field[oy : oy + height, ox : ox + width]
    return field / max(float(field[::4, ::4].std()), 1e-6)


def _grid_shape(height: int, width: int, cell: int) -> tuple[int, int]:
    """Grid nodes that cover the canvas plus a crop offset of up to 2 cells after upsampling."""
    return height // cell + 3, width // cell + 3


def _rect_corners(cx: float, cy: float, half_u: float, half_v: float, angle: float) -> np.ndarray:
    """(4, 2) corners of a rectangle centred at (cx, cy) with its u axis at `angle` radians."""
    eu = np.array([math.cos(angle), math.sin(angle)])
    ev = np.array([-math.sin(angle), math.cos(angle)])
    signs = ((-1, -1), (1, -1), (1, 1), (-1, 1))
    return np.array([(cx, cy) + su * half_u * eu + sv * half_v * ev for su, sv in signs])


def _rect_frame(
    cx: float, cy: float, half_u: float, half_v: float, angle: float, height: int, width: int
) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """A rotated rectangle's clipped bounding box and each pixel's (u, v) in the rectangle's own frame.

    Returns (rows, cols, u, v) with u, v of shape (len(rows), len(cols)), or None when off-canvas. Pixel
    centres sit at integer coordinates, as in PIL.ImageDraw, so the shadows drawn with it line up.
    The rectangle's pixels are `(abs(u) <= half_u) & (abs(v) <= half_v)`: this test *is* the mask.
    """
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    reach_x = abs(half_u * cos_a) + abs(half_v * sin_a)
    reach_y = abs(half_u * sin_a) + abs(half_v * cos_a)
    x0, x1 = max(math.floor(cx - reach_x), 0), min(math.ceil(cx + reach_x) + 1, width)
    y0, y1 = max(math.floor(cy - reach_y), 0), min(math.ceil(cy + reach_y) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    return slice(y0, y1), slice(x0, x1), dx * cos_a + dy * sin_a, dy * cos_a - dx * sin_a


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """mask moved by (dx, dy) px, zero-filled (a shadow cast by the mask)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _resample(points: np.ndarray, step: float) -> np.ndarray:
    """A polyline (N, 2) resampled every `step` px of arc length."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    at = np.arange(0.0, arc[-1] + 1e-9, step)
    return np.stack([np.interp(at, arc, points[:, 0]), np.interp(at, arc, points[:, 1])], axis=1)


def _bezier(start: np.ndarray, control: np.ndarray, end: np.ndarray, samples: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 1.0, samples)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def _crossing_path(rng: np.random.Generator, height: int, width: int, bend: float) -> np.ndarray:
    """A straight or bent polyline that crosses the whole canvas (its ends lie well outside it)."""
    reach = math.hypot(height, width)
    centre = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height])
    angle = rng.uniform(0, math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start, end = centre - direction * reach, centre + direction * reach
    if bend == 0:
        return np.stack([start, end])
    return _bezier(start, centre + normal * bend * reach, end)


def _inside(points: np.ndarray, height: int, width: int, margin: float = 0.0) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    return (x >= margin) & (x < width - margin) & (y >= margin) & (y < height - margin)


# --- the layers, in draw order ----------------------------------------------------------------------


def _paint_ground(canvas: _Canvas) -> None:
    """Soil and grass blended by low-frequency noise, with fine texture: the background class."""
    rng, h, w = canvas.rng, canvas.height, canvas.width
    grass, lawn, soil = (
        _jitter(rng, colours, 10) for colours in (GRASS_COLOURS, GRASS_COLOURS, SOIL_COLOURS)
    )
    cover = _fractal_noise(rng, h, w, 128, octaves=4)
    greenness = rng.uniform(-1.2, 1.2)  # the share of grass: dry and bare scenes exist
    blend = np.clip(0.5 + (cover + greenness) * rng.uniform(0.5, 1.5), 0.0, 1.0)
    patches = np.clip(0.5 + _fractal_noise(rng, h, w, 32, octaves=3), 0.0, 1.0)  # two kinds of grass
    detail = 1.0 + rng.uniform(0.05, 0.12) * _fractal_noise(rng, h, w, 8, octaves=3) + 0.04 * canvas.grain
    # Per-pixel weights of (soil, grass, lawn) times one (3, 3) colour matrix: one pass over the image.
    weights = np.stack([1.0 - blend, blend * (1.0 - patches), blend * patches], axis=-1) * detail[..., None]
    np.matmul(weights, np.stack([soil, grass, lawn]), out=canvas.rgb)


def _paint_fields(canvas: _Canvas) -> None:
    """Crop fields with furrows and paved lots with parking stripes: background that looks like a class.

    They teach the model that stripes are not roads and that grey pavement is not a road either.
    """
    rng, h, w = canvas.rng, canvas.height, canvas.width
    if not canvas.somewhere(0.45):
        return
    for _ in range(max(1, canvas.count(2.0))):
        paved = rng.random() < 0.3
        size = (12, 45) if paved else (30, 110)
        half_u, half_v = rng.uniform(*size), rng.uniform(*size)
        cx, cy, angle = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, math.pi)
        frame = _rect_frame(cx, cy, half_u, half_v, angle, h, w)
        if frame is None:
            continue
        rows, cols, along, across = frame
        inside = (np.abs(along) <= half_u) & (np.abs(across) <= half_v)
        if paved:  # concrete or asphalt with a light stall line every 5-6 px
            colour = _grey(rng, rng.uniform(95, 175), tint=(0, 0, 0), spread=4)
            stripes = np.where(np.abs(across) % rng.uniform(5.0, 6.5) < 0.8, 1.35, 1.0)
        else:
            colour = _jitter(rng, FIELD_COLOURS, 12)
            stripes = 1.0 + rng.uniform(0.04, 0.14) * np.sin(across * (2 * math.pi / rng.uniform(3.0, 8.0)))
        texture = (stripes * (1.0 + 0.05 * canvas.grain[rows, cols]))[..., None]
        region = canvas.rgb[rows, cols]
        region[inside] = (colour * texture)[inside]


def _paint_water(canvas: _Canvas) -> None:
    """A lake (thresholded smooth noise) or a river (a wobbly band), with depth shading and ripples."""
    rng, h, w = canvas.rng, canvas.height, canvas.width
    if not canvas.somewhere(0.6):
        return
    if rng.random() < 0.65:
        level = _fractal_noise(rng, h, w, 128, octaves=5, persistence=0.5)
        coverage = rng.uniform(0.05, 0.35)
        water = level > np.quantile(level[::4, ::4], 1.0 - coverage)
    else:
        path = _resample(_crossing_path(rng, h, w, bend=rng.uniform(-0.25, 0.25)), 2.0)
        path = path[_inside(path, h, w, margin=-60)]
        if len(path) < 2:
            return
        radius = rng.uniform(6, 22) * (1.0 + 0.35 * _fractal_noise(rng, 1, len(path), 32)[0])
        image = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(image)
        for (x, y), r in zip(path, np.maximum(radius, 3.0), strict=True):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        water = np.asarray(image) > 0
    if not water.any():
        return
    # A blurred mask is a cheap distance to the shore: 0.5 on it, -> 1 deep inside, -> 0 far outside.
    water_image = Image.fromarray(water.astype(np.uint8) * 255)
    shore_distance = water_image.filter(ImageFilter.BoxBlur(rng.uniform(3, 8)))
    nearness = np.asarray(shore_distance, dtype=np.float32) / 255.0
    depth = np.clip(2.0 * nearness - 1.0, 0.0, 1.0) ** 0.7
    if rng.random() < 0.7:  # a sandy, muddy or reedy margin (background) around the water
        ring = (nearness > rng.uniform(0.1, 0.35)) & ~water
        canvas.rgb[ring] = 0.5 * canvas.rgb[ring] + 0.5 * _jitter(rng, SHORE_COLOURS, 10)
    deep, shallow = _jitter(rng, DEEP_WATER_COLOURS, 8), _jitter(rng, SHALLOW_WATER_COLOURS, 8)
    ys, xs = np.nonzero(water)
    wave = rng.uniform(0, math.pi)
    phase = (xs * math.cos(wave) + ys * math.sin(wave)) * (2 * math.pi / rng.uniform(3, 7))
    swell = 2.5 * _fractal_noise(rng, h, w, 16)[ys, xs]  # bends the ripples' crests
    ripples = 1.0 + rng.uniform(0.02, 0.07) * np.sin(phase + swell)
    canvas.rgb[ys, xs] = (shallow + (deep - shallow) * depth[ys, xs, None]) * ripples[:, None]
    canvas.labels[water] = WATER


@dataclass(frozen=True)
class _Road:
    """A drawn road's centreline, resampled every px, for markings and for placing houses and trees."""

    path: np.ndarray  # (N, 2) x, y
    width: int


def _paint_roads(canvas: _Canvas) -> list[_Road]:
    """Asphalt (sometimes dirt) bands: roads across the canvas and side roads branching off them."""
    rng, h, w = canvas.rng, canvas.height, canvas.width
    if not canvas.somewhere(0.8):
        return []
    layer, mask_image = Image.new("RGB", (w, h)), Image.new("L", (w, h), 0)
    paint, mask = ImageDraw.Draw(layer), ImageDraw.Draw(mask_image)
    asphalt = _grey(rng, rng.uniform(62, 135), tint=(3, 2, 0), spread=3)  # slightly warm, never purple
    marking = _jitter(rng, MARKING_COLOURS, 8)
    dirt = rng.random() < 0.15
    roads: list[_Road] = []
    # Through roads cross the whole canvas, so their number grows with its side; side roads with its area.
    through = 1 + int(rng.poisson(0.7 * math.sqrt(h * w / TILE_AREA)))
    for n in range(through + canvas.count(0.7)):
        start_gap = 0.0
        if n >= through:  # a side road: a T-junction off a visible stretch of a drawn road
            parent = roads[int(rng.integers(len(roads)))]
            visible = parent.path[_inside(parent.path, h, w, margin=8)]
            if len(visible) < 2:
                continue
            k = int(rng.integers(len(visible) - 1))
            tangent = visible[k + 1] - visible[k]
            tangent /= max(float(np.linalg.norm(tangent)), 1e-6)
            side = _sign(rng)
            turn = rng.uniform(-0.25, 0.25)
            normal = side * np.array([-tangent[1], tangent[0]])
            cos_t, sin_t = math.cos(turn), math.sin(turn)
            direction = np.array(
                [normal[0] * cos_t - normal[1] * sin_t, normal[0] * sin_t + normal[1] * cos_t]
            )
            length = rng.uniform(50, 400)
            end = visible[k] + direction * length
            sway = np.array([-direction[1], direction[0]]) * rng.uniform(-0.3, 0.3) * length
            path = _bezier(visible[k], (visible[k] + end) / 2 + sway, end, samples=24)
            width = int(rng.integers(5, min(parent.width, 10) + 1))
            start_gap = parent.width / 2 + 2
            dead_end = bool(_inside(path[-1:], h, w).all())
        else:
            bend = 0.0 if rng.random() < 0.5 else rng.uniform(-0.4, 0.4)
            path = _crossing_path(rng, h, w, bend)
            width = int(rng.integers(6, 15))
            dead_end = False
        colour = asphalt + rng.uniform(-6, 6, 3).astype(np.float32)
        if dirt:
            colour = _jitter(rng, SOIL_COLOURS, 10) * 0.95
        fill = tuple(int(c) for c in np.clip(colour, 0, 255))
        points = [(float(x), float(y)) for x, y in path]
        paint.line(points, fill=fill, width=width, joint="curve")
        mask.line(points, fill=255, width=width, joint="curve")
        if dead_end and rng.random() < 0.6:  # a turning circle
            x, y = path[-1]
            r = width * rng.uniform(0.9, 1.4)
            paint.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            mask.ellipse((x - r, y - r, x + r, y + r), fill=255)
        dense = _resample(path, 1.0)
        if not dirt and width >= 10 and rng.random() < 0.4:  # solid edge lines on wide roads
            paint.line(points, fill=tuple(int(c) for c in marking), width=width - 2, joint="curve")
            paint.line(points, fill=fill, width=width - 4, joint="curve")
        if not dirt and width >= 7 and rng.random() < 0.8:
            _paint_dashes(paint, dense, marking, 1 if width < 11 else 2, start_gap, rng, h, w)
        roads.append(_Road(dense[_inside(dense, h, w, margin=-20)], width))
    drawn = np.asarray(mask_image) > 0
    wear = 1.0 + 0.07 * canvas.grain + 0.05 * _fractal_noise(rng, h, w, 32)
    road_rgb = np.asarray(layer, dtype=np.float32) * wear[..., None]
    canvas.rgb[drawn] = road_rgb[drawn]
    canvas.labels[drawn] = ROAD
    return [road for road in roads if len(road.path) >= 2]


def _paint_dashes(
    paint: ImageDraw.ImageDraw,
    dense: np.ndarray,
    colour: np.ndarray,
    width: int,
    start: float,
    rng: np.random.Generator,
    height: int,
    canvas_width: int,
) -> None:
    """Dashed centre line along a 1-px-resampled centreline, from arc length `start` on."""
    on, off = rng.uniform(4, 9), rng.uniform(4, 10)
    arc = np.arange(len(dense), dtype=np.float32)
    dashed = ((arc - start) % (on + off) < on) & (arc >= start) & _inside(dense, height, canvas_width, -4)
    index = np.flatnonzero(dashed)
    fill = tuple(int(c) for c in np.clip(colour, 0, 255))
    for run in np.split(index, np.flatnonzero(np.diff(index) > 1) + 1):
        if len(run) >= 2:
            paint.line([(float(x), float(y)) for x, y in dense[run]], fill=fill, width=width)


@dataclass(frozen=True)
class _Wing:
    """One rectangle of a footprint with its own roof; an L-shaped house is two wings."""

    cx: float
    cy: float
    half_length: float  # along the ridge (u axis)
    half_width: float
    angle: float
    roof: str  # "gable", "hip" or "flat"

    def corners(self) -> np.ndarray:
        return _rect_corners(self.cx, self.cy, self.half_length, self.half_width, self.angle)


def _paint_buildings(canvas: _Canvas, roads: list[_Road]) -> None:
    """Houses along roads and scattered, warehouses, L-shapes; pitched or flat roofs; ground shadows."""
    rng, h, w = canvas.rng, canvas.height, canvas.width
    if not canvas.somewhere(0.85):
        return
    wanted = canvas.count(_pick(rng, (4.0, 14.0, 28.0), (0.3, 0.4, 0.3)))  # houses per tile
    if wanted == 0:
        return
    # One value per 16 px, features ~250 px: buildings gather in villages and thin out between them, so a
    # large canvas has towns and open country rather than one even sprinkle.
    town = np.clip(0.55 + 0.5 * _fractal_noise(rng, h // 16 + 1, w // 16 + 1, 16, octaves=2), 0.05, 1.0)
    palette = [ROOF_COLOURS[int(i)] for i in rng.choice(len(ROOF_COLOURS), size=int(rng.integers(2, 5)))]
    grid_angle = rng.uniform(0, math.pi / 2)  # scattered buildings share a street grid's orientation
    shadows = Image.new("L", (w, h), 0)
    draw_shadow = ImageDraw.Draw(shadows)
    placed = 0
    for _ in range(wanted * 8):
        if placed >= wanted:
            break
        wings = _propose_building(rng, h, w, roads, grid_angle)
        cx, cy = wings[0].cx, wings[0].cy
        if not (0 <= cx < w and 0 <= cy < h) or rng.random() > town[int(cy) // 16, int(cx) // 16]:
            continue
        if _blocked(canvas.labels, wings, margin=2.5):
            continue
        colour = _jitter(rng, palette, 10)
        height_px = rng.uniform(3, 6) if wings[0].half_length < 16 else rng.uniform(4, 10)
        dx, dy = -canvas.sun * height_px * canvas.shadow_scale
        for wing in wings:
            _paint_roof(canvas, wing, colour)
            corners = wing.corners()
            moved = corners + (dx, dy)
            draw_shadow.polygon([(float(x), float(y)) for x, y in moved], fill=255)
            for i in range(4):  # the wall's sweep: the polygon's Minkowski sum with the shadow vector
                a, b = corners[i], corners[(i + 1) % 4]
                quad = [tuple(a), tuple(b), tuple(b + (dx, dy)), tuple(a + (dx, dy))]
                draw_shadow.polygon([(float(x), float(y)) for x, y in quad], fill=255)
        placed += 1
    shadow = (np.asarray(shadows) > 0) & (canvas.labels != BUILDING)
    canvas.darken(shadow, strength=rng.uniform(0.75, 1.0))


_BLOCKS_BUILDINGS = np.array([False, True, True, True, False])  # by label: building, road, water


def _blocked(labels: np.ndarray, wings: list[_Wing], margin: float) -> bool:
    """Whether the footprint grown by `margin` px touches a building, road or water.

    Sampling every <= 2 px is exact enough: nothing it must not touch is narrower than 5 px.
    """
    h, w = labels.shape
    for wing in wings:
        half_u, half_v = wing.half_length + margin, wing.half_width + margin
        u = np.linspace(-half_u, half_u, int(half_u) + 2)[None, :]
        v = np.linspace(-half_v, half_v, int(half_v) + 2)[:, None]
        cos_a, sin_a = math.cos(wing.angle), math.sin(wing.angle)
        x = np.rint(wing.cx + u * cos_a - v * sin_a).astype(np.intp).ravel()
        y = np.rint(wing.cy + u * sin_a + v * cos_a).astype(np.intp).ravel()
        on_canvas = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        if _BLOCKS_BUILDINGS[labels[y[on_canvas], x[on_canvas]]].any():
            return True
    return False


def _propose_building(
    rng: np.random.Generator, h: int, w: int, roads: list[_Road], grid_angle: float
) -> list[_Wing]:
    """A random footprint: a house set back from a road and parallel to it, or scattered on the grid."""
    large = rng.random() < 0.15
    if large:
        half_length, half_width = rng.uniform(14, 36), rng.uniform(10, 22)
        roof = "flat" if rng.random() < 0.85 else "gable"
    else:
        half_length, half_width = rng.uniform(6, 13), rng.uniform(4, 8)
        roof = _pick(rng, ("gable", "hip", "flat"), (0.55, 0.35, 0.10))
    if roads and rng.random() < 0.75:
        road = roads[int(rng.integers(len(roads)))]
        k = int(rng.integers(len(road.path) - 1))
        tangent = road.path[k + 1] - road.path[k]
        tangent /= max(float(np.linalg.norm(tangent)), 1e-6)
        normal = np.array([-tangent[1], tangent[0]]) * _sign(rng)
        angle = math.atan2(tangent[1], tangent[0]) + rng.normal(0, 0.04)
        across = half_width
        if rng.random() < 0.3:  # gable end facing the street
            angle += math.pi / 2
            across = half_length
        cx, cy = road.path[k] + normal * (road.width / 2 + rng.uniform(3, 12) + across)
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        angle = grid_angle + (math.pi / 2) * int(rng.integers(2)) + rng.normal(0, 0.03)
        if rng.random() < 0.3:
            angle = rng.uniform(0, math.pi)
    wings = [_Wing(float(cx), float(cy), half_length, half_width, angle, roof)]
    if rng.random() < 0.3:  # an L: a perpendicular wing from the ridge outwards at one end
        arm_half_width = rng.uniform(0.6, 1.0) * half_width
        reach = rng.uniform(0.8, 2.0) * half_width
        along = _sign(rng) * (half_length - arm_half_width)
        out = _sign(rng) * (half_width + reach) / 2
        eu = np.array([math.cos(angle), math.sin(angle)])
        ev = np.array([-math.sin(angle), math.cos(angle)])
        centre = np.array([cx, cy]) + along * eu + out * ev
        arm_length = (half_width + reach) / 2
        wings.append(
            _Wing(float(centre[0]), float(centre[1]), arm_length, arm_half_width, angle + math.pi / 2, roof)
        )
    return wings


def _paint_roof(canvas: _Canvas, wing: _Wing, colour: np.ndarray) -> None:
    """Colour one wing's pixels: sunlit facets, ridge and eaves lines, rows of tiles or rooftop units."""
    a, b = wing.half_length, wing.half_width
    frame = _rect_frame(wing.cx, wing.cy, a, b, wing.angle, canvas.height, canvas.width)
    if frame is None:
        return
    rows, cols, u, v = frame
    inside = (np.abs(u) <= a) & (np.abs(v) <= b)
    rng = canvas.rng
    cos_a, sin_a = math.cos(wing.angle), math.sin(wing.angle)
    sun_u = float(canvas.sun[0] * cos_a + canvas.sun[1] * sin_a)  # the sun in the wing's frame
    sun_v = float(-canvas.sun[0] * sin_a + canvas.sun[1] * cos_a)
    contrast = rng.uniform(0.15, 0.35)
    if wing.roof == "flat":
        light = np.ones_like(u)
        for _ in range(int(rng.integers(0, 5))):  # rooftop units
            u0, v0, s = rng.uniform(-0.7 * a, 0.7 * a), rng.uniform(-0.7 * b, 0.7 * b), rng.uniform(1.0, 3.0)
            light[(np.abs(u - u0) < s) & (np.abs(v - v0) < s)] = _pick(rng, (0.8, 1.2))
        edge = (np.abs(u) > a - 1.5) | (np.abs(v) > b - 1.5)
        light = np.where(edge, 0.85, light) * (1.0 + 0.03 * np.sin(u * 1.3))
    else:
        side = np.sign(v) * sun_v
        if wing.roof == "hip":
            end = np.abs(u) - (a - b) > np.abs(v)
            side = np.where(end, np.sign(u) * sun_u, side)
        light = 1.0 + contrast * side
        light *= 1.0 + 0.04 * np.sin(v * (2 * math.pi / rng.uniform(1.6, 2.6)))  # rows of tiles
        ridge = (np.abs(v) < 0.8) & (np.abs(u) < a - (b if wing.roof == "hip" else 0))
        light = np.where(ridge, light * 1.1, light)
        eaves = (np.abs(u) > a - 1.0) | (np.abs(v) > b - 1.0)
        light = np.where(eaves, light * 0.88, light)
    shaded = colour * (light * (1.0 + 0.04 * canvas.grain[rows, cols]))[..., None]
    canvas.rgb[rows, cols][inside] = shaded[inside]
    canvas.labels[rows, cols][inside] = BUILDING


def _paint_trees(canvas: _Canvas, roads: list[_Road]) -> None:
    """Round crowns from a height field (clusters, woods, street rows), lit by the sun, with shadows."""
    rng, h, w = canvas.rng, canvas.height, canvas.width
    crowns: list[tuple[float, float, float]] = []  # x, y, radius
    if canvas.somewhere(0.85):
        for _ in range(max(1, canvas.count(5.0))):
            cx, cy, spread = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 22)
            for _ in range(int(rng.integers(1, 14))):
                crowns.append((cx + rng.normal(0, spread), cy + rng.normal(0, spread), rng.uniform(2.5, 7.5)))
    if canvas.somewhere(0.2):  # a wood: dense crowns filling a noise blob
        wood = _fractal_noise(rng, h, w, 128, octaves=3) > rng.uniform(0.3, 1.2)
        seeds = canvas.count(350)
        for x, y in zip(rng.uniform(0, w, seeds), rng.uniform(0, h, seeds), strict=True):
            if wood[int(y), int(x)]:
                crowns.append((x, y, rng.uniform(3.5, 7.5)))
    if roads and rng.random() < 0.3:  # a row of street trees
        road = roads[int(rng.integers(len(roads)))]
        spacing, radius = rng.uniform(10, 18), rng.uniform(3.5, 6.0)
        offset = road.width / 2 + radius + rng.uniform(0, 3)
        tangent = np.gradient(road.path, axis=0)
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-6)
        side = _sign(rng)
        for k in range(0, len(road.path), max(1, int(spacing))):
            x, y = road.path[k] + side * offset * normal[k]
            crowns.append((x, y, radius * rng.uniform(0.8, 1.2)))
    height_field = np.zeros((h, w), dtype=np.float32)
    tint = np.zeros((h, w), dtype=np.float32)
    for x, y, r in crowns:
        if not (0 <= x < w and 0 <= y < h) or canvas.labels[int(y), int(x)] in (BUILDING, ROAD, WATER):
            continue  # crowns stand on open ground; they may still overhang a roof edge or a road
        _stamp_crown(height_field, tint, x, y, r, base=rng.uniform(0, 2), shade=rng.random())
    tree = height_field > np.clip(0.5 + 0.6 * canvas.grain, 0.0, 2.0)  # ragged crown edges
    if not tree.any():
        return
    dx, dy = canvas.shadow_offset(rng.uniform(4, 7))
    canvas.darken(_shift(tree, dx, dy) & ~tree, strength=rng.uniform(0.7, 0.95))
    relief = height_field + 0.7 * canvas.grain  # leafy bumps on the crowns
    grad_y, grad_x = (np.asarray(g)[tree] for g in np.gradient(relief))
    elevation = 0.8
    lit = (-grad_x * canvas.sun[0] - grad_y * canvas.sun[1]) * math.cos(elevation) + math.sin(elevation)
    lit /= np.sqrt(grad_x**2 + grad_y**2 + 1.0)
    light = 0.4 + 0.85 * np.clip(lit, 0.0, None)
    dark, pale = _jitter(rng, TREE_COLOURS, 8), _jitter(rng, TREE_COLOURS, 8)  # species vary per crown
    canvas.rgb[tree] = (dark + (pale - dark) * tint[tree][:, None]) * light[:, None]
    canvas.labels[tree] = TREE


def _stamp_crown(
    height_field: np.ndarray, tint: np.ndarray, x: float, y: float, r: float, base: float, shade: float
) -> None:
    """Raise a hemisphere of radius r at (x, y) where it is higher than what is there (crowns interlock)."""
    h, w = height_field.shape
    y0, y1 = max(int(y - r) - 1, 0), min(int(y + r) + 2, h)
    x0, x1 = max(int(x - r) - 1, 0), min(int(x + r) + 2, w)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    crown = np.sqrt(np.maximum(r * r - d2, 0.0)).astype(np.float32) + base
    region, tint_region = height_field[y0:y1, x0:x1], tint[y0:y1, x0:x1]
    higher = (d2 < r * r) & (crown > region)
    region[higher] = crown[higher]
    tint_region[higher] = shade


# --- the photo ------------------------------------------------------------------------------------


def _photograph(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Canvas -> uint8 RGB as a camera sees it: light falloff, white balance, haze, noise, gamma, blur."""
    h, w, _ = rgb.shape
    tilt = rng.uniform(0, 2 * math.pi)
    across = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
    down = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
    ramp = across * math.cos(tilt) + down * math.sin(tilt)  # -0.7..0.7 across the canvas
    exposure = (1.0 + rng.uniform(0.0, 0.3) * ramp) * rng.uniform(0.85, 1.15)
    haze = rng.uniform(0.0, 0.18)
    balance = rng.uniform(0.94, 1.06, 3).astype(np.float32) * (1 - haze)
    out = rgb * exposure[..., None]
    out *= balance
    out += haze * np.array([194, 198, 204], dtype=np.float32)
    # Sensor noise: the sum of two uniforms is close enough to Gaussian and 3x cheaper to draw.
    spread = rng.uniform(1.5, 5.0) * math.sqrt(6.0)  # a noise std of 1.5-5 grey levels
    out += spread * rng.random(out.shape, dtype=np.float32)
    out += spread * (rng.random(out.shape, dtype=np.float32) - 1.0)
    np.clip(out, 0, 255, out=out)
    image = Image.fromarray(out.astype(np.uint8))
    gamma = rng.uniform(0.85, 1.15)
    image = image.point([round(255 * (i / 255) ** gamma) for i in range(256)] * 3)
    # A 3 x 3 Gaussian of sigma 0.3-0.9 px (optics, resampling); 2x cheaper than ImageFilter.GaussianBlur.
    side = math.exp(-0.5 / rng.uniform(0.3, 0.9) ** 2)
    taps = [side, 1.0, side]
    image = image.filter(ImageFilter.Kernel((3, 3), [a * b for a in taps for b in taps]))
    return np.asarray(image).copy()


def _encode_png_rgb(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=IMAGE_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
