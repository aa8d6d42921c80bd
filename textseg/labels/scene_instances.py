"""Instances of a windowed scene: the connected regions of its label map, found block by block.

A scene is too large to hold as one label map, so its mask is assembled in blocks (row-major, one grid;
`textseg.pipeline.scenes`). A region cut by a block or window border must still be one instance, as the
polygons of `textseg.labels.vector_merge` are one polygon: each block's regions are labeled on their own
(8-connected, as `textseg.labels.instances.region_instances` labels a whole image), touching regions of
the same class in neighbouring blocks are recorded as edges (the row above the block and the column to
its left, diagonals included), and `instances()` joins them with scipy's connected components.

What is held: per region piece its class, pixel count, score sum and first pixel; its runs of pixels in
column-major order (what COCO's RLE is made of); the last label row above the current block row and the
column left of the current block. Memory is thus proportional to the scene's RLE, never to its pixels.
The rows are those `region_instances` gives for the whole label map, in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from textseg.image.windows import SCORE_LEVELS, Window
from textseg.labels.instances import EIGHT_CONNECTED, encode_rle_runs, instance_row


class SceneRegions:
    """Feed every block of one grid over a (height, width) scene in row-major order (`add`), then read
    the scene's instances (`instances`)."""

    def __init__(self, width: int, height: int, class_names: list[str]):
        self.width, self.height, self.class_names = width, height, class_names
        self._next_id = 1  # 0: no region
        self._pieces: list[tuple[np.ndarray, ...]] = []  # per block: class, count, score sum, first pixel
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per block: id, start, end
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._above = np.zeros((2, width), dtype=np.int64)  # ids and labels of the row above the blocks
        self._pending = np.zeros((2, width), dtype=np.int64)  # the bottom row of the current block row
        self._left = np.zeros((2, 0), dtype=np.int64)  # ids and labels of the column left of the block
        self._last: Window | None = None

    def add(self, block: Window, labels: np.ndarray, scores: np.ndarray) -> None:
        """labels: the block's (h, w) uint8 labels (0 background, 255 no data); scores: its (1 + K, h, w)
        uint8 class scores."""
        if block.x0 == 0:
            self._above, self._pending = self._pending, np.zeros_like(self._pending)
        elif self._last is None or (self._last.x1, self._last.y0, self._last.height) != (
            block.x0,
            block.y0,
            block.height,
        ):
            raise ValueError(f"blocks must come row-major from one grid; got {block} after {self._last}")
        ids = self._label(block, labels, scores)
        self._add_edges(block, ids, labels)
        self._add_runs(block, ids)
        self._pending[:, block.x0 : block.x1] = ids[-1], labels[-1]
        self._left = np.stack([ids[:, -1], labels[:, -1].astype(np.int64)])
        self._last = block

    def _label(self, block: Window, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The block's region ids (0 outside regions), numbered on from the previous blocks', with each
        new id's class, pixel count, score sum and first pixel (row-major position in the scene)."""
        ids = np.zeros(labels.shape, dtype=np.int64)
        classes = []
        first_id = self._next_id
        for index in np.unique(labels):
            if index == 0 or index >= len(self.class_names):
                continue
            regions, count = ndimage.label(labels == index, structure=EIGHT_CONNECTED)
            inside = regions > 0
            ids[inside] = regions[inside] + (self._next_id - 1)
            classes.append(np.full(count, index, dtype=np.int64))
            self._next_id += count
        pieces = self._next_id - first_id
        if pieces == 0:
            return ids
        flat = ids.ravel()
        inside = flat > 0
        local = flat[inside] - first_id
        class_of_pixel = np.where(labels < len(self.class_names), labels, 0).astype(np.intp)
        pixel_scores = np.take_along_axis(scores, class_of_pixel[None], axis=0)[0].ravel()[inside]
        counts = np.bincount(local, minlength=pieces)
        sums = np.bincount(local, weights=pixel_scores.astype(np.float64), minlength=pieces)
        _, first = np.unique(local, return_index=True)  # ids are dense: one first pixel per piece
        row, column = np.divmod(np.flatnonzero(inside)[first], block.width)
        first_pixel = (block.y0 + row) * self.width + block.x0 + column
        self._pieces.append((np.concatenate(classes), counts, sums, first_pixel))
        return ids

    def _add_edges(self, block: Window, ids: np.ndarray, labels: np.ndarray) -> None:
        """Pairs of ids that touch across the block's top row and left column (8-connected)."""
        columns = np.arange(block.x0, block.x1)
        for shift in (-1, 0, 1):
            neighbour = columns + shift
            keep = (neighbour >= 0) & (neighbour < self.width)
            self._edge(ids[0][keep], labels[0][keep], self._above[:, neighbour[keep]])
        if block.x0 > 0:
            rows = np.arange(block.height)
            for shift in (-1, 0, 1):
                neighbour = rows + shift
                keep = (neighbour >= 0) & (neighbour < block.height)
                self._edge(ids[:, 0][keep], labels[:, 0][keep], self._left[:, neighbour[keep]])

    def _edge(self, ids: np.ndarray, labels: np.ndarray, other: np.ndarray) -> None:
        touching = (ids > 0) & (other[0] > 0) & (labels.astype(np.int64) == other[1])
        if touching.any():
            self._edges.append((ids[touching], other[0][touching]))

    def _add_runs(self, block: Window, ids: np.ndarray) -> None:
        """The block's runs of one id down each column, as column-major positions in the scene."""
        height = block.height
        flat = ids.T.ravel()
        change = np.ones(flat.size, dtype=bool)
        change[1:] = flat[1:] != flat[:-1]
        change[::height] = True  # a run never crosses a column of the block
        starts = np.flatnonzero(change)
        lengths = np.diff(np.r_[starts, flat.size])
        keep = flat[starts] > 0
        starts, lengths = starts[keep], lengths[keep]
        where = (block.x0 + starts // height) * self.height + block.y0 + starts % height
        self._runs.append((flat[starts], where, where + lengths))

    def instances(self) -> list[dict[str, Any]]:
        """The scene's instances (`textseg.outputs.instances.INSTANCE_STRUCT` rows), as `region_instances`
        gives them for the whole label map."""
        if not self._pieces:
            return []
        pieces = self._next_id
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(pieces, pieces))
        _, region_of = connected_components(graph, directed=False)
        classes = np.r_[0, np.concatenate([p[0] for p in self._pieces])]
        counts = np.r_[0, np.concatenate([p[1] for p in self._pieces])]
        sums = np.r_[0.0, np.concatenate([p[2] for p in self._pieces])]
        first = np.r_[0, np.concatenate([p[3] for p in self._pieces])]
        regions = region_of.max() + 1
        region_count = np.bincount(region_of, weights=counts, minlength=regions)
        region_sum = np.bincount(region_of, weights=sums, minlength=regions)
        region_class = np.zeros(regions, dtype=np.int64)
        region_class[region_of] = classes
        region_first = np.full(regions, np.iinfo(np.int64).max)
        np.minimum.at(region_first, region_of[1:], first[1:])

        run_ids = np.concatenate([r[0] for r in self._runs])
        starts = np.concatenate([r[1] for r in self._runs])
        ends = np.concatenate([r[2] for r in self._runs])
        run_region = region_of[run_ids]
        order = np.lexsort((starts, run_region))
        run_region, starts, ends = run_region[order], starts[order], ends[order]
        bounds = np.flatnonzero(np.r_[True, run_region[1:] != run_region[:-1], True])
        found = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            region = int(run_region[lo])
            found.append((region_class[region], region_first[region], region, lo, hi))
        rows = []
        for index, _, region, lo, hi in sorted(found):  # class, then reading order: as region_instances
            region_starts, region_ends = starts[lo:hi], ends[lo:hi]  # single-column runs, in RLE order
            columns = region_starts // self.height
            box = (
                int(columns.min()),
                int((region_starts % self.height).min()),
                int(columns.max()) + 1,
                int(((region_ends - 1) % self.height).max()) + 1,
            )
            score = float(region_sum[region] / region_count[region]) / SCORE_LEVELS
            counts = encode_rle_runs(*_joined(region_starts, region_ends), self.height, self.width)
            rows.append(
                instance_row(self.class_names, int(index), score, box, (self.height, self.width), counts)
            )
        return rows


def _joined(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted runs with runs that continue one another (a region crossing a block's bottom border, or a
    column's end) joined: RLE counts alternate strictly between unset and set pixels."""
    begins = np.flatnonzero(np.r_[True, starts[1:] != ends[:-1]])
    return starts[begins], ends[np.r_[begins[1:] - 1, ends.size - 1]]
