"""The Arrow schema of a metadata row, the one place a row is shaped, and atomic part files.

Every image a run attempts gets exactly one row of this schema; `status` is `ok` or `error`.
"""

from __future__ import annotations

import datetime as dt
import io
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from textseg import storage
from textseg.errors import reason_category
from textseg.image.rasters import GeoRef
from textseg.outputs.instances import INSTANCE_FIELD, INSTANCE_STRUCT, instance_rows, instances_dir

STATUS_OK = "ok"
STATUS_ERROR = "error"
# Only in DEST's state view (textseg.outputs.state), never in a run's metadata: the image's latest row,
# for an image that a later full listing of the same SOURCE no longer found.
STATUS_DELETED = "deleted"

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
        # Error rows: True when another attempt cannot pass while the file is unchanged (its bytes cannot
        # be decoded: `ImageDecodeError.permanent`; its name cannot become a mask path), False when it
        # may (storage, worker loss, the model stage, memory, ...); null on ok rows and in rows written
        # before the column existed (read as False). Set where the error is made, never from its wording.
        pa.field("permanent", pa.bool_()),
    ]
)


def stage_rows_schema(instances: bool) -> pa.Schema:
    """What the write and scene-assembly stages hand the part writer: metadata rows, and with --instances
    each image's instances beside them (`write_metadata_part` splits them off)."""
    if not instances:
        return METADATA_SCHEMA
    return METADATA_SCHEMA.append(pa.field(INSTANCE_FIELD, pa.list_(INSTANCE_STRUCT)))


def conform_metadata(table: pa.Table) -> pa.Table:
    """Rows read back from DEST (a metadata part, a view file) in METADATA_SCHEMA: columns added since
    the file was written are null, so parts and views of earlier versions stay readable."""
    missing = [f for f in METADATA_SCHEMA if f.name not in table.schema.names]
    for f in missing:
        table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA)


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
    permanent: bool = False,
) -> dict[str, Any]:
    """The one place a metadata row (METADATA_SCHEMA) is shaped, for whole images and assembled scenes.

    notes: what the caller left out and why ("no polygons: ..."), one sentence or several; the row's own
    (no WGS84 bounds when the CRS cannot be reprojected) come first, and repeats are dropped.
    permanent: for an error, whoever made it said that retrying cannot help while the file is unchanged
    (the `permanent` column; an incremental run skips such an image as known bad).
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
        "permanent": None if ok else bool(permanent),
    }


def _bounds_wgs84(georef: GeoRef) -> tuple[list[float] | None, str]:
    """(the raster's lon/lat bounds, "") or (None, why not): a CRS PROJ cannot reproject (a local
    engineering grid) or a raster outside its CRS's domain must not cost the image its row."""
    try:
        return list(georef.bounds_wgs84), ""
    except Exception as err:  # noqa: BLE001 - pyproj's ProjError/CRSError, GeoError: each is a note
        return None, f"no WGS84 bounds: {type(err).__name__}: {err}"


# A run id: its UTC start time to the microsecond, then random hex ("20250101T000000.000000Z-1a2b3c").
# Ids made before sub-second precision ("20250101T000000Z-1a2b3c") still parse and order.
RUN_ID_TIME = "%Y%m%dT%H%M%S.%fZ"
_SECOND_RUN_ID_TIME = "%Y%m%dT%H%M%SZ"


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable and unique: the UTC start time plus random hex, so two runs never share output names and
    two runs started within one second still sort in the order they started."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime(RUN_ID_TIME) + "-" + secrets.token_hex(3)


def run_started_at(run_id: str) -> dt.datetime | None:
    """The start time a run id encodes (`new_run_id`), or None for a name that is not a run id."""
    stamp = run_id.split("-", 1)[0]
    for layout in (RUN_ID_TIME, _SECOND_RUN_ID_TIME):
        try:
            return dt.datetime.strptime(stamp, layout).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
    return None


def run_order(run_id: str) -> tuple[dt.datetime, str]:
    """Sort key for run ids, oldest first: the start time, then the id (a name that is not a run id first)."""
    return run_started_at(run_id) or dt.datetime.min.replace(tzinfo=dt.timezone.utc), run_id


def metadata_dir(run_id: str) -> str:
    return f"metadata/{run_id}"


