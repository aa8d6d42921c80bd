"""The CPU stages of a labeling run, as plain functions over batches of rows.

A row is one unit of work: a whole image, or one window of a large scene (`textseg.sources`). It starts
as the listing made it (`work_rows`), becomes one row per piece with model-size pixels in
`read_and_decode`, gains full-resolution labels (or, for a window, quantized class scores) in the model
stage (`textseg.labeler`), and in `encode_and_write` becomes a metadata row (a window's scores go to the
scratch area instead; `textseg.scenes` assembles its scene). Batches are Ray Data's numpy format (dict of
column -> array), so the Ray plan (`runner_ray`) and the in-process runner (`runner_local`) call the very
same functions.

Per-image problems never raise: a row whose `error` is non-empty is carried through every stage untouched
and lands as an `error` row, so every listed image is accounted for exactly once.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from textseg import geo, storage
from textseg.decoding import ImageDecodeError
from textseg.geo import GeoRef
from textseg.listing import ImageRef, mask_relpath
from textseg.masks import encode_png_mask
from textseg.metadata import METADATA_SCHEMA, STATUS_ERROR, STATUS_OK, class_statistics
from textseg.models.input_spec import InputSpec
from textseg.scenes import VECTOR_PARTS, SceneManifest, scene_key, write_window_error, write_window_result
from textseg.sources import Piece, WindowPlan, open_source, resized
from textseg.vectors import VectorSettings, polygons_from_labels, write_geoparquet
from textseg.windows import Window

Batch = dict[str, np.ndarray]

# Columns every row has after `read_and_decode` besides the listing's, so batches always stack.
NO_TRANSFORM = (0.0,) * 6


@dataclass(frozen=True)
class DecodeSettings:
    storage_options: Mapping[str, Any]
    input_spec: InputSpec
    max_pixels: int
    window_plan: WindowPlan
    scratch_uri: str  # DEST/_work/<run_id>: where scene manifests go


@dataclass(frozen=True)
class WriteSettings:
    dest: str
    storage_options: Mapping[str, Any]
    palette: list[int]
    class_names: list[str]
    model_id: str
    ontology_hash: str
    run_id: str
    scratch_uri: str
    vectors: VectorSettings | None  # None: no polygons


def work_rows(refs: Iterable[ImageRef], problems: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Listed images -> rows for the plan. `problems` maps a relpath to a reason known before reading
    (a mask-name collision, say); such rows go straight to the metadata as errors."""
    problems = problems or {}
    return [
        {
            "source_uri": ref.uri,
            "relpath": ref.relpath,
            "mask_relpath": mask_relpath(ref.relpath) if not ref.problem else "",
            "fingerprint": ref.fingerprint,
            "error": problems.get(ref.relpath) or ref.problem or "",
            "elapsed_ms": 0.0,
        }
        for ref in refs
    ]


def read_and_decode(batch: Batch, settings: DecodeSettings) -> Batch:
    """Read and decode each image as a viewer shows it; emit one row per piece (the whole image, or each
    window of a large scene) with `pixels` (h, w, 3) uint8 at the model's input size.

    Adds `width`/`height` (the piece's full-resolution size), `nodata` (packed bits of the piece's fully
    transparent or no-data pixels, empty when none), `window` (x0, y0, width, height in the image),
    `windowed` (the piece is one window of a scene), and `crs`/`transform` (the image's georeference,
    "" when none). A scene's windows are emitted only once all were read; any failure makes the image a
    single error row.
    """
    out: dict[str, list[Any]] = collections.defaultdict(list)
    secrets = storage.secret_values(settings.storage_options)
    for i in range(len(batch["relpath"])):
        row = {key: batch[key][i] for key in ("source_uri", "relpath", "mask_relpath", "fingerprint")}
        error = str(batch["error"][i] or "")
        started = time.perf_counter()
        pieces: list[Piece] = []
        georef, windowed = None, False
        if not error:
            try:
                fs, path = storage.filesystem_for(str(row["source_uri"]), settings.storage_options)
                source, found = open_source(
                    fs, path, str(row["relpath"]), settings.window_plan, settings.max_pixels
                )
                pieces = [resized(piece, settings.input_spec) for piece in found]
                georef, windowed = source.georef, source.windows is not None
                row["mask_relpath"] = str(row["mask_relpath"]).removesuffix(".png") + source.mask_suffix
            except ImageDecodeError as err:
                error = str(err)
            except Exception as err:  # noqa: BLE001 - any read failure becomes this image's error row
                error = storage.redact(describe_read_error(err), secrets)
        elapsed = float(batch["elapsed_ms"][i]) + (time.perf_counter() - started) * 1000
        if error or not pieces:
            _emit(
                out,
                row,
                None,
                settings.input_spec,
                georef=None,
                windowed=False,
                error=error or "the image has no pixels",
                elapsed_ms=elapsed,
            )
            continue
        if windowed:
            _write_manifest(row, pieces, georef, settings, elapsed)
        for piece in pieces:
            _emit(
                out,
                row,
                piece,
                settings.input_spec,
                georef=georef,
                windowed=windowed,
                error="",
                elapsed_ms=elapsed / len(pieces),
            )
    return _to_batch(out)


