"""A run's polygon pieces -> DEST/vectors/: pieces cut by tile and window borders merged, then filtered,
by neighbourhood, on many workers.

The write and scene-assembly stages park each image's (or scene block's) polygons under the run's scratch
area (`VECTOR_PARTS`); `merge_run_vectors` joins them at the end of the run. A run of 10 M images has far
too many pieces for one process, so the merge is split by place: a piece can only join pieces near it.

The scheme: nested lon/lat grids (`CellGrid`). Level k cuts the world into square cells
`cell_degrees * growth**k` wide (default 0.125 degrees, ~14 km: hundreds of zoom-18 tiles), each with a
halo of `halo_fraction` of its width (default 1/8: ~1.7 km at level 0); the top level is one cell, the
world. A piece's *home* at a level is the cell holding the centre of its bounding box; a piece is *staged*
to its home and to every cell whose halo its bounding box reaches.

1. One call per piece file (`map_fn`): stage its pieces to the level-0 cells, one staging file per cell
   under the scratch area (`CELL_STAGING`; plain Parquet with WKB geometry, which keeps every bit).
2. One call per cell, level by level: group the cell's pieces into *clusters* (pieces of one class closer
   than `NEIGHBOUR_DEGREES`: every pair `merge_across_borders` could join, and a few more). A cluster is
   *complete* when its bounding box, grown by `MARGIN_DEGREES`, lies inside the cell and its halo, and
   *small* when its width and height are at most the halo less two margins. A complete, small cluster
   whose bounding-box centre lies in the cell is merged (`merge_across_borders`), filtered
   (`filter_by_area`) and written to `DEST/vectors/run=<run_id>/cell=<cell>/part-0.parquet`; a complete,
   small cluster centred elsewhere is left to that cell; every other cluster (incomplete, or larger than
   the halo) has its pieces *homed here* staged to the next level, where cells and halos are `growth`
   times larger. The top level writes whatever reaches it.

Why it is exact (every polygon the single-process merge makes is written once, and nothing else):

- Complete means complete: a piece missing from the cell but able to join a cluster lies within
  NEIGHBOUR_DEGREES of it, so its bounding box reaches the halo and it was staged here; a cluster whose
  grown box lies inside the halo therefore has every piece of the run's (global) cluster.
- A small global cluster is complete in every cell that holds its centre or a piece's home (its box is
  within `halo - 2 margins` of any point of it), so it is written exactly once, by the cell of its centre,
  and none of its pieces moves up. Every cell computes the same box and centre: they are minima and
  maxima of the pieces' own coordinates, read from the same files, so no arithmetic can differ.
- Any other global cluster is written nowhere at this level (each cell sees it incomplete or large), and
  each of its pieces moves up exactly once, from its single home cell. The pieces that reach level k + 1
  are thus whole global clusters, and the argument repeats; the top level sees every cluster complete.
  Clusters are unions of the groups `merge_across_borders` forms, so merging a cell's chosen clusters
  gives the polygons of the single-process merge.

A piece whose halo-grown box spans more than MAX_CELLS_PER_PIECE cells of a level (a whole tile at zoom
<= 8, a polygon across the antimeridian) would be copied to many cells; it is parked aside instead
(`_big`), copied only to the cells of that level that hold other pieces (the only ones that could judge a
nearby cluster complete), and moved up by itself, once. That keeps both arguments above.

Limits. A polygon larger than a level's halo is merged at a higher level, in one call with everything
else of that larger cell that also moved up; one connected region over a continent (a road network of
one class across every tile) ends at the top level, in one process. A piece much smaller than a cell is
staged to (1 + 2 * halo_fraction)**2 (~1.56) cells on average at level 0, 4 at most. The driver holds
cell ids (and the names of parked files) only. Every file name is a function of the call's input, so a
call that Ray retries rewrites the same files.

What DEST/vectors/ holds: a hive-partitioned GeoParquet dataset, one partition per run
(`run=<run_id>/cell=<cell>/part-0.parquet`), each run's partition the polygons of the images that run
labeled; nothing is ever deleted by a later run, so after an incremental re-run (which labels only new
images) every labeled image still has its polygons, in the partition of the run that labeled it. An image
relabeled later (changed file, model or ontology) has polygons in the newer partition too: the current
polygons of every image are, per `source`, those of the latest run (run ids sort by start time); a merged
polygon's `source` names all its images ("a.png|b.png"), and is current when its run is the latest of
each of them. The whole directory reads as one table, with `run` and `cell` columns from the paths:
`geopandas.read_parquet(DEST/vectors)` or `pyarrow.dataset.dataset(DEST/vectors, partitioning="hive")`.
Every polygon also carries its `run_id`, `model_id` and `ontology_hash` as columns (from its pieces), so
a file copied out of the dataset still says what made it. A run's partition is complete once its run
summary is written; a retried merge rewrites the same names and removes any cell file it no longer makes.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from textseg import storage
from textseg.image.rasters import lazy_import
from textseg.labels.vectors import (
    MERGE_SNAP_DEGREES,
    PROVENANCE_COLUMNS,
    RECORD_COLUMNS,
    VectorSettings,
    filter_by_area,
    merge_across_borders,
    read_geoparquet,
    repair_records,
    write_geoparquet,
)
from textseg.outputs.state import MapFn

log = logging.getLogger(__name__)

VECTOR_PARTS = "vectors"  # under a run's scratch area: polygons of its images and scenes, not yet merged
CELL_STAGING = "vector-cells"  # under a run's scratch area: pieces staged per level and cell
VECTORS_DIR = "vectors"  # under DEST: the polygons of every run, partitioned by run and cell
PART_NAME = "part-0.parquet"
BIG = "_big"  # a level's staging folder of pieces too large to copy to every cell they reach
HOME = "_home"  # staged records: whether the staging cell is the piece's home at that level

# merge_across_borders grows each piece by MERGE_SNAP_DEGREES with mitred corners (at most 5 snaps out, the
# mitre limit), so two pieces it joins are within 10 snaps; clusters take every pair within 16.
NEIGHBOUR_DEGREES = 16 * MERGE_SNAP_DEGREES
# Room between a cluster and the halo's edge: a neighbour still fully inside, with float noise to spare.
MARGIN_DEGREES = 4 * NEIGHBOUR_DEGREES
MAX_CELLS_PER_PIECE = 16
WORLD_WIDTH_DEGREES = 360.0

Bounds = tuple[float, float, float, float]  # west, south, east, north
Cell = tuple[int, int]  # column (from 180 W), row (from 90 S) of a level's grid


@dataclass(frozen=True)
class CellGrid:
    """The nested lon/lat grids of the merge (module docstring); tests pass tiny cells to force borders."""

    cell_degrees: float = 0.125
    halo_fraction: float = 0.125
    growth: int = 4

    def __post_init__(self) -> None:
        if not (self.cell_degrees > 0 and 0 < self.halo_fraction <= 0.5 and self.growth >= 2):
            raise ValueError(f"need cell_degrees > 0, 0 < halo_fraction <= 0.5, growth >= 2: {self}")
        if self.halo(0) <= 4 * MARGIN_DEGREES:
            raise ValueError(f"the level-0 halo ({self.halo(0)} degrees) is too small for {MARGIN_DEGREES}")

    @property
    def top(self) -> int:
        """The level of the single world cell: the first whose cells are as wide as the world."""
        level = 0
        while self.size(level) < WORLD_WIDTH_DEGREES:
            level += 1
        return level

    def size(self, level: int) -> float:
        return self.cell_degrees * self.growth**level

    def halo(self, level: int) -> float:
        return self.size(level) * self.halo_fraction

    def is_small(self, level: int, bounds: Bounds) -> bool:
        """Whether a cluster this size is complete in every cell holding one of its points."""
        limit = math.inf if level == self.top else self.halo(level) - 2 * MARGIN_DEGREES
        return bounds[2] - bounds[0] <= limit and bounds[3] - bounds[1] <= limit

    def cell_of(self, level: int, x: float, y: float) -> Cell:
        if level == self.top:
            return (0, 0)
        size = self.size(level)
        return (math.floor((x + 180.0) / size), math.floor((y + 90.0) / size))

    def home(self, level: int, bounds: Bounds) -> Cell:
        return self.cell_of(level, (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)

    def reach(self, level: int, bounds: Bounds) -> tuple[range, range]:
        """Columns and rows of the cells whose halo `bounds` reaches."""
        if level == self.top:
            return range(0, 1), range(0, 1)
        halo = self.halo(level)
        (c0, r0), (c1, r1) = (
            self.cell_of(level, bounds[0] - halo, bounds[1] - halo),
            self.cell_of(level, bounds[2] + halo, bounds[3] + halo),
        )
        return range(c0, c1 + 1), range(r0, r1 + 1)

    def holds_all_of(self, level: int, cell: Cell, bounds: Bounds) -> bool:
        """Whether `bounds`, grown by the margin, lies strictly inside the cell and its halo."""
        if level == self.top:
            return True
        size, halo = self.size(level), self.halo(level)
        west, south = -180.0 + cell[0] * size - halo, -90.0 + cell[1] * size - halo
        east, north = west + size + 2 * halo, south + size + 2 * halo
        m = MARGIN_DEGREES
        return (
            bounds[0] - m > west and bounds[1] - m > south and bounds[2] + m < east and bounds[3] + m < north
        )


@dataclass(frozen=True)
class Staged:
    """What a call staged for the next round: the cells with staging files, and its parked big pieces
    (file name, their joint bounds). Small: the driver keeps only these."""

    level: int
    cells: frozenset[Cell] = frozenset()
    big: tuple[tuple[str, Bounds], ...] = ()

    @staticmethod
    def union(level: int, results: Iterable[Staged]) -> Staged:
        cells: set[Cell] = set()
        big: list[tuple[str, Bounds]] = []
        for result in results:
            if result.level != level:
                raise AssertionError(f"staged for level {result.level}, expected {level}")
            cells |= result.cells
            big += result.big
        return Staged(level, frozenset(cells), tuple(sorted(big)))


def vectors_uri(dest: str, run_id: str) -> str:
    """The run's partition of DEST/vectors/ (a folder of GeoParquet files, one per cell)."""
    return storage.join_uri(dest, f"{VECTORS_DIR}/run={run_id}")


