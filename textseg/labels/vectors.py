"""Labels -> polygons -> GeoParquet: map features (buildings, roads, water ...) as vector data.

A georeferenced label mask becomes one record per connected region of one class:

    {"class": "building", "class_index": 1, "score": 0.83, "area_m2": 412.7, "source": "15/17602/10746.png",
     "geometry": <shapely Polygon in EPSG:4326, lon/lat>,
     "run_id": "20250101T000000Z-a1b2c3", "model_id": "clipseg@3f2a...", "ontology_hash": "9c1e..."}

(run_id, model_id, ontology_hash: the run, model and ontology that made the polygon, from `VectorSettings`.)

How, and why each choice:

- Regions are traced by GDAL's polygonize (`rasterio.features.shapes`) with 4-connectivity: pixels join a
  region through shared edges only. 8-connectivity would join diagonal neighbours into rings that touch
  themselves at a vertex, which OGC calls invalid and GIS tools repair in different ways. Holes are kept
  (a courtyard in a building, an island in a lake). Class 0 (background) and 255 (no-data) are not traced.
- Simplification happens in pixel space, with the tolerance in pixels (global or per class): a model's
  edge error is measured in pixels whatever the ground resolution, so one tolerance (1 px removes the
  staircase) suits 30 cm scenes and zoom-15 tiles alike. A class may instead give its tolerance in metres
  on the ground (`simplify_m`, the ontology key): it is turned into pixels with the image's metres per
  pixel at its centre (`metres_per_pixel`: a pixel step measured on the WGS84 ellipsoid, so a Web
  Mercator tile at 60 N gets half its nominal size; the pixel size for a CRS in metres PROJ cannot
  place), the same as that tolerance in the CRS's units before reprojection. Where no metric scale
  exists the class's pixel tolerance is used and a note says so. The block is simplified as a coverage
  (every region, background and no-data included; GEOS's topology-preserving coverage simplifier,
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
- `min_area_m2` then drops specks (global or per class, the ontology's per-class minimum mapping unit),
  measured on the simplified polygon.
- Geometry that cannot be trusted is never passed on. A CRS that cannot be reprojected to lon/lat (a
  local engineering CRS), or a raster outside its CRS's domain (a UTM scene placed far from its zone,
  where PROJ gives inf or lon/lat that do not map back: `GeoRef.wgs84_transformer`), raises
  `VectorError`: the image keeps its mask, and only its polygons are missing. Of the polygons made, one
  with a corner without finite lon/lat is left out, and an invalid one (a self-touching ring after
  reprojection, a ring collapsed to a line) is repaired (`shapely.make_valid`, polygonal parts only) or
  left out when nothing polygonal remains; a note says so (`notes`).
- score: the mean of the class's score over the region's pixels, when scores are given.

Large scenes are vectorised per block (with `GeoRef.window_georef`), and XYZ tiles per tile; a building
cut by a block or tile border comes out in pieces, which `merge_across_borders` joins (`filter_by_area`
then applies the area filter to whole objects). `write_geoparquet` writes records as GeoParquet (with its
`geo` metadata) through fsspec, atomically; `read_geoparquet` reads them back. `merge_across_borders`
repairs or drops bad geometry itself (`repair_records`), so no piece can stop a merge.

rasterio, shapely, pyproj and geopandas are the optional `geo` extra, imported at first use.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from textseg.image.rasters import WGS84, GeoError, GeoRef, lazy_import
from textseg.image.windows import SCORE_LEVELS
from textseg.storage import read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

BACKGROUND = 0
NODATA = 255
CONNECTIVITY = 4  # edge-connected regions: always valid polygons (module docstring)
# Gaps narrower than this (degrees; ~1.1 mm of latitude) between pieces of one class are closed when merging:
# far above floating-point noise at a shared tile border (~1e-13 degrees), far below any imagery's pixel.
MERGE_SNAP_DEGREES = 1e-8
SOURCES_SEPARATOR = "|"  # a merged record's `source`: its pieces' sources, sorted, joined by this

RECORD_COLUMNS = ("class", "class_index", "score", "area_m2", "source", "geometry")
# What made each polygon (strings, null when unknown): written after RECORD_COLUMNS by write_geoparquet.
PROVENANCE_COLUMNS = ("run_id", "model_id", "ontology_hash")
MAX_LATITUDE = 90.0
NO_POLYGONS = "no polygons"  # how `image_polygons` begins the note of an image whose polygons failed


class VectorError(ValueError):
    """An image's polygons cannot be made at all (its CRS has no way to lon/lat); the mask is unaffected."""


