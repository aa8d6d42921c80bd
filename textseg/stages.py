"""The CPU stages of a labeling run, as plain functions over batches of rows.

A row is one unit of work. It starts as the listing made it (`work_rows`), gains the decoded model-size
pixels in `read_and_decode`, full-resolution labels in the model stage (`textseg.labeler`), and becomes a
metadata row in `encode_and_write`. Batches are Ray Data's numpy format (dict of column -> array), so the
Ray plan (`runner_ray`) and the in-process runner (`runner_local`) call the very same functions.

Per-image problems never raise: a row whose `error` is non-empty is carried through every stage untouched
and lands as an `error` row, so every listed image is accounted for exactly once.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from textseg import storage
from textseg.decoding import ImageDecodeError, decode_image, resize_for_model
from textseg.listing import ImageRef, mask_relpath
from textseg.masks import encode_png_mask
from textseg.metadata import METADATA_SCHEMA, STATUS_ERROR, STATUS_OK
from textseg.models.input_spec import InputSpec

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class DecodeSettings:
    storage_options: Mapping[str, Any]
    input_spec: InputSpec
    max_pixels: int


@dataclass(frozen=True)
class WriteSettings:
    dest: str
    storage_options: Mapping[str, Any]
    palette: list[int]
    class_names: list[str]
    model_id: str
    ontology_hash: str
    run_id: str


def work_rows(refs: Iterable[ImageRef], problems: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Listed images -> rows for the plan. `problems` maps a relpath to a reason known before reading
    (a mask-name collision, say); such rows go straight to the metadata as errors."""
    problems = problems or {}
    return [
        {
            "source_uri": ref.uri,
            "relpath": ref.relpath,
            "mask_relpath": mask_relpath(ref.relpath),
            "fingerprint": ref.fingerprint,
            "error": problems.get(ref.relpath) or ref.problem or "",
            "elapsed_ms": 0.0,
        }
        for ref in refs
    ]


def read_and_decode(batch: Batch, settings: DecodeSettings) -> Batch:
    """Read each image's bytes, decode it as a viewer shows it and resize it to the model's input.

    Adds `pixels` (B, h, w, 3) uint8 at the model's input size, `width`/`height` (full size), and
    `nodata` (packed bits of the fully transparent pixels, empty when there are none).
    """
    height, width = settings.input_spec.size
    count = len(batch["relpath"])
    pixels = np.zeros((count, height, width, 3), dtype=np.uint8)
    full_width = np.zeros(count, dtype=np.int32)
    full_height = np.zeros(count, dtype=np.int32)
    nodata = np.full(count, b"", dtype=object)
    errors = batch["error"].astype(object)
    elapsed = batch["elapsed_ms"].astype(np.float64)
    secrets = storage.secret_values(settings.storage_options)
    for i, uri in enumerate(batch["source_uri"]):
        if errors[i]:
            continue
        started = time.perf_counter()
        try:
            fs, path = storage.filesystem_for(str(uri), settings.storage_options)
            decoded = decode_image(storage.read_bytes(fs, path), max_pixels=settings.max_pixels)
            pixels[i] = resize_for_model(decoded.image, (height, width), settings.input_spec.resample)
            full_width[i], full_height[i] = decoded.width, decoded.height
            if decoded.nodata is not None:
                nodata[i] = np.packbits(decoded.nodata.ravel()).tobytes()
        except ImageDecodeError as err:
            errors[i] = str(err)
        except Exception as err:  # noqa: BLE001 - any read failure becomes this image's error row
            errors[i] = storage.redact(describe_read_error(err), secrets)
        elapsed[i] += (time.perf_counter() - started) * 1000
    return {
        **batch,
        "pixels": pixels,
        "width": full_width,
        "height": full_height,
        "nodata": nodata,
        "error": errors,
        "elapsed_ms": elapsed,
    }


def describe_read_error(err: BaseException) -> str:
    """The one place a failed read of a source object becomes a reason string."""
    if isinstance(err, FileNotFoundError):
        return "source object not found (deleted or renamed after listing)"
    if isinstance(err, PermissionError):
        return "access denied reading the source object"
    if isinstance(err, MemoryError):
        return "out of memory decoding the image"
    return f"cannot read the source object: {type(err).__name__}: {err}"


def unpack_nodata(packed: bytes, height: int, width: int) -> np.ndarray | None:
    """The inverse of the packing in `read_and_decode`: (H, W) bool, or None when nothing is no-data."""
    if not packed:
        return None
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)


def encode_and_write(batch: Batch, settings: WriteSettings) -> pa.Table:
    """Encode each row's labels as a palette PNG, write it atomically under DEST/masks/, and return the
    batch as metadata rows (METADATA_SCHEMA)."""
    secrets = storage.secret_values(settings.storage_options)
    dest_fs, dest_root = storage.filesystem_for(settings.dest, settings.storage_options)
    rows: list[dict[str, Any]] = []
    class_count = len(settings.class_names)
    for i, relpath in enumerate(batch["relpath"]):
        started = time.perf_counter()
        error = str(batch["error"][i] or "")
        mask_uri = None
        if not error:
            target = f"masks/{batch['mask_relpath'][i]}"
            try:
                labels = np.frombuffer(batch["labels"][i], dtype=np.uint8)
                labels = labels.reshape(int(batch["height"][i]), int(batch["width"][i]))
                storage.write_bytes_atomic(
                    dest_fs, storage.join_uri(dest_root, target), encode_png_mask(labels, settings.palette)
                )
                mask_uri = storage.join_uri(settings.dest, target)
            except Exception as err:  # noqa: BLE001 - a failed write is this image's error row
                error = storage.redact(f"cannot write the mask: {type(err).__name__}: {err}", secrets)
        ok = not error
        elapsed = float(batch["elapsed_ms"][i]) + (time.perf_counter() - started) * 1000
        rows.append(
            {
                "source_uri": storage.redact_uri(str(batch["source_uri"][i])),
                "relpath": str(relpath),
                "mask_uri": mask_uri,
                "status": STATUS_OK if ok else STATUS_ERROR,
                "error": None if ok else error,
                "width": int(batch["width"][i]) if "width" in batch and ok else None,
                "height": int(batch["height"][i]) if "height" in batch and ok else None,
                "class_names": settings.class_names,
                "class_pixel_fraction": _floats(batch, "class_pixel_fraction", i, class_count)
                if ok
                else None,
                "class_mean_score": _floats(batch, "class_mean_score", i, class_count) if ok else None,
                "model_id": settings.model_id,
                "ontology_hash": settings.ontology_hash,
                "source_fingerprint": str(batch["fingerprint"][i]),
                "run_id": settings.run_id,
                "labeled_at": dt.datetime.now(dt.timezone.utc),
                "duration_ms": elapsed,
            }
        )
    return pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)


def _floats(batch: Batch, column: str, i: int, count: int) -> list[float | None]:
    values = np.asarray(batch[column][i], dtype=np.float64)[:count]
    return [None if np.isnan(v) else float(v) for v in values]