def _emit(
    out: dict[str, list[Any]],
    row: Mapping[str, Any],
    piece: Piece | None,
    spec: InputSpec,
    *,
    georef: GeoRef | None,
    windowed: bool,
    error: str,
    elapsed_ms: float,
) -> None:
    window = piece.window if piece is not None else None
    for key, value in row.items():
        out[key].append(value)
    out["pixels"].append(piece.pixels if piece is not None else np.zeros((*spec.size, 3), dtype=np.uint8))
    out["width"].append(window.width if window else 0)
    out["height"].append(window.height if window else 0)
    out["window"].append((window.x0, window.y0, window.width, window.height) if window else (0, 0, 0, 0))
    out["windowed"].append(windowed)
    has_nodata = piece is not None and piece.nodata is not None
    out["nodata"].append(np.packbits(piece.nodata.ravel()).tobytes() if has_nodata else b"")  # type: ignore[union-attr]
    out["crs"].append(georef.crs if georef else "")
    out["transform"].append(georef.transform if georef else NO_TRANSFORM)
    out["error"].append(error)
    out["elapsed_ms"].append(elapsed_ms)


def _to_batch(out: Mapping[str, list[Any]]) -> Batch:
    batch: Batch = {}
    for key, values in out.items():
        if key in ("pixels",):
            batch[key] = np.stack(values)
        elif key in ("width", "height"):
            batch[key] = np.array(values, dtype=np.int32)
        elif key == "window":
            batch[key] = np.array(values, dtype=np.int32).reshape(-1, 4)
        elif key == "transform":
            batch[key] = np.array(values, dtype=np.float64).reshape(-1, 6)
        elif key == "windowed":
            batch[key] = np.array(values, dtype=bool)
        elif key == "elapsed_ms":
            batch[key] = np.array(values, dtype=np.float64)
        else:
            array = np.empty(len(values), dtype=object)
            array[:] = values
            batch[key] = array
    return batch


def _write_manifest(
    row: Mapping[str, Any],
    pieces: Sequence[Piece],
    georef: GeoRef | None,
    settings: DecodeSettings,
    elapsed_ms: float,
) -> None:
    fs, root = storage.filesystem_for(settings.scratch_uri, settings.storage_options)
    scene_width = max(p.window.x1 for p in pieces)
    scene_height = max(p.window.y1 for p in pieces)
    manifest = SceneManifest(
        source_uri=str(row["source_uri"]),
        relpath=str(row["relpath"]),
        mask_relpath=str(row["mask_relpath"]),
        fingerprint=str(row["fingerprint"]),
        width=scene_width,
        height=scene_height,
        overlap=_overlap(pieces) if len(pieces) > 1 else 0,
        windows=[(p.window.x0, p.window.y0, p.window.width, p.window.height) for p in pieces],
        georef=georef,
        decode_ms=elapsed_ms,
    )
    directory = f"{root}/scenes/{scene_key(manifest.relpath)}"
    storage.write_bytes_atomic(fs, f"{directory}/scene.json", manifest.to_json())


def _overlap(pieces: Sequence[Piece]) -> int:
    """The tiling's nominal overlap: tile size minus the stride between the first two windows of a row or
    column (the last window of an axis may overlap more; blending normalizes that)."""
    first = pieces[0].window
    xs = sorted({p.window.x0 for p in pieces})
    ys = sorted({p.window.y0 for p in pieces})
    strides = [b - a for axis in (xs, ys) for a, b in zip(axis, axis[1:], strict=False)]
    return max(0, min(first.width, first.height) - min(strides)) if strides else 0


