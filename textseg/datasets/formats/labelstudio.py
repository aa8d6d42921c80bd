"""`textseg export --format labelstudio`: Label Studio tasks whose BrushLabels pre-annotations are DEST's
masks, so a reviewer corrects auto-labels instead of drawing them; `textseg import-labelstudio` brings the
corrections back (`textseg.datasets.labelstudio`).

    OUT/labeling_config.xml    the project's labeling interface: Image "image", BrushLabels "tag" with one
                               Label per class in its ontology colour, and "no data" (mask value 255)
    OUT/tasks-00000.json ...   the tasks to import, at most TASKS_PER_FILE or FILE_BYTES a file

A task is one image. `data.image` is what Label Studio loads: the image's URI (s3://, gs://, https://;
Label Studio signs bucket URIs through a source cloud storage connected to the bucket) or, for a copy
under a local OUT (`--images copy`), `/data/local-files/?d=images/...`, served when Label Studio runs
with LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT=OUT. The rest of `data` (relpath,
source URI and fingerprint, size, split) is what the import needs to write the corrected mask where
training finds it: Label Studio keeps `data` as imported and writes it back in its JSON export.

The masks go in as `predictions`, not `annotations`: Label Studio shows a prediction as the starting
point of a reviewer's annotation, and a task counts as labeled only once a person submits one. So its
export's `annotations` are exactly the reviewed images, which is what the import takes, and the
prediction stays beside them (with the model and its scores) to compare against.

One brush result per class present in the image, not per instance: a class's result is its mask as
training reads it, Label Studio's brush tools edit a class's region as a whole (paint, erase), and an image
of hundreds of buildings stays a handful of regions, each a whole-image RLE
(`textseg.datasets.labelstudio_rle`).
"""

from __future__ import annotations

import json
import math
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from typing import Any

import numpy as np

from textseg import storage
from textseg.datasets.export import ExportItem
from textseg.datasets.labelstudio_rle import encode_rle
from textseg.ontology import NODATA, Ontology

IMAGE_NAME = "image"  # the Image tag's name: results' to_name
BRUSH_NAME = "tag"  # the BrushLabels tag's name: results' from_name
NODATA_LABEL = "no data"  # the label of mask value 255: pixels a reviewer paints with it, training ignores
NODATA_COLOR = "#ffffff"  # as the mask palette shows no data
CONFIG_FILE = "labeling_config.xml"
# A task file is held in memory until written, and Label Studio reads an uploaded file whole (and caps
# upload sizes): a file ends at TASKS_PER_FILE tasks or FILE_BYTES of JSON, whichever comes first. A class
# of a 1024 px tile is ~0.1-0.3 MB of RLE as JSON; of a 256 px tile, a few kB.
TASKS_PER_FILE = 1000
FILE_BYTES = 64 << 20
LOCAL_FILES_URL = "/data/local-files/?d="  # Label Studio's URL for a file under LOCAL_FILES_DOCUMENT_ROOT


def task_file(number: int) -> str:
    return f"tasks-{number:05d}.json"


class LabelStudioWriter:
    """Tasks with one brush result per class of the image's mask, written a file of them at a time."""

    wants_mask_regions = False  # one brush region per class

    def __init__(self, out: str, ontology: Ontology, storage_options: Mapping[str, Any]) -> None:
        if NODATA_LABEL in ontology.class_names:
            raise ValueError(f"a class may not be named {NODATA_LABEL!r}: Label Studio's export uses it")
        self.ontology = ontology
        self.fs, self.root = storage.filesystem_for(out, storage_options)
        self.tasks: list[str] = []  # JSON text: ~4 bytes an RLE byte, not a list's 8-byte pointer
        self.bytes = 0
        self.files = 0
        self.count = 0
        self.regions = 0

    def add(self, item: ExportItem) -> None:
        names = list(item.row["class_names"])
        scores = list(item.row["class_mean_score"] or [])
        results = []
        for value in np.unique(item.mask).tolist():
            if value == 0:
                continue
            name = NODATA_LABEL if value == NODATA else names[value]
            result = _brush_result(item.mask == value, name, f"class-{value}")
            score = scores[value] if value < len(scores) else None
            if score is not None and math.isfinite(score):
                result["score"] = round(float(score), 4)
            results.append(result)
        prediction: dict[str, Any] = {"model_version": str(item.row["model_id"]), "result": results}
        class_scores = [r["score"] for r in results if "score" in r]
        if class_scores:
            # A task's score sorts Label Studio's queue: its least confident class is what needs a look.
            prediction["score"] = min(class_scores)
        self.tasks.append(json.dumps({"data": self._data(item), "predictions": [prediction]}))
        self.bytes += len(self.tasks[-1])
        self.count += 1
        self.regions += len(results)
        if len(self.tasks) >= TASKS_PER_FILE or self.bytes >= FILE_BYTES:
            self._flush()

    def _data(self, item: ExportItem) -> dict[str, Any]:
        image = item.image_uri
        if item.image_relpath is not None and storage.is_local(self.fs):
            image = LOCAL_FILES_URL + urllib.parse.quote(item.image_relpath)
        return {
            "image": image,
            "relpath": item.relpath,
            "source_uri": str(item.row["source_uri"]),
            "source_fingerprint": item.row.get("source_fingerprint"),
            "width": item.width,
            "height": item.height,
            "split": item.split,
        }

    def _flush(self) -> None:
        if not self.tasks:
            return
        path = storage.join_uri(self.root, task_file(self.files))
        storage.write_bytes_atomic(self.fs, path, ("[\n" + ",\n".join(self.tasks) + "\n]\n").encode())
        self.tasks, self.bytes = [], 0
        self.files += 1

    def close(self) -> dict[str, int]:
        self._flush()
        config = labeling_config(self.ontology)
        storage.write_bytes_atomic(self.fs, storage.join_uri(self.root, CONFIG_FILE), config.encode())
        return {"label studio tasks": self.count, "brush regions": self.regions, "task files": self.files}


def _brush_result(region: np.ndarray, label: str, result_id: str) -> dict[str, Any]:
    """A BrushLabels result (what Label Studio stores per region) for a (H, W) bool region."""
    height, width = region.shape
    return {
        "id": result_id,
        "type": "brushlabels",
        "from_name": BRUSH_NAME,
        "to_name": IMAGE_NAME,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_rle(region), "brushlabels": [label]},
    }


def labeling_config(ontology: Ontology) -> str:
    """The labeling interface XML: the image, and a brush label per class (its mask colour), then no data."""
    view = ElementTree.Element("View")
    ElementTree.SubElement(view, "Image", name=IMAGE_NAME, value=f"${IMAGE_NAME}", zoom="true")
    brush = ElementTree.SubElement(view, "BrushLabels", name=BRUSH_NAME, toName=IMAGE_NAME)
    for name, spec in ontology.to_dict()["classes"].items():
        ElementTree.SubElement(brush, "Label", value=name, background=spec["color"])
    ElementTree.SubElement(brush, "Label", value=NODATA_LABEL, background=NODATA_COLOR)
    ElementTree.indent(view)
    return ElementTree.tostring(view, encoding="unicode") + "\n"
