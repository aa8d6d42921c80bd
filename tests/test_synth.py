"""The synthetic tile generator: shapes, determinism, class coverage, mask exactness, dataset layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml
from PIL import Image

from textseg.ontology import from_yaml_text
from textseg.outputs.masks import decode_png_mask
from textseg.training import synth
from textseg.training.synth import SYNTH_CLASSES, render_scene, render_tile, write_synth_dataset


def tile(seed: int, i: int = 0, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    return render_tile(np.random.default_rng([seed, i]), size)


@pytest.mark.parametrize(("height", "width"), [(256, 256), (32, 32), (100, 333)])
def test_render_scene_returns_uint8_rgb_and_class_mask_of_the_canvas_size(height: int, width: int) -> None:
    image, mask = render_scene(np.random.default_rng(0), height, width)
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert mask.shape == (height, width) and mask.dtype == np.uint8
    assert mask.max() <= len(SYNTH_CLASSES)


def test_render_tile_is_a_square_scene() -> None:
    image, mask = tile(5, size=96)
    assert image.shape == (96, 96, 3) and mask.shape == (96, 96)


def test_too_small_a_canvas_is_refused_with_the_minimum() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        render_scene(np.random.default_rng(0), 16, 256)


def test_same_seed_gives_identical_tiles_and_other_seeds_differ() -> None:
    image_a, mask_a = tile(7, 3)
    image_b, mask_b = tile(7, 3)
    assert image_a.tobytes() == image_b.tobytes() and mask_a.tobytes() == mask_b.tobytes()
    for other in (tile(8, 3), tile(7, 4)):
        assert other[0].tobytes() != image_a.tobytes()
        assert other[1].tobytes() != mask_a.tobytes()


def test_every_class_appears_across_eight_tiles_but_not_in_every_tile() -> None:
    masks = [tile(0, i)[1] for i in range(8)]
    seen = set(np.unique(np.stack(masks)).tolist())
    assert seen == set(range(len(SYNTH_CLASSES) + 1))
    assert not all(set(np.unique(m).tolist()) == seen for m in masks), "some tiles should lack a class"


def test_classes_look_different_in_the_image() -> None:
    """Spot check that the mask is what was drawn: each class's pixels have their own look."""
    images, masks = zip(*(tile(1, i) for i in range(8)), strict=True)
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64)
    labels = np.concatenate([m.ravel() for m in masks])
    mean = {k: pixels[labels == k].mean(axis=0) for k in range(5)}
    tree, water, road = mean[synth.TREE], mean[synth.WATER], mean[synth.ROAD]
    assert tree.sum() < mean[synth.BACKGROUND].sum() and tree[1] > tree[2]  # dark and green, not blue
    assert water[2] > water[0]  # blue-ish rather than red
    assert abs(road[0] - road[2]) < 25  # asphalt is close to grey
    assert np.abs(mean[synth.BUILDING] - mean[synth.BACKGROUND]).max() > 10


def test_mask_edges_fall_on_image_edges() -> None:
    """A mask shifted by a few px against its image would put its class borders on flat colour."""
    image, mask = tile(2, 1)
    luma = image.astype(np.float32).mean(axis=2)
    gradient = np.abs(np.diff(luma, axis=1))
    border = mask[:, 1:] != mask[:, :-1]
    shifted = np.roll(mask, 4, axis=1)
    shifted_border = (shifted[:, 1:] != shifted[:, :-1]) & ~border
    assert gradient[border].mean() > 2.5 * gradient[~border].mean()
    assert gradient[border].mean() > 1.5 * gradient[shifted_border].mean()


def test_building_shadows_darken_the_ground_without_labelling_it() -> None:
    rng = np.random.default_rng(11)
    canvas = synth._Canvas.new(rng, 256, 256)
    canvas.shadow_scale = 1.3  # long shadows, so there are many shadow pixels to check
    synth._paint_ground(canvas)
    before_rgb, before_labels = canvas.rgb.copy(), canvas.labels.copy()
    for _ in range(10):
        synth._paint_buildings(canvas, roads=[])
        if (canvas.labels == synth.BUILDING).any():
            break
    building = canvas.labels == synth.BUILDING
    changed = np.any(canvas.rgb != before_rgb, axis=2)
    shadow = changed & ~building
    assert building.any() and shadow.sum() > 50
    assert np.all(canvas.labels[shadow] == before_labels[shadow])  # still background
    assert np.all(canvas.rgb[shadow].sum(axis=1) < before_rgb[shadow].sum(axis=1))  # darker
    assert np.all(changed[building])  # every building pixel was painted as roof


def test_write_synth_dataset_writes_images_masks_and_ontology(tmp_path) -> None:
    relpaths = write_synth_dataset(str(tmp_path / "synth"), n=3, seed=4, size=64)
    assert relpaths == ["tile_00000.png", "tile_00001.png", "tile_00002.png"]
    root = tmp_path / "synth"
    assert sorted(p.name for p in (root / "images").iterdir()) == relpaths
    assert sorted(p.name for p in (root / "masks").iterdir()) == relpaths
    for relpath in relpaths:
        with Image.open(root / "images" / relpath) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
        with Image.open(root / "masks" / relpath) as mask:
            assert mask.mode == "P" and mask.size == (64, 64)
    ontology_text = (root / "ontology.yaml").read_text()
    assert list(yaml.safe_load(ontology_text)["classes"]) == list(SYNTH_CLASSES)
    assert [c.name for c in from_yaml_text(ontology_text, 0.5).classes] == list(SYNTH_CLASSES)


def test_dataset_tile_i_is_reproducible_on_its_own(tmp_path) -> None:
    write_synth_dataset(str(tmp_path), n=3, seed=9, size=64)
    image, mask = render_tile(np.random.default_rng([9, 2]), 64)
    with Image.open(tmp_path / "images" / "tile_00002.png") as written:
        assert np.array_equal(np.asarray(written), image)
    assert np.array_equal(decode_png_mask((tmp_path / "masks" / "tile_00002.png").read_bytes()), mask)


def test_write_synth_dataset_goes_through_fsspec_and_is_deterministic() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    write_synth_dataset("memory://synth-a", n=2, seed=3, size=48)
    write_synth_dataset("memory://synth-b", n=2, seed=3, size=48)
    for relpath in ("images/tile_00001.png", "masks/tile_00001.png", "ontology.yaml"):
        assert fs.cat_file(f"/synth-a/{relpath}") == fs.cat_file(f"/synth-b/{relpath}")
    with Image.open(io.BytesIO(fs.cat_file("/synth-a/masks/tile_00000.png"))) as mask:
        assert mask.mode == "P"
    fs.rm("/synth-a", recursive=True)
    fs.rm("/synth-b", recursive=True)


def test_synth_command_writes_the_dataset(tmp_path) -> None:
    from textseg.cli import main

    assert main(["synth", str(tmp_path), "--n", "2", "--seed", "1", "--size", "48"]) == 0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["tile_00000.png", "tile_00001.png"]
