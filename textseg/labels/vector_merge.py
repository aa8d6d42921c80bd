"""A run's polygon pieces -> DEST/vectors/: pieces cut by tile and window borders merged, then filtered.

The write and scene-assembly stages park each image's (or scene block's) polygons under the run's
scratch area (`VECTOR_PARTS`); `merge_run_vectors` joins them at the end of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from textseg import storage
from textseg.labels.vectors import (
    VectorSettings,
    filter_by_area,
    merge_across_borders,
    read_geoparquet,
    write_geoparquet,
)

VECTOR_PARTS = "vectors"  # under a run's scratch area: polygons of its images and scenes, not yet merged


def vectors_uri(dest: str, run_id: str) -> str:
    return storage.join_uri(dest, f"vectors/{run_id}.parquet")


def merge_run_vectors(
    scratch_uri: str,
    dest: str,
    run_id: str,
    settings: VectorSettings,
    storage_options: Mapping[str, Any],
) -> int:
    """Join the run's polygon parts into DEST/vectors/<run_id>.parquet, merging pieces cut by tile or
    window borders; returns the number of polygons written."""
    fs, root = storage.filesystem_for(scratch_uri, storage_options)
    records = [
        r for path in sorted(fs.glob(f"{root}/{VECTOR_PARTS}/*.parquet")) for r in read_geoparquet(fs, path)
    ]
    merged = filter_by_area(merge_across_borders(records), settings) if records else []
    out_fs, out_path = storage.filesystem_for(vectors_uri(dest, run_id), storage_options)
    write_geoparquet(merged, out_fs, out_path)
    return len(merged)
