"""Synthetic map data: XYZ pyramids with objects across tile borders; GeoTIFF scenes and their truth."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

rasterio = pytest.importorskip("rasterio")

from textseg.image.rasters import GeoRef, read_georef, read_window_rgb, xyz_tile  # noqa: E402
from textseg.image.windows import Window  # noqa: E402
from textseg.ontology import from_yaml_text  # noqa: E402
from textseg.storage import filesystem_for  # noqa: E402
from textseg.training.geo_synth import write_geotiff_scene, write_xyz_pyramid  # noqa: E402
from textseg.training.synth import SYNTH_CLASSES  # noqa: E402


def _mosaic(root: pathlib.Path, folder: str, relpaths: list[str], nx: int) -> np.ndarray:
    tiles = [np.asarray(Image.open(root / folder / relpath)) for relpath in relpaths]
    rows = [np.concatenate(tiles[i : i + nx], axis=1) for i in range(0, len(tiles), nx)]
    return np.concatenate(rows, axis=0)


def test_xyz_pyramid_cuts_one_scene_into_z_x_y_tiles(tmp_path: pathlib.Path) -> None:
    relpaths = write_xyz_pyramid(str(tmp_path), z=18, x0=140816, y0=85970, nx=3, ny=2, seed=3, tile_size=64)
    assert relpaths == [f"18/{140816 + c}/{85970 + r}.png" for r in range(2) for c in range(3)]
    assert [xyz_tile(relpath) for relpath in relpaths][-1] == (18, 140818, 85971)
    for relpath in relpaths:
        with Image.open(tmp_path / "images" / relpath) as image:
            assert (image.mode, image.size) == ("RGB", (64, 64))
        with Image.open(tmp_path / "masks" / relpath) as mask:
            assert (mask.mode, mask.size) == ("P", (64, 64))
    mask = _mosaic(tmp_path, "masks", relpaths, nx=3)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3, 4} and len(np.unique(mask)) >= 3
    # One scene, not six: some class runs straight across a tile border.
    assert ((mask[:, 63] == mask[:, 64]) & (mask[:, 63] > 0)).any()
    ontology = from_yaml_text((tmp_path / "ontology.yaml").read_text(), default_threshold=0.5)
    assert ontology.class_names == ["background", *SYNTH_CLASSES]
    again = tmp_path / "again"
    write_xyz_pyramid(str(again), z=18, x0=140816, y0=85970, nx=3, ny=2, seed=3, tile_size=64)
    np.testing.assert_array_equal(
        _mosaic(again, "images", relpaths, 3), _mosaic(tmp_path, "images", relpaths, 3)
    )


def test_xyz_pyramid_refuses_tiles_outside_the_zoom_level(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="do not all exist"):
        write_xyz_pyramid(str(tmp_path), z=2, x0=3, y0=0, nx=2, ny=1, seed=0)


def test_geotiff_scene_and_its_mask_share_a_real_grid(tmp_path: pathlib.Path) -> None:
    # 1030 is not a multiple of anything: the last render block is 6 px wide.
    georef = write_geotiff_scene(str(tmp_path), 1030, 600, seed=5, block_size=256, render_block_size=512)
    assert georef == GeoRef("EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 6000000.0), 1030, 600)
    fs, image_path = filesystem_for(str(tmp_path / "images" / "scene.tif"))
    assert read_georef(fs, image_path) == georef
    assert read_georef(*filesystem_for(str(tmp_path / "masks" / "scene.tif"))) == georef
    with (
        rasterio.open(tmp_path / "images" / "scene.tif") as image,
        rasterio.open(tmp_path / "masks/scene.tif") as mask,
    ):
        assert (image.count, image.block_shapes[0], image.compression.name) == (3, (256, 256), "deflate")
        labels = mask.read(1)
        assert mask.colormap(1)[1][:3] == tuple(
            from_yaml_text((tmp_path / "ontology.yaml").read_text(), 0.5).classes[0].color
        )
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 4} and len(np.unique(labels)) >= 3
    rgb, nodata = read_window_rgb(fs, image_path, Window(1000, 500, 30, 100))
    assert rgb.shape == (100, 30, 3) and nodata is None and rgb.std() > 0


def test_geotiff_scene_from_a_few_distinct_blocks_is_fast_and_bounded(tmp_path: pathlib.Path) -> None:
    georef = write_geotiff_scene(
        str(tmp_path), 2048, 2048, seed=1, crs="EPSG:3857", origin=(1489604.8, 6895231.4), pixel_size=0.6,
        render_block_size=512, distinct_blocks=2,
    )  # fmt: skip
    assert georef.crs == "EPSG:3857"
    with rasterio.open(tmp_path / "masks" / "scene.tif") as mask:
        labels = mask.read(1)
    blocks = [labels[r : r + 512, c : c + 512] for r in range(0, 2048, 512) for c in range(0, 2048, 512)]
    variants = {block.tobytes() for block in blocks}
    assert 2 <= len(variants) <= 16  # 2 renders x 8 rotations and flips
    first = blocks[0]
    turned = [np.rot90(first, k) for k in range(4)]
    same_family = [b for b in blocks if any((b == t).all() or (b == t[:, ::-1]).all() for t in turned)]
    assert 1 <= len(same_family) < 16


def test_pyramid_truth_vectorised_per_tile_and_merged_equals_the_whole_scene(tmp_path: pathlib.Path) -> None:
    """The map-data path end to end on exact labels: tiles -> polygons -> merged across tile borders."""
    from textseg.image.rasters import xyz_georef
    from textseg.labels.vectors import VectorSettings, merge_across_borders, polygons_from_labels

    z, x0, y0 = 18, 140816, 85970  # even, so the 2 x 2 block is one tile at z = 17
    relpaths = write_xyz_pyramid(str(tmp_path), z=z, x0=x0, y0=y0, nx=2, ny=2, seed=11, tile_size=128)
    names = ["background", *SYNTH_CLASSES]
    settings = VectorSettings(simplify_tolerance=1.0)
    pieces = []
    for relpath in relpaths:
        labels = np.asarray(Image.open(tmp_path / "masks" / relpath))
        tile_z, x, y = xyz_tile(relpath)
        pieces += polygons_from_labels(
            labels, xyz_georef(tile_z, x, y, 128, 128), names, None, relpath, settings
        )
    whole_labels = _mosaic(tmp_path, "masks", relpaths, nx=2)
    whole_georef = xyz_georef(z - 1, x0 // 2, y0 // 2, 256, 256)
    whole = polygons_from_labels(whole_labels, whole_georef, names, None, "mosaic", settings)
    merged = merge_across_borders(pieces)
    assert len(pieces) > len(whole)
    assert sorted(r["class"] for r in merged) == sorted(r["class"] for r in whole)
    assert sum(r["area_m2"] for r in merged) == pytest.approx(sum(r["area_m2"] for r in whole), rel=0.01)
