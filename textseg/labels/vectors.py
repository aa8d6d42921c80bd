"""Labels -> polygons -> GeoParquet: map features (buildings, roads, water ...) as vector data.

A georeferenced label mask becomes one record per connected region of one class:

    {"class": "building", "class_index": 1, "score": 0.83, "area_m2": 412.7, "source": "15/17602/10746.png",
     "geometry": <shapely Polygon in EPSG:4326, lon/lat>}

How, and why each choice:

- Regions are traced by GDAL's polygonize (`rasterio.features.shapes`) with 4-connectivity: pixels join a
  region through shared edges only. 8-connectivity would join diagonal neighbours into rings that touch
  themselves at a vertex, which OGC calls invalid and GIS tools repair in different ways. Holes are kept
  (a courtyard in a building, an island in a lake). Class 0 (background) and 255 (no-data) are not traced.
- Simplification happens in pixel space, with the tolerance in pixels (global or per class): a model's
  edge error is measured in pixels whatever the ground resolution, so one tolerance (1 px removes the
  staircase) suits 30 cm scenes and zoom-15 tiles alike. The block is simplified as a coverage (every
  region, background and no-data included; GEOS's topology-preserving coverage simplifier,
  `shapely.coverage_simplify`): a border two regions share is simplified once, so neighbours never gain
  gaps or overlaps, holes survive, and the block's own outline (the window or tile border) is kept
  exactly, so pieces of an object cut by that border still meet edge to edge for `merge_across_borders`.
  Its tolerance is Visvalingam-Whyatt's, about the square root of the area of each removed triangle:
  1-2 px removes the staircase (a disk of 120 px: 277 vertices -> 113 at 1 px, 41 at 2 px, its outline
  moving by about a pixel at most).
  Classes with different tolerances are simplified in separate passes, so only their shared borders may
  differ by up to the tolerance. With shapely < 2.1 (no coverage simplifier) each polygon is simplified on
  its own with Douglas-Peucker (topology preserved), without those guarantees.
- Geometry is reprojected to EPSG:4326 (lon/lat, the CRS GeoParquet readers assume without being told)
  with exterior rings counter-clockwise and holes clockwise (RFC 7946's right-hand rule).
- Areas are geodesic, on the WGS84 ellipsoid (`pyproj.Geod`), in square metres. Never in the mask's CRS
  units: a Web Mercator "square metre" at 60 N is a quarter of a real one.
- `min_area_m2` then drops specks (global or per class), measured on the simplified polygon.
- score: the mean of the class's score over the region's pixels, when scores are given.

Large scenes are vectorised per block (with `GeoRef.window_georef`), and XYZ tiles per tile; a building
cut by a block or tile border comes out in pieces, which `merge_across_borders` joins (`filter_by_area`
then applies the area filter to whole objects). `write_geoparquet` writes records as GeoParquet (with its
`geo` metadata) through fsspec, atomically; `read_geoparquet` reads them back.

rasterio, shapely, pyproj and geopandas are the optional `geo` extra, imported at first use.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from textseg.image.rasters import WGS84, GeoRef, lazy_import
from textseg.image.windows import SCORE_LEVELS
from textseg.storage import read_bytes, write_bytes_atomic

BACKGROUND = 0
NODATA = 255
CONNECTIVITY = 4  # edge-connected regions: always valid polygons (module docstring)
# Gaps narrower than this (degrees; ~1.1 mm of latitude) between pieces of one class are closed when merging:
# far above floating-point noise at a shared tile border (~1e-13 degrees), far below any imagery's pixel.
MERGE_SNAP_DEGREES = 1e-8
SOURCES_SEPARATOR = "|"  # a merged record's `source`: its pieces' sources, sorted, joined by this

RECORD_COLUMNS = ("class", "class_index", "score", "area_m2", "source", "geometry")


@dataclass(frozen=True)
class VectorSettings:
    """How labels become polygons; each value global (a float) or per class index ({1: 1.5, 3: 0.0}).

    A class missing from a mapping gets 0 (no simplification, no area filter).
    """

    # Pixels of the mask (not map units): see the module docstring. 0 keeps the exact pixel outlines.
    simplify_tolerance: Mapping[int, float] | float = 0.0
    # Square metres on the ground (geodesic); polygons smaller than this after simplification are dropped.
    min_area_m2: Mapping[int, float] | float = 0.0

    def __post_init__(self) -> None:
        for name in ("simplify_tolerance", "min_area_m2"):
            value = getattr(self, name)
            values = value.values() if isinstance(value, Mapping) else [value]
            if any(not v >= 0 for v in values):
                raise ValueError(f"{name} must be >= 0 (globally or per class), got {value!r}")

    def tolerance_for(self, class_index: int) -> float:
        return _per_class(self.simplify_tolerance, class_index)

    def min_area_for(self, class_index: int) -> float:
        return _per_class(self.min_area_m2, class_index)


def polygons_from_labels(
    labels: np.ndarray,
    georef: GeoRef,
    class_names: list[str],
    scores: np.ndarray | None,
    source: str,
    settings: VectorSettings,
) -> list[dict[str, Any]]:
    """One record per 4-connected region of each class in `labels` (record layout: module docstring).

    labels: (H, W) uint8 class indices with georef.height == H and georef.width == W; 0 and 255 are not
    traced. class_names: background first (`Ontology.class_names`), so class_names[k] names value k.
    scores: (len(class_names), H, W) float in [0, 1] or uint8 0..255 (`windows.quantize_scores`), row k the
    score of class k (the layout of `postprocess.class_scores`), or None (then every score is None).
    source: what the records came from (a relpath or URI), copied into each. Records are ordered by class,
    then by position (top to bottom).
    """
    features = lazy_import("rasterio.features")
    shapely = lazy_import("shapely")
    _check_inputs(labels, georef, class_names, scores)
    if not ((labels != BACKGROUND) & (labels != NODATA)).any():
        return []
    with warnings.catch_warnings():  # pixel space: an identity transform is intended, not a mistake
        warnings.simplefilter("ignore", lazy_import("rasterio.errors").NotGeoreferencedWarning)
        # Every region, background and no-data too: together they cover the block (see _simplify_coverage).
        shapes = list(features.shapes(labels, connectivity=CONNECTIVITY))
        regions = np.array([shapely.geometry.shape(geometry) for geometry, _ in shapes], dtype=object)
        classes = np.array([int(value) for _, value in shapes], dtype=np.int64)
        mean_scores = _region_mean_scores(regions, classes, labels, scores) if scores is not None else None
    traced = (classes != BACKGROUND) & (classes != NODATA)
    order = np.flatnonzero(traced)[np.argsort(classes[traced], kind="stable")]  # by class, then position
    geometries = _pixels_to_wgs84(_simplify_coverage(regions, classes, settings)[order], georef)
    records = []
    for i, geometry in zip(order.tolist(), geometries, strict=True):
        if geometry is None or geometry.is_empty:
            continue
        class_index = int(classes[i])
        geometry = shapely.geometry.polygon.orient(geometry, sign=1.0)
        area = geodesic_area_m2(geometry)
        if area < settings.min_area_for(class_index):
            continue
        records.append(
            {
                "class": class_names[class_index],
                "class_index": class_index,
                "score": None if mean_scores is None else float(mean_scores[i]),
                "area_m2": area,
                "source": source,
                "geometry": geometry,
            }
        )
    return records


def merge_across_borders(
    records: Sequence[dict[str, Any]], snap_degrees: float = MERGE_SNAP_DEGREES
) -> list[dict[str, Any]]:
    """Join pieces of one class that touch or overlap across tile or window borders into single polygons.

    records: as `polygons_from_labels` returns them, from any number of sources (EPSG:4326 geometries).
    Pieces of the same class whose gap is below `snap_degrees` form a group; a group of one is returned
    unchanged. A group is unioned robustly: every piece is grown by snap_degrees (mitred corners), the
    union taken, and the result shrunk back by the same amount, which closes the floating-point slits two
    tiles leave along a shared border (their edge coordinates come from different arithmetic) and restores
    square corners exactly. Pieces that meet only at a corner point are grouped too, but the shrink parts
    them again: they come back as separate polygons (re-measured, each with its own sources).
    A merged record: area_m2 recomputed (geodesic) on the union; score the area-weighted mean of its
    pieces' scores (None when none has one); source the sorted distinct sources of its pieces joined by
    "|" (`SOURCES_SEPARATOR`), so the column stays one string per row. Order: unchanged records first, in
    input order, then merged ones by class. Pieces should come without an area filter (`filter_by_area`
    after merging), or a sliver of an object beyond a border is lost before it can join.
    """
    shapely = lazy_import("shapely")
    if snap_degrees <= 0:
        raise ValueError(f"snap_degrees must be > 0, got {snap_degrees}")
    kept: list[int] = []
    merged: list[dict[str, Any]] = []
    by_class: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(int(record["class_index"]), []).append(i)
    for class_index in sorted(by_class):
        members = by_class[class_index]
        geometries = np.array([records[i]["geometry"] for i in members], dtype=object)
        grown = shapely.buffer(geometries, snap_degrees, join_style="mitre")
        for group in _touching_groups(grown):
            if len(group) == 1:
                kept.append(members[group[0]])
                continue
            pieces = [records[members[j]] for j in group]
            union = shapely.buffer(shapely.union_all(grown[group]), -snap_degrees, join_style="mitre")
            merged.extend(_merged_records(pieces, union))
    return [records[i] for i in sorted(kept)] + merged


def filter_by_area(records: Sequence[dict[str, Any]], settings: VectorSettings) -> list[dict[str, Any]]:
    """The records whose area_m2 reaches their class's `settings.min_area_m2`, in order.

    For pieces that will be merged: vectorise tiles or blocks with min_area_m2 = 0, merge, then filter,
    so that a building's sliver across a border is not dropped before it can join the rest.
    """
    return [r for r in records if r["area_m2"] >= settings.min_area_for(int(r["class_index"]))]


def write_geoparquet(records: Sequence[dict[str, Any]], fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Write records as one GeoParquet file (CRS EPSG:4326, `geo` metadata) at `path`, atomically.

    Columns: class (string), class_index (int32), score (float64, null when absent), area_m2 (float64),
    source (string), geometry (WKB), then any extra keys the records carry, in first-seen order. No
    records still make a valid file with those columns. The file is built in memory (vectors are small
    next to the imagery) and published with `storage.write_bytes_atomic`, so readers never see half of it.
    Any GeoParquet reader opens it: GeoPandas, GDAL/OGR (pyogrio), DuckDB, QGIS.
    """
    geopandas = lazy_import("geopandas")
    pandas = lazy_import("pandas")
    for record in records:
        missing = [column for column in RECORD_COLUMNS if column not in record]
        if missing:
            raise ValueError(f"a vector record lacks {missing}; records come from polygons_from_labels")
    extra = list(dict.fromkeys(key for record in records for key in record if key not in RECORD_COLUMNS))
    columns: dict[str, Any] = {
        "class": pandas.Series([r["class"] for r in records], dtype="string"),
        "class_index": pandas.Series([r["class_index"] for r in records], dtype="int32"),
        "score": pandas.Series(
            [np.nan if r["score"] is None else r["score"] for r in records], dtype="float64"
        ),
        "area_m2": pandas.Series([r["area_m2"] for r in records], dtype="float64"),
        "source": pandas.Series([r["source"] for r in records], dtype="string"),
    }
    for key in extra:
        columns[key] = pandas.Series([r.get(key) for r in records])
    frame = geopandas.GeoDataFrame(
        columns, geometry=geopandas.GeoSeries([r["geometry"] for r in records], crs=WGS84), crs=WGS84
    )
    frame = frame[["class", "class_index", "score", "area_m2", "source", "geometry", *extra]]
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes_atomic(fs, path, buffer.getvalue())


