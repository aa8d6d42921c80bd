"""StageSettings: what every per-image stage needs to know about its run, in one frozen value.

The plan builds it once (`textseg.plan.prepare.JobPlan.stage_settings`) and hands the same object to the
decode tasks, the model actors, the write tasks and the scene assembly, so a setting is defined in one
place and cannot drift between stages. It travels to Ray workers pickled; it holds no open handles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from textseg import storage
from textseg.image.pieces import WindowPlan
from textseg.labels.vectors import VectorSettings
from textseg.models import ScoreKind
from textseg.models.input_spec import InputSpec
from textseg.outputs.metadata import STATUS_OK
from textseg.pipeline.batches import CrashLedger


class ProgressCounter(Protocol):
    """Where stages add what they finished (listed, skipped, ok, error, shards), for the progress the
    driver shows (`textseg.plan.progress`); display only, never the run's accounting."""

    def add(self, **counts: int) -> None: ...


# Counted by model actors once their model is ready (weights loaded, prompts embedded, warmed up): how many,
# and the milliseconds it took them in all (`textseg.pipeline.label.Labeler`).
MODELS_READY, MODEL_STARTUP_MS = "models_ready", "model_startup_ms"
# Counted by model actors per batch they are given: model calls and the images in them (how full the
# batches the model sees are: Ray Data may hand an actor less than the batch size it asked for).
MODEL_CALLS, MODEL_IMAGES = "model_calls", "model_images"
# The model stage's column of a detector's instances (SAM 3's queries), JSON rows per whole image ("" for
# none found or a semantic backend, whose instances the write stage finds in the mask).
QUERY_INSTANCES = "query_instances"


SCRATCH_DIR = "_work"  # DEST/_work/<run_id>: a run's scene windows and polygon pieces, removed when it ends


def scratch_uri(dest: str, run_id: str) -> str:
    return storage.join_uri(dest, f"{SCRATCH_DIR}/{run_id}")


@dataclass(frozen=True)
class StageSettings:
    dest: str
    run_id: str
    input_spec: InputSpec
    max_pixels: int  # decompression-bomb limit
    window_plan: WindowPlan
    class_names: list[str]  # background first
    palette: list[int]  # the masks' PNG palette
    thresholds: tuple[float, ...]  # per class, without background
    score_kind: ScoreKind
    model_id: str
    ontology_hash: str
    vectors: VectorSettings | None  # None: no polygons; pieces are never area-filtered (merged first)
    instances: bool = False  # rows carry their image's instances (textseg.labels.instances)
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets
    crashes: CrashLedger | None = None  # set by a runner whose workers can die (textseg.plan.runner_ray)
    progress: ProgressCounter | None = None  # set by a runner that shows progress

    def count_rows(self, rows: pa.Table) -> None:
        """Add finished metadata rows to the progress counts."""
        if self.progress is None or rows.num_rows == 0:
            return
        ok = int(pc.sum(pc.equal(rows["status"], STATUS_OK)).as_py() or 0)
        self.progress.add(ok=ok, error=rows.num_rows - ok)

    @property
    def scratch_uri(self) -> str:
        return scratch_uri(self.dest, self.run_id)

    @property
    def secrets(self) -> list[str]:
        """Storage option values that must never appear in an error message."""
        return storage.secret_values(self.storage_options)
