"""`textseg export --format hf`: a Hugging Face `datasets` DatasetDict on disk, as transformers' semantic
segmentation examples read it.

    OUT/dataset_dict.json, OUT/<split>/...   `DatasetDict.save_to_disk`: one split per --split name
    OUT/id2label.json                        {"0": "background", "1": <class 1>, ...}

Columns: `image` (Image: the image file's bytes), `label` (Image: a palette PNG whose pixel values are the
export ontology's class indices, 0 background, 255 no data: transformers' segmentation models ignore 255 in
their loss), `relpath`. Read it back with `datasets.load_from_disk(OUT)`; `np.array(row["label"])` is the
class map and `json.load(open(OUT/id2label.json))` the names.

The image bytes are SOURCE's, whatever --images says, so the dataset stands alone: a dataset that refers to
files elsewhere breaks when it is moved. `datasets`' Image decoding applies EXIF orientation as `textseg
label` did. TIFFs are the exception: a raster's bands and bit depth (16-bit, 4 bands) decode in Pillow
otherwise than through textseg's decoder, so a TIFF is stored as the PNG of the RGB pixels that were
labeled. Mask values of a class the export's ontology lacks (an older run's) become 255: not labeled as
far as this ontology goes.

Memory: each image is appended to its split's local Arrow stream as it comes; at the end each split is
built from its stream by `Dataset.from_generator` (a few rows in memory at a time, WRITER_BATCH_SIZE)
and the DatasetDict saved to OUT (local or an object store, through fsspec), then the streams are deleted.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from textseg import storage
from textseg.datasets.export import ExportItem
from textseg.datasets.labeled_dest import read_image
from textseg.ontology import NODATA, Ontology
from textseg.outputs.masks import encode_png_mask, is_tiff

ID2LABEL = "id2label.json"
DATASETS_INSTALL = "pip install 'datasets>=3'"
WRITER_BATCH_SIZE = 16  # rows `datasets` holds before writing them: a bounded handful of images
_SPOOL_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.binary()), ("relpath", pa.string())])


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"--format hf needs the Hugging Face datasets library: {DATASETS_INSTALL}"
        ) from None
    return datasets


class HfWriter:
    """Each image and label appended to its split's local Arrow stream; the DatasetDict built and saved at
    the end."""

    wants_mask_regions = False  # class masks only

    def __init__(self, out: str, ontology: Ontology, storage_options: Mapping[str, Any]) -> None:
        self.datasets = _datasets()  # fail before any image is read
        self.out = out
        self.storage_options = dict(storage_options)
        self.ontology = ontology
        self.class_index = {name: index for index, name in enumerate(ontology.class_names)}
        self.folder = tempfile.TemporaryDirectory(prefix="textseg-hf-")
        self.spools: dict[str, tuple[pa.ipc.RecordBatchStreamWriter, str]] = {}

    def add(self, item: ExportItem) -> None:
        if item.split not in self.spools:
            path = os.path.join(self.folder.name, f"{len(self.spools)}.arrows")
            self.spools[item.split] = (pa.ipc.new_stream(path, _SPOOL_SCHEMA), path)
        spool = self.spools[item.split][0]
        label = encode_png_mask(self._labels(item), self.ontology.palette())
        row = {"image": [self._image_bytes(item)], "label": [label], "relpath": [item.relpath]}
        spool.write_batch(pa.record_batch(row, schema=_SPOOL_SCHEMA))

    def _labels(self, item: ExportItem) -> np.ndarray:
        """The mask in the export ontology's class indices (matched by name), NODATA where it has none."""
        names = list(item.row["class_names"])
        if names == self.ontology.class_names:
            return item.mask
        lookup = np.full(256, NODATA, dtype=np.uint8)
        for value, name in enumerate(names):
            lookup[value] = self.class_index.get(name, NODATA)
        return lookup[item.mask]

    def _image_bytes(self, item: ExportItem) -> bytes:
        fs, path = storage.filesystem_for(item.image_uri, self.storage_options)
        data = storage.read_bytes(fs, path)
        if not is_tiff(data):
            return data
        buffer = io.BytesIO()
        Image.fromarray(read_image(item.image_uri, self.storage_options)).save(buffer, format="PNG")
        return buffer.getvalue()

    def close(self) -> dict[str, int]:
        datasets = self.datasets
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.Image(), "relpath": datasets.Value("string")}
        )
        counts = {"hf rows": 0}
        try:
            splits = {}
            for split, (spool, path) in self.spools.items():
                spool.close()
                splits[split] = datasets.Dataset.from_generator(
                    _spooled_rows,
                    features=features,
                    gen_kwargs={"path": path},
                    cache_dir=os.path.join(self.folder.name, "cache"),
                    writer_batch_size=WRITER_BATCH_SIZE,
                )
                counts["hf rows"] += splits[split].num_rows
            if splits:
                datasets.DatasetDict(splits).save_to_disk(self.out, storage_options=self.storage_options)
            id2label = {str(index): name for index, name in enumerate(self.ontology.class_names)}
            fs, root = storage.filesystem_for(self.out, self.storage_options)
            storage.write_bytes_atomic(
                fs, storage.join_uri(root, ID2LABEL), json.dumps(id2label, indent=1).encode("utf-8")
            )
        finally:
            self.folder.cleanup()
        return counts


def _spooled_rows(path: str) -> Iterator[dict[str, Any]]:
    """A split's rows from its Arrow stream, one batch (one image) at a time."""
    with pa.memory_map(path) as source:
        for batch in pa.ipc.open_stream(source):
            for image, label, relpath in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                yield {
                    "image": {"bytes": image, "path": None},
                    "label": {"bytes": label, "path": None},
                    "relpath": relpath,
                }
