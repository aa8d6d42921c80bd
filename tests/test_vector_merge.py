"""The distributed merge of a run's polygon pieces: exact (each object once, as the single-process merge
makes it) whatever the cell grid, picklable, one partition per run, retries that never duplicate."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytest

shapely = pytest.importorskip("shapely")
geopandas = pytest.importorskip("geopandas")
pytest.importorskip("pyproj")
pytest.importorskip("rasterio")

import pyarrow.dataset as pads  # noqa: E402

from textseg.image.rasters import xyz_georef  # noqa: E402
from textseg.labels import vector_merge  # noqa: E402
from textseg.labels.vector_merge import VECTOR_PARTS, CellGrid, merge_run_vectors, vectors_uri  # noqa: E402
from textseg.labels.vectors import (  # noqa: E402
    VectorSettings,
    filter_by_area,
    merge_across_borders,
    polygons_from_labels,
    write_geoparquet,
)
from textseg.storage import filesystem_for  # noqa: E402

CLASS_NAMES = ["background", "building", "water"]
Z, X, Y = 18, 140816, 85970  # Berlin, ~0.6 m pixels
TILE = 256
TILE_DEGREES = 360.0 / 2**Z  # a zoom-18 tile's width in longitude
SETTINGS = VectorSettings(min_area_m2={1: 20.0})
RUN = "20250101T000000Z-aaaaaa"


def _tile_pieces(mosaic: np.ndarray, x0: int = X, y0: int = Y) -> list[list[dict[str, Any]]]:
    """The mosaic cut into 256 px XYZ tiles from x0/y0, each vectorised on its own as the write stage
    does (no area filter): one list of pieces per tile, row by row."""
    tiles = []
    for ty in range(mosaic.shape[0] // TILE):
        for tx in range(mosaic.shape[1] // TILE):
            labels = np.ascontiguousarray(mosaic[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE])
            georef = xyz_georef(Z, x0 + tx, y0 + ty, TILE, TILE)
            source = f"{Z}/{x0 + tx}/{y0 + ty}.png"
            tiles.append(polygons_from_labels(labels, georef, CLASS_NAMES, None, source, VectorSettings()))
    return tiles


def _park(scratch: pathlib.Path, files: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Write pieces as the write stage parks them: one GeoParquet part per batch, under the scratch area."""
    fs, root = filesystem_for(str(scratch))
    for i, pieces in enumerate(files):
        if pieces:
            write_geoparquet(list(pieces), fs, f"{root}/{VECTOR_PARTS}/part-{i:04d}.parquet")


def _summary(records: Iterable[dict[str, Any]]) -> list[tuple[str, str, float]]:
    return sorted((str(r["class"]), str(r["source"]), round(float(r["area_m2"]), 6)) for r in records)


def _read_run(dest: pathlib.Path, run_id: str = RUN) -> Any:
    return geopandas.read_parquet(vectors_uri(str(dest), run_id))


