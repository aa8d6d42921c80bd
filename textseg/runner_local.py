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
    """Label `plan.rows` in this process and write `DEST/metadata/<run_id>/part-000000.parquet`."""
    config = plan.config
    labeler = (
        Labeler(plan.model, plan.ontology, config.device, batch_size, config.vectors) if plan.rows else None
    )
    tables = [pa.Table.from_pylist([], schema=METADATA_SCHEMA)]
    with tqdm(total=len(plan.rows), unit="img", disable=not progress) as bar:
        for start in range(0, len(plan.rows), batch_size):
            batch = rows_to_batch(plan.rows[start : start + batch_size])
            assert labeler is not None
            labeled = labeler(read_and_decode(batch, plan.decode_settings))
            tables.append(encode_and_write(labeled, plan.write_settings))
            bar.update(len(batch["relpath"]))
    write_metadata_part(
        pa.concat_tables(tables), plan.metadata_uri, plan.config.storage_options, "part-000000"
    )
    manifests = manifest_uris(plan.assembly_settings)
    if manifests:
        scenes = assemble_batch({"manifest_uri": np.array(manifests, dtype=object)}, plan.assembly_settings)
        write_metadata_part(scenes, plan.metadata_uri, plan.config.storage_options, "part-scenes-000000")
