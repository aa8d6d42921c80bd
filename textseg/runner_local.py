"""The in-process runner: the same stage functions as the Ray plan, in one process, no Ray.

Tests and benchmarks use it, and so can a notebook with a handful of images. Batches flow through
`read_and_decode` -> `Labeler` -> `encode_and_write`, and the metadata lands as one Parquet part file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from textseg.job import JobPlan
from textseg.labeler import Labeler
from textseg.metadata import METADATA_SCHEMA, write_metadata_part
from textseg.scenes import assemble_batch, manifest_uris
from textseg.stages import Batch, encode_and_write, read_and_decode


def rows_to_batch(rows: Sequence[dict[str, Any]]) -> Batch:
    """Row dicts -> Ray Data's numpy batch format (strings as object arrays)."""
    return {
        key: np.array([row[key] for row in rows], dtype=object if key != "elapsed_ms" else np.float64)
        for key in rows[0]
    }


def run_local(plan: JobPlan, batch_size: int = 8, progress: bool = True) -> None:
    """Label `plan.rows` in this process; the metadata lands as `DEST/metadata/<run_id>/part-*.parquet`.

    One listed image at a time is decoded, so a scene's windows (possibly hundreds) are scored and parked
    `batch_size` at a time: memory stays bounded by a window batch, as in the Ray plan.
    """
    config = plan.config
    if not plan.rows:
        return
    labeler = Labeler(plan.model, plan.ontology, config.device, batch_size, config.vectors)
    tables = [pa.Table.from_pylist([], schema=METADATA_SCHEMA)]
    for row in tqdm(plan.rows, unit="img", disable=not progress):
        pieces = read_and_decode(rows_to_batch([row]), plan.decode_settings)
        for start in range(0, len(pieces["relpath"]), batch_size):
            chunk = {key: column[start : start + batch_size] for key, column in pieces.items()}
            tables.append(encode_and_write(labeler(chunk), plan.write_settings))
    write_metadata_part(pa.concat_tables(tables), plan.metadata_uri, config.storage_options, "part-000000")
    manifests = manifest_uris(plan.assembly_settings)
    if manifests:
        scenes = assemble_batch({"manifest_uri": np.array(manifests, dtype=object)}, plan.assembly_settings)
        write_metadata_part(scenes, plan.metadata_uri, config.storage_options, "part-scenes-000000")
