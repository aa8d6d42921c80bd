"""`textseg export --format coco`: COCO instance segmentation, one annotation file per split.

    OUT/annotations/instances_<split>.json   info, licenses, categories, images, annotations

Categories are the ontology's classes, ids 1..K as their mask values (0, background, is no category).
An image's `file_name` is its copy's path under OUT (`images/<split>/<relpath>`: give OUT as the image
root) with --images copy, else its SOURCE URI. Each object is an annotation whose `segmentation` is its
COCO RLE as DEST stores it (`{"size": [h, w], "counts": "<compressed>"}`, lossless: what
`pycocotools.mask.decode` and `COCO.annToMask` read), with `area` (its pixel count), `bbox` ([x, y, w, h],
the mask's box), `category_id` and, for DEST's own instance rows, the model's `score`; the regions the
export finds in a mask have no score. `iscrowd` is 0: COCOeval ignores crowd ground truth when matching and
detectron2 and mmdetection drop it from training, while none of them ties an RLE segmentation to
iscrowd=1 (pycocotools decodes RLE whatever iscrowd says). Annotation and image ids start at 1 (COCOeval
reads id 0 as "unmatched").

A split's image and annotation entries are streamed to temporary files as they come and assembled into
its JSON at the end (published with `storage.write_file_atomic`), so memory stays one image whatever
DEST's size. An instance of a class the export's ontology lacks (an older run's) is left out and counted.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import IO, Any

from pycocotools import mask as coco_mask

from textseg import storage
from textseg.datasets.export import ExportItem
from textseg.ontology import Ontology

ANNOTATIONS_DIR = "annotations"
UNKNOWN_CLASS = "coco instances of classes not in the ontology"


def annotation_path(split: str) -> str:
    """Where a split's annotation file goes under OUT."""
    return f"{ANNOTATIONS_DIR}/instances_{split}.json"


class _SplitSpool:
    """One split's image and annotation entries so far, as comma-separated JSON in two temporary files."""

    def __init__(self, folder: str, split: str) -> None:
        self.images = open(os.path.join(folder, f"{split}.images"), "w+", encoding="utf-8")
        self.annotations = open(os.path.join(folder, f"{split}.annotations"), "w+", encoding="utf-8")
        self.image_count = 0
        self.annotation_count = 0

    def add_image(self, entry: dict[str, Any]) -> None:
        self.image_count += 1
        _append(self.images, self.image_count, {"id": self.image_count, **entry})

    def add_annotation(self, entry: dict[str, Any]) -> None:
        self.annotation_count += 1
        _append(self.annotations, self.annotation_count, {"id": self.annotation_count, **entry})

    def write(self, target: IO[str], header: dict[str, Any]) -> None:
        """The whole annotation file: header's keys, then "images" and "annotations" from the spool."""
        target.write(json.dumps(header)[:-1] + ', "images": [')
        _copy_spool(self.images, target)
        target.write('], "annotations": [')
        _copy_spool(self.annotations, target)
        target.write("]}")

    def close(self) -> None:
        self.images.close()
        self.annotations.close()


def _append(spool: IO[str], number: int, entry: dict[str, Any]) -> None:
    spool.write(("," if number > 1 else "") + json.dumps(entry, separators=(",", ":")))


def _copy_spool(spool: IO[str], target: IO[str]) -> None:
    spool.flush()
    spool.seek(0)
    shutil.copyfileobj(spool, target)


class CocoWriter:
    """Image and annotation entries per split, streamed to a temporary folder; the JSON files at the end."""

    wants_mask_regions = True  # objects: a mask's regions when DEST has no instance rows

    def __init__(self, out: str, ontology: Ontology, storage_options: Mapping[str, Any]) -> None:
        self.out = out
        self.storage_options = storage_options
        self.category_id = {name: index for index, name in enumerate(ontology.class_names) if index > 0}
        self.categories = [
            {"id": index, "name": name, "supercategory": name} for name, index in self.category_id.items()
        ]
        self.folder = tempfile.TemporaryDirectory(prefix="textseg-coco-")
        self.splits: dict[str, _SplitSpool] = {}
        self.unknown = 0

    def add(self, item: ExportItem) -> None:
        spool = self.splits.get(item.split)
        if spool is None:
            spool = self.splits[item.split] = _SplitSpool(self.folder.name, item.split)
        spool.add_image(
            {
                "file_name": item.image_relpath or item.image_uri,
                "width": item.width,
                "height": item.height,
            }
        )
        for instance in item.instances:
            category = self.category_id.get(instance["class"])
            if category is None:
                self.unknown += 1
                continue
            spool.add_annotation(
                _annotation(instance, spool.image_count, category, with_score=not item.instances_from_mask)
            )

    def close(self) -> dict[str, int]:
        header = {
            "info": {
                "description": "textseg export",
                "version": "1.0",
                "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "licenses": [],
            "categories": self.categories,
        }
        counts = {"coco annotations": 0}
        try:
            for split, spool in self.splits.items():
                assembled = os.path.join(self.folder.name, f"{split}.json")
                with open(assembled, "w", encoding="utf-8") as target:
                    spool.write(target, header)
                spool.close()
                fs, path = storage.filesystem_for(
                    storage.join_uri(self.out, annotation_path(split)), self.storage_options
                )
                storage.write_file_atomic(fs, path, assembled)
                os.unlink(assembled)
                counts["coco annotations"] += spool.annotation_count
        finally:
            for spool in self.splits.values():
                spool.close()
            self.folder.cleanup()
        if self.unknown:
            counts[UNKNOWN_CLASS] = self.unknown
        return counts


def _annotation(
    instance: Mapping[str, Any], image_id: int, category: int, with_score: bool
) -> dict[str, Any]:
    size = [int(v) for v in instance["mask_size"]]
    counts = str(instance["mask_counts"])
    x0, y0, x1, y1 = (float(v) for v in instance["bbox"])
    entry: dict[str, Any] = {
        "image_id": image_id,
        "category_id": category,
        "segmentation": {"size": size, "counts": counts},
        "area": int(coco_mask.area({"size": size, "counts": counts.encode("ascii")})),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "iscrowd": 0,
    }
    if with_score:
        entry["score"] = float(instance["score"])
    return entry
