"""The in-process runner: the same stage functions as the Ray plan, in one process, no Ray.

Tests and benchmarks use it, and so can a notebook with a handful of images. Work rows stream from the
listing (`textseg.plan.work.list_work`) one image at a time through decode -> model -> write
(`textseg.pipeline.fused`, as the Ray plan's CPU actors run them); metadata
parts are written every PART_ROWS rows, as the Ray plan's sink does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from textseg.outputs.metadata import Tally, write_metadata_part
from textseg.outputs.sinks import PART_ROWS
from textseg.outputs.state import DoneIndex
from textseg.pipeline.batches import rows_to_batch
from textseg.pipeline.fused import DecodeLabelWrite
from textseg.pipeline.scenes import assemble_batch, manifest_uris
from textseg.plan.finish import finish, merge_pending_runs
from textseg.plan.prepare import JobPlan
from textseg.plan.progress import LocalProgress, ProgressDisplay
from textseg.plan.summary import RunSummary
from textseg.plan.work import ListingTally, list_work


class _Parts:
    """Metadata rows collected into parts of PART_ROWS, tallied as they are written."""

    def __init__(self, plan: JobPlan, prefix: str):
        self.plan, self.prefix = plan, prefix
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.written = 0
        self.tally = Tally()

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.rows += table.num_rows
        if self.rows >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.concat_tables(self.tables)
        name = f"{self.prefix}{self.written:06d}"
        write_metadata_part(table, self.plan.metadata_uri, self.plan.config.storage_options, name)
        self.tally.add(Tally.of(table))
        self.tables, self.rows, self.written = [], 0, self.written + 1


def run_local(plan: JobPlan, batch_size: int = 8, progress: bool = True) -> RunSummary:
    """Label what SOURCE holds and DEST's state does not, in this process; returns the run summary.

    One listed image at a time is decoded, so a scene's windows (possibly hundreds) are scored and parked
    `batch_size` at a time: memory stays bounded by a window batch, as in the Ray plan.
    """
    config = plan.config
    merge_pending_runs(plan)
    counts = LocalProgress()
    settings = dataclasses.replace(plan.stage_settings, progress=counts)
    listing = ListingTally()
    parts = _Parts(plan, "part-")
    scenes = _Parts(plan, "part-scenes-")
    index = DoneIndex.load(config.dest, config.storage_options)
    work_settings = dataclasses.replace(plan.work_settings(index), progress=counts)

    def execute() -> None:
        stages: DecodeLabelWrite | None = None  # loaded at the first image: nothing to do, no model
        for work in list_work(plan.shards, work_settings, listing):
            for row in work.to_pylist():
                if stages is None:
                    stages = DecodeLabelWrite(
                        plan.model,
                        plan.ontology,
                        settings,
                        config.device,
                        batch_size,
                        config.keeps_scores,
                        config.compile,
                    )
                parts.add(stages(rows_to_batch([row])))
        parts.flush()
        for uri in manifest_uris(settings):
            scenes.add(assemble_batch({"manifest_uri": np.array([uri], dtype=object)}, settings))
        scenes.flush()

    if progress:
        ProgressDisplay(counts.snapshot, shards=len(plan.shards)).run(execute)
    else:
        execute()
    parts.tally.add(scenes.tally)
    plan.summary.startup_s, plan.summary.mean_model_batch = counts.report(plan.started_wall)
    return finish(plan, listing, parts.tally)
