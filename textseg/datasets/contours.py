"""Region masks -> polygons, for export formats that store outlines rather than masks (YOLO-seg).

A vertex is a pixel's centre, (x, y) = (column, row), as OpenCV's `findContours` gives it and as polygon
fillers paint it back: OpenCV's `fillPoly` and Pillow's `ImageDraw.polygon` fill the pixels inside a polygon
and those on its outline, so an outline through the centres of a region's boundary pixels paints exactly the
region, a one-pixel line or a single pixel included.

How the outlines are found: the cracks between the region's pixels and the rest (pixel edges) are chained
into rings that keep the region on their right, which makes an outline clockwise on screen and a hole
counter-clockwise. Where two region pixels touch only at a corner the chain turns towards the other pixel,
so they stay in one ring: a region is 8-connected, as `textseg.labels.instances` cuts them. Every crack has
one region pixel on its right; those pixels in ring order are the ring through pixel centres.

YOLO-seg (like most polygon formats) has one vertex list per object, without holes, so `single_polygon`
joins a region's rings by zero-width cuts, walked there and back along the same segment:
- A hole is cut from its leftmost pixel straight left, along its row, to the first pixel of another ring
  (its part's outline or another hole). Every pixel the cut crosses is a region pixel (a non-region pixel
  on the way would have a ring pixel just right of it), so a hole costs nothing when painted back, and
  since each cut ends further left than it starts the cuts form a tree under the outline.
- A region in several parts (SAM 3's query masks can be) has its parts bridged, from the largest on, the
  part nearest to those joined so far next, at their closest pair of vertices (Prim's algorithm: the
  shortest tree of straight bridges). One object stays one line, at the price of each bridge's one-pixel
  line over what separates the parts when painted back.
Runs of collinear vertices keep only their ends.

`instance_polygon` does this for an instance row (`textseg.outputs.instances`), decoding its COCO RLE over
the object's own box: an image's thousands of small objects must not cost a full-image pass each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

# Crack directions in the order they turn clockwise on screen (y down): east, south, west, north.
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])
# Where a crack of each direction starts, from the top-left corner of the region pixel on its right, and
# which neighbour of that pixel (outside the region) lies on its left.
_START = np.array([[0, 0], [1, 0], [1, 1], [0, 1]])
_OUTSIDE = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]])


def instance_polygon(instance: Mapping[str, Any]) -> np.ndarray:
    """An instance row's object as `single_polygon` gives it, in full-image pixels: (N, 2) int64 (x, y)."""
    crop, left, top = instance_crop(instance)
    return single_polygon(crop) + np.array([left, top])


def instance_crop(instance: Mapping[str, Any]) -> tuple[np.ndarray, int, int]:
    """An instance row's mask over the box of its pixels: ((h, w) bool, left, top); (0, 0) when empty."""
    height = int(instance["mask_size"][0])
    runs = rle_runs(str(instance["mask_counts"]))
    ends = np.cumsum(runs)
    starts, lengths = (ends - runs)[1::2], runs[1::2]  # COCO's runs alternate, starting with unset pixels
    # Every set pixel's column-major position: x * height + y.
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    columns, rows = np.divmod(np.repeat(starts, lengths) + offsets, height)
    if columns.size == 0:
        return np.zeros((0, 0), dtype=bool), 0, 0
    left, top = int(columns.min()), int(rows.min())
    crop = np.zeros((int(rows.max()) - top + 1, int(columns.max()) - left + 1), dtype=bool)
    crop[rows - top, columns - left] = True
    return crop, left, top


def rle_runs(counts: str) -> np.ndarray:
    """COCO's compressed RLE `counts` (pycocotools' string form) -> its run lengths, int64.

    The string holds one number per run in 5-bit groups (chars from '0', low group first, 0x20 = more
    groups follow, 0x10 in the last = negative); from the third number on each is the difference from the
    number two before it."""
    values: list[int] = []
    data = counts.encode("ascii")
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            group = data[position] - 48
            position += 1
            value |= (group & 0x1F) << shift
            shift += 5
            more = bool(group & 0x20)
            if not more and group & 0x10:
                value -= 1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return np.asarray(values, dtype=np.int64)


