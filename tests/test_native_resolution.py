"""Georeferenced scenes are labeled at the model's own scale: a mosaic of held-out synthetic tiles, as a
GeoTIFF at the demo model's training GSD (0.5 m/px) and at twice it, labels as well as the same tiles
labeled one by one; its building polygons match the truth in map coordinates.

Before native-resolution windowing, a scene up to 4096 px a side was shrunk whole to the model's 256 px
input (a 1024 px mosaic: 4x too coarse), which is what these comparisons would catch.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import textseg
from textseg.evaluation import confusion_matrix, report_from_confusion
from textseg.image.rasters import GeoRef, write_geotiff_rgb
from textseg.image.windows import Window
from textseg.outputs.masks import decode_png_mask
from textseg.training.evaluation import render_tiles
from textseg.training.synth import SYNTH_CLASSES, SYNTH_GSD_M, write_dataset_files

rasterio = pytest.importorskip("rasterio")
geopandas = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")

TILES, SIDE, TILE = 4, 4 * 256, 256  # a 4 x 4 mosaic of 256 px tiles: 1024 px a side
HELD_OUT_SEED = 20_001  # never used to train the demo model
ORIGIN = (500_000.0, 6_000_000.0)  # UTM 33N, near 54 N
CLASSES = ["background", *SYNTH_CLASSES]
BUILDING = CLASSES.index("building")


@pytest.fixture(scope="module")
def tiles() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return render_tiles(TILES * TILES, HELD_OUT_SEED, TILE)


def _mosaic(parts: list[np.ndarray]) -> np.ndarray:
    rows = [np.concatenate(parts[r * TILES : (r + 1) * TILES], axis=1) for r in range(TILES)]
    return np.concatenate(rows, axis=0)


def _miou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    confusion = sum(confusion_matrix(truth, pred) for truth, pred in pairs)
    size = len(CLASSES)
    report = report_from_confusion(np.asarray(confusion)[:size, :size], CLASSES, len(pairs), [])
    assert report.miou is not None
    return report.miou


def _label(source: pathlib.Path, dest: pathlib.Path, ontology: pathlib.Path, **options: object) -> list[dict]:
    summary = textseg.label(
        str(source), str(dest), runner="local", model="demo", ontology=str(ontology), **options
    )
    assert summary.error == 0, summary
    return pq.read_table(dest / "metadata").to_pylist()


def _scene(folder: pathlib.Path, image: np.ndarray, gsd: float) -> GeoRef:
    georef = GeoRef("EPSG:32633", (gsd, 0.0, ORIGIN[0], 0.0, -gsd, ORIGIN[1]), image.shape[1], image.shape[0])
    fs, _ = textseg.storage.filesystem_for(str(folder))
    folder.mkdir(parents=True)
    write_geotiff_rgb(
        fs, str(folder / "scene.tif"), georef, [(Window(0, 0, georef.width, georef.height), image)]
    )
    return georef


@pytest.fixture(scope="module")
def labeled(
    tmp_path_factory: pytest.TempPathFactory, tiles: tuple[list[np.ndarray], list[np.ndarray]]
) -> dict:
    """The tiles one by one, the mosaic at 0.5 m/px (with vectors) and at 1 m/px, each labeled once."""
    work = tmp_path_factory.mktemp("native")
    fs, _ = textseg.storage.filesystem_for(str(work))
    write_dataset_files(fs, str(work))
    ontology = work / "ontology.yaml"
    images, masks = tiles
    by_tile = _by_tile(work / "tiles", images, masks, ontology)
    # The same tiles as a sensor with 1 m pixels records them, one by one (resized whole to the model).
    coarse_tiles = [np.asarray(Image.fromarray(image).reduce(2)) for image in images]
    by_coarse_tile = _by_tile(work / "coarse_tiles", coarse_tiles, [m[::2, ::2] for m in masks], ontology)

    mosaic, truth = _mosaic(images), _mosaic(masks)
    fine_georef = _scene(work / "fine", mosaic, SYNTH_GSD_M)
    fine_rows = _label(work / "fine", work / "fine_out", ontology, vectors=True)
    coarse_georef = _scene(work / "coarse", _mosaic(coarse_tiles), 2 * SYNTH_GSD_M)
    coarse_rows = _label(work / "coarse", work / "coarse_out", ontology)
    return {
        "by_tile": by_tile,
        "by_coarse_tile": by_coarse_tile,
        "truth": truth,
        "fine": (fine_georef, fine_rows, work / "fine_out"),
        "coarse": (coarse_georef, coarse_rows, work / "coarse_out"),
    }


def _by_tile(
    folder: pathlib.Path, images: list[np.ndarray], masks: list[np.ndarray], ontology: pathlib.Path
) -> float:
    """mIoU of the tiles labeled one by one, each a photo resized whole to the model's input."""
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"tile_{i:02d}.png")
    out = folder.with_name(folder.name + "_out")
    rows = _label(folder, out, ontology)
    predicted = {r["relpath"]: decode_png_mask((out / "masks" / r["relpath"]).read_bytes()) for r in rows}
    return _miou([(masks[i], predicted[f"tile_{i:02d}.png"]) for i in range(len(images))])


def _scene_mask(dest: pathlib.Path, georef: GeoRef) -> np.ndarray:
    with rasterio.open(dest / "masks" / "scene.tif") as dataset:
        # The mask keeps the scene's own grid, whatever scale the model saw.
        assert (dataset.width, dataset.height) == (georef.width, georef.height)
        assert dataset.crs.to_epsg() == 32633
        assert tuple(dataset.transform)[:6] == georef.transform
        return dataset.read(1)


