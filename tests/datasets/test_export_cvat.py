"""`textseg export --format cvat` read back the way CVAT's "Segmentation mask 1.1" import (Datumaro's VOC
reader) reads it: labelmap.txt's `name:r,g,b:parts:actions` lines, the class masks' colours looked up in it,
the object masks' colours in VOC's colormap, one class per object, and the split lists."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from textseg.cli import main
from textseg.datasets.export import ExportItem
from textseg.datasets.formats.cvat import CvatWriter
from textseg.datasets.labeled_dest import iter_labeled, parse_split, read_mask, split_of
from textseg.labels.instances import encode_rle, instance_row
from textseg.ontology import NODATA, from_yaml_text
from textseg.outputs.masks import decode_png_mask

SPLIT = "train=0.6,val=0.4"


def _labelmap(path: pathlib.Path) -> list[tuple[str, tuple[int, int, int]]]:
    """labelmap.txt as Datumaro parses it: comments skipped, exactly four ':'-separated fields."""
    entries = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, color, parts, actions = line.split(":")
        assert parts == actions == ""
        red, green, blue = (int(v) for v in color.split(","))
        entries.append((name, (red, green, blue)))
    return entries


def _voc_color(index: int) -> tuple[int, int, int]:
    """The VOC devkit's colour of an index (its labelcolormap, bit by bit)."""
    red = green = blue = 0
    for shift in range(8):
        red |= ((index >> 0) & 1) << (7 - shift)
        green |= ((index >> 1) & 1) << (7 - shift)
        blue |= ((index >> 2) & 1) << (7 - shift)
        index >>= 3
    return red, green, blue


def _unpaint(png: Image.Image, colors: dict[tuple[int, int, int], int]) -> np.ndarray:
    """A mask read as OpenCV gives it to Datumaro (the palette expanded to colours), mapped back to indices;
    a colour that is not declared fails, as it fails CVAT's import."""
    rgb = np.asarray(png.convert("RGB")).astype(np.int64)
    packed = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    values, inverse = np.unique(packed, return_inverse=True)
    lookup = np.array([colors[(v >> 16, (v >> 8) & 255, v & 255)] for v in values.tolist()])
    return lookup[inverse].reshape(packed.shape)


@pytest.fixture(params=["labeled_dest", "labeled_dest_plain"])
def labeled(request: pytest.FixtureRequest) -> Any:
    """DEST with its instance rows, and DEST whose instances the export finds in the masks."""
    return request.getfixturevalue(request.param)