def latest_run(dest: str, storage_options: Mapping[str, Any]) -> str | None:
    """The newest run id under DEST/metadata/ (run ids sort by start time), or None."""
    fs, root = storage.filesystem_for(dest, storage_options)
    runs = [name for name in storage.names(fs, storage.join_uri(root, "metadata")) if run_started_at(name)]
    return max(runs, key=run_order, default=None)


def iter_errors(dest: str, run_id: str, storage_options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(relpath, reason) of every `error` row of run `run_id`, a part file at a time: `textseg errors
    DEST` lists a million of them without holding them."""
    fs, root = storage.filesystem_for(dest, storage_options)
    for path in storage.glob(fs, storage.join_uri(root, f"{metadata_dir(run_id)}/part-*.parquet")):
        # One thread: pyarrow's thread pool can abort a short-lived process at exit ("terminate called
        # without an active exception", apache/arrow#50482); three small columns need no parallel decode.
        data = pa.BufferReader(storage.read_bytes(fs, path))
        table = pq.read_table(data, columns=["relpath", "status", "error"], use_threads=False)
        columns = (table[c].to_pylist() for c in ("relpath", "status", "error"))
        for relpath, status, error in zip(*columns, strict=True):
            if status == STATUS_ERROR:
                yield relpath, error or ""


def summary_path(run_id: str) -> str:
    return f"runs/{run_id}.json"


def write_metadata_part(
    table: pa.Table, metadata_uri: str, storage_options: Mapping[str, Any], name: str
) -> None:
    """Write rows as `<metadata_uri>/<name>.parquet` (names start `part-`), atomically: a reader (or the
    next run's incremental check) sees the whole part file or none of it, also when the writer is killed.
    A retried writer rewrites the same name, so a retry can never duplicate rows.

    Rows that carry their images' instances (`textseg.labels.instances.INSTANCE_FIELD`, --instances) have
    them written first, to the part of the same name under DEST/instances/<run_id>/
    (`textseg.outputs.instances`)."""
    fs, root = storage.filesystem_for(metadata_uri, storage_options)
    if INSTANCE_FIELD in table.column_names:
        dest_root, _, run_id = root.rstrip("/").rsplit("/", 2)  # root is DEST/metadata/<run_id>
        path = storage.join_uri(dest_root, f"{instances_dir(run_id)}/{name}.parquet")
        buffer = io.BytesIO()
        pq.write_table(instance_rows(table), buffer)
        storage.write_bytes_atomic(fs, path, buffer.getvalue())
        table = table.drop_columns([INSTANCE_FIELD])
    buffer = io.BytesIO()
    pq.write_table(table.cast(METADATA_SCHEMA), buffer)
    storage.write_bytes_atomic(fs, storage.join_uri(root, f"{name}.parquet"), buffer.getvalue())


@dataclass
class Tally:
    """Counts of metadata rows by status, and errors by reason category (the text before ':'), added up
    from what the write tasks produced: a run's summary never re-reads its metadata."""

    ok: int = 0
    error: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # category -> one full reason
    ok_without_crs: int = 0  # ok rows without a georeference (`crs` null): --vectors made no polygons

    @classmethod
    def of(cls, table: pa.Table) -> Tally:
        tally = cls()
        crs = table["crs"].to_pylist() if "crs" in table.column_names else [None] * table.num_rows
        for status, error, row_crs in zip(
            table["status"].to_pylist(), table["error"].to_pylist(), crs, strict=True
        ):
            if status == STATUS_OK:
                tally.ok += 1
                tally.ok_without_crs += row_crs is None
                continue
            tally.error += 1
            category = reason_category(error or "")
            tally.categories[category] = tally.categories.get(category, 0) + 1
            tally.examples.setdefault(category, error or "")
        return tally

    def add(self, other: Tally) -> None:
        self.ok += other.ok
        self.error += other.error
        self.ok_without_crs += other.ok_without_crs
        for category, count in other.categories.items():
            self.categories[category] = self.categories.get(category, 0) + count
            self.examples.setdefault(category, other.examples.get(category, ""))

    def top_errors(self, count: int = 5) -> list[tuple[str, int]]:
        """(category, images) for the most frequent categories."""
        return sorted(self.categories.items(), key=lambda item: (-item[1], item[0]))[:count]
