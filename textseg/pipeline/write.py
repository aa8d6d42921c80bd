"""The write stage (CPU tasks): labels -> a mask under DEST/masks/ and the image's metadata row.

Whole images get their mask encoded (palette PNG, or a GeoTIFF for georeferenced rasters) and written
atomically, and leave as one metadata row (`textseg.outputs.metadata.metadata_row`). A window of a scene
parks its quantized scores in the run's scratch area instead and leaves no row: its scene gets its one
row when `textseg.pipeline.scenes` assembles it.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from textseg import storage
from textseg.image import rasters
from textseg.image.rasters import GeoRef
from textseg.image.windows import Window
from textseg.labels.instances import region_instances
from textseg.labels.vector_merge import VECTOR_PARTS
from textseg.labels.vectors import image_polygons, write_geoparquet
from textseg.outputs.instances import INSTANCE_FIELD
from textseg.outputs.masks import encode_png_mask
from textseg.outputs.metadata import metadata_row, stage_rows_schema
from textseg.pipeline.batches import Batch, is_permanent, isolate, report_failure, unpack_nodata
from textseg.pipeline.scenes import scene_key, write_window_error, write_window_result
from textseg.pipeline.settings import QUERY_INSTANCES, StageSettings


def write_stage(batch: Batch, settings: StageSettings) -> pa.Table:
    """The write stage as the plans call it: `encode_and_write`, isolated per image."""
    return isolate(
        lambda b: encode_and_write(b, settings), batch, "writing", settings.storage_options, settings.crashes
    )


def encode_and_write(batch: Batch, settings: StageSettings) -> pa.Table:
    """Whole images: encode the labels (palette PNG, or a GeoTIFF for georeferenced rasters), write the
    mask atomically under DEST/masks/ and return a metadata row. Windows: park the quantized scores in
    the scratch area for `textseg.pipeline.scenes` and return no row (the scene gets its one row when
    assembled)."""
    secrets = settings.secrets
    dest_fs, dest_root = storage.filesystem_for(settings.dest, settings.storage_options)
    rows: list[dict[str, Any]] = []
    polygons: list[dict[str, Any]] = []
    for i, relpath in enumerate(batch["relpath"]):
        started = time.perf_counter()
        error = str(batch["error"][i] or "")
        permanent = bool(error) and is_permanent(batch, i)  # where the error was made said so
        width, height = int(batch["width"][i]), int(batch["height"][i])
        georef = _georef(batch, i)
        if batch["windowed"][i]:
            _park_window(batch, i, settings, error)
            continue
        mask_uri = None
        instances: list[dict[str, Any]] = []
        notes: list[str] = []  # what this image's ok row lacks, and why
        if not error:
            target = f"masks/{batch['mask_relpath'][i]}"
            try:
                labels = np.frombuffer(batch["labels"][i], dtype=np.uint8).reshape(height, width)
                mask_path = storage.join_uri(dest_root, target)
                _write_mask(dest_fs, mask_path, labels, georef, settings.palette, settings.class_names)
                mask_uri = storage.join_uri(settings.dest, target)
                if settings.vectors is not None and georef is not None:
                    scores = _scores(batch, i, len(settings.class_names))
                    polygons += image_polygons(
                        labels, georef, settings.class_names, scores, str(relpath), settings.vectors, notes
                    )
                if settings.instances:
                    instances = _instances(batch, i, labels, settings)
            except Exception as err:  # noqa: BLE001 - a failed write is this image's error row
                error = storage.redact(f"cannot write the mask: {type(err).__name__}: {err}", secrets)
                report_failure(error, err, str(relpath), secrets)
        rows.append(
            metadata_row(
                source_uri=str(batch["source_uri"][i]),
                relpath=str(relpath),
                fingerprint=str(batch["fingerprint"][i]),
                mask_uri=mask_uri,
                error=error or None,
                width=width,
                height=height,
                counts=batch["class_pixel_count"][i],
                score_sums=batch["class_score_sum"][i],
                georef=georef,
                elapsed_ms=float(batch["elapsed_ms"][i]) + (time.perf_counter() - started) * 1000,
                class_names=settings.class_names,
                model_id=settings.model_id,
                ontology_hash=settings.ontology_hash,
                run_id=settings.run_id,
                tiling=str(batch["tiling"][i]),
                properties=str(batch["properties"][i]),
                notes=[storage.redact(note, secrets) for note in notes],
                permanent=permanent,
            )
            | ({INSTANCE_FIELD: instances} if settings.instances else {})
        )
    if polygons:
        fs, root = storage.filesystem_for(settings.scratch_uri, settings.storage_options)
        # Named by the batch's images, so a retried task rewrites the same part instead of adding one.
        name = hashlib.sha1("\0".join(str(r) for r in batch["relpath"]).encode()).hexdigest()[:24]
        write_geoparquet(polygons, fs, f"{root}/{VECTOR_PARTS}/part-{name}.parquet")
    table = pa.Table.from_pylist(rows, schema=stage_rows_schema(settings.instances))
    settings.count_rows(table)
    return table


def _instances(batch: Batch, i: int, labels: np.ndarray, settings: StageSettings) -> list[dict[str, Any]]:
    """A detector's own objects (the model stage's JSON rows), else the regions of the image's mask."""
    if QUERY_INSTANCES in batch:
        text = str(batch[QUERY_INSTANCES][i] or "")
        if text:
            found: list[dict[str, Any]] = json.loads(text)
            return found
    return region_instances(labels, settings.class_names, _scores(batch, i, len(settings.class_names)))


def _scores(batch: Batch, i: int, channels: int) -> np.ndarray:
    """The row's (1 + K, H, W) uint8 class scores as the labeler shipped them."""
    shape = (channels, int(batch["height"][i]), int(batch["width"][i]))
    return np.frombuffer(batch["scores"][i], dtype=np.uint8).reshape(shape)


def _georef(batch: Batch, i: int) -> GeoRef | None:
    crs = str(batch["crs"][i] or "")
    if not crs:
        return None
    transform = tuple(float(v) for v in batch["transform"][i])
    return GeoRef(crs, transform, int(batch["width"][i]), int(batch["height"][i]))  # type: ignore[arg-type]


def _write_mask(
    fs: Any, path: str, labels: np.ndarray, georef: GeoRef | None, palette: list[int], class_names: list[str]
) -> None:
    """A Cloud Optimized GeoTIFF with palette and class names for georeferenced rasters; a PNG otherwise."""
    if path.endswith(".tif") and georef is not None:
        height, width = labels.shape
        blocks = [(Window(0, 0, width, height), labels)]
        rasters.write_geotiff_mask(fs, path, georef, blocks, palette, class_names=class_names)
    else:
        storage.write_bytes_atomic(fs, path, encode_png_mask(labels, palette))


def _park_window(batch: Batch, i: int, settings: StageSettings, error: str) -> None:
    fs, root = storage.filesystem_for(settings.scratch_uri, settings.storage_options)
    scene_dir = f"{root}/scenes/{scene_key(str(batch['relpath'][i]))}"
    window = Window(*(int(v) for v in batch["window"][i]))
    if error:
        write_window_error(fs, scene_dir, window, error)
        return
    scores = _scores(batch, i, len(settings.class_names))
    nodata = unpack_nodata(batch["nodata"][i], window.height, window.width)
    write_window_result(fs, scene_dir, window, scores, nodata, float(batch["elapsed_ms"][i]))
