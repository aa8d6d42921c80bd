"""The Arrow schema of a metadata row, the one place a row is shaped, and atomic part files.

Every image a run attempts gets exactly one row of this schema; `status` is `ok` or `error`.
"""

from __future__ import annotations

import datetime as dt
import io
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from textseg import storage
from textseg.errors import reason_category
from textseg.image.rasters import GeoRef

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
        # How the model saw the image (`textseg.image.pieces.Tiling.describe`), e.g. "whole image resized
        # to 352x352" or "windows of 352 px, overlap 32 px, at 0.5 m/px (scene 0.5 m/px)".
        pa.field("tiling", pa.string()),
        # What the listing knew beyond the object, as a JSON object (a STAC item's properties).
        pa.field("source_properties", pa.string()),
        # What an `ok` row lacks and why (e.g. no WGS84 bounds: the CRS cannot be reprojected), or null.
        pa.field("notes", pa.string()),
    ]
)


def class_statistics(counts: Sequence[float], score_sums: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-class pixel counts and score sums (possibly added up over the blocks of a scene) ->
    (class_pixel_fraction of the valid pixels, class_mean_score; NaN for a class with no pixel)."""
    total = max(sum(counts), 1)
    fractions = [c / total for c in counts]
    means = [s / c if c else float("nan") for c, s in zip(counts, score_sums, strict=True)]
    return fractions, means


def metadata_row(
    *,
    source_uri: str,
    relpath: str,
    fingerprint: str,
    mask_uri: str | None,
    error: str | None,
    width: int,
    height: int,
    counts: Sequence[float],
    score_sums: Sequence[float],
    georef: GeoRef | None,
    elapsed_ms: float,
    class_names: list[str],
    model_id: str,
    ontology_hash: str,
    run_id: str,
    tiling: str = "",
    properties: str = "",
    notes: str | Sequence[str] = "",
) -> dict[str, Any]:
    """The one place a metadata row (METADATA_SCHEMA) is shaped, for whole images and assembled scenes.

    notes: what the caller left out and why ("no polygons: ..."), one sentence or several; the row's own
    (no WGS84 bounds when the CRS cannot be reprojected) come first, and repeats are dropped.
    """
    ok = not error
    fractions, means = class_statistics(list(counts), list(score_sums)) if ok else (None, None)
    bounds = georef.bounds if ok and georef is not None else None
    bounds_wgs84, wgs84_note = _bounds_wgs84(georef) if ok and georef is not None else (None, "")
    all_notes = [wgs84_note, *([notes] if isinstance(notes, str) else notes)]
    return {
        "source_uri": storage.redact_uri(source_uri),
        "relpath": relpath,
        "mask_uri": mask_uri if ok else None,
        "status": STATUS_OK if ok else STATUS_ERROR,
        "error": None if ok else error,
        "width": width if ok else None,
        "height": height if ok else None,
        "class_names": class_names,
        "class_pixel_fraction": fractions,
        "class_mean_score": None if means is None else [None if m != m else m for m in means],
        "model_id": model_id,
        "ontology_hash": ontology_hash,
        "source_fingerprint": fingerprint,
        "run_id": run_id,
        "labeled_at": dt.datetime.now(dt.timezone.utc),
        "duration_ms": elapsed_ms,
        "crs": georef.crs if ok and georef is not None else None,
        "bounds": list(bounds) if bounds is not None else None,
        "bounds_wgs84": bounds_wgs84,
        "tiling": tiling or None,
        "source_properties": properties or None,
        "notes": "; ".join(dict.fromkeys(n for n in all_notes if n)) or None,
    }


def _bounds_wgs84(georef: GeoRef) -> tuple[list[float] | None, str]:
    """(the raster's lon/lat bounds, "") or (None, why not): a CRS PROJ cannot reproject (a local
    engineering grid) or a raster outside its CRS's domain must not cost the image its row."""
    try:
        return list(georef.bounds_wgs84), ""
    except Exception as err:  # noqa: BLE001 - pyproj's ProjError/CRSError, GeoError: each is a note
        return None, f"no WGS84 bounds: {type(err).__name__}: {err}"


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


def write_metadata_part(
    table: pa.Table, metadata_uri: str, storage_options: Mapping[str, Any], name: str
) -> None:
    """Write rows as `<metadata_uri>/<name>.parquet` (names start `part-`), atomically: a reader (or the
    next run's incremental check) sees the whole part file or none of it, also when the writer is killed.
    A retried writer rewrites the same name, so a retry can never duplicate rows."""
    buffer = io.BytesIO()
    pq.write_table(table.cast(METADATA_SCHEMA), buffer)
    fs, root = storage.filesystem_for(metadata_uri, storage_options)
    storage.write_bytes_atomic(fs, storage.join_uri(root, f"{name}.parquet"), buffer.getvalue())


@dataclass
class Tally:
    """Counts of metadata rows by status, and errors by reason category (the text before ':'), added up
    from what the write tasks produced: a run's summary never re-reads its metadata."""

    ok: int = 0
    error: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # category -> one full reason

    @classmethod
    def of(cls, table: pa.Table) -> Tally:
        tally = cls()
        for status, error in zip(table["status"].to_pylist(), table["error"].to_pylist(), strict=True):
            if status == STATUS_OK:
                tally.ok += 1
                continue
            tally.error += 1
            category = reason_category(error or "")
            tally.categories[category] = tally.categories.get(category, 0) + 1
            tally.examples.setdefault(category, error or "")
        return tally

    def add(self, other: Tally) -> None:
        self.ok += other.ok
        self.error += other.error
        for category, count in other.categories.items():
            self.categories[category] = self.categories.get(category, 0) + count
            self.examples.setdefault(category, other.examples.get(category, ""))

    def top_errors(self, count: int = 5) -> list[tuple[str, int]]:
        """(category, images) for the most frequent categories."""
        return sorted(self.categories.items(), key=lambda item: (-item[1], item[0]))[:count]