def _single_process(pieces: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return filter_by_area(merge_across_borders(pieces), SETTINGS)


def _building_mosaic() -> np.ndarray:
    """One building over the corner of 2 x 2 tiles, plus one inside a tile."""
    mosaic = np.zeros((2 * TILE, 2 * TILE), np.uint8)
    mosaic[200:320, 190:330] = 1
    mosaic[30:60, 30:80] = 1
    return mosaic


def _grid_cutting(pieces: Sequence[dict[str, Any]], halo_fraction: float) -> CellGrid:
    """A grid with cells about two tiles wide whose level-0 cell borders part the pieces' homes."""
    for step in range(400):
        grid = CellGrid(cell_degrees=2 * TILE_DEGREES * (1 + step / 397), halo_fraction=halo_fraction)
        if len({grid.home(0, p["geometry"].bounds) for p in pieces}) == len(pieces):
            return grid
    raise AssertionError("no grid found")


def _counting_map(calls: list[tuple[str, int]]) -> Callable[[Callable[[Any], Any], Sequence[Any]], Any]:
    def map_fn(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        items = list(items)
        calls.append((fn.__name__, len(items)))
        return [fn(item) for item in items]

    return map_fn


# ----------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("halo_fraction", [0.5, 0.125], ids=["object-within-halo", "object-beyond-halo"])
def test_a_building_over_2x2_tiles_and_a_cell_corner_is_one_polygon_written_once(
    tmp_path: pathlib.Path, halo_fraction: float
) -> None:
    tiles = _tile_pieces(_building_mosaic())
    pieces = [p for tile in tiles for p in tile]
    assert len(pieces) == 5  # the corner building in 4 pieces, the other whole
    corner = shapely.union_all([p["geometry"] for p in pieces[1:]])  # pieces[0]: the tile's own building
    grid = _grid_cutting(pieces[1:], halo_fraction)  # the building's pieces in four level-0 cells
    building_degrees = max(corner.bounds[2] - corner.bounds[0], corner.bounds[3] - corner.bounds[1])
    assert (building_degrees < grid.halo(0)) == (halo_fraction == 0.5)
    _park(tmp_path / "scratch", tiles)
    calls: list[tuple[str, int]] = []
    count = merge_run_vectors(
        str(tmp_path / "scratch"), str(tmp_path / "dest"), RUN, SETTINGS, {}, _counting_map(calls), grid
    )
    frame = _read_run(tmp_path / "dest")
    assert count == len(frame) == 2
    joined = "|".join(f"{Z}/{X + dx}/{Y + dy}.png" for dx in (0, 1) for dy in (0, 1))
    assert sorted(frame["source"]) == [f"{Z}/{X}/{Y}.png", joined]
    assert _summary(frame.to_dict("records")) == _summary(_single_process(pieces))
    assert calls[0] == ("stage_part", 4)  # one call per piece file
    levels = sum(1 for name, cells in calls if name == "merge_cell" and cells)
    assert (levels > 1) == (halo_fraction == 0.125)  # beyond the halo: merged one level up


def _busy_mosaic(seed: int, size: int = 4 * TILE) -> np.ndarray:
    """Buildings of every size, some over tile borders and corners, and a river across the whole mosaic."""
    rng = np.random.default_rng(seed)
    mosaic = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(40):
        r0, c0 = rng.integers(0, size - 20, 2)
        h, w = rng.integers(4, 90, 2)
        mosaic[r0 : r0 + h, c0 : c0 + w] = 1
    for _ in range(6):
        cx, cy, radius = rng.integers(0, size), rng.integers(0, size), rng.integers(10, 70)
        mosaic[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = 2
    mosaic[np.abs(yy - 0.7 * xx - 60) < 8] = 2  # a river over many tiles: one polygon
    return mosaic


GRIDS = {
    "default": CellGrid(),
    "tile-cells": CellGrid(cell_degrees=TILE_DEGREES, halo_fraction=0.25),
    "tiny-cells": CellGrid(cell_degrees=TILE_DEGREES / 8, halo_fraction=0.5, growth=2),
    "tiny-halos": CellGrid(cell_degrees=TILE_DEGREES / 3, halo_fraction=0.0625),
}


@pytest.mark.parametrize("grid_name", list(GRIDS))
@pytest.mark.parametrize("seed", [0, 1])
def test_any_grid_gives_the_polygons_of_the_single_process_merge(
    tmp_path: pathlib.Path, grid_name: str, seed: int
) -> None:
    tiles = _tile_pieces(_busy_mosaic(seed, size=3 * TILE))
    files = [tiles[i : i + 3] for i in range(0, len(tiles), 3)]  # batches of three tiles per part
    _park(tmp_path / "scratch", [[p for tile in batch for p in tile] for batch in files])
    pieces = [p for tile in tiles for p in tile]
    expected = _single_process(pieces)
    calls: list[tuple[str, int]] = []
    count = merge_run_vectors(
        str(tmp_path / "scratch"),
        str(tmp_path / "dest"),
        RUN,
        SETTINGS,
        {},
        _counting_map(calls),
        GRIDS[grid_name],
    )
    frame = _read_run(tmp_path / "dest")
    assert count == len(frame) == len(expected) < len(pieces)
    assert _summary(frame.to_dict("records")) == _summary(expected)
    assert frame["geometry"].is_valid.all()
    river = max(expected, key=lambda r: r["source"].count("|"))
    assert river["class"] == "water" and river["source"].count("|") >= 3  # over four tiles or more
    assert any(g.equals(river["geometry"]) for g in frame["geometry"])  # not approximately: the same polygon
    if grid_name == "tiny-cells":  # pieces wider than 4 x 4 cells are parked and spread by themselves
        assert any(name == "spread_big" and n for name, n in calls)


def test_each_call_runs_in_another_process(tmp_path: pathlib.Path) -> None:
    """Everything map_fn gets (the callables and their items) pickles, and the results travel back."""
    tiles = _tile_pieces(_busy_mosaic(2, size=2 * TILE))
    _park(tmp_path / "scratch", tiles)
    grid = GRIDS["tiny-cells"]
    with ProcessPoolExecutor(max_workers=2) as pool:
        count = merge_run_vectors(
            str(tmp_path / "scratch"), str(tmp_path / "dest"), RUN, SETTINGS, {}, pool.map, grid
        )
    expected = _single_process([p for tile in tiles for p in tile])
    assert count == len(expected)
    assert _summary(_read_run(tmp_path / "dest").to_dict("records")) == _summary(expected)


# ----------------------------------------------------------------------------------------------------------
# The dataset over runs; retries


def test_runs_add_partitions_and_the_directory_reads_as_one_table(tmp_path: pathlib.Path) -> None:
    """An incremental second run labels only new tiles: the first run's polygons stay where they were."""
    first, second = "20250101T000000Z-aaaaaa", "20250102T000000Z-bbbbbb"
    mosaic = _building_mosaic()
    old_tiles, new_tiles = _tile_pieces(mosaic), _tile_pieces(mosaic, x0=X + 2)  # new tiles to the east
    for run_id, tiles in ((first, old_tiles), (second, new_tiles)):
        _park(tmp_path / run_id, tiles)
        assert merge_run_vectors(str(tmp_path / run_id), str(tmp_path / "dest"), run_id, SETTINGS, {}) == 2
    vectors = tmp_path / "dest" / "vectors"
    assert sorted(p.name for p in vectors.iterdir()) == [f"run={first}", f"run={second}"]
    frame = geopandas.read_parquet(vectors)
    assert frame.crs.to_epsg() == 4326 and len(frame) == 4
    assert sorted(frame["run"].astype(str)) == [first, first, second, second]
    assert frame["cell"].notna().all()
    sources = {s for joined in frame["source"] for s in joined.split("|")}
    assert sources == {f"{Z}/{X + dx}/{Y + dy}.png" for dx in range(4) for dy in range(2)}
    table = pads.dataset(str(vectors), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 4 and set(table.column("run").to_pylist()) == {first, second}
    assert {"class", "class_index", "score", "area_m2", "source", "geometry"} <= set(table.column_names)


def test_a_retried_merge_rewrites_the_same_files(tmp_path: pathlib.Path) -> None:
    tiles = _tile_pieces(_busy_mosaic(3, size=2 * TILE))
    _park(tmp_path / "scratch", tiles)
    grid = GRIDS["tile-cells"]
    run_dir = pathlib.Path(vectors_uri(str(tmp_path / "dest"), RUN))
    stale = run_dir / "cell=L0x0y0" / "part-0.parquet"  # a cell an earlier attempt wrote, not made now
    write_geoparquet(tiles[0], *filesystem_for(str(stale)))
    args = (str(tmp_path / "scratch"), str(tmp_path / "dest"), RUN, SETTINGS, {}, map, grid)
    first = merge_run_vectors(*args)
    files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file())
    assert not stale.exists()
    assert merge_run_vectors(*args) == first
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file()) == files
    assert all(p.name == "part-0.parquet" for p in files)
    assert len(_read_run(tmp_path / "dest")) == first


def test_a_run_without_pieces_writes_nothing(tmp_path: pathlib.Path) -> None:
    (tmp_path / "scratch").mkdir()
    assert merge_run_vectors(str(tmp_path / "scratch"), str(tmp_path / "dest"), RUN, SETTINGS, {}) == 0
    assert not (tmp_path / "dest" / "vectors").exists()


def test_grid_levels_end_in_one_world_cell() -> None:
    grid = CellGrid()
    assert [grid.size(k) for k in range(grid.top + 1)][:3] == [0.125, 0.5, 2.0]
    assert grid.size(grid.top) >= 360 and grid.size(grid.top - 1) < 360
    assert grid.reach(grid.top, (-180.0, -90.0, 180.0, 90.0)) == (range(0, 1), range(0, 1))
    assert grid.holds_all_of(grid.top, (0, 0), (-180.0, -90.0, 180.0, 90.0))
    with pytest.raises(ValueError, match="halo"):
        CellGrid(cell_degrees=1e-6)
    assert vector_merge.NEIGHBOUR_DEGREES > 10 * vector_merge.MERGE_SNAP_DEGREES