def test_cvat_export_reads_back_as_the_dest_masks(labeled: Any, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "cvat"
    args = ["export", str(labeled.dest), str(out), "--format", "cvat", "--split", SPLIT, "--no-progress"]
    assert main(args) == 0
    ontology = from_yaml_text(labeled.ontology.read_text(), 0.5)
    labelmap = _labelmap(out / "labelmap.txt")
    assert [name for name, _ in labelmap] == ontology.class_names
    assert [color for _, color in labelmap] == [(0, 0, 0), *(c.color for c in ontology.classes)]
    class_of_color = {color: index for index, (_, color) in enumerate(labelmap)}
    object_of_color = {_voc_color(i): i for i in range(256)}
    assert _voc_color(1) == (128, 0, 0) and _voc_color(15) == (192, 128, 128)  # VOC's aeroplane, person

    images = list(iter_labeled(str(labeled.dest), {}, instances=True))
    assert len(images) == 10
    fractions = parse_split(SPLIT)
    sets = {p.stem: p.read_text().split() for p in (out / "ImageSets" / "Segmentation").glob("*.txt")}
    assert {s: sorted(ids) for s, ids in sets.items()} == {
        split: sorted(
            image.relpath.rsplit(".", 1)[0] for image in images if split_of(image.relpath, fractions) == split
        )
        for split in {split_of(image.relpath, fractions) for image in images}
    }
    assert len(sets) == 2

    for image in images:
        mask = read_mask(image.row["mask_uri"], {})
        assert image.class_names == ontology.class_names
        image_id = image.relpath.rsplit(".", 1)[0]
        with Image.open(out / "SegmentationClass" / f"{image_id}.png") as png:
            assert png.mode == "P"
            np.testing.assert_array_equal(np.asarray(png), mask)  # read as indices (Pillow)
            np.testing.assert_array_equal(_unpaint(png, class_of_color), mask)  # read as colours (OpenCV)
        with Image.open(out / "SegmentationObject" / f"{image_id}.png") as png:
            objects = _unpaint(png, object_of_color)
            np.testing.assert_array_equal(objects, np.asarray(png))
        np.testing.assert_array_equal(objects > 0, (mask > 0) & (mask != NODATA))  # no class pixel lost
        ids = np.unique(objects[objects > 0])
        for object_id in ids.tolist():
            assert len(np.unique(mask[objects == object_id])) == 1, "CVAT takes one class per object"
        if image.instances is not None:
            assert len(ids) >= len(image.instances)  # DEST's instances, and regions they leave uncovered


def test_objects_keep_to_their_class_and_uncovered_class_pixels_become_objects(
    labeled_dest: Any, tmp_path: pathlib.Path
) -> None:
    """A detector's instance (SAM 3's) may spill over other classes and leave its class's pixels
    uncovered; CVAT would give the object one class and drop the pixels in no object."""
    ontology = from_yaml_text(labeled_dest.ontology.read_text(), 0.5)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[0:20, 0:40] = 1  # building
    mask[30:40, :] = 2  # road
    box = np.zeros((64, 64), dtype=bool)
    box[0:35, 0:20] = True  # a building instance over building, background and road pixels
    size, counts = encode_rle(box)
    instance = instance_row(ontology.class_names, 1, 0.9, (0, 0, 20, 35), (size[0], size[1]), counts)
    item = ExportItem(
        "a.png",
        "train",
        "a.png",
        None,
        64,
        64,
        mask,
        [instance],
        False,
        {"class_names": ontology.class_names},
    )
    writer = CvatWriter(str(tmp_path), ontology, {})
    writer.add(item)
    writer.close()
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[0:20, 0:20] = 1  # the instance, within its class
    expected[0:20, 20:40] = 2  # the building pixels it left: a region
    expected[30:40, :] = 3  # the road: a region
    objects = decode_png_mask((tmp_path / "SegmentationObject" / "a.png").read_bytes())
    np.testing.assert_array_equal(objects, expected)


def test_no_data_is_background_and_too_many_objects_leave_only_class_masks(
    labeled_dest: Any, tmp_path: pathlib.Path
) -> None:
    ontology = from_yaml_text(labeled_dest.ontology.read_text(), 0.5)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[::3, ::3] = 1  # 22 x 22 = 484 separate buildings, more than an 8-bit object mask holds
    mask[:, 60:] = NODATA
    row = {"class_names": ontology.class_names}
    writer = CvatWriter(str(tmp_path), ontology, {})
    for relpath, mask_of in (("dense/a.png", mask), ("sparse/b.jpg", np.where(mask == NODATA, 2, 0))):
        item = ExportItem(relpath, "train", relpath, None, 64, 64, mask_of.astype(np.uint8), [], True, row)
        writer.add(item)
    counts = writer.close()
    assert counts == {"cvat class masks": 2, "cvat object masks": 1, "cvat images over 255 objects": 1}
    dense = decode_png_mask((tmp_path / "SegmentationClass" / "dense" / "a.png").read_bytes())
    np.testing.assert_array_equal(dense, np.where(mask == NODATA, 0, mask))
    assert not (tmp_path / "SegmentationObject" / "dense" / "a.png").exists()
    sparse = decode_png_mask((tmp_path / "SegmentationObject" / "sparse" / "b.png").read_bytes())
    np.testing.assert_array_equal(sparse, (mask == NODATA).astype(np.uint8))
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [
        "dense/a",
        "sparse/b",
    ]
