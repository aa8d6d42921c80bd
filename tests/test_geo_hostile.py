"""Geodata that its own georeference cannot place on the Earth still gets its mask and an ok row.

GeoTIFFs placed far outside their UTM zone (PROJ returns inf there, or lon/lat that do not map back) and
one in a local engineering CRS (no way to lon/lat at all) are labeled with --vectors: each keeps a mask
on its own grid; only what needs lon/lat (WGS84 bounds, polygons) is left out, with the reason in the
row's notes, and the run succeeds.
Bad polygons (self-intersecting, collapsed, non-finite) are repaired or dropped, never fail a merge.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
geopandas = pytest.importorskip("geopandas")
pyproj = pytest.importorskip("pyproj")

import pyarrow.parquet as pq  # noqa: E402
from rasterio.transform import Affine  # noqa: E402
from shapely.geometry import Polygon, box  # noqa: E402

import textseg  # noqa: E402
from textseg.image.rasters import GeoError, GeoRef  # noqa: E402
from textseg.labels.vector_merge import VECTOR_PARTS, CellGrid, merge_run_vectors, vectors_uri  # noqa: E402
from textseg.labels.vectors import (  # noqa: E402
    VectorError,
    VectorSettings,
    image_polygons,
    merge_across_borders,
    polygons_from_labels,
    repair_geometries,
    write_geoparquet,
)
from textseg.outputs.metadata import metadata_row  # noqa: E402
from textseg.storage import filesystem_for  # noqa: E402

WIDTH, HEIGHT = 80, 64
# 20,000 km east of UTM 33N's central meridian: valid numbers, but outside the projection's domain (inf).
BEYOND = Affine(10.0, 0.0, 500_000.0 + 2e7, 0.0, -10.0, 6_000_000.0)
# 15,500 km east: PROJ gives a finite lon/lat, but one that maps back ~100 m away (its series diverge).
ASKEW = Affine(10.0, 0.0, 500_000.0 + 1.55e7, 0.0, -10.0, 6_000_000.0)
# 6,500 km east: extreme but sound (lon/lat map back within a millimetre), so nothing is left out.
STRETCHED = Affine(10.0, 0.0, 500_000.0 + 6.5e6, 0.0, -10.0, 6_000_000.0)
GOOD = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 6_000_000.0)
LOCAL_WKT = (
    'LOCAL_CS["Site grid",LOCAL_DATUM["site",0],UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)
LOCAL = Affine(0.5, 0.0, 1000.0, 0.0, -0.5, 2000.0)
CLASS_NAMES = ["background", "a", "b"]


def _write_geotiff(path: pathlib.Path, crs: object, transform: Affine) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, HEIGHT, WIDTH), dtype=np.uint8)
    pixels[:, : HEIGHT // 2] = (np.array([200, 30, 30], np.uint8))[:, None, None]
    profile = {"driver": "GTiff", "width": WIDTH, "height": HEIGHT, "count": 3, "dtype": "uint8"}
    with rasterio.open(path, "w", crs=crs, transform=transform, **profile) as dataset:
        dataset.write(pixels)


@pytest.fixture
def hostile_sources(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "src"
    folder.mkdir()
    _write_geotiff(folder / "far.tif", "EPSG:32633", BEYOND)
    _write_geotiff(folder / "askew.tif", "EPSG:32633", ASKEW)
    _write_geotiff(folder / "local.tif", rasterio.crs.CRS.from_wkt(LOCAL_WKT), LOCAL)
    _write_geotiff(folder / "good.tif", "EPSG:32633", GOOD)  # the others must not cost it anything
    return folder


@pytest.mark.parametrize("tile_size", [None, 4096], ids=["windowed-scene", "whole-image"])
def test_rasters_that_cannot_reach_wgs84_keep_their_masks_and_say_what_they_lack(
    tmp_path: pathlib.Path,
    hostile_sources: pathlib.Path,
    tiny_clipseg_dir: pathlib.Path,
    tile_size: int | None,
) -> None:
    dest = tmp_path / "out"
    summary = textseg.label(
        str(hostile_sources),
        str(dest),
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="a,b",
        device="cpu",
        threshold=0.0,  # every pixel is a or b: polygons everywhere
        tile_size=tile_size,
        vectors=True,
    )
    assert (summary.status, summary.listed, summary.ok, summary.error) == ("succeeded", 4, 4, 0)
    assert json.loads((dest / "runs" / f"{summary.run_id}.json").read_text())["status"] == "succeeded"
    rows = {r["relpath"]: r for r in pq.read_table(dest / "metadata" / summary.run_id).to_pylist()}
    for name in ("far.tif", "askew.tif", "local.tif", "good.tif"):
        row = rows[name]
        assert row["status"] == "ok" and row["error"] is None and row["mask_uri"].endswith(f"masks/{name}")
        with rasterio.open(hostile_sources / name) as source, rasterio.open(dest / "masks" / name) as mask:
            assert (mask.width, mask.height) == (source.width, source.height)
            assert mask.transform == source.transform and mask.crs == source.crs
            assert set(np.unique(mask.read(1))) <= {1, 2}
        assert row["bounds"] is not None and row["crs"]

    local, good = rows["local.tif"], rows["good.tif"]
    assert good["notes"] is None and good["bounds_wgs84"] == pytest.approx(
        list(GeoRef("EPSG:32633", tuple(GOOD)[:6], WIDTH, HEIGHT).bounds_wgs84)
    )
    for far in (rows["far.tif"], rows["askew.tif"]):
        assert far["bounds_wgs84"] is None
        why = "reaches outside the domain of EPSG:32633: its edges have no longitude and latitude"
        first, second = far["notes"].split("; ")
        assert first.startswith("no WGS84 bounds: GeoError: the raster (bounds (") and why in first
        assert second.startswith("no polygons: the raster (bounds (") and why in second
    assert local["bounds_wgs84"] is None
    assert local["notes"].startswith("no WGS84 bounds: ProjError: ")
    assert 'no polygons: the CRS "Site grid" cannot be reprojected to EPSG:4326: ProjError' in local["notes"]

    frame = geopandas.read_parquet(vectors_uri(str(dest), summary.run_id))
    assert summary.polygons == len(frame) > 0
    assert set("|".join(frame["source"]).split("|")) == {"good.tif"}  # the others' polygons left out only
    assert frame.geometry.is_valid.all() and np.isfinite(frame.geometry.bounds.to_numpy()).all()


def _utm(transform: Affine | tuple[float, ...]) -> GeoRef:
    return GeoRef("EPSG:32633", tuple(transform)[:6], WIDTH, HEIGHT)  # type: ignore[arg-type]


def test_bounds_wgs84_refuses_edges_pyproj_cannot_place_instead_of_returning_infinity_or_garbage() -> None:
    pyproj_bounds = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform_bounds
    assert not np.isfinite(
        pyproj_bounds(*_utm(BEYOND).bounds, densify_pts=21)
    ).all()  # what rows used to hold
    edge = _domain_edge_easting()  # straddling the edge: PROJ's own bounds silently drop the inf half
    straddling = _utm((10.0, 0.0, edge - 400.0, 0.0, -10.0, 6e6))
    assert np.isfinite(pyproj_bounds(*straddling.bounds, densify_pts=21)).all()
    for georef in (_utm(BEYOND), _utm(ASKEW), straddling):
        with pytest.raises(GeoError, match="outside the domain of EPSG:32633"):
            georef.bounds_wgs84  # noqa: B018
        with pytest.raises(VectorError, match="outside the domain of EPSG:32633"):
            polygons_from_labels(_stripes(), georef, CLASS_NAMES, None, "far.tif", VectorSettings())
    west, south, east, north = _utm(STRETCHED).bounds_wgs84  # extreme but sound: kept
    assert 70 < west < east < 80 and 30 < south < north < 40
    notes: list[str] = []
    records = polygons_from_labels(
        _stripes(), _utm(STRETCHED), CLASS_NAMES, None, "s", VectorSettings(), notes
    )
    assert len(records) == WIDTH // 8 and notes == [] and all(r["geometry"].is_valid for r in records)


def test_metadata_row_notes_missing_wgs84_bounds_and_keeps_the_callers_notes() -> None:
    common = dict(
        source_uri="file:///x.tif",
        relpath="x.tif",
        fingerprint="f",
        mask_uri="file:///out/masks/x.tif",
        error=None,
        width=WIDTH,
        height=HEIGHT,
        counts=[1, 2, 3],
        score_sums=[0.5, 1.0, 1.5],
        elapsed_ms=1.0,
        class_names=CLASS_NAMES,
        model_id="m",
        ontology_hash="h",
        run_id="r",
    )
    local = metadata_row(georef=GeoRef(LOCAL_WKT, tuple(LOCAL)[:6], WIDTH, HEIGHT), **common)
    assert local["status"] == "ok" and local["bounds_wgs84"] is None and local["bounds"] is not None
    assert local["notes"].startswith("no WGS84 bounds: ProjError: ")
    noted = metadata_row(
        georef=GeoRef(LOCAL_WKT, tuple(LOCAL)[:6], WIDTH, HEIGHT),
        notes=["no polygons: x", "no polygons: x"],
        **common,
    )
    assert noted["notes"].count("; ") == 1 and noted["notes"].endswith("; no polygons: x")
    good = metadata_row(georef=GeoRef("EPSG:32633", tuple(GOOD)[:6], WIDTH, HEIGHT), **common)
    assert good["notes"] is None and len(good["bounds_wgs84"]) == 4


# ----------------------------------------------------------------------------------------------------------
# Polygons


def _domain_edge_easting(northing: float = 6e6) -> float:
    """The easting (UTM 33N, at `northing`) beyond which this PROJ gives no finite lon/lat (bisection)."""
    transformer = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    low, high = 1e7, 3e7
    assert math.isfinite(transformer.transform(low, northing)[0])
    assert not math.isfinite(transformer.transform(high, northing)[0])
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (
            (middle, high) if math.isfinite(transformer.transform(middle, northing)[0]) else (low, middle)
        )
    return low


def _stripes(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Vertical 8 px stripes of classes 1 and 2: many small polygons across the raster."""
    return (1 + (np.arange(width) // 8) % 2).astype(np.uint8)[None, :].repeat(height, axis=0)


def test_a_crs_without_a_way_to_lon_lat_raises_vector_error_and_the_pipeline_notes_it() -> None:
    georef = GeoRef(LOCAL_WKT, tuple(LOCAL)[:6], WIDTH, HEIGHT)
    with pytest.raises(VectorError, match='the CRS "Site grid" cannot be reprojected to EPSG:4326'):
        polygons_from_labels(_stripes(), georef, CLASS_NAMES, None, "local.tif", VectorSettings())
    notes: list[str] = []
    assert image_polygons(_stripes(), georef, CLASS_NAMES, None, "local.tif", VectorSettings(), notes) == []
    assert len(notes) == 1 and notes[0].startswith("no polygons: ")


BOWTIE = Polygon([(13.0, 52.0), (13.001, 52.001), (13.001, 52.0), (13.0, 52.001), (13.0, 52.0)])
COLLAPSED = Polygon([(13.002, 52.0), (13.003, 52.0), (13.002, 52.0), (13.002, 52.0)])  # too few points
INFINITE = Polygon([(math.inf, math.inf), (math.inf, 52.0), (math.inf, 52.001), (math.inf, math.inf)])
HALF_INFINITE = Polygon([(13.004, 52.0), (math.inf, 52.0), (13.005, 52.001), (13.004, 52.0)])
BEYOND_POLE = Polygon([(13.0, 91.0), (13.001, 91.0), (13.001, 91.001), (13.0, 91.0)])


def _record(geometry: Polygon, source: str, class_index: int = 1) -> dict:
    return {
        "class": CLASS_NAMES[class_index],
        "class_index": class_index,
        "score": None,
        "area_m2": 1.0,
        "source": source,
        "geometry": geometry,
    }


def test_invalid_geometry_is_repaired_or_dropped_with_a_note() -> None:
    assert not BOWTIE.is_valid and not COLLAPSED.is_valid
    square = box(13.01, 52.0, 13.011, 52.001)
    notes: list[str] = []
    fixed = repair_geometries(
        np.array([BOWTIE, COLLAPSED, INFINITE, HALF_INFINITE, BEYOND_POLE, square, None], dtype=object), notes
    )
    bowtie, collapsed, infinite, half, pole, kept, missing = fixed
    assert bowtie.geom_type == "MultiPolygon" and bowtie.is_valid and len(bowtie.geoms) == 2
    assert all(part.exterior.is_ccw for part in bowtie.geoms)
    assert bowtie.area == pytest.approx(2 * 0.001 * 0.0005 / 2, rel=1e-9)  # its two triangles
    assert collapsed is None and infinite is None and half is None and pole is None and missing is None
    assert kept is square  # valid geometry passes through untouched
    assert (
        len(notes) == 3
        and any("repaired" in n for n in notes)
        and any("no polygonal part" in n for n in notes)
    )


def test_merge_across_borders_survives_invalid_and_non_finite_polygons() -> None:
    left, right = box(13.0, 52.01, 13.001, 52.011), box(13.001, 52.01, 13.002, 52.011)  # two halves
    with pytest.raises(shapely.errors.GEOSException, match="Shell empty"):
        shapely.buffer(INFINITE, 1e-8, join_style="mitre")  # what used to stop the run's merge
    records = [
        _record(left, "a.tif"),
        _record(BOWTIE, "b.tif"),
        _record(INFINITE, "c.tif"),
        _record(COLLAPSED, "d.tif"),
        _record(right, "e.tif"),
        _record(HALF_INFINITE, "f.tif", class_index=2),
    ]
    merged = merge_across_borders(records)
    by_source = {r["source"]: r for r in merged}
    assert sorted(by_source) == ["a.tif|e.tif", "b.tif"]
    joined = by_source["a.tif|e.tif"]["geometry"]
    assert joined.geom_type == "Polygon"
    assert joined.symmetric_difference(box(13.0, 52.01, 13.002, 52.011)).area < 1e-14
    bowtie = by_source["b.tif"]
    assert bowtie["geometry"].is_valid and bowtie["area_m2"] > 0 and bowtie["area_m2"] != 1.0  # re-measured


def test_the_distributed_merge_writes_the_good_polygons_of_a_part_holding_bad_ones(
    tmp_path: pathlib.Path,
) -> None:
    good = box(13.0, 52.01, 13.001, 52.011)
    fs, root = filesystem_for(str(tmp_path / "scratch"))
    pieces = [_record(good, "good.tif"), _record(INFINITE, "far.tif"), _record(BOWTIE, "bow.tif")]
    write_geoparquet(pieces, fs, f"{root}/{VECTOR_PARTS}/part-0.parquet")
    calls = []

    def map_fn(fn, items):
        items = list(items)
        calls.append(fn.__name__)
        return [fn(item) for item in items]

    count = merge_run_vectors(
        str(tmp_path / "scratch"), str(tmp_path / "dest"), "run1", VectorSettings(), {}, map_fn, CellGrid()
    )
    frame = geopandas.read_parquet(vectors_uri(str(tmp_path / "dest"), "run1"))
    assert count == len(frame) == 2 and sorted(frame["source"]) == ["bow.tif", "good.tif"]
    assert frame.geometry.is_valid.all() and "merge_cell" in calls
