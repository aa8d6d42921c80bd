"""Instance rows in DEST: `instances/<run_id>/part-*.parquet`, one row per object of a labeled image.

The rows ride with their image's metadata row (a list column, `INSTANCE_FIELD`) to the part writer
(`textseg.outputs.metadata.write_metadata_part`), which writes them to the instance part named as the
metadata part, just before it: a retried or resumed image has its instances exactly where its row is,
once. A part written by a writer killed before its metadata part is an orphan, removed when the next run
merges the killed one (`remove_orphan_instance_parts`), since those images are labeled again.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from textseg import storage

INSTANCE_FIELD = "instances"  # the column of a write stage's table that carries an image's instances
INSTANCE_STRUCT = pa.struct(
    [
        pa.field("class", pa.string(), nullable=False),
        pa.field("class_index", pa.int16(), nullable=False),
        pa.field("prompt", pa.string()),  # the prompt that found it; null for a region of a class's mask
        pa.field("score", pa.float32(), nullable=False),
        # The mask's own box (COCO's): x0, y0, x1, y1 in full-image pixels, end exclusive.
        pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),
        # A detector's box for the object (SAM 3's pred_boxes, same units); null for a region of a mask.
        pa.field("detector_bbox", pa.list_(pa.float32(), 4)),
        pa.field("mask_size", pa.list_(pa.int32(), 2), nullable=False),  # height, width (COCO's `size`)
        pa.field("mask_counts", pa.string(), nullable=False),  # COCO's compressed RLE `counts`
    ]
)
INSTANCE_SCHEMA = pa.schema(
    [
        pa.field("relpath", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("instance", pa.int32(), nullable=False),  # its index among the image's instances
        *INSTANCE_STRUCT,
    ]
)


def instances_dir(run_id: str) -> str:
    """Where a run's instance parts go under DEST."""
    return f"instances/{run_id}"


def instance_rows(table: pa.Table) -> pa.Table:
    """A write stage's table (metadata rows with an INSTANCE_FIELD column) -> one row per instance."""
    rows = [
        {"relpath": relpath, "run_id": run_id, "instance": number, **instance}
        for relpath, run_id, instances in zip(
            table["relpath"].to_pylist(),
            table["run_id"].to_pylist(),
            table[INSTANCE_FIELD].to_pylist(),
            strict=True,
        )
        for number, instance in enumerate(instances or [])
    ]
    return pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)


def remove_orphan_instance_parts(
    dest: str, run_id: str, metadata_parts: set[str], storage_options: Mapping[str, Any]
) -> int:
    """Remove the instance parts of run `run_id` that have no metadata part of the same name (file names
    in `metadata_parts`); returns how many. Their images have no row, so the next run labels them again."""
    fs, root = storage.filesystem_for(dest, storage_options)
    removed = 0
    for path in storage.glob(fs, storage.join_uri(root, f"{instances_dir(run_id)}/part-*.parquet")):
        if posixpath.basename(path) not in metadata_parts:
            storage.remove(fs, path)
            removed += 1
    return removed