def describe_read_error(err: BaseException) -> str:
    """The one place a failed read of a source object becomes a reason string."""
    if isinstance(err, FileNotFoundError):
        return "source object not found (deleted or renamed after listing)"
    if isinstance(err, PermissionError):
        return "access denied reading the source object"
    if isinstance(err, MemoryError):
        return "out of memory decoding the image"
    if isinstance(err, geo.MissingGeoDependency):
        return str(err)
    return f"cannot read the source object: {type(err).__name__}: {err}"


def unpack_nodata(packed: bytes, height: int, width: int) -> np.ndarray | None:
    """The inverse of the packing in `read_and_decode`: (H, W) bool, or None when nothing is no-data."""
    if not packed:
        return None
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)


def encode_and_write(batch: Batch, settings: WriteSettings) -> pa.Table:
    """Whole images: encode the labels (palette PNG, or a GeoTIFF for georeferenced rasters), write the
    mask atomically under DEST/masks/ and return a metadata row. Windows: park the quantized scores in the
    scratch area for `textseg.scenes` and return no row (the scene gets its one row when assembled)."""
    secrets = storage.secret_values(settings.storage_options)
    dest_fs, dest_root = storage.filesystem_for(settings.dest, settings.storage_options)
    rows: list[dict[str, Any]] = []
    polygons: list[dict[str, Any]] = []
    for i, relpath in enumerate(batch["relpath"]):
        started = time.perf_counter()
        error = str(batch["error"][i] or "")
        width, height = int(batch["width"][i]), int(batch["height"][i])
        georef = _georef(batch, i)
        if batch["windowed"][i]:
            _park_window(batch, i, settings, error)
            continue
        mask_uri = None
        if not error:
            target = f"masks/{batch['mask_relpath'][i]}"
            try:
                labels = np.frombuffer(batch["labels"][i], dtype=np.uint8).reshape(height, width)
                _write_mask(dest_fs, storage.join_uri(dest_root, target), labels, georef, settings.palette)
                mask_uri = storage.join_uri(settings.dest, target)
                if settings.vectors is not None and georef is not None:
                    scores = _scores(batch, i, len(settings.class_names))
                    polygons += polygons_from_labels(
                        labels, georef, settings.class_names, scores, str(relpath), settings.vectors
                    )
            except Exception as err:  # noqa: BLE001 - a failed write is this image's error row
                error = storage.redact(f"cannot write the mask: {type(err).__name__}: {err}", secrets)
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
            )
        )
    if polygons:
        fs, root = storage.filesystem_for(settings.scratch_uri, settings.storage_options)
        # Named by the batch's images, so a retried task rewrites the same part instead of adding one.
        name = hashlib.sha1("\0".join(str(r) for r in batch["relpath"]).encode()).hexdigest()[:24]
        write_geoparquet(polygons, fs, f"{root}/{VECTOR_PARTS}/part-{name}.parquet")
    return pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)


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


def _write_mask(fs: Any, path: str, labels: np.ndarray, georef: GeoRef | None, palette: list[int]) -> None:
    if path.endswith(".tif") and georef is not None:
        height, width = labels.shape
        geo.write_geotiff_mask(fs, path, georef, [(Window(0, 0, width, height), labels)], palette)
    else:
        storage.write_bytes_atomic(fs, path, encode_png_mask(labels, palette))


def _park_window(batch: Batch, i: int, settings: WriteSettings, error: str) -> None:
    fs, root = storage.filesystem_for(settings.scratch_uri, settings.storage_options)
    scene_dir = f"{root}/scenes/{scene_key(str(batch['relpath'][i]))}"
    window = Window(*(int(v) for v in batch["window"][i]))
    if error:
        write_window_error(fs, scene_dir, window, error)
        return
    scores = _scores(batch, i, len(settings.class_names))
    nodata = unpack_nodata(batch["nodata"][i], window.height, window.width)
    write_window_result(fs, scene_dir, window, scores, nodata, float(batch["elapsed_ms"][i]))


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
) -> dict[str, Any]:
    """The one place a metadata row (METADATA_SCHEMA) is shaped, for whole images and assembled scenes."""
    ok = not error
    fractions, means = class_statistics(list(counts), list(score_sums)) if ok else (None, None)
    bounds = georef.bounds if ok and georef is not None else None
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
        "bounds_wgs84": list(georef.bounds_wgs84) if bounds is not None and georef is not None else None,
    }