def cell_name(level: int, cell: Cell) -> str:
    return f"L{level}x{cell[0]}y{cell[1]}"


def merge_run_vectors(
    scratch_uri: str,
    dest: str,
    run_id: str,
    settings: VectorSettings,
    storage_options: Mapping[str, Any],
    map_fn: MapFn = map,
    grid: CellGrid | None = None,
) -> int:
    """Merge the run's polygon pieces by neighbourhood into DEST/vectors/run=<run_id>/ (module docstring);
    returns the number of polygons written.

    `map_fn(fn, items)` runs the per-file and per-cell calls (the Ray plan passes one that runs them as
    tasks); everything it is given is picklable and returns small values. Staging from an earlier attempt
    is dropped first, and cell files this attempt did not write are removed last, so a retry never adds.
    """
    job = _Merge(scratch_uri, dest, run_id, settings, dict(storage_options), grid or CellGrid())
    fs, root = storage.filesystem_for(scratch_uri, storage_options)
    storage.remove(fs, f"{root}/{CELL_STAGING}")
    parts = [posixpath.basename(p) for p in storage.glob(fs, f"{root}/{VECTOR_PARTS}/*.parquet")]
    staged = Staged.union(0, map_fn(job.stage_part, parts))
    written: set[str] = set()
    polygons = 0
    for level in range(job.grid.top + 1):
        if not staged.cells and not staged.big:
            break
        log.info("vectors: level %d: %d cells, %d parked files", level, len(staged.cells), len(staged.big))
        moved_up = list(map_fn(job.spread_big, _big_items(job.grid, staged)))
        cells = sorted(staged.cells)
        for cell, (count, more) in zip(
            cells, map_fn(job.merge_cell, [(level, c) for c in cells]), strict=True
        ):
            polygons += count
            if count:
                written.add(cell_name(level, cell))
            moved_up.append(more)
        staged = Staged.union(level + 1, moved_up)
    _remove_unwritten_cells(dest, run_id, storage_options, written)
    return polygons


