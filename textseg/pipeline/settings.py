"""StageSettings: what every per-image stage needs to know about its run, in one frozen value.

The plan builds it once (`textseg.plan.prepare.JobPlan.stage_settings`) and hands the same object to the
decode tasks, the model actors, the write tasks and the scene assembly, so a setting is defined in one
place and cannot drift between stages. It travels to Ray workers pickled; it holds no open handles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from textseg import storage
from textseg.image.pieces import WindowPlan
from textseg.labels.vectors import VectorSettings
from textseg.models import ScoreKind
from textseg.models.input_spec import InputSpec
from textseg.pipeline.batches import CrashLedger

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
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets
    crashes: CrashLedger | None = None  # set by a runner whose workers can die (textseg.plan.runner_ray)

    @property
    def scratch_uri(self) -> str:
        return scratch_uri(self.dest, self.run_id)

    @property
    def secrets(self) -> list[str]:
        """Storage option values that must never appear in an error message."""
        return storage.secret_values(self.storage_options)