def test_a_scene_at_the_training_gsd_labels_as_well_as_its_tiles_one_by_one(labeled: dict) -> None:
    georef, (row,), dest = labeled["fine"]
    mask = _scene_mask(dest, georef)
    scene = _miou([(labeled["truth"], mask)])
    print(f"mIoU: tiles one by one {labeled['by_tile']:.3f}, scene at 0.5 m/px {scene:.3f}")
    assert scene >= labeled["by_tile"] - 0.05
    assert row["tiling"].startswith("windows of 256 px"), row["tiling"]
    assert "model's 0.5 m/px" in row["tiling"]


def test_a_scene_at_twice_the_gsd_is_resampled_to_the_model_and_labeled_on_its_own_grid(
    labeled: dict,
) -> None:
    georef, (row,), dest = labeled["coarse"]
    mask = _scene_mask(dest, georef)
    truth = labeled["truth"][::2, ::2]
    scene = _miou([(truth, mask)])
    print(f"mIoU at 1 m/px: tiles one by one {labeled['by_coarse_tile']:.3f}, scene {scene:.3f}")
    assert scene >= labeled["by_coarse_tile"] - 0.05
    assert row["tiling"].startswith("windows of 128 px"), row["tiling"]  # 128 scene px = 256 model px


def test_building_polygons_match_the_truth_in_map_coordinates(labeled: dict) -> None:
    from rasterio.features import shapes

    georef, _, dest = labeled["fine"]
    frame = geopandas.read_parquet(dest / "vectors").to_crs(georef.crs)  # polygons come in EPSG:4326
    predicted = shapely.union_all(frame[frame["class"] == "building"].geometry.values)
    truth = (labeled["truth"] == BUILDING).astype(np.uint8)
    truth_shapes = [
        shapely.geometry.shape(g) for g, v in shapes(truth, mask=truth > 0, transform=georef.affine()) if v
    ]
    expected = shapely.union_all(truth_shapes)
    iou = predicted.intersection(expected).area / predicted.union(expected).area
    print(f"building polygons IoU in EPSG:32633: {iou:.3f}")
    assert iou >= 0.6


def test_a_photo_without_georeference_is_still_resized_whole(tmp_path: pathlib.Path, tiles: tuple) -> None:
    images, _ = tiles
    (tmp_path / "photos").mkdir()
    Image.fromarray(_mosaic(images)).save(tmp_path / "photos" / "photo.png")
    fs, _ = textseg.storage.filesystem_for(str(tmp_path))
    write_dataset_files(fs, str(tmp_path))
    (row,) = _label(tmp_path / "photos", tmp_path / "out", tmp_path / "ontology.yaml")
    assert row["tiling"] == "whole image resized to 256x256"
    assert json.loads(row["source_properties"] or "{}") == {}


def test_window_plan_cuts_by_georeference_and_ground_sample_distance() -> None:
    from textseg.image.pieces import WindowPlan
    from textseg.image.rasters import xyz_georef

    utm = GeoRef("EPSG:32633", (0.25, 0.0, ORIGIN[0], 0.0, -0.25, ORIGIN[1]), 2000, 1000)
    plan = WindowPlan(None, 64, (256, 256), model_gsd=0.5)
    fine = plan.tiling(2000, 1000, utm)  # 0.25 m/px: a window shows 512 scene px, shrunk 2x for the model
    assert fine.windows is not None and {(w.width, w.height) for w in fine.windows} == {(512, 512)}
    assert fine.describe.startswith("windows of 512 px, overlap 128 px")
    # Without a declared GSD a window is the model's input side; a photo is resized whole.
    assert WindowPlan(None, 64, (256, 256)).tiling(2000, 1000, utm).describe.startswith("windows of 256 px")
    assert plan.tiling(2000, 1000, None).windows is None
    # A retina XYZ tile (512 px) is larger than the model's input: windowed at its own resolution.
    tile = xyz_georef(18, 140816, 85970, 512, 512)
    gsd = tile.ground_sample_distance()
    assert gsd is not None and 0.15 < gsd < 0.25  # web mercator's 0.3 m/px shrinks by cos(54 deg)
    assert WindowPlan(None, 64, (256, 256)).tiling(512, 512, tile).windows is not None
    # --tile-size wins, with its overlap in image pixels.
    forced = WindowPlan(300, 40, (256, 256), model_gsd=0.5).tiling(2000, 1000, utm)
    assert forced.describe == "windows of 300 px, overlap 40 px (--tile-size)"


def test_large_photos_get_windows_of_a_large_models_own_input_size() -> None:
    """SAM 3 reads 1008 px: its windows are exactly that, where CLIPSeg's 352 px gets 1024 px windows."""
    from textseg.image.pieces import WindowPlan

    sam3 = WindowPlan(None, 64, (1008, 1008)).tiling(5000, 3000, None)
    clipseg = WindowPlan(None, 64, (352, 352)).tiling(5000, 3000, None)
    assert sam3.windows and {(w.width, w.height) for w in sam3.windows} == {(1008, 1008)}
    assert clipseg.windows and {(w.width, w.height) for w in clipseg.windows} == {(1024, 1024)}
    assert sam3.describe.startswith("windows of 1008 px") and clipseg.describe.startswith(
        "windows of 1024 px"
    )
