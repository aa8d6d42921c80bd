"""Vectors: labels -> lon/lat polygons, geodesic areas, holes, filters, scores, border merges, GeoParquet."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

shapely = pytest.importorskip("shapely")
pyproj = pytest.importorskip("pyproj")
geopandas = pytest.importorskip("geopandas")
pyogrio = pytest.importorskip("pyogrio")

import pyarrow.parquet as pq  # noqa: E402
from shapely.geometry import Polygon, box  # noqa: E402

from textseg.image.rasters import GeoRef, xyz_georef  # noqa: E402
from textseg.image.windows import Window, quantize_scores  # noqa: E402
from textseg.labels.vectors import (  # noqa: E402
    VectorSettings,
    filter_by_area,
    geodesic_area_m2,
    merge_across_borders,
    polygons_from_labels,
    read_geoparquet,
    write_geoparquet,
)
from textseg.storage import filesystem_for  # noqa: E402

CLASS_NAMES = ["background", "building", "water"]
PIXEL = 0.5
UTM = GeoRef("EPSG:32633", (PIXEL, 0.0, 500000.0, 0.0, -PIXEL, 6000000.0), 400, 300)
# Buildings as pixel boxes (col0, row0, col1, row1), half-open.
BUILDINGS = [(100, 50, 160, 80), (20, 200, 90, 260)]
WATER_OUTER, WATER_HOLE = (200, 100, 350, 200), (250, 130, 300, 170)


def _scene() -> np.ndarray:
    labels = np.zeros((UTM.height, UTM.width), np.uint8)
    for c0, r0, c1, r1 in BUILDINGS:
        labels[r0:r1, c0:c1] = 1
    c0, r0, c1, r1 = WATER_OUTER
    labels[r0:r1, c0:c1] = 2
    c0, r0, c1, r1 = WATER_HOLE
    labels[r0:r1, c0:c1] = 0
    labels[10:12, 10:12] = 1  # a 1 m^2 speck
    labels[290:, 390:] = 255  # no-data is never a polygon
    return labels


def _to_utm(geometry):
    transformer = pyproj.Transformer.from_crs("EPSG:4326", UTM.crs, always_xy=True)
    return shapely.transform(geometry, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def _map_box(georef: GeoRef, c0: float, r0: float, c1: float, r1: float):
    (x0, y0), (x1, y1) = georef.xy(c0, r0), georef.xy(c1, r1)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _equal_area_m2(geometry) -> float:
    """Area in the Lambert azimuthal equal-area projection (EPSG:3035): an independent check of geodesy."""
    transformer = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True)
    return shapely.transform(
        geometry, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))
    ).area


def test_building_rectangles_come_back_within_a_pixel_in_map_coordinates() -> None:
    records = polygons_from_labels(_scene(), UTM, CLASS_NAMES, None, "scene.tif", VectorSettings())
    buildings = [r for r in records if r["class"] == "building" and r["area_m2"] > 10]
    assert len(buildings) == 2
    for record, pixels in zip(
        sorted(buildings, key=lambda r: -r["geometry"].centroid.y), BUILDINGS, strict=True
    ):
        assert record["class_index"] == 1 and record["source"] == "scene.tif" and record["score"] is None
        truth = _map_box(UTM, *pixels)
        found = _to_utm(record["geometry"])
        assert np.abs(np.array(found.bounds) - np.array(truth.bounds)).max() < PIXEL
        assert found.symmetric_difference(truth).area < 1e-3
        # Geodesic m^2: the grid area divided by UTM's scale factor squared (k = 0.9996 near 15 E), and the
        # same as in an equal-area projection.
        assert record["area_m2"] == pytest.approx(truth.area / 0.9996**2, rel=2e-4)
        assert record["area_m2"] == pytest.approx(_equal_area_m2(record["geometry"]), rel=1e-6)
        assert record["geometry"].exterior.is_ccw and record["geometry"].is_valid


def test_holes_are_kept() -> None:
    records = polygons_from_labels(_scene(), UTM, CLASS_NAMES, None, "scene.tif", VectorSettings())
    (water,) = [r for r in records if r["class"] == "water"]
    assert len(water["geometry"].interiors) == 1 and not water["geometry"].interiors[0].is_ccw
    outer, hole = _map_box(UTM, *WATER_OUTER), _map_box(UTM, *WATER_HOLE)
    assert _to_utm(water["geometry"]).symmetric_difference(outer.difference(hole)).area < 1e-3
    assert water["area_m2"] == pytest.approx((outer.area - hole.area) / 0.9996**2, rel=3e-4)


def test_background_and_nodata_are_not_polygons() -> None:
    labels = np.zeros((UTM.height, UTM.width), np.uint8)
    labels[:10] = 255
    assert polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", VectorSettings()) == []


def test_min_area_filter_drops_small_blobs_globally_or_per_class() -> None:
    labels = _scene()
    everything = polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", VectorSettings())
    assert sorted(round(r["area_m2"]) for r in everything if r["class"] == "building") == [1, 450, 1051]
    filtered = polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", VectorSettings(min_area_m2=5.0))
    assert len(filtered) == len(everything) - 1 and min(r["area_m2"] for r in filtered) > 5
    per_class = polygons_from_labels(
        labels, UTM, CLASS_NAMES, None, "s", VectorSettings(min_area_m2={2: 1e6})
    )
    assert [r["class"] for r in per_class] == ["building"] * 3


def test_simplification_is_in_pixels_and_keeps_the_shape() -> None:
    yy, xx = np.mgrid[0 : UTM.height, 0 : UTM.width]
    labels = (((xx - 200) ** 2 + (yy - 150) ** 2) < 60**2).astype(np.uint8)
    exact = polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", VectorSettings())[0]
    smooth = polygons_from_labels(
        labels, UTM, CLASS_NAMES, None, "s", VectorSettings(simplify_tolerance=1.0)
    )[0]
    assert len(smooth["geometry"].exterior.coords) < len(exact["geometry"].exterior.coords) / 2
    assert smooth["area_m2"] == pytest.approx(exact["area_m2"], rel=0.02) and smooth["geometry"].is_valid
    assert _to_utm(smooth["geometry"]).hausdorff_distance(_to_utm(exact["geometry"])) <= 1.0 * PIXEL + 1e-6
    per_class = VectorSettings(simplify_tolerance={2: 5.0})  # class 1 not listed: not simplified
    assert polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", per_class)[0]["geometry"].equals(
        exact["geometry"]
    )


def test_simplified_neighbours_share_their_border_without_gaps_or_overlaps() -> None:
    yy, xx = np.mgrid[0 : UTM.height, 0 : UTM.width]
    labels = np.zeros((UTM.height, UTM.width), np.uint8)
    lake = ((xx - 200) ** 2 + (yy - 150) ** 2) < 80**2
    island = ((xx - 230) ** 2 + (yy - 140) ** 2) < 40**2
    labels[lake] = 2
    labels[island] = 1  # a building on an island: its whole outline is shared with the lake
    labels[yy > 0.7 * xx + 100] = 1  # a diagonal staircase through both
    settings = VectorSettings(simplify_tolerance=2.0)
    records = polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", settings)
    geometries = [_to_utm(r["geometry"]) for r in records]
    overlap = sum(a.intersection(b).area for i, a in enumerate(geometries) for b in geometries[i + 1 :])
    assert overlap < 1e-6  # m^2
    raw = [
        _to_utm(r["geometry"])
        for r in polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", VectorSettings())
    ]
    assert shapely.union_all(geometries).area == pytest.approx(shapely.union_all(raw).area, rel=0.01)
    assert len(shapely.get_coordinates(geometries)) < len(shapely.get_coordinates(raw)) / 2
    assert all(g.is_valid for g in geometries)


@pytest.mark.parametrize("quantized", [False, True])
def test_score_is_the_mean_class_score_over_the_polygons_pixels(quantized: bool) -> None:
    labels = _scene()
    scores = np.zeros((3, UTM.height, UTM.width), np.float32)
    c0, r0, c1, r1 = BUILDINGS[0]
    scores[1, r0:r1, c0:c1] = 0.9
    scores[1, r0:r1, c0 : c0 + 30] = 0.5  # half the building: mean 0.7
    c0, r0, c1, r1 = BUILDINGS[1]
    scores[1, r0 - 5 : r1 + 5, c0:c1] = 0.6  # pixels outside the building must not count
    scores[1, r0 - 5 : r0, c0:c1] = 0.0
    scores[2] = 0.8
    given = quantize_scores(scores) if quantized else scores
    records = polygons_from_labels(labels, UTM, CLASS_NAMES, given, "s", VectorSettings(min_area_m2=5.0))
    by_area = {round(r["area_m2"]): r["score"] for r in records}
    tolerance = 1 / 255 if quantized else 1e-6
    assert by_area[450] == pytest.approx(0.7, abs=tolerance)
    assert by_area[1051] == pytest.approx(0.6, abs=tolerance)
    assert [r["score"] for r in records if r["class"] == "water"] == [pytest.approx(0.8, abs=tolerance)]


def test_bad_inputs_are_refused_with_a_reason() -> None:
    labels = _scene()
    with pytest.raises(ValueError, match="beyond"):
        polygons_from_labels(labels, UTM, CLASS_NAMES[:2], None, "s", VectorSettings())
    with pytest.raises(ValueError, match="georef"):
        polygons_from_labels(labels[:10], UTM, CLASS_NAMES, None, "s", VectorSettings())
    with pytest.raises(ValueError, match="scores"):
        polygons_from_labels(labels, UTM, CLASS_NAMES, np.zeros((2, 300, 400)), "s", VectorSettings())
    with pytest.raises(ValueError, match=">= 0"):
        VectorSettings(min_area_m2={1: -1.0})


# ----------------------------------------------------------------------------------------------------------
# Merging across borders

Z, X, Y = 18, 140816, 85970  # Berlin, ~0.6 m pixels


def _two_tiles(rows: tuple[int, int], left_cols: tuple[int, int], right_cols: tuple[int, int]) -> list[dict]:
    """A rectangle drawn over tiles X and X+1 (one row of pixels in each): each tile vectorised on its own."""
    records = []
    for dx, (c0, c1) in enumerate([left_cols, right_cols]):
        labels = np.zeros((256, 256), np.uint8)
        labels[rows[0] : rows[1], c0:c1] = 1
        scores = np.zeros((3, 256, 256), np.float32)
        scores[1] = 0.9 if dx == 0 else 0.6
        georef = xyz_georef(Z, X + dx, Y, 256, 256)
        records += polygons_from_labels(
            labels, georef, CLASS_NAMES, scores, f"{Z}/{X + dx}/{Y}.png", VectorSettings()
        )
    return records


def _wgs84_box(georef: GeoRef, c0: float, r0: float, c1: float, r1: float):
    transformer = pyproj.Transformer.from_crs(georef.crs, "EPSG:4326", always_xy=True)
    (west, north), (east, south) = (transformer.transform(*georef.xy(c, r)) for c, r in ((c0, r0), (c1, r1)))
    return box(west, south, east, north)  # Mercator is separable: a map box is a lon/lat box


def test_a_rectangle_across_an_xyz_tile_border_becomes_one_polygon() -> None:
    pieces = _two_tiles(rows=(100, 150), left_cols=(200, 256), right_cols=(0, 60))
    assert len(pieces) == 2
    merged = merge_across_borders(pieces)
    assert len(merged) == 1
    (record,) = merged
    geometry = record["geometry"]
    assert geometry.geom_type == "Polygon" and len(geometry.interiors) == 0 and geometry.is_valid
    truth = _wgs84_box(xyz_georef(Z, X, Y, 256, 256), 200, 100, 316, 150)
    expected_area = geodesic_area_m2(truth)
    assert record["area_m2"] == pytest.approx(expected_area, rel=0.01)
    assert record["area_m2"] == pytest.approx(expected_area, rel=1e-6)  # in fact exact
    assert len(geometry.exterior.coords) == 5  # square corners restored, no seam vertices left over
    assert record["score"] == pytest.approx((0.9 * 56 + 0.6 * 60) / 116, rel=1e-6)  # area-weighted
    assert record["source"] == f"{Z}/{X}/{Y}.png|{Z}/{X + 1}/{Y}.png"
    assert (record["class"], record["class_index"]) == ("building", 1)


def test_simplified_tiles_still_merge_into_the_polygons_of_the_whole_mosaic() -> None:
    """Simplification keeps each tile's outline exact, so pieces still meet edge to edge at tile borders."""
    yy, xx = np.mgrid[0:512, 0:512]
    mosaic = np.zeros((512, 512), np.uint8)
    for cx, cy, radius in ((256, 256, 90), (250, 40, 30), (40, 300, 25), (470, 470, 60)):
        mosaic[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = 1
    mosaic[np.abs(yy - 0.8 * xx - 30) < 6] = 2  # a river crossing tile borders diagonally
    settings = VectorSettings(simplify_tolerance=1.5)
    pieces = []
    for ty in range(2):
        for tx in range(2):
            tile = np.ascontiguousarray(mosaic[ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256])
            georef = xyz_georef(Z, X + tx, Y + ty, 256, 256)
            pieces += polygons_from_labels(tile, georef, CLASS_NAMES, None, f"{tx}/{ty}", settings)
    whole_georef = xyz_georef(Z - 1, X // 2, Y // 2, 512, 512)
    whole = polygons_from_labels(mosaic, whole_georef, CLASS_NAMES, None, "whole", settings)
    merged = merge_across_borders(pieces)
    assert len(pieces) > len(whole)
    assert sorted(r["class"] for r in merged) == sorted(r["class"] for r in whole)
    assert sum(r["area_m2"] for r in merged) == pytest.approx(sum(r["area_m2"] for r in whole), rel=0.01)


def test_area_filter_after_merging_keeps_an_object_whose_piece_is_a_sliver() -> None:
    pieces = _two_tiles(rows=(100, 150), left_cols=(254, 256), right_cols=(0, 60))  # 2 px + 60 px
    settings = VectorSettings(min_area_m2={1: 50.0})
    assert len(filter_by_area(pieces, settings)) == 1  # filtering first would lose the sliver
    (whole,) = filter_by_area(merge_across_borders(pieces), settings)
    assert whole["area_m2"] == pytest.approx(sum(p["area_m2"] for p in pieces), rel=1e-6)


def test_merging_closes_floating_point_slits_but_not_real_gaps() -> None:
    pieces = _two_tiles(rows=(100, 150), left_cols=(200, 256), right_cols=(0, 60))
    nudged = dict(pieces[1], geometry=shapely.affinity.translate(pieces[1]["geometry"], xoff=1e-12))
    assert len(merge_across_borders([pieces[0], nudged])) == 1
    apart = _two_tiles(rows=(100, 150), left_cols=(200, 256), right_cols=(1, 60))  # one pixel of gap
    assert merge_across_borders(apart) == apart


def test_merging_never_joins_different_classes_and_keeps_loners_unchanged() -> None:
    pieces = _two_tiles(rows=(100, 150), left_cols=(200, 256), right_cols=(0, 60))
    water = dict(pieces[1], **{"class": "water", "class_index": 2})
    loner = dict(pieces[0], geometry=shapely.affinity.translate(pieces[0]["geometry"], yoff=1.0))
    merged = merge_across_borders([pieces[0], water, loner])
    assert merged == [pieces[0], water, loner]


def test_pieces_of_a_large_scene_cut_by_window_borders_merge_back() -> None:
    """The same in UTM, where window borders are not straight lines of longitude."""
    labels = _scene()
    whole = polygons_from_labels(labels, UTM, CLASS_NAMES, None, "scene", VectorSettings(min_area_m2=5))
    pieces = []
    for window in (Window(0, 0, 230, 300), Window(230, 0, 170, 300)):  # cuts the water ring in two
        part = labels[window.slices]
        georef = UTM.window_georef(window)
        pieces += polygons_from_labels(
            part, georef, CLASS_NAMES, None, "scene", VectorSettings(min_area_m2=5)
        )
    assert len(pieces) == len(whole) + 1
    merged = merge_across_borders(pieces)
    assert len(merged) == len(whole)
    for before, after in zip(
        sorted(whole, key=lambda r: r["area_m2"]), sorted(merged, key=lambda r: r["area_m2"]), strict=True
    ):
        assert after["area_m2"] == pytest.approx(before["area_m2"], rel=1e-6)
        # Not bit-identical: an edge cut in two is reprojected as two chords instead of one (~0.1 mm apart).
        assert _equal_area_m2(after["geometry"].symmetric_difference(before["geometry"])) < 0.05


# ----------------------------------------------------------------------------------------------------------
# GeoParquet


def test_geoparquet_is_read_back_by_gis_readers_with_its_crs(tmp_path: pathlib.Path) -> None:
    records = polygons_from_labels(_scene(), UTM, CLASS_NAMES, None, "scene.tif", VectorSettings())
    records[0] = dict(records[0], score=0.5, run_id="r1")  # an extra key becomes a column
    path = tmp_path / "vectors" / "scene.parquet"
    write_geoparquet(records, *filesystem_for(str(path)))
    schema = pq.read_schema(path)
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert schema.field("class_index").type == "int32"
    readers = [geopandas.read_parquet, _read_geoparquet_by_the_spec]
    if "Parquet" in pyogrio.list_drivers():  # GDAL's reader, where the installed GDAL has the driver
        readers.append(pyogrio.read_dataframe)
    for read in readers:
        frame = read(path)
        assert frame.crs.to_epsg() == 4326
        assert list(frame.columns)[:6] == ["class", "class_index", "score", "area_m2", "source", "geometry"]
        assert len(frame) == len(records)
        assert frame["class"].tolist() == [r["class"] for r in records]
        assert frame["area_m2"].tolist() == pytest.approx([r["area_m2"] for r in records])
        assert frame["score"].iloc[0] == 0.5 and frame["score"].iloc[1:].isna().all()
        assert frame["run_id"].iloc[0] == "r1"
        for found, record in zip(frame.geometry, records, strict=True):
            assert found.equals_exact(record["geometry"], 1e-12)


def _read_geoparquet_by_the_spec(path: pathlib.Path):
    """A reader that knows only the GeoParquet spec: the `geo` key, WKB, and the CRS as PROJJSON."""
    table = pq.read_table(path)
    geo = json.loads(table.schema.metadata[b"geo"])
    column = geo["primary_column"]
    crs = geo["columns"][column].get("crs", "OGC:CRS84")  # absent means OGC:CRS84 (lon/lat WGS84)
    frame = table.drop([column]).to_pandas()
    frame[column] = shapely.from_wkb(table.column(column).to_numpy(zero_copy_only=False))
    return geopandas.GeoDataFrame(
        frame[table.column_names], geometry=column, crs=pyproj.CRS.from_user_input(crs)
    )


def test_read_geoparquet_returns_the_records_written(tmp_path: pathlib.Path) -> None:
    records = polygons_from_labels(_scene(), UTM, CLASS_NAMES, None, "scene.tif", VectorSettings())
    records[0] = dict(records[0], score=0.25)
    fs, path = filesystem_for(str(tmp_path / "part.parquet"))
    write_geoparquet(records, fs, path)
    found = read_geoparquet(fs, path)
    assert [r["score"] for r in found] == [0.25] + [None] * (len(records) - 1)
    for back, record in zip(found, records, strict=True):
        assert {k: back[k] for k in ("class", "class_index", "area_m2", "source")} == {
            k: record[k] for k in ("class", "class_index", "area_m2", "source")
        }
        assert type(back["class_index"]) is int and back["geometry"].equals_exact(record["geometry"], 0)


def test_geoparquet_of_no_polygons_is_a_valid_empty_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.parquet"
    write_geoparquet([], *filesystem_for(str(path)))
    frame = geopandas.read_parquet(path)
    assert len(frame) == 0 and frame.crs.to_epsg() == 4326 and "area_m2" in frame.columns


def test_geodesic_area_ignores_ring_orientation() -> None:
    square = Polygon([(13.0, 52.0), (13.001, 52.0), (13.001, 52.001), (13.0, 52.001)])
    assert geodesic_area_m2(square) > 0
    assert geodesic_area_m2(square) == pytest.approx(geodesic_area_m2(square.reverse()))
    assert geodesic_area_m2(square) == pytest.approx(_equal_area_m2(square), rel=1e-6)
