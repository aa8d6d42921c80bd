"""Polygons a GIS can trust at any size: what made them (run, model, ontology), each class's minimum
mapping unit in square metres, and simplification in metres on the ground."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

shapely = pytest.importorskip("shapely")
pyproj = pytest.importorskip("pyproj")
geopandas = pytest.importorskip("geopandas")
rasterio = pytest.importorskip("rasterio")

import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

import textseg  # noqa: E402
from textseg import ontology as ontology_mod  # noqa: E402
from textseg.config import JobConfig  # noqa: E402
from textseg.image.rasters import GeoRef, xyz_georef  # noqa: E402
from textseg.image.windows import Window  # noqa: E402
from textseg.labels import vectors  # noqa: E402
from textseg.labels.vector_merge import VECTOR_PARTS, merge_run_vectors, vectors_uri  # noqa: E402
from textseg.labels.vectors import (  # noqa: E402
    PROVENANCE_COLUMNS,
    VectorSettings,
    filter_by_area,
    merge_across_borders,
    metres_per_pixel,
    polygons_from_labels,
    read_geoparquet,
    write_geoparquet,
)
from textseg.plan.prepare import prepare  # noqa: E402
from textseg.storage import filesystem_for  # noqa: E402

CLASS_NAMES = ["background", "building", "water"]
PIXEL = 0.5
UTM = GeoRef("EPSG:32633", (PIXEL, 0.0, 500000.0, 0.0, -PIXEL, 6000000.0), 400, 300)
ONTOLOGY = """
classes:
  building:
    prompts: [building, house]
    min_area_m2: 20
    simplify_m: 1.0
  water:
    prompts: [water]