def geodesic_area_m2(geometry: Any) -> float:
    """Area in square metres of a lon/lat (EPSG:4326) polygon or multipolygon on the WGS84 ellipsoid.

    Holes are subtracted. Orientation does not matter: each polygon is oriented before measuring, since
    pyproj's signed area assumes counter-clockwise exteriors and clockwise holes.
    """
    shapely = lazy_import("shapely")
    total = 0.0
    for part in shapely.get_parts(geometry):
        area, _ = _geod().geometry_area_perimeter(shapely.geometry.polygon.orient(part, sign=1.0))
        total += abs(area)
    return total


# ----------------------------------------------------------------------------------------------------------
# Internals


def _per_class(value: Mapping[int, float] | float, class_index: int) -> float:
    return float(value.get(class_index, 0.0)) if isinstance(value, Mapping) else float(value)


@functools.lru_cache(maxsize=1)
def _geod() -> Any:
    return lazy_import("pyproj").Geod(ellps="WGS84")


@functools.lru_cache(maxsize=16)
def _transformer_to_wgs84(crs: str) -> Any:
    """pyproj's transformer from `crs` to lon/lat; cached, as building one costs about a millisecond."""
    return lazy_import("pyproj").Transformer.from_crs(crs, WGS84, always_xy=True)


def _check_inputs(
    labels: np.ndarray, georef: GeoRef, class_names: list[str], scores: np.ndarray | None
) -> None:
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be a 2-D uint8 array, got {labels.dtype} {labels.shape}")
    if labels.shape != (georef.height, georef.width):
        raise ValueError(
            f"labels are {labels.shape} (H, W) but the georef is {georef.height} x {georef.width}"
        )
    present = np.unique(labels)
    unknown = [int(v) for v in present if v != NODATA and v >= len(class_names)]
    if unknown:
        raise ValueError(f"labels hold class indices {unknown} beyond the {len(class_names)} class names")
    if scores is not None and scores.shape != (len(class_names), *labels.shape):
        raise ValueError(
            f"scores must be (len(class_names), H, W) = {(len(class_names), *labels.shape)}, "
            f"got {scores.shape}"
        )