@dataclass(frozen=True)
class VectorSettings:
    """How labels become polygons; each value global (a float) or per class index ({1: 1.5, 3: 0.0}).

    A class missing from a mapping gets 0 (no simplification, no area filter).
    """

    # Pixels of the mask (not map units): see the module docstring. 0 keeps the exact pixel outlines.
    simplify_tolerance: Mapping[int, float] | float = 0.0
    # Square metres on the ground (geodesic); polygons smaller than this after simplification are dropped.
    min_area_m2: Mapping[int, float] | float = 0.0
    # Metres on the ground, per class (the ontology's `simplify_m`): a class listed here is simplified by
    # this distance, converted to pixels per image (`metres_per_pixel`), instead of simplify_tolerance.
    simplify_m: Mapping[int, float] = field(default_factory=dict)
    # Copied into every record (PROVENANCE_COLUMNS); None leaves the column null.
    run_id: str | None = None
    model_id: str | None = None
    ontology_hash: str | None = None

    def __post_init__(self) -> None:
        for name in ("simplify_tolerance", "min_area_m2", "simplify_m"):
            value = getattr(self, name)
            values = value.values() if isinstance(value, Mapping) else [value]
            if any(not 0 <= v < math.inf for v in values):
                raise ValueError(f"{name} must be finite and >= 0 (globally or per class), got {value!r}")

    def tolerance_for(self, class_index: int, metres_per_pixel: float | None = None) -> float:
        """The class's simplification tolerance in pixels of an image with `metres_per_pixel` (None: not
        known, so a tolerance in metres cannot be used and the pixel tolerance applies)."""
        if class_index in self.simplify_m and metres_per_pixel:
            return float(self.simplify_m[class_index]) / metres_per_pixel
        return _per_class(self.simplify_tolerance, class_index)

    @property
    def provenance(self) -> dict[str, str | None]:
        return {"run_id": self.run_id, "model_id": self.model_id, "ontology_hash": self.ontology_hash}

    def min_area_for(self, class_index: int) -> float:
        return _per_class(self.min_area_m2, class_index)


