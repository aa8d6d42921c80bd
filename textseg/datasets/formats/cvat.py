"""`textseg export --format cvat`: CVAT's "Segmentation mask 1.1" (Pascal VOC segmentation), so DEST's
masks open in CVAT as a task's annotations to review.

    OUT/labelmap.txt                         `name:r,g,b::` a line, background first, in mask-value order
    OUT/ImageSets/Segmentation/<split>.txt   the ids of each split's images (relpath without extension)
    OUT/SegmentationClass/<id>.png           palette PNG: index = class, its colour = the label's colour
    OUT/SegmentationObject/<id>.png          palette PNG: index = object 1..255, colours VOC's colormap

CVAT imports it zipped (Upload annotations, "Segmentation mask 1.1") with Datumaro's VOC reader, which
matches an id to the task's image of that name without extension: the relpath, for a task made from
SOURCE's files. Datumaro reads a mask as colours (OpenCV expands the palette) and looks each colour up in
labelmap.txt, or reads the indices (Pillow); index i has label i's colour, so both give the same class.

It takes the objects from the object mask and each object's class from the class mask, and a class pixel
in no object is lost. So an instance's pixels are only those of its class, and class pixels that DEST's
instances leave uncovered become objects too (their connected regions). VOC's object masks are 8-bit: an
image of more than MAX_OBJECTS objects gets none, and Datumaro makes one object per class of its class
mask instead ("only class segmentations available").

No data (255) is written as background: labelmap.txt has no label for it and CVAT refuses a colour that
labelmap.txt does not declare.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask
from scipy import ndimage

from textseg import storage
from textseg.datasets.export import ExportItem
from textseg.labels.instances import EIGHT_CONNECTED
from textseg.ontology import NODATA, Ontology
from textseg.outputs.masks import encode_png_mask

CLASS_DIR = "SegmentationClass"
OBJECT_DIR = "SegmentationObject"
SETS_DIR = "ImageSets/Segmentation"
LABELMAP = "labelmap.txt"
MAX_OBJECTS = 255  # object ids 1..255 in an 8-bit mask; 0 is no object
TOO_MANY_OBJECTS = f"cvat images over {MAX_OBJECTS} objects"  # the count of images without an object mask


def voc_colormap(count: int = 256) -> np.ndarray:
    """(count, 3) uint8: Pascal VOC's colour of each index (the index's bits spread over r, g, b from the
    high bit down), the colours Datumaro maps an object mask's colours back to object ids with."""
    indices = np.arange(count)
    colors = np.zeros((count, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colors[:, channel] |= ((indices >> channel) & 1) << shift
        indices = indices >> 3
    return colors.astype(np.uint8)


class CvatWriter:
    """Class and object masks per image; labelmap.txt and the split lists at the end."""

    wants_mask_regions = False  # finds the objects its class masks need itself

    def __init__(self, out: str, ontology: Ontology, storage_options: Mapping[str, Any]) -> None:
        names = ontology.class_names
        bad = [n for n in names[1:] if ":" in n or "\n" in n or n == names[0]]
        if bad:
            raise ValueError(f"CVAT's labelmap.txt cannot name classes {bad}: rename them in the ontology")
        colors = [(0, 0, 0), *(c.color for c in ontology.classes)]
        if len(set(colors)) < len(colors):
            raise ValueError(
                "CVAT tells classes apart by colour: give every class its own colour in the ontology, none "
                f"black (the background); got {dict(zip(names, colors, strict=True))}"
            )
        self.ontology = ontology
        self.class_index = {name: i for i, name in enumerate(names)}
        self.fs, self.root = storage.filesystem_for(out, storage_options)
        self.object_palette = voc_colormap().ravel().tolist()
        self.ids: dict[str, list[str]] = {}
        self.counts = {"cvat class masks": 0, "cvat object masks": 0, TOO_MANY_OBJECTS: 0}

    def add(self, item: ExportItem) -> None:
        image_id = posixpath.splitext(item.relpath)[0]
        classes = self._classes(item)
        self._write(f"{CLASS_DIR}/{image_id}.png", encode_png_mask(classes, self.ontology.palette()))
        self.counts["cvat class masks"] += 1
        objects = self._objects(item, classes)
        if objects is None:
            self.counts[TOO_MANY_OBJECTS] += 1
        else:
            self._write(f"{OBJECT_DIR}/{image_id}.png", encode_png_mask(objects, self.object_palette))
            self.counts["cvat object masks"] += 1
        self.ids.setdefault(item.split, []).append(image_id)

    def _classes(self, item: ExportItem) -> np.ndarray:
        """The mask in the export ontology's indices (matched by name: an older run may have labeled with
        other classes; those are background), no data as background."""
        lut = np.zeros(256, dtype=np.uint8)
        for value, name in enumerate(item.row["class_names"]):
            lut[value] = self.class_index.get(name, 0)
        lut[NODATA] = 0
        return lut[item.mask]

    def _objects(self, item: ExportItem, classes: np.ndarray) -> np.ndarray | None:
        """(H, W) uint8 object ids (0 none): DEST's instances within their class, then the connected regions
        of the class pixels left; None when there are more than MAX_OBJECTS. Regions found in the mask are
        DEST's instances already (`instances_from_mask`), so only their regions are taken."""
        rows = [] if item.instances_from_mask else item.instances
        if len(rows) > MAX_OBJECTS:
            return None
        objects = np.zeros(classes.shape, dtype=np.int32)
        count = 0
        for row in rows:
            index = self.class_index.get(row["class"], 0)
            if index == 0:
                continue
            pixels = coco_mask.decode({"size": list(row["mask_size"]), "counts": row["mask_counts"]})
            count += 1
            objects[(pixels > 0) & (classes == index)] = count
        for index in np.unique(classes[objects == 0]).tolist():
            if index == 0:
                continue
            regions, found = ndimage.label((classes == index) & (objects == 0), structure=EIGHT_CONNECTED)
            objects[regions > 0] = regions[regions > 0] + count
            count += found
        return objects.astype(np.uint8) if count <= MAX_OBJECTS else None

    def _write(self, relpath: str, data: bytes) -> None:
        storage.write_bytes_atomic(self.fs, storage.join_uri(self.root, relpath), data)

    def close(self) -> dict[str, int]:
        for split, ids in self.ids.items():
            self._write(f"{SETS_DIR}/{split}.txt", "".join(f"{i}\n" for i in ids).encode())
        self._write(LABELMAP, labelmap(self.ontology).encode())
        return self.counts


def labelmap(ontology: Ontology) -> str:
    """labelmap.txt: `name:r,g,b:parts:actions` lines (no parts, no actions), background first."""
    palette = ontology.palette()
    lines = ["# label:color_rgb:parts:actions"]
    for i, name in enumerate(ontology.class_names):
        lines.append(f"{name}:{','.join(str(v) for v in palette[3 * i : 3 * i + 3])}::")
    return "\n".join(lines) + "\n"