def _region_mean_scores(
    regions: np.ndarray, classes: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> np.ndarray:
    """Mean score of each region's class over the region's pixels: (len(regions),) float64.

    The traced outlines lie on pixel edges, so rasterising them back (pixel-centre rule) gives exactly the
    pixels of each region: one region id per pixel, then one weighted bincount per class.
    """
    features = lazy_import("rasterio.features")
    traced = ((region, i + 1) for i, region in enumerate(regions) if classes[i] not in (BACKGROUND, NODATA))
    region_ids = features.rasterize(traced, out_shape=labels.shape, fill=0, dtype="int32")
    sums = np.zeros(len(regions) + 1, dtype=np.float64)
    counts = np.zeros(len(regions) + 1, dtype=np.float64)
    for class_index in np.unique(classes):
        if class_index in (BACKGROUND, NODATA):
            continue  # not traced, never reported
        where = labels == class_index
        class_scores = scores[class_index][where].astype(np.float64)
        if scores.dtype == np.uint8:
            class_scores /= SCORE_LEVELS
        sums += np.bincount(region_ids[where], weights=class_scores, minlength=len(sums))
        counts += np.bincount(region_ids[where], minlength=len(counts))
    return sums[1:] / np.maximum(counts[1:], 1.0)


def _simplify_coverage(regions: np.ndarray, classes: np.ndarray, settings: VectorSettings) -> np.ndarray:
    """Pixel-space regions simplified by their class's tolerance, as one coverage (module docstring).

    regions: every region of the block (they tile it exactly); classes: each region's value. Background and
    no-data regions take part, so that the block's outline is the coverage's boundary, which stays intact.
    """
    shapely = lazy_import("shapely")
    tolerances = np.array([settings.tolerance_for(int(k)) for k in classes], dtype=np.float64)
    traced = (classes != BACKGROUND) & (classes != NODATA)
    wanted = sorted({float(t) for t in tolerances[traced] if t > 0})
    if not wanted:
        return regions
    if not hasattr(shapely, "coverage_simplify"):  # shapely < 2.1
        return shapely.simplify(regions, tolerances, preserve_topology=True)
    # Polygonize puts vertices only where an outline turns, so a long edge of one region may run past a
    # corner of its neighbours. The coverage simplifier needs shared edges to have the same vertices: a vertex
    # at every pixel corner along every edge gives exactly that.
    noded = shapely.segmentize(regions, 1.0)
    simplified = regions.copy()
    for tolerance in wanted:
        chosen = traced & (tolerances == tolerance)
        simplified[chosen] = shapely.coverage_simplify(noded, tolerance, simplify_boundary=False)[chosen]
    # The kept outline still has a vertex per pixel: drop the ones in the middle of straight runs (a
    # tolerance of 0 removes only vertices exactly on the line through their neighbours).
    return shapely.simplify(simplified, 0.0, preserve_topology=True)


def _pixels_to_wgs84(geometries: np.ndarray, georef: GeoRef) -> np.ndarray:
    """Pixel-space geometries -> lon/lat: the georef's affine transform, then the CRS's reprojection."""
    shapely = lazy_import("shapely")
    a, b, c, d, e, f = georef.transform
    to_wgs84 = None if georef.crs == WGS84 else _transformer_to_wgs84(georef.crs)

    def transform(coords: np.ndarray) -> np.ndarray:  # coords: (N, 2) pixel (col, row)
        x = a * coords[:, 0] + b * coords[:, 1] + c
        y = d * coords[:, 0] + e * coords[:, 1] + f
        if to_wgs84 is not None:
            x, y = to_wgs84.transform(x, y)
        return np.column_stack([x, y])

    return shapely.transform(geometries, transform)


def _touching_groups(geometries: np.ndarray) -> list[list[int]]:
    """Indexes of `geometries` grouped into connected components of the 'intersects' relation."""
    shapely = lazy_import("shapely")
    parent = list(range(len(geometries)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = shapely.STRtree(geometries).query(geometries, predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(geometries)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _merged_records(pieces: list[dict[str, Any]], union: Any) -> list[dict[str, Any]]:
    """Records for each polygon of `union`, with score and sources from the pieces that fall inside it."""
    shapely = lazy_import("shapely")
    parts = [part for part in shapely.get_parts(union) if not part.is_empty]
    inside = shapely.point_on_surface(np.array([piece["geometry"] for piece in pieces], dtype=object))
    tree = shapely.STRtree(np.array(parts, dtype=object))
    owner: dict[int, int] = {}
    for piece_index, part_index in zip(*tree.query(inside, predicate="intersects").tolist(), strict=True):
        owner.setdefault(piece_index, part_index)
    records = []
    for part_index, part in enumerate(parts):
        members = [pieces[i] for i, p in owner.items() if p == part_index]
        scored = [m for m in members if m["score"] is not None]
        weight = sum(m["area_m2"] for m in scored)
        score = sum(m["score"] * m["area_m2"] for m in scored) / weight if scored and weight > 0 else None
        polygon = shapely.geometry.polygon.orient(part, sign=1.0)
        records.append(
            {
                "class": pieces[0]["class"],
                "class_index": pieces[0]["class_index"],
                "score": score,
                "area_m2": geodesic_area_m2(polygon),
                "source": SOURCES_SEPARATOR.join(sorted({m["source"] for m in members or pieces})),
                "geometry": polygon,
            }
        )
    return records


def read_geoparquet(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """Records back from a file `write_geoparquet` wrote (the inverse, for merging a run's parts).

    Missing scores (null) come back as None, class_index as int; transient storage errors are retried.
    """
    geopandas = lazy_import("geopandas")
    frame = geopandas.read_parquet(io.BytesIO(read_bytes(fs, path)))
    records = frame.to_dict("records")
    for record in records:
        score = record.get("score")
        record["score"] = None if score is None or score != score else float(score)
        record["class_index"] = int(record["class_index"])
    return records
