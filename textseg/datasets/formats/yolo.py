"""`textseg export --format yolo`: the YOLO segmentation layout that Ultralytics-style trainers read.

    OUT/data.yaml                            path (a local OUT), one key per split, names
    OUT/images/<split>/<relpath>             the images, copied (--images copy, which this format needs)
    OUT/labels/<split>/<relpath stem>.txt    one line per object: class id, then x y pairs in [0, 1]

Class ids are 0-based over the ontology's classes (mask value - 1; background is no class). A trainer finds
an image's label file from the image's own path, the last `/images/` replaced by `/labels/` and the suffix
by `.txt`; that is why the images must be copied, and `label_path` follows the same rule, so a relpath
holding an `images` folder still pairs up. An image without objects gets an empty label file.

A line is the object's outline as `textseg.datasets.contours.single_polygon` draws it: vertices at pixel
centres, holes and further parts joined by zero-width cuts (YOLO-seg has no holes), so a polygon filler
(OpenCV's `fillPoly`, as trainers rasterize) paints the object's pixels back, plus a one-pixel bridge between
the parts of a multi-part object. Coordinates are x / width and y / height to 6 decimals (0.1 px on a
100,000 px side). A polygon of fewer than three vertices (a pixel, a straight line) repeats them to three,
the fewest a polygon reader accepts.

data.yaml names the splits written (`train`, `val`, ... as --split names them; Ultralytics wants `train` and
`val`). `path` is OUT on local disk; on an object store it is left out, so a trainer takes the folder that
holds data.yaml once it is copied down.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np
import yaml

from textseg import storage
from textseg.datasets.contours import instance_polygon
from textseg.datasets.export import COPIES_REQUIRED, ExportItem
from textseg.ontology import Ontology

DATA_YAML = "data.yaml"
MIN_VERTICES = 3
UNKNOWN_CLASS = "yolo objects of classes not in the ontology"


def label_path(image_relpath: str) -> str:
    """An image's label file under OUT, found as trainers find it: the last `images/` folder of the path
    becomes `labels/`, the suffix `.txt`."""
    head, _, tail = f"/{image_relpath}".rpartition("/images/")
    return f"{head}/labels/{posixpath.splitext(tail)[0]}.txt".lstrip("/")


def label_line(class_id: int, polygon: np.ndarray, width: int, height: int) -> str:
    """One object's line: `class x1 y1 x2 y2 ...`, (N, 2) pixel vertices normalized by the image size."""
    if len(polygon) < MIN_VERTICES:
        polygon = np.resize(polygon, (MIN_VERTICES, 2))
    normalized = polygon / np.array([width, height], dtype=np.float64)
    return f"{class_id} " + " ".join(f"{value:.6f}" for value in normalized.ravel())


class YoloWriter:
    """A label file per image; data.yaml at the end."""

    wants_mask_regions = True  # objects: a mask's regions when DEST has no instance rows

    def __init__(self, out: str, ontology: Ontology, storage_options: Mapping[str, Any]) -> None:
        self.fs, self.root = storage.filesystem_for(out, storage_options)
        self.class_id = {name: index - 1 for index, name in enumerate(ontology.class_names) if index > 0}
        self.splits: list[str] = []
        self.counts = {"yolo label files": 0, "yolo objects": 0}

    def add(self, item: ExportItem) -> None:
        if item.image_relpath is None:
            raise ValueError(COPIES_REQUIRED["yolo"])
        lines = []
        for instance in item.instances:
            class_id = self.class_id.get(instance["class"])
            if class_id is None:
                self.counts[UNKNOWN_CLASS] = self.counts.get(UNKNOWN_CLASS, 0) + 1
                continue
            polygon = instance_polygon(instance)
            if len(polygon):  # an object without pixels has no outline
                lines.append(label_line(class_id, polygon, item.width, item.height))
        text = "".join(f"{line}\n" for line in lines)
        path = storage.join_uri(self.root, label_path(item.image_relpath))
        storage.write_bytes_atomic(self.fs, path, text.encode("ascii"))
        self.counts["yolo label files"] += 1
        self.counts["yolo objects"] += len(lines)
        if item.split not in self.splits:
            self.splits.append(item.split)

    def close(self) -> dict[str, int]:
        data: dict[str, Any] = {"path": self.root} if storage.is_local(self.fs) else {}
        data.update({split: f"images/{split}" for split in self.splits})
        data["names"] = {index: name for name, index in self.class_id.items()}
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        storage.write_bytes_atomic(self.fs, storage.join_uri(self.root, DATA_YAML), text.encode("utf-8"))
        return self.counts
