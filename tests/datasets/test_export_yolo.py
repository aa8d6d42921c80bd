"""`textseg export --format yolo`: polygons painted back with Pillow's polygon filler (it fills inside and on
the outline, as OpenCV's fillPoly in YOLO trainers does) give the objects' masks back; labels pair with
their copied images by the trainers' path rule; data.yaml names the splits and classes."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask
from scipy import ndimage

from textseg.datasets.contours import instance_crop, rle_runs, single_polygon
from textseg.datasets.export import export
from textseg.datasets.formats.yolo import label_line, label_path
from textseg.datasets.labeled_dest import iter_labeled, run_ids, run_ontology
from textseg.labels.instances import EIGHT_CONNECTED, encode_rle


def paint(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 2) pixel vertices -> (H, W) bool, as a trainer rasterizes a YOLO polygon."""
    canvas = Image.new("L", (width, height), 0)
    vertices = [(float(x), float(y)) for x, y in points]
    ImageDraw.Draw(canvas).polygon(vertices, fill=1, outline=1)
    return np.asarray(canvas).astype(bool)


def read_line(line: str, width: int, height: int) -> tuple[int, np.ndarray]:
    """A YOLO-seg label line -> (class id, (N, 2) pixel vertices)."""
    class_id, *values = line.split()
    return int(class_id), np.rint(np.array(values, dtype=np.float64).reshape(-1, 2) * [width, height])


def painted_back(region: np.ndarray) -> np.ndarray:
    """A region through its YOLO label line and back to pixels."""
    height, width = region.shape
    _, points = read_line(label_line(0, single_polygon(region), width, height), width, height)
    return paint(points, height, width)


def _shape(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


SHAPES = {
    "square with a hole": ["#####", "#...#", "#..##", "#...#", "#####"],
    "pixels touching at corners": ["#..", ".#.", "..#"],
    "ring closed at a corner": [".#.", "#.#", ".#."],
    "one-pixel line": ["#####"],
    "one pixel": ["#"],
    "hole beside a hole": ["#######", "#.#.#.#", "#######"],
    "hole in a hole's wall": ["#########", "#.......#", "#.#####.#", "#.#...#.#", "#.#####.#", "#########"],
    "comb": ["#.#.#", "#.#.#", "#####"],
}


@pytest.mark.parametrize("name", SHAPES)
def test_single_polygon_paints_the_region_back(name: str) -> None:
    region = np.pad(_shape(SHAPES[name]), 2)
    assert np.array_equal(painted_back(region), region)


def test_single_polygon_paints_random_regions_with_holes_back_exactly() -> None:
    rng = np.random.default_rng(5)
    holes = 0
    for _ in range(150):
        noise = rng.random((18, 21)) < rng.uniform(0.3, 0.8)
        parts, count = ndimage.label(noise, structure=EIGHT_CONNECTED)
        region = parts == 1 + int(np.argmax(ndimage.sum(noise, parts, range(1, count + 1))))
        holes += ndimage.label(ndimage.binary_fill_holes(region) & ~region)[1]
        assert np.array_equal(painted_back(region), region)
    assert holes > 100  # the regions were riddled with holes


def test_single_polygon_bridges_parts_with_one_line() -> None:
    region = np.zeros((18, 16), dtype=bool)
    region[2:6, 2:6] = True
    region[2:6, 9:13] = True  # three background columns apart
    region[8:10, 3:5] = True  # two background rows below the first
    region[10:17, 2:9] = True
    region[11:16, 3:8] = False
    region[13, 5] = True  # an island in a hole: a part of its own
    painted = painted_back(region)
    assert np.all(painted[region])
    assert 0 < np.count_nonzero(painted & ~region) <= 3 + 2 + 2  # the bridges' pixels only


def test_instance_crop_decodes_rle_over_the_object_box() -> None:
    mask = np.zeros((40, 30), dtype=bool)
    mask[:, 7:9] = True  # whole columns: runs that continue into the next column
    mask[5:9, 20:26] = True
    size, counts = encode_rle(mask)
    crop, left, top = instance_crop({"mask_size": size, "mask_counts": counts})
    assert (left, top, crop.shape) == (7, 0, (40, 19))
    assert np.array_equal(crop, mask[:, 7:26])
    runs = rle_runs(counts)
    assert runs.sum() == mask.size


def test_label_path_follows_the_trainers_images_to_labels_rule() -> None:
    assert label_path("images/train/tile_1.png") == "labels/train/tile_1.txt"
    assert label_path("images/val/a/images/b.v2.jpg") == "images/val/a/labels/b.v2.txt"


def test_yolo_polygons_paint_back_the_dest_instances(labeled_dest, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "yolo"
    counts = export(
        str(labeled_dest.dest), str(out), "yolo", split="train=0.6,val=0.4", seed=1, images="copy"
    )
    data = yaml.safe_load((out / "data.yaml").read_text())
    ontology = run_ontology(str(labeled_dest.dest), run_ids(str(labeled_dest.dest), {})[-1], {})
    assert data["names"] == dict(enumerate(ontology.class_names[1:]))
    assert data["path"] == str(out)
    assert set(data) == {"path", "train", "val", "names"}
    ious = []
    for labeled in iter_labeled(str(labeled_dest.dest), {}, instances=True):
        images = [s for s in ("train", "val") if (out / data[s] / labeled.relpath).is_file()]
        assert len(images) == 1
        image_relpath = f"{data[images[0]]}/{labeled.relpath}"
        with Image.open(out / image_relpath) as image:
            width, height = image.size
        lines = (out / label_path(image_relpath)).read_text().splitlines()
        objects = [read_line(line, width, height) for line in lines]
        assert len(objects) == len(labeled.instances)
        for (class_id, points), instance in zip(objects, labeled.instances, strict=True):
            assert data["names"][class_id] == instance["class"]
            truth = coco_mask.decode({"size": instance["mask_size"], "counts": instance["mask_counts"]}) > 0
            painted = paint(points, height, width)
            ious.append(np.count_nonzero(painted & truth) / np.count_nonzero(painted | truth))
    assert len(ious) == counts["yolo objects"] > 100
    assert min(ious) >= 0.95
    assert ious.count(1.0) == len(ious)  # DEST's regions are one part each: painted back exactly


def test_yolo_refuses_images_it_cannot_pair_with_labels(labeled_dest, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="--images copy"):
        export(str(labeled_dest.dest), str(tmp_path / "yolo"), "yolo", images="uri")
    assert not (tmp_path / "yolo").exists()
