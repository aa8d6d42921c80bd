"""Large images as windows through the whole plan: cut, scored per window, blended back into one mask."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image

import textseg
from textseg.image import rasters
from textseg.image.windows import Window
from textseg.labels.vector_merge import vectors_uri
from textseg.storage import filesystem_for

PROMPTS = "red,green"


def label(source, dest, model_dir, runner="local", **options):
    return textseg.label(
        str(source),
        str(dest),
        runner=runner,
        model=str(model_dir),
        prompts=PROMPTS,
        device="cpu",
        threshold=0.5,
        **options,
    )


def scene_pixels(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2] = (200, 30, 30)
    return pixels


def test_large_png_is_labeled_through_windows_into_one_png_mask_and_one_row(tmp_path, tiny_clipseg_dir):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(scene_pixels(150, 230)).save(tmp_path / "imgs" / "big.png")
    summary = label(tmp_path / "imgs", tmp_path / "out", tiny_clipseg_dir, tile_size=96, tile_overlap=16)
    assert (summary.listed, summary.ok, summary.error) == (1, 1, 0)
    with Image.open(tmp_path / "out" / "masks" / "big.png") as mask:
        assert mask.mode == "P" and mask.size == (230, 150)
        labels = np.asarray(mask)
    assert set(np.unique(labels)) <= {0, 1, 2}
    rows = pq.read_table(tmp_path / "out" / "metadata" / summary.run_id).to_pylist()
    assert [(r["relpath"], r["status"], r["width"], r["height"]) for r in rows] == [
        ("big.png", "ok", 230, 150)
    ]
    fractions = np.bincount(labels.ravel(), minlength=3) / labels.size
    assert rows[0]["class_pixel_fraction"] == pytest.approx(fractions.tolist(), abs=1e-6)
    assert not (tmp_path / "out" / "_work").exists()  # the scratch area is gone after the run


def test_georeferenced_geotiff_scene_gets_a_tiled_geotiff_mask_on_the_same_grid(
    tmp_path, tiny_clipseg_dir, ray_session
):
    georef = rasters.GeoRef("EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 6000000.0), 230, 150)
    (tmp_path / "imgs").mkdir()
    fs, path = filesystem_for(str(tmp_path / "imgs" / "scene.tif"))
    rasters.write_geotiff_rgb(
        fs, path, georef, [(Window(0, 0, 230, 150), scene_pixels(150, 230))], block_size=64
    )
    summary = label(
        tmp_path / "imgs", tmp_path / "out", tiny_clipseg_dir, runner="ray", tile_size=96, tile_overlap=16
    )
    assert (summary.listed, summary.ok, summary.error) == (1, 1, 0)
    with rasterio.open(tmp_path / "out" / "masks" / "scene.tif") as mask:
        assert (mask.width, mask.height, mask.count, mask.dtypes[0]) == (230, 150, 1, "uint8")
        assert mask.crs.to_string() == "EPSG:32633" and tuple(mask.transform)[:6] == georef.transform
        assert mask.profile["tiled"] and mask.compression is not None
    row = pq.read_table(tmp_path / "out" / "metadata" / summary.run_id).to_pylist()[0]
    assert row["crs"] == "EPSG:32633"
    assert row["bounds"] == pytest.approx([500000.0, 6000000.0 - 75.0, 500000.0 + 115.0, 6000000.0])
    assert row["mask_uri"].endswith("masks/scene.tif")


def test_xyz_tile_rows_carry_web_mercator_bounds(tmp_path, tiny_clipseg_dir):
    tile = tmp_path / "tiles" / "1" / "1" / "0.png"
    tile.parent.mkdir(parents=True)
    Image.fromarray(scene_pixels(64, 64)).save(tile)
    summary = label(tmp_path / "tiles", tmp_path / "out", tiny_clipseg_dir)
    row = pq.read_table(tmp_path / "out" / "metadata" / summary.run_id).to_pylist()[0]
    half = rasters.WEB_MERCATOR_HALF_EXTENT
    assert row["crs"] == "EPSG:3857" and row["bounds"] == pytest.approx([0.0, 0.0, half, half])
    assert row["bounds_wgs84"][0] == pytest.approx(0.0) and row["bounds_wgs84"][2] == pytest.approx(180.0)


def test_vectors_of_a_windowed_geotiff_scene_are_merged_across_window_borders(tmp_path, tiny_clipseg_dir):
    """With every pixel scored alike (a threshold of 0 and one prompt), the scene is one region of class
    1 cut by every window border; the merged GeoParquet must hold it as one polygon of the scene's area."""
    geopandas = pytest.importorskip("geopandas")
    georef = rasters.GeoRef("EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 6000000.0), 230, 150)
    (tmp_path / "imgs").mkdir()
    fs, path = filesystem_for(str(tmp_path / "imgs" / "scene.tif"))
    rasters.write_geotiff_rgb(
        fs, path, georef, [(Window(0, 0, 230, 150), scene_pixels(150, 230))], block_size=64
    )
    summary = textseg.label(
        str(tmp_path / "imgs"),
        str(tmp_path / "out"),
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="anything",
        device="cpu",
        threshold=0.0,
        tile_size=96,
        tile_overlap=16,
        vectors=True,
    )
    assert summary.ok == 1 and summary.polygons == 1
    frame = geopandas.read_parquet(vectors_uri(str(tmp_path / "out"), summary.run_id))
    assert frame.crs.to_epsg() == 4326 and list(frame["class"]) == ["anything"]
    assert frame["area_m2"].iloc[0] == pytest.approx(115.0 * 75.0, rel=0.01)
    assert frame["source"].iloc[0] == "scene.tif"


def test_synth_xyz_pyramid_labeled_with_vectors_merges_polygons_across_tile_borders(
    tmp_path, tiny_clipseg_dir
):
    """Threshold 0 with one prompt labels every pixel of every tile as one class: the 2 x 2 tiles' pieces
    must come back as one polygon covering the four tiles (Web Mercator tiles: area from their bounds)."""
    geopandas = pytest.importorskip("geopandas")
    from textseg.cli import main

    assert (
        main(["synth", str(tmp_path / "pyramid"), "--xyz", "12/2200/1343", "--n", "2", "--size", "64"]) == 0
    )
    images = tmp_path / "pyramid" / "images"
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png")) == [
        "12/2200/1343.png",
        "12/2200/1344.png",
        "12/2201/1343.png",
        "12/2201/1344.png",
    ]
    summary = textseg.label(
        str(images),
        str(tmp_path / "out"),
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="land",
        device="cpu",
        threshold=0.0,
        vectors=True,
    )
    assert summary.ok == 4 and summary.polygons == 1
    frame = geopandas.read_parquet(vectors_uri(str(tmp_path / "out"), summary.run_id))
    tiles = [rasters.xyz_georef(12, x, y, 64, 64) for x in (2200, 2201) for y in (1343, 1344)]
    import shapely.geometry

    from textseg.labels.vectors import geodesic_area_m2

    expected = sum(geodesic_area_m2(shapely.geometry.box(*t.bounds_wgs84)) for t in tiles)
    assert frame["area_m2"].iloc[0] == pytest.approx(expected, rel=0.01)
    assert frame["source"].iloc[0].count("|") == 3  # the four tiles' pieces, merged


def test_scratch_of_runs_started_earlier_is_removed_and_a_later_one_kept(tmp_path, tiny_clipseg_dir):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(scene_pixels(40, 40)).save(tmp_path / "imgs" / "small.png")
    killed = tmp_path / "out" / "_work" / "20200101T000000Z-abcdef" / "scenes" / "k"
    later = tmp_path / "out" / "_work" / "29990101T000000Z-abcdef" / "scenes" / "k"
    for folder in (killed, later):
        folder.mkdir(parents=True)
        (folder / "scene.json").write_text("{}")
    assert label(tmp_path / "imgs", tmp_path / "out", tiny_clipseg_dir).ok == 1
    assert not killed.exists() and later.exists()
