"""The Arrow schema of a metadata row, and run summaries (SPEC.md: What lands in DEST).

Every image a run attempts gets exactly one row of this schema; `status` is `ok` or `error`.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

STATUS_OK = "ok"
STATUS_ERROR = "error"

METADATA_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("relpath", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("class_names", pa.list_(pa.string())),
        pa.field("class_pixel_fraction", pa.list_(pa.float32())),
        pa.field("class_mean_score", pa.list_(pa.float32())),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("ontology_hash", pa.string(), nullable=False),
        pa.field("source_fingerprint", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("labeled_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("duration_ms", pa.float32()),
        # Georeferenced images (GeoTIFF, XYZ tiles): the CRS, the bounds in it, and the bounds in lon/lat.
        pa.field("crs", pa.string()),
        pa.field("bounds", pa.list_(pa.float64(), 4)),
        pa.field("bounds_wgs84", pa.list_(pa.float64(), 4)),
    ]
)


def class_statistics(counts: Sequence[float], score_sums: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-class pixel counts and score sums (possibly added up over the blocks of a scene) ->
    (class_pixel_fraction of the valid pixels, class_mean_score; NaN for a class with no pixel)."""
    total = max(sum(counts), 1)
    fractions = [c / total for c in counts]
    means = [s / c if c else float("nan") for c, s in zip(counts, score_sums, strict=True)]
    return fractions, means


# What decides whether an image is already done (SPEC.md: Incremental by default).
DONE_KEY_COLUMNS = ("relpath", "source_fingerprint", "model_id", "ontology_hash")


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable and unique: a UTC timestamp plus random hex, so two runs never share output names."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def run_started_at(run_id: str) -> dt.datetime | None:
    """The start time a run id encodes (`new_run_id`), or None for a name that is not a run id."""
    try:
        return dt.datetime.strptime(run_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def metadata_dir(run_id: str) -> str:
    return f"metadata/{run_id}"


def summary_path(run_id: str) -> str:
    return f"runs/{run_id}.json"


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
    finished_at: str | None = None
    listed: int = 0
    skipped: int = 0
    ok: int = 0
    error: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    polygons: int | None = None  # with --vectors: polygons written to DEST/vectors/<run_id>.parquet
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
        return (
            f"run {self.run_id}: listed {self.listed}, skipped {self.skipped} (already done), "
            f"labeled {self.ok}, failed {self.error}, {self.images_per_s:.1f} images/s"
        )


def write_metadata_part(
    table: pa.Table, metadata_uri: str, storage_options: Mapping[str, Any], name: str
) -> None:
    """Write rows as `<metadata_uri>/<name>.parquet` (names start `part-`), atomically: a reader (or the
    next run's incremental check) sees the whole part file or none of it, also when the writer is killed.
    A retried writer rewrites the same name, so a retry can never duplicate rows."""
    from textseg import storage

    buffer = io.BytesIO()
    pq.write_table(table.cast(METADATA_SCHEMA), buffer)
    fs, root = storage.filesystem_for(metadata_uri, storage_options)
    storage.write_bytes_atomic(fs, storage.join_uri(root, f"{name}.parquet"), buffer.getvalue())