# ----------------------------------------------------------------------------------------------------------
# Internals


@dataclass(frozen=True)
class _Merge:
    """The calls of a merge, as picklable callables (bound methods of a frozen dataclass)."""

    scratch_uri: str
    dest: str
    run_id: str
    settings: VectorSettings
    storage_options: Mapping[str, Any]
    grid: CellGrid = field(default_factory=CellGrid)

    def stage_part(self, name: str) -> Staged:
        """Step 1: one piece file of the write or scene stage -> its level-0 cells."""
        fs, root = self._scratch()
        # Unusable geometry (no finite lon/lat, nothing valid left) has no place on the grid: dropped here.
        records = repair_records(_read_records(fs, f"{root}/{VECTOR_PARTS}/{name}"))
        return self._stage(fs, records, 0, posixpath.splitext(name)[0])

    def spread_big(self, item: tuple[int, str, tuple[Cell, ...]]) -> Staged:
        """A parked file of big pieces -> copies in the level's occupied cells they reach (never home
        there), and the pieces themselves one level up."""
        level, name, cells = item
        fs, root = self._scratch()
        records = _read_records(fs, f"{_level_dir(root, level)}/{BIG}/{name}.parquet")
        wanted = set(cells)
        by_cell: dict[Cell, list[dict[str, Any]]] = {}
        for record, box in zip(records, _bounds(records), strict=True):
            columns, rows = self.grid.reach(level, box)
            for cell in wanted:
                if cell[0] in columns and cell[1] in rows:
                    by_cell.setdefault(cell, []).append({**record, HOME: False})
        for cell, copies in sorted(by_cell.items()):
            _write_staging(fs, f"{_level_dir(root, level)}/{cell_name(level, cell)}/b-{name}.parquet", copies)
        return self._stage(fs, records, level + 1, f"b-{name}")

    def merge_cell(self, item: tuple[int, Cell]) -> tuple[int, Staged]:
        """Step 2: one cell's pieces -> the polygons it owns, written; the rest's home pieces moved up.
        Returns (polygons written, what was staged one level up)."""
        level, cell = item
        fs, root = self._scratch()
        folder = f"{_level_dir(root, level)}/{cell_name(level, cell)}"
        records = [r for path in storage.glob(fs, f"{folder}/*.parquet") for r in _read_records(fs, path)]
        owned, moving = self._split(records, level, cell)
        polygons = filter_by_area(merge_across_borders(owned), self.settings) if owned else []
        if polygons:
            out_fs, out_root = storage.filesystem_for(
                vectors_uri(self.dest, self.run_id), self.storage_options
            )
            path = f"{out_root}/cell={cell_name(level, cell)}/{PART_NAME}"
            columns = (*RECORD_COLUMNS, *PROVENANCE_COLUMNS)
            write_geoparquet([{k: r.get(k) for k in columns} for r in polygons], out_fs, path)
        if level == self.grid.top:
            return len(polygons), Staged(level + 1)
        return len(polygons), self._stage(fs, moving, level + 1, f"c-{cell_name(level, cell)}")

    def _split(
        self, records: list[dict[str, Any]], level: int, cell: Cell
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(pieces of the clusters this cell owns, pieces homed here of the clusters that move up)."""
        bounds = _bounds(records)
        owned: list[int] = []
        moving: list[int] = []
        for members in _clusters(records):
            box = _joint_bounds([bounds[i] for i in members])
            if self.grid.holds_all_of(level, cell, box) and self.grid.is_small(level, box):
                if self.grid.home(level, box) == cell:
                    owned += members
            else:
                moving += [i for i in members if records[i][HOME]]
        return [records[i] for i in sorted(owned)], [records[i] for i in sorted(moving)]

    def _stage(
        self, fs: fsspec.AbstractFileSystem, records: Sequence[dict[str, Any]], level: int, name: str
    ) -> Staged:
        """Write `records` as staging files `name` of their cells at `level`; big ones parked aside."""
        if not records:
            return Staged(level)
        root = _level_dir(self._scratch()[1], level)
        by_cell: dict[Cell, list[dict[str, Any]]] = {}
        big: list[dict[str, Any]] = []
        for record, box in zip(records, _bounds(records), strict=True):
            columns, rows = self.grid.reach(level, box)
            if len(columns) * len(rows) > MAX_CELLS_PER_PIECE:
                big.append({**record, HOME: False})
                continue
            home = self.grid.home(level, box)
            for cell in ((c, r) for c in columns for r in rows):
                by_cell.setdefault(cell, []).append({**record, HOME: cell == home})
        for cell, staged in by_cell.items():
            _write_staging(fs, f"{root}/{cell_name(level, cell)}/{name}.parquet", staged)
        parked: tuple[tuple[str, Bounds], ...] = ()
        if big:
            _write_staging(fs, f"{root}/{BIG}/{name}.parquet", big)
            parked = ((name, _joint_bounds(_bounds(big))),)
        return Staged(level, frozenset(by_cell), parked)

    def _scratch(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return storage.filesystem_for(self.scratch_uri, self.storage_options)


# Staging files are plain Parquet with WKB geometry: the scratch area's own format, read and written many
# times per piece, where GeoParquet's CRS metadata (parsed by pyproj on every read) costs ~30 ms a file.
STAGING_SCHEMA = pa.schema(
    [
        ("class", pa.string()),
        ("class_index", pa.int32()),
        ("score", pa.float64()),
        ("area_m2", pa.float64()),
        ("source", pa.string()),
        ("geometry", pa.binary()),
        *((name, pa.string()) for name in PROVENANCE_COLUMNS),
        (HOME, pa.bool_()),
    ]
)


def _write_staging(fs: fsspec.AbstractFileSystem, path: str, records: Sequence[dict[str, Any]]) -> None:
    shapely = lazy_import("shapely")
    # .get: pieces parked by an older version (a killed run merged later) have no provenance columns.
    columns: dict[str, list[Any]] = {name: [r.get(name) for r in records] for name in STAGING_SCHEMA.names}
    columns["geometry"] = shapely.to_wkb(np.array(columns["geometry"], dtype=object)).tolist()
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, schema=STAGING_SCHEMA), buffer)
    storage.write_bytes_atomic(fs, path, buffer.getvalue())


def _read_records(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """Records from a staging file or a piece file (GeoParquet with WKB geometry, as `write_geoparquet`
    writes it; any other encoding goes through `read_geoparquet`). WKB keeps every coordinate bit."""
    shapely = lazy_import("shapely")
    table = pq.read_table(pa.BufferReader(storage.read_bytes(fs, path)))
    if not pa.types.is_binary(table.schema.field("geometry").type):
        return read_geoparquet(fs, path)
    records = table.drop_columns(["geometry"]).to_pylist()
    geometries = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    for record, geometry in zip(records, geometries.tolist(), strict=True):
        score = record["score"]
        record["score"] = None if score is None or score != score else float(score)
        record["geometry"] = geometry
    return records


def _level_dir(scratch_root: str, level: int) -> str:
    return f"{scratch_root}/{CELL_STAGING}/L{level}"


def _big_items(grid: CellGrid, staged: Staged) -> list[tuple[int, str, tuple[Cell, ...]]]:
    """For each parked file: the level's occupied cells its pieces' joint bounds reach (O(cells) each)."""
    items = []
    for name, bounds in staged.big:
        columns, rows = grid.reach(staged.level, bounds)
        cells = tuple(c for c in sorted(staged.cells) if c[0] in columns and c[1] in rows)
        items.append((staged.level, name, cells))
    return items


def _bounds(records: Sequence[dict[str, Any]]) -> list[Bounds]:
    shapely = lazy_import("shapely")
    if not records:
        return []
    boxes = shapely.bounds(np.array([r["geometry"] for r in records], dtype=object))
    return [(float(w), float(s), float(e), float(n)) for w, s, e, n in boxes.tolist()]


def _joint_bounds(bounds: Sequence[Bounds]) -> Bounds:
    return (
        min(b[0] for b in bounds),
        min(b[1] for b in bounds),
        max(b[2] for b in bounds),
        max(b[3] for b in bounds),
    )


def _clusters(records: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indexes of `records` grouped into connected components of 'same class and within
    NEIGHBOUR_DEGREES': a union of the groups merge_across_borders would form."""
    shapely = lazy_import("shapely")
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_class: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(int(record["class_index"]), []).append(i)
    for members in by_class.values():
        geometries = np.array([records[i]["geometry"] for i in members], dtype=object)
        tree = shapely.STRtree(geometries)
        left, right = tree.query(geometries, predicate="dwithin", distance=NEIGHBOUR_DEGREES)
        for i, j in zip(left.tolist(), right.tolist(), strict=True):
            parent[root(members[i])] = root(members[j])
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _remove_unwritten_cells(
    dest: str, run_id: str, storage_options: Mapping[str, Any], written: set[str]
) -> None:
    """Drop the run's cell folders this merge did not write (left by an earlier attempt)."""
    fs, run_root = storage.filesystem_for(vectors_uri(dest, run_id), storage_options)
    for name in storage.names(fs, run_root):
        if name.startswith("cell=") and name.removeprefix("cell=") not in written:
            storage.remove(fs, f"{run_root}/{name}")
