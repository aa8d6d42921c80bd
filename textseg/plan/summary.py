"""The run summary (DEST/runs/<run_id>.json) and how a run's status is decided from its counts.

Counts come from what the stages produced (listing tallies, the metadata sink's tallies), never from
re-reading DEST. listed == skipped + ok + error for a run that finished; skipped counts the images
already labeled and the known-bad ones (`known_bad`), and the status judges this run's attempts only.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from textseg.outputs.metadata import Tally

STATUS_SUCCEEDED = "succeeded"


@dataclass
class RunSummary:
    """What `DEST/runs/<run_id>.json` holds. listed == skipped + ok + error for a finished run."""

    run_id: str
    config: dict[str, Any]
    versions: dict[str, str]
    model_id: str
    ontology_hash: str
    class_names: list[str]
    started_at: str
    # The ontology the run labeled with, in its YAML form (prompts, thresholds, colours): what exports,
    # reports and `textseg calibrate` read back (`textseg.datasets.labeled_dest.run_ontology`).
    ontology: dict[str, Any] = field(default_factory=dict)
    finished_at: str | None = None
    listed: int = 0
    skipped: int = 0  # already labeled, or known bad
    known_bad: int = 0  # of skipped: failed earlier for a reason that cannot pass (--retry-errors)
    ok: int = 0
    error: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    # How the run started, in seconds (`textseg.plan.progress.startup_seconds`): connecting to Ray, the
    # first model ready and the first mask written (both after the run started), and the mean time a
    # model actor took to load, embed the prompts and warm up. These overlap `timings_s["labeling"]`.
    startup_s: dict[str, float] = field(default_factory=dict)
    # Images per model call, over the run: the batch size the model actually saw (None: no image).
    mean_model_batch: float | None = None
    # The most frequent error categories (a reason's text before ':'), each with one full example.
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    error_examples: dict[str, str] = field(default_factory=dict)
    shards: int = 0  # listing shards SOURCE was split into
    polygons: int | None = None  # with --vectors: polygons written to DEST/vectors/run=<run_id>/
    deleted: int = 0  # images DEST's state now marks deleted: this run's complete listing missed them
    # Labeled images without a georeference (their row's `crs` is null): --vectors made no polygons for them.
    without_georeference: int = 0
    # A dry run: listed images that would become error rows before any read (`ImageRef.problem`), those of
    # them whose mask would share its name with another image's (`flag_collisions`), and a few examples.
    problems: int = 0
    collisions: int = 0
    collision_examples: list[str] = field(default_factory=list)
    status: str = "running"

    @property
    def attempted(self) -> int:
        return self.ok + self.error

    @property
    def error_rate(self) -> float:
        return self.error / self.attempted if self.attempted else 0.0

    @property
    def images_per_s(self) -> float:
        total = self.timings_s.get("total", 0.0)
        return self.attempted / total if total > 0 else 0.0

    def to_json(self) -> str:
        payload = asdict(self)
        payload["images_per_s"] = round(self.images_per_s, 3)
        return json.dumps(payload, indent=2, default=str)

    def line(self) -> str:
        """The closing summary line a run prints."""
        why = "already done"
        if self.known_bad:
            why = f"{self.skipped - self.known_bad} already done, {self.known_bad} known bad"
            why = "known bad" if self.known_bad == self.skipped else why
        deleted = f", {self.deleted} gone from SOURCE" if self.deleted else ""
        return (
            f"run {self.run_id}: listed {self.listed}, skipped {self.skipped} ({why}), "
            f"labeled {self.ok}, failed {self.error}{deleted}, {self.images_per_s:.1f} images/s"
        )


def decide_status(summary: RunSummary, max_error_rate: float) -> str:
    """succeeded, failed (too many errors), or incomplete (images without a row: a bug or lost work)."""
    accounted = summary.skipped + summary.ok + summary.error
    if accounted != summary.listed:
        return f"incomplete: {summary.listed - accounted} listed images have no row"
    if summary.error_rate > max_error_rate:
        return (
            f"failed: {summary.error} of {summary.attempted} images failed "
            f"({summary.error_rate:.1%} > --max-error-rate {max_error_rate:.1%})"
        )
    return STATUS_SUCCEEDED


def count_rows(summary: RunSummary, tally: Tally) -> None:
    summary.ok, summary.error = tally.ok, tally.error
    summary.without_georeference = tally.ok_without_crs
    summary.top_errors = tally.top_errors()
    summary.error_examples = {c: tally.examples[c] for c, _ in summary.top_errors}


COLLISION_EXAMPLES = 5
COLLISION_PREFIX = "mask name collision"  # how `textseg.source.refs.flag_collisions` words its problem


def count_problems(summary: RunSummary, work: pa.Table) -> None:
    """A dry run: add the work rows that start as errors (problem refs) to the summary's counts."""
    for relpath, error in zip(work["relpath"].to_pylist(), work["error"].to_pylist(), strict=True):
        if not error:
            continue
        summary.problems += 1
        if error.startswith(COLLISION_PREFIX):
            summary.collisions += 1
            if len(summary.collision_examples) < COLLISION_EXAMPLES:
                summary.collision_examples.append(f"{relpath!r} ({error})")


def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("textseg", "ray", "torch", "transformers", "pyarrow", "pillow", "fsspec", "s3fs"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