"""


def _to_utm(geometry):
    transformer = pyproj.Transformer.from_crs("EPSG:4326", UTM.crs, always_xy=True)
    return shapely.transform(geometry, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def _disk(georef: GeoRef, radius: float, class_index: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[0 : georef.height, 0 : georef.width]
    centre_x, centre_y = georef.width / 2, georef.height / 2
    return np.where((xx - centre_x) ** 2 + (yy - centre_y) ** 2 < radius**2, class_index, 0).astype(np.uint8)


@pytest.fixture
def plan(tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "ontology.yaml").write_text(ONTOLOGY)
    config = JobConfig(
        source=str(tmp_path / "src"),
        dest=str(tmp_path / "out"),
        ontology=str(tmp_path / "ontology.yaml"),
        model=str(tiny_clipseg_dir),
        vectors=True,
        vector_min_area=2.0,
        vector_simplify=1.0,
    )
    return prepare(config)


# ----------------------------------------------------------------------------------------------------------
# The ontology keys and the plan's settings


def test_ontology_takes_min_area_and_simplify_in_metres_per_class_and_validates_them() -> None:
    ontology = ontology_mod.from_yaml_text(ONTOLOGY, 0.4)
    building, water = ontology.classes
    assert (building.min_area_m2, building.simplify_m) == (20.0, 1.0)
    assert (water.min_area_m2, water.simplify_m) == (None, None)
    again = ontology_mod.from_mapping(ontology.to_dict(), 0.4)
    assert again == ontology and "min_area_m2" not in ontology.to_dict()["classes"]["water"]
    # They shape polygons, not masks: an incremental run's skip check (the hash) does not change.
    plain = ontology_mod.from_yaml_text("classes: {building: {prompts: [building, house]}, water: {}}", 0.4)
    assert plain.stable_hash() == ontology.stable_hash()
    for bad in (
        "min_area_m2: -1",
        "simplify_m: '1 m'",
        "min_area_m2: true",
        "simplify_m: .nan",
        "min_area: 5",
    ):
        with pytest.raises(ontology_mod.OntologyError, match="min_area|simplify_m"):
            ontology_mod.from_yaml_text("classes: {building: {" + bad + "}}", 0.4)


def test_the_plan_puts_class_keys_over_the_job_options_and_provenance_in_every_setting(plan) -> None:
    settings = plan.vector_settings
    assert settings.min_area_m2 == {1: 20.0, 2: 2.0}  # building its own, water the job's --vector-min-area
    assert settings.simplify_m == {1: 1.0} and settings.simplify_tolerance == 1.0
    assert settings.tolerance_for(1, 0.5) == 2.0 and settings.tolerance_for(2, 0.5) == 1.0
    expected = {
        "run_id": plan.run_id,
        "model_id": plan.model.model_id,
        "ontology_hash": plan.ontology.stable_hash(),
    }
    assert settings.provenance == expected and all(expected.values())
    pieces = plan.stage_settings.vectors  # the write stage's: no area filter before merging, the rest alike
    assert pieces.min_area_m2 == 0.0 and pieces.simplify_m == {1: 1.0} and pieces.provenance == expected


# ----------------------------------------------------------------------------------------------------------
# Columns


def test_polygons_carry_run_model_and_ontology_through_pieces_merge_and_geoparquet(tmp_path, plan) -> None:
    labels = np.zeros((UTM.height, UTM.width), np.uint8)
    labels[50:150, 50:150] = 1
    labels[200:260, 300:380] = 2
    left, right = (
        UTM.window_georef(Window(0, 0, 200, 300)),
        UTM.window_georef(Window(200, 0, 200, 300)),
    )
    settings = plan.stage_settings.vectors
    pieces = polygons_from_labels(
        np.ascontiguousarray(labels[:, :200]), left, CLASS_NAMES, None, "s", settings
    )
    pieces += polygons_from_labels(
        np.ascontiguousarray(labels[:, 200:]), right, CLASS_NAMES, None, "s", settings
    )
    expected = plan.vector_settings.provenance
    assert pieces and all({k: p[k] for k in PROVENANCE_COLUMNS} == expected for p in pieces)
    fs, root = filesystem_for(str(tmp_path / "scratch"))
    write_geoparquet(pieces, fs, f"{root}/{VECTOR_PARTS}/part-0.parquet")
    back = read_geoparquet(fs, f"{root}/{VECTOR_PARTS}/part-0.parquet")
    assert all({k: p[k] for k in PROVENANCE_COLUMNS} == expected for p in back)
    assert (
        merge_run_vectors(
            str(tmp_path / "scratch"), str(tmp_path / "dest"), plan.run_id, plan.vector_settings, {}
        )
        == 2
    )
    frame = geopandas.read_parquet(vectors_uri(str(tmp_path / "dest"), plan.run_id))
    schema = pq.read_schema(next((tmp_path / "dest").rglob("part-0.parquet")))
    assert all(schema.field(name).type == schema.field("source").type for name in PROVENANCE_COLUMNS)
    for name, value in expected.items():
        assert frame[name].tolist() == [value, value]


def test_records_without_provenance_still_write_the_columns_as_null(tmp_path: pathlib.Path) -> None:
    records = polygons_from_labels(_disk(UTM, 40), UTM, CLASS_NAMES, None, "s", VectorSettings())
    assert all(r[k] is None for r in records for k in PROVENANCE_COLUMNS)
    path = tmp_path / "p.parquet"
    write_geoparquet(records, *filesystem_for(str(path)))
    frame = geopandas.read_parquet(path)
    assert list(frame.columns) == [
        "class",
        "class_index",
        "score",
        "area_m2",
        "source",
        "geometry",
        *PROVENANCE_COLUMNS,
    ]
    assert frame["run_id"].isna().all()


def test_labeled_polygons_name_the_run_model_and_ontology(tmp_path, tiny_clipseg_dir) -> None:
    tile = tmp_path / "tiles" / "16" / "34588" / "19031.png"
    tile.parent.mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tile)
    summary = textseg.label(
        str(tmp_path / "tiles"),
        str(tmp_path / "out"),
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="land",
        device="cpu",
        threshold=0.0,
        vectors=True,
    )
    frame = geopandas.read_parquet(vectors_uri(str(tmp_path / "out"), summary.run_id))
    assert summary.polygons == len(frame) == 1
    assert frame["run_id"].tolist() == [summary.run_id]
    assert frame["model_id"].tolist() == [summary.model_id]
    assert frame["ontology_hash"].tolist() == [summary.ontology_hash]


# ----------------------------------------------------------------------------------------------------------
# Minimum mapping unit


def test_a_class_minimum_mapping_unit_drops_its_small_blobs_only(plan) -> None:
    """Squares of known size at 0.5 m/px: 4 x 4 px = 4 m^2, 8 x 8 = 16 m^2, 10 x 10 = 25 m^2, 20 x 20 =
    100 m^2 (grid m^2; geodesic ones differ by UTM's scale factor, 0.9996^-2)."""
    labels = np.zeros((UTM.height, UTM.width), np.uint8)
    sides = (4, 8, 10, 20)
    for i, side in enumerate(sides):
        labels[20 : 20 + side, 20 + 60 * i : 20 + 60 * i + side] = 1  # buildings: min_area_m2 20
        labels[150 : 150 + side, 20 + 60 * i : 20 + 60 * i + side] = 2  # water: the job's 2 m^2
    labels[280:282, 20:22] = 2  # 1 m^2 of water: under the job's minimum
    pieces = polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", plan.stage_settings.vectors)
    assert len(pieces) == 2 * len(sides) + 1  # pieces are never filtered: they may be slivers of an object
    kept = filter_by_area(merge_across_borders(pieces), plan.vector_settings)
    areas = {
        c: sorted(round(r["area_m2"] * 0.9996**2) for r in kept if r["class"] == c)
        for c in ("building", "water")
    }
    assert areas == {"building": [25, 100], "water": [4, 16, 25, 100]}


# ----------------------------------------------------------------------------------------------------------
# Simplification in metres


def test_metres_per_pixel_is_the_ground_size_of_a_pixel() -> None:
    assert metres_per_pixel(UTM) == pytest.approx(PIXEL, rel=1e-3)  # UTM: grid metres, scale factor ~1
    tile = xyz_georef(16, 34588, 19031, 256, 256)  # ~60 N: a Web Mercator metre is half a real one there
    west, south, east, north = tile.bounds_wgs84
    nominal = tile.transform[0]
    assert metres_per_pixel(tile) == pytest.approx(
        nominal * math.cos(math.radians((south + north) / 2)), rel=3e-3
    )
    assert 0.45 * nominal < metres_per_pixel(tile) < 0.55 * nominal
    lonlat = GeoRef("EPSG:4326", (1e-5, 0.0, 13.0, 0.0, -1e-5, 52.0), 100, 100)
    assert metres_per_pixel(lonlat) == pytest.approx(math.sqrt(1.113 * 0.686), rel=0.01)  # 1e-5 degree steps


def test_simplify_m_bounds_the_hausdorff_distance_in_metres_whatever_the_resolution() -> None:
    settings = VectorSettings(simplify_tolerance=0.0, simplify_m={1: 1.0})
    results = {}
    for pixel in (0.5, 0.25):  # the same 30 m disk at two resolutions
        georef = GeoRef(
            "EPSG:32633", (pixel, 0.0, 500000.0, 0.0, -pixel, 6000000.0), int(80 / pixel), int(80 / pixel)
        )
        labels = _disk(georef, 30.0 / pixel)
        (exact,) = polygons_from_labels(labels, georef, CLASS_NAMES, None, "s", VectorSettings())
        (smooth,) = polygons_from_labels(labels, georef, CLASS_NAMES, None, "s", settings)
        vertices = len(smooth["geometry"].exterior.coords)
        assert vertices < len(exact["geometry"].exterior.coords) / 4
        assert _to_utm(smooth["geometry"]).hausdorff_distance(_to_utm(exact["geometry"])) <= 1.0
        assert smooth["area_m2"] == pytest.approx(exact["area_m2"], rel=0.01) and smooth["geometry"].is_valid
        results[pixel] = vertices
    assert abs(results[0.5] - results[0.25]) <= 0.3 * results[0.5]  # metres, not pixels: alike at both
    water = VectorSettings(simplify_m={1: 1.0})  # only the classes listed are simplified in metres
    (disk,) = polygons_from_labels(_disk(UTM, 60, class_index=2), UTM, CLASS_NAMES, None, "s", water)
    (exact,) = polygons_from_labels(
        _disk(UTM, 60, class_index=2), UTM, CLASS_NAMES, None, "s", VectorSettings()
    )
    assert disk["geometry"].equals(exact["geometry"])


def test_simplify_m_on_a_web_mercator_tile_uses_the_true_ground_size() -> None:
    tile = xyz_georef(16, 34588, 19031, 256, 256)  # ~60 N
    labels = _disk(tile, 100)
    ground = metres_per_pixel(tile)
    in_metres = polygons_from_labels(
        labels, tile, CLASS_NAMES, None, "s", VectorSettings(simplify_m={1: 2 * ground})
    )
    in_pixels = polygons_from_labels(
        labels, tile, CLASS_NAMES, None, "s", VectorSettings(simplify_tolerance=2.0)
    )
    assert in_metres[0]["geometry"].equals(in_pixels[0]["geometry"])  # 2 px of ground, not of Mercator metres


def test_without_a_metric_scale_the_pixel_tolerance_is_used_and_noted(monkeypatch) -> None:
    monkeypatch.setattr(vectors, "metres_per_pixel", lambda georef: None)
    labels = _disk(UTM, 60)
    notes: list[str] = []
    settings = VectorSettings(simplify_tolerance=1.5, simplify_m={1: 5.0})
    (fallback,) = polygons_from_labels(labels, UTM, CLASS_NAMES, None, "s", settings, notes)
    (pixels,) = polygons_from_labels(
        labels, UTM, CLASS_NAMES, None, "s", VectorSettings(simplify_tolerance=1.5)
    )
    assert fallback["geometry"].equals(pixels["geometry"])
    assert notes == [
        "simplify_m not applied: EPSG:32633 has no metric scale, "
        "so polygons were simplified by the pixel tolerance"
    ]
    assert VectorSettings(simplify_m={1: 5.0}).tolerance_for(1, None) == 0.0
    with pytest.raises(ValueError, match="simplify_m"):
        VectorSettings(simplify_m={1: -1.0})