def single_polygon(mask: np.ndarray) -> np.ndarray:
    """An (H, W) bool mask's region as one (N, 2) int64 vertex list (x, y) at pixel centres, its holes
    and further parts joined by zero-width cuts (module docstring); (0, 2) for an empty mask."""
    points, starts, twice_area = _rings(mask)
    if len(points) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    cuts, entry = _hole_cuts(points, starts, twice_area < 0)
    outlines = np.flatnonzero(twice_area > 0)
    outlines = outlines[np.argsort(-twice_area[outlines], kind="stable")]  # the largest part first
    walks = [points[_splice(starts, len(points), entry, cuts, outline)] for outline in outlines.tolist()]
    walk_starts = np.r_[0, np.cumsum([len(walk) for walk in walks])[:-1]]
    cuts, entry = _bridges(walks, walk_starts)
    joined = np.concatenate(walks)
    joined = joined[_splice(walk_starts, len(joined), entry, cuts, 0)]
    return _corners(joined, np.zeros(1, dtype=np.int64))[0]


def _rings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rings of a bool mask through its boundary pixels' centres, without repeated vertices:
    (points concatenated ring after ring, each ring's start, each ring's twice signed crack area: positive
    for an outline, negative for a hole)."""
    inside = np.pad(mask.astype(bool), 1)
    height, width = inside.shape
    starts, directions = [], []
    for side in range(4):
        dx, dy = _OUTSIDE[side]
        outside = ~np.roll(inside, (-dy, -dx), axis=(0, 1))
        rows, cols = np.nonzero(inside & outside)
        starts.append(np.column_stack([cols, rows]) + _START[side])
        directions.append(np.full(rows.size, side))
    start = np.concatenate(starts)
    direction = np.concatenate(directions)
    if start.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order, ring_starts = _cycles(_following_cracks(start, direction, height + 1, width + 1))
    end = start + _STEP[direction]
    twice_area = np.add.reduceat((start[:, 0] * end[:, 1] - end[:, 0] * start[:, 1])[order], ring_starts)
    pixels = (start - _START[direction] - 1)[order]  # the region pixel right of each crack, unpadded
    points, point_starts = _without_repeats(pixels, ring_starts)
    return points, point_starts, twice_area


def _following_cracks(start: np.ndarray, direction: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """For each crack, the index of the one that follows it in its ring: at its end vertex the crack
    turning left, else straight on, else right. Two cracks leave a vertex only where region pixels touch at
    a corner, and turning left there keeps them in one ring (8-connected). `rows` x `columns`: the vertex
    grid."""

    def key(d: np.ndarray, vertex: np.ndarray) -> np.ndarray:
        return (d * rows + vertex[:, 1]) * columns + vertex[:, 0]

    keys = key(direction, start)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    end = start + _STEP[direction]
    following = np.full(direction.size, -1)
    for turn in (-1, 0, 1):
        wanted = key((direction + turn) % 4, end)
        position = np.minimum(np.searchsorted(sorted_keys, wanted), sorted_keys.size - 1)
        hit = (sorted_keys[position] == wanted) & (following < 0)
        following[hit] = order[position[hit]]
    return following


def _cycles(following: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cycles of a permutation: all indices, cycle after cycle in cycle order, and where each starts."""
    successor = following.tolist()
    seen = [False] * len(successor)
    order: list[int] = []
    starts: list[int] = []
    for first in range(len(successor)):
        if seen[first]:
            continue
        starts.append(len(order))
        index = first
        while not seen[index]:
            seen[index] = True
            order.append(index)
            index = successor[index]
    return np.asarray(order), np.asarray(starts)


def _hole_cuts(
    points: np.ndarray, starts: np.ndarray, is_hole: np.ndarray
) -> tuple[dict[int, list[int]], np.ndarray]:
    """Where each hole is cut in (module docstring): {ring vertex: the holes cut in there}, and the vertex
    each ring is entered by (a hole's leftmost; an outline's first)."""
    lengths = np.diff(np.r_[starts, len(points)])
    ring = np.repeat(np.arange(len(starts)), lengths)
    keys = points[:, 1] * (int(points[:, 0].max()) + 2) + points[:, 0]
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    entry = np.where(is_hole, np.lexsort((points[:, 0], ring))[starts], starts)  # leftmost: least x
    holes = np.flatnonzero(is_hole)
    # A hole's leftmost pixel lies on another ring too when the pixel left of it is outside the region;
    # otherwise the nearest ring pixel left of it in its row is the cut's other end.
    hole_keys = keys[entry[holes]]
    lows = np.searchsorted(sorted_keys, hole_keys, "left").tolist()
    highs = np.searchsorted(sorted_keys, hole_keys, "right").tolist()
    cuts: dict[int, list[int]] = {}
    for hole, low, high in zip(holes.tolist(), lows, highs, strict=True):
        shared = [vertex for vertex in by_key[low:high].tolist() if ring[vertex] != hole]
        cuts.setdefault(shared[0] if shared else int(by_key[low - 1]), []).append(hole)
    return cuts, entry