def polygons_from_labels(
    labels: np.ndarray,
    georef: GeoRef,
    class_names: list[str],
    scores: np.ndarray | None,
    source: str,
    settings: VectorSettings,
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One record per 4-connected region of each class in `labels` (record layout: module docstring).

    labels: (H, W) uint8 class indices with georef.height == H and georef.width == W; 0 and 255 are not
    traced. class_names: background first (`Ontology.class_names`), so class_names[k] names value k.
    scores: (len(class_names), H, W) float in [0, 1] or uint8 0..255 (`windows.quantize_scores`), row k the
    score of class k (the layout of `postprocess.class_scores`), or None (then every score is None).
    source: what the records came from (a relpath or URI), copied into each. Records are ordered by class,
    then by position (top to bottom). notes: when given, receives a sentence for each thing left out or
    approximated (polygons without finite lon/lat, repaired geometry, a metre tolerance used in pixels),
    for the image's metadata row. Raises VectorError when the CRS cannot be reprojected to lon/lat.
    """
    features = lazy_import("rasterio.features")
    shapely = lazy_import("shapely")
    _check_inputs(labels, georef, class_names, scores)
    if not ((labels != BACKGROUND) & (labels != NODATA)).any():
        return []
    to_wgs84 = _checked_transformer(georef)
    notes = [] if notes is None else notes
    with warnings.catch_warnings():  # pixel space: an identity transform is intended, not a mistake
        warnings.simplefilter("ignore", lazy_import("rasterio.errors").NotGeoreferencedWarning)
        # Every region, background and no-data too: together they cover the block (see _simplify_coverage).
        shapes = list(features.shapes(labels, connectivity=CONNECTIVITY))
        regions = np.array([shapely.geometry.shape(geometry) for geometry, _ in shapes], dtype=object)
        classes = np.array([int(value) for _, value in shapes], dtype=np.int64)
        mean_scores = _region_mean_scores(regions, classes, labels, scores) if scores is not None else None
    traced = (classes != BACKGROUND) & (classes != NODATA)
    order = np.flatnonzero(traced)[np.argsort(classes[traced], kind="stable")]  # by class, then position
    metres_per_pixel = _metres_per_pixel_if_needed(georef, classes[traced], settings, notes)
    simplified = _simplify_coverage(regions, classes, settings, metres_per_pixel)
    geometries = _pixels_to_wgs84(simplified[order], georef, to_wgs84)
    repaired = repair_geometries(geometries, notes, _crs_name(georef.crs))
    records = []
    for i, geometry in zip(order.tolist(), repaired, strict=True):
        if geometry is None:
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
                **settings.provenance,
            }
        )
    return records


def image_polygons(
    labels: np.ndarray,
    georef: GeoRef,
    class_names: list[str],
    scores: np.ndarray | None,
    source: str,
    settings: VectorSettings,
    notes: list[str],
) -> list[dict[str, Any]]:
    """`polygons_from_labels` for the pipeline (an image, or a block of a scene): never raises. When no
    polygons can be made, [] and a note "no polygons: <why>" (an unexpected failure is logged with its
    traceback too): the image keeps its mask and its row, and the other images their polygons."""
    try:
        return polygons_from_labels(labels, georef, class_names, scores, source, settings, notes)
    except VectorError as err:
        notes.append(f"{NO_POLYGONS}: {err}")
    except Exception as err:  # noqa: BLE001 - polygons are an extra: never worth the mask or the run
        notes.append(f"{NO_POLYGONS}: {type(err).__name__}: {err}")
        log.warning("vectors: no polygons for %r", source, exc_info=True)
    return []


def metres_per_pixel(georef: GeoRef) -> float | None:
    """Metres on the ground per pixel at the raster's centre, or None when the CRS gives no metric scale.

    The pixel step along each axis is measured on the WGS84 ellipsoid (so Web Mercator tiles, lon/lat
    grids and any projection get their true size; `GeoRef.ground_sample_distance`), falling back to the
    pixel size for a CRS in metres that PROJ cannot place (a local grid, a scene outside its UTM zone).
    """
    return georef.ground_sample_distance()


def repair_geometries(
    geometries: np.ndarray, notes: list[str] | None = None, where: str = "EPSG:4326"
) -> list[Any]:
    """Each lon/lat geometry usable as it is, repaired, or None (left out), with a note on what was done.

    Left out: a corner without finite coordinates or with |latitude| > 90 (what PROJ returns for points
    outside a projection's domain), or nothing polygonal left after repair. Repaired: an invalid geometry
    (self-intersection, a ring collapsed below 4 points) through `shapely.make_valid` (its "structure"
    method, which keeps only polygonal parts; exterior rings then counter-clockwise, RFC 7946). Kept:
    valid geometries, the same objects. `where` names the coordinates' origin in the note.
    """
    shapely = lazy_import("shapely")
    geometries = np.asarray(geometries, dtype=object)
    if len(geometries) == 0:
        return []
    missing = np.array([g is None for g in geometries])
    present = np.where(missing, shapely.Polygon(), geometries)
    coordinates, owner = shapely.get_coordinates(present, return_index=True)
    bad_corner = ~np.isfinite(coordinates).all(axis=1) | (np.abs(coordinates[:, 1]) > MAX_LATITUDE)
    outside = np.bincount(owner[bad_corner], minlength=len(geometries)) > 0
    usable = ~missing & ~outside & ~shapely.is_empty(present)
    invalid = np.zeros(len(geometries), dtype=bool)
    invalid[usable] = ~shapely.is_valid(present[usable])
    out: list[Any] = [None] * len(geometries)
    repaired = dropped = 0
    for i in np.flatnonzero(usable).tolist():
        if not invalid[i]:
            out[i] = present[i]
            continue
        fixed = _polygonal(shapely.make_valid(present[i], method="structure", keep_collapsed=False))
        if fixed is None:
            dropped += 1
        else:
            out[i], repaired = fixed, repaired + 1
    if notes is not None:
        if outside.any():
            notes.append(
                f"polygons left out: corners with no finite longitude and latitude (outside the domain "
                f"of {where})"
            )
        if dropped:
            notes.append("polygons left out: invalid geometry with no polygonal part left after repair")
        if repaired:
            notes.append("polygons repaired: invalid geometry made valid (polygonal parts kept)")
    return out


def repair_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose geometry is usable (`repair_geometries`): valid ones unchanged (the same dicts),
    repaired ones as copies with their area re-measured, the rest left out (and logged)."""
    if not records:
        return []
    notes: list[str] = []
    geometries = repair_geometries(np.array([r["geometry"] for r in records], dtype=object), notes)
    kept = []
    for record, geometry in zip(records, geometries, strict=True):
        if geometry is None:
            continue
        if geometry is not record["geometry"]:
            record = {**record, "geometry": geometry, "area_m2": geodesic_area_m2(geometry)}
        kept.append(record)
    if notes:
        log.warning("vectors: %s (%d of %d pieces kept)", "; ".join(notes), len(kept), len(records))
    return kept


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
    Bad geometry never stops a merge: pieces are first passed through `repair_records` (invalid ones
    repaired, unusable ones left out), a union that comes out invalid is repaired the same way, and a
    group whose union GEOS still cannot compute is kept as its separate pieces (logged). Every geometry
    returned is valid.
    """
    shapely = lazy_import("shapely")
    if snap_degrees <= 0:
        raise ValueError(f"snap_degrees must be > 0, got {snap_degrees}")
    records = repair_records(records)
    kept: list[int] = []
    merged: list[dict[str, Any]] = []
    by_class: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(int(record["class_index"]), []).append(i)
    for class_index in sorted(by_class):
        members = by_class[class_index]
        geometries = np.array([records[i]["geometry"] for i in members], dtype=object)
        grown = _grown(geometries, snap_degrees)
        for group in _touching_groups(grown):
            if len(group) == 1:
                kept.append(members[group[0]])
                continue
            pieces = [records[members[j]] for j in group]
            try:
                union = shapely.buffer(shapely.union_all(grown[group]), -snap_degrees, join_style="mitre")
                if not union.is_valid:  # the shrink can pinch a ring into crossing itself
                    union = _polygonal(shapely.make_valid(union, method="structure", keep_collapsed=False))
                if union is None:
                    raise shapely.errors.GEOSException("the union of the pieces has no valid polygon")
                merged.extend(_merged_records(pieces, union))
            except shapely.errors.GEOSException as err:
                log.warning("vectors: %d pieces of class %d kept apart: %s", len(group), class_index, err)
                kept.extend(members[j] for j in group)
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
    source (string), geometry (WKB), run_id, model_id, ontology_hash (string, null when a record lacks
    them: PROVENANCE_COLUMNS), then any extra keys the records carry, in first-seen order. No
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
    known = (*RECORD_COLUMNS, *PROVENANCE_COLUMNS)
    extra = list(dict.fromkeys(key for record in records for key in record if key not in known))
    columns: dict[str, Any] = {
        "class": pandas.Series([r["class"] for r in records], dtype="string"),
        "class_index": pandas.Series([r["class_index"] for r in records], dtype="int32"),
        "score": pandas.Series(
            [np.nan if r["score"] is None else r["score"] for r in records], dtype="float64"
        ),
        "area_m2": pandas.Series([r["area_m2"] for r in records], dtype="float64"),
        "source": pandas.Series([r["source"] for r in records], dtype="string"),
        **{key: pandas.Series([r.get(key) for r in records], dtype="string") for key in PROVENANCE_COLUMNS},
    }
    for key in extra:
        columns[key] = pandas.Series([r.get(key) for r in records])
    frame = geopandas.GeoDataFrame(
        columns, geometry=geopandas.GeoSeries([r["geometry"] for r in records], crs=WGS84), crs=WGS84
    )
    frame = frame[[*RECORD_COLUMNS, *PROVENANCE_COLUMNS, *extra]]
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


def _checked_transformer(georef: GeoRef) -> Any:
    """The georef's transformer to lon/lat (None for lon/lat itself), or VectorError saying why not:
    a CRS without a way to lon/lat, or a raster outside its CRS's domain (`GeoRef.wgs84_transformer`)."""
    if georef.crs == WGS84:
        return None
    try:
        return georef.wgs84_transformer()
    except GeoError as err:
        raise VectorError(str(err)) from err
    except Exception as err:  # pyproj's ProjError / CRSError: no operation from this CRS to lon/lat
        raise VectorError(
            f"{_crs_name(georef.crs)} cannot be reprojected to EPSG:4326: {type(err).__name__}: {err}"
        ) from err


def _crs_name(crs: str) -> str:
    """'EPSG:32633', or the name in a WKT ('the CRS "Site grid"'), for notes and errors."""
    if not crs.lstrip().endswith("]"):
        return crs
    name = crs.split('"')[1] if crs.count('"') >= 2 else ""
    return f'the CRS "{name}"' if name else "the CRS"


def _metres_per_pixel_if_needed(
    georef: GeoRef, classes: np.ndarray, settings: VectorSettings, notes: list[str]
) -> float | None:
    """metres_per_pixel when a traced class has a tolerance in metres (a note when there is none)."""
    if not any(int(k) in settings.simplify_m for k in np.unique(classes)):
        return None
    scale = metres_per_pixel(georef)
    if scale is None:
        notes.append(
            f"simplify_m not applied: {_crs_name(georef.crs)} has no metric scale, so polygons were "
            "simplified by the pixel tolerance"
        )
    return scale


def _polygonal(geometry: Any) -> Any:
    """The (multi)polygon in a make_valid result, exterior rings counter-clockwise; None when empty."""
    shapely = lazy_import("shapely")
    # get_parts goes one level deep: twice turns a collection holding a multipolygon into polygons.
    parts = [q for p in shapely.get_parts(geometry) for q in shapely.get_parts(p)]
    polygons = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    oriented = [shapely.geometry.polygon.orient(p, sign=1.0) for p in polygons]
    if not oriented:
        return None
    result = oriented[0] if len(oriented) == 1 else shapely.MultiPolygon(oriented)
    return result if result.is_valid else None


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


def _simplify_coverage(
    regions: np.ndarray, classes: np.ndarray, settings: VectorSettings, metres_per_pixel: float | None
) -> np.ndarray:
    """Pixel-space regions simplified by their class's tolerance, as one coverage (module docstring).

    regions: every region of the block (they tile it exactly); classes: each region's value. Background and
    no-data regions take part, so that the block's outline is the coverage's boundary, which stays intact.
    metres_per_pixel: the block's scale, for the classes whose tolerance is in metres.
    """
    shapely = lazy_import("shapely")
    tolerances = np.array(
        [settings.tolerance_for(int(k), metres_per_pixel) for k in classes], dtype=np.float64
    )
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


def _pixels_to_wgs84(geometries: np.ndarray, georef: GeoRef, to_wgs84: Any) -> np.ndarray:
    """Pixel-space geometries -> lon/lat: the georef's affine transform, then `to_wgs84` (None: none, the
    CRS is lon/lat). Points outside the CRS's domain come back as inf (`repair_geometries` drops them)."""
    shapely = lazy_import("shapely")
    a, b, c, d, e, f = georef.transform

    def transform(coords: np.ndarray) -> np.ndarray:  # coords: (N, 2) pixel (col, row)
        x = a * coords[:, 0] + b * coords[:, 1] + c
        y = d * coords[:, 0] + e * coords[:, 1] + f
        if to_wgs84 is not None:
            x, y = to_wgs84.transform(x, y)
        return np.column_stack([x, y])

    return shapely.transform(geometries, transform)


def _grown(geometries: np.ndarray, snap_degrees: float) -> np.ndarray:
    """The geometries grown by snap_degrees (mitred); one by one, and a geometry GEOS cannot buffer
    unchanged, when the whole array fails."""
    shapely = lazy_import("shapely")
    try:
        return shapely.buffer(geometries, snap_degrees, join_style="mitre")
    except shapely.errors.GEOSException:
        grown = geometries.copy()
        for i, geometry in enumerate(geometries):
            try:
                grown[i] = shapely.buffer(geometry, snap_degrees, join_style="mitre")
            except shapely.errors.GEOSException as err:
                log.warning("vectors: a piece could not be grown for merging, kept as it is: %s", err)
        return grown


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
                **{key: pieces[0].get(key) for key in PROVENANCE_COLUMNS},
            }
        )
    return records


def read_geoparquet(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """Records back from a file `write_geoparquet` wrote (the inverse, for merging a run's parts).

    Missing scores (null) come back as None, class_index as int; transient storage errors are retried.
    """
    geopandas = lazy_import("geopandas")
    pandas = lazy_import("pandas")
    frame = geopandas.read_parquet(io.BytesIO(read_bytes(fs, path)))
    records = frame.to_dict("records")
    for record in records:
        score = record.get("score")
        record["score"] = None if score is None or score != score else float(score)
        record["class_index"] = int(record["class_index"])
        for key in PROVENANCE_COLUMNS:
            value = record.get(key)
            record[key] = None if value is None or value is pandas.NA else str(value)
    return records
