"""Decode, model and write in one process: the CPU plan's actors and the in-process runner.

Where the model runs on the CPU, every core does all three stages for its own images, as a hand-written
process pool would: a work row's compressed image comes in and its metadata row leaves, and neither the
decoded pixels nor the full-size labels (1.9 MB for a 1600x1200 photo) cross Ray's object store. On 2
cores, 1,200 photos of 1600x1200, tiny CLIPSeg: the three stages as separate Ray tasks and actors spent
~70 ms of CPU an image (the copies of each image's labels into and out of the object store, three
processes time-sharing two cores), one process doing all three ~50 ms. GPU actors keep the stages apart
(`textseg.plan.runner_ray`): there the GPU, not the CPU, is the scarce thing, and decoding and encoding
belong on the cores the model does not need.

The stages are the same functions either way (`decode_stage`, `Labeler`, `write_stage`), each still
isolating its failures per image. A scene's windows are scored and parked `batch_size` at a time, so
memory stays bounded by one batch of windows whatever the scene's size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from textseg.models import ModelRef
from textseg.ontology import Ontology
from textseg.outputs.metadata import stage_rows_schema
from textseg.pipeline.batches import Batch, batch_len, take
from textseg.pipeline.decode import decode_stage
from textseg.pipeline.settings import StageSettings
from textseg.pipeline.write import write_stage

if TYPE_CHECKING:
    from textseg.pipeline.label import Labeler


class DecodeLabelWrite:
    """Callable on batches of work rows -> their metadata rows (a `pa.Table`); Ray Data's actor pool
    constructs it once per actor, the in-process runner once per run."""

    def __init__(
        self,
        model: ModelRef,
        ontology: Ontology,
        settings: StageSettings,
        device: str = "cpu",
        batch_size: int = 8,
        keep_scores: bool = False,
        compile: bool = False,
        torch_threads: int | None = None,
    ):
        """torch_threads: torch's intra-op threads in this process (the Ray plan's actors: 1, one process
        per core, as threads would only contend); None leaves torch's default (the in-process runner)."""
        import torch  # here, not at import: the driver names this class for Ray without loading torch

        from textseg.pipeline.label import Labeler

        self.settings = settings
        self.batch_size = batch_size
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.labeler: Labeler = Labeler(
            model,
            ontology,
            device,
            batch_size,
            keep_scores,
            settings.crashes,
            settings.progress,
            compile,
            settings.instances,
        )

    def __call__(self, batch: Batch) -> pa.Table:
        pieces = decode_stage(batch, self.settings)
        count = batch_len(pieces)
        tables = [
            write_stage(
                self.labeler(take(pieces, range(start, min(start + self.batch_size, count)))), self.settings
            )
            for start in range(0, count, self.batch_size)
        ]
        if not tables:
            return stage_rows_schema(self.settings.instances).empty_table()
        return pa.concat_tables(tables)