def _bridges(walks: list[np.ndarray], starts: np.ndarray) -> tuple[dict[int, list[int]], np.ndarray]:
    """Where each further part is bridged in, as `_hole_cuts` says it for holes: part by part (Prim's
    algorithm), the part closest to those joined so far, at its closest pair of vertices, so the bridges are
    as short as the parts allow. Costs a nearest-vertex query of every part per part."""
    entry = starts.copy()
    distance = np.full(len(walks), np.inf)
    link = np.zeros(len(walks), dtype=np.int64)  # the joined vertex each part would be bridged to
    waiting = set(range(1, len(walks)))
    cuts: dict[int, list[int]] = {}
    added = 0
    while waiting:
        tree = cKDTree(walks[added])
        for part in waiting:
            found, nearest = tree.query(walks[part])
            closest = int(np.argmin(found))
            if found[closest] < distance[part]:
                distance[part] = found[closest]
                link[part] = starts[added] + nearest[closest]
                entry[part] = starts[part] + closest
        added = min(waiting, key=lambda part: distance[part])
        waiting.remove(added)
        cuts.setdefault(int(link[added]), []).append(added)
    return cuts, entry


def _splice(
    starts: np.ndarray, count: int, entry: np.ndarray, cuts: dict[int, list[int]], root: int
) -> np.ndarray:
    """The vertex indices of ring `root` walked round with the rings cut in at its vertices (`cuts`),
    and theirs in turn: at vertex v, for each ring cut in there, that ring from its entry vertex round to it
    again, then v again, then on. `count`: the number of vertices of all rings."""
    first = starts.tolist()
    size = np.diff(np.r_[starts, count]).tolist()
    sequence: list[int] = []
    # A stack of (vertex, whether its cuts are still to walk) lists, each to be walked from its end.
    stack = [[(first[root] + k, True) for k in range(size[root])][::-1]]
    while stack:
        if not stack[-1]:
            stack.pop()
            continue
        vertex, open_cuts = stack[-1].pop()
        sequence.append(vertex)
        if not open_cuts:
            continue
        for ring in cuts.get(vertex, [])[::-1]:
            offset = int(entry[ring]) - first[ring]
            around = [first[ring] + (offset + k) % size[ring] for k in range(size[ring] + 1)]
            stack.append([(vertex, False)] + [(v, k < size[ring]) for k, v in enumerate(around)][::-1])
    return np.asarray(sequence)


def _corners(points: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rings (concatenated, each from `starts`) without repeated vertices and without the inner vertices
    of straight runs; returns the rings so thinned, concatenated, and their starts."""
    points, starts = _without_repeats(points, starts)
    before, after, ring, _ = _ring_neighbours(points, starts)
    into, out = points - before, after - points
    cross = into[:, 0] * out[:, 1] - into[:, 1] * out[:, 0]
    short = (np.diff(np.r_[starts, len(points)]) < 3)[ring]
    return _kept(points, starts, (cross != 0) | (np.sum(into * out, axis=1) < 0) | short)


def _without_repeats(points: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rings (concatenated, each from `starts`) without a vertex equal to the one before it; a ring of one
    repeated vertex (a single pixel) keeps one."""
    before, _, ring, first = _ring_neighbours(points, starts)
    moved = np.any(points != before, axis=1)
    moved |= (np.arange(len(points)) == first) & ~np.logical_or.reduceat(moved, starts)[ring]
    return _kept(points, starts, moved)


def _ring_neighbours(
    points: np.ndarray, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each vertex of concatenated rings: the one before and after it in its ring (wrapping round), its
    ring's number and the index of its ring's first vertex."""
    lengths = np.diff(np.r_[starts, len(points)])
    ring = np.repeat(np.arange(len(starts)), lengths)
    index = np.arange(len(points))
    first = starts[ring]
    last = first + lengths[ring] - 1
    before = points[np.where(index == first, last, index - 1)]
    after = points[np.where(index == last, first, index + 1)]
    return before, after, ring, first


def _kept(points: np.ndarray, starts: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.add.reduceat(keep.astype(np.int64), starts)
    return points[keep], np.r_[0, np.cumsum(counts)[:-1]]
