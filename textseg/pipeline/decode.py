"""The decode stage (CPU tasks): listed images -> model-size pixels, one row per piece.

A row arrives as the listing made it (`textseg.source.listing.work_row`) and leaves as one row per piece:
the whole image, or each window of a large scene (`textseg.image.pieces`), with the pixels resized to the
model's input. Per-image problems become the row's `error` here; the row is still emitted, so the model
and write stages hand it on to its metadata row. No torch: decode tasks must start fast.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from textseg import storage
from textseg.image import rasters
from textseg.image.decoding import ImageDecodeError
from textseg.image.pieces import Piece, open_source, resized
from textseg.image.rasters import GeoRef
from textseg.models.input_spec import InputSpec
from textseg.pipeline.batches import Batch, is_permanent, isolate, report_failure, to_batch
from textseg.pipeline.scenes import SceneManifest, scene_key
from textseg.pipeline.settings import StageSettings

# Columns every row has after decoding besides the listing's, so batches of any mix of rows stack.
NO_TRANSFORM = (0.0,) * 6
# The listing's columns that every piece of an image carries on to its metadata row.
_PASSED_ON = ("source_uri", "relpath", "mask_relpath", "fingerprint", "properties")


def decode_stage(batch: Batch, settings: StageSettings) -> Batch:
    """The decode stage as the plans call it: `read_and_decode`, isolated per image."""
    return isolate(
        lambda b: read_and_decode(b, settings), batch, "decoding", settings.storage_options, settings.crashes
    )


def read_and_decode(batch: Batch, settings: StageSettings) -> Batch:
    """Read and decode each image as a viewer shows it; emit one row per piece (the whole image, or each
    window of a large scene) with `pixels` (h, w, 3) uint8 at the model's input size.

    Adds `width`/`height` (the piece's full-resolution size), `nodata` (packed bits of the piece's fully
    transparent or no-data pixels, empty when none), `window` (x0, y0, width, height in the image),
    `windowed` (the piece is one window of a scene), and `crs`/`transform` (the image's georeference,
    "" when none). A scene's windows are emitted only once all were read; any failure makes the image a
    single error row.
    """
    out: dict[str, list[Any]] = collections.defaultdict(list)
    secrets = settings.secrets
    for i in range(len(batch["relpath"])):
        row = {key: batch[key][i] for key in _PASSED_ON}
        error = str(batch["error"][i] or "")
        permanent = bool(error) and is_permanent(batch, i)  # the listing's problem, or an earlier stage's
        started = time.perf_counter()
        pieces: list[Piece] = []
        georef, windowed, tiling = None, False, ""
        if not error:
            try:
                fs, path = storage.filesystem_for(str(row["source_uri"]), settings.storage_options)
                source, found = open_source(
                    fs, path, str(row["relpath"]), settings.window_plan, settings.max_pixels
                )
                pieces = [resized(piece, settings.input_spec) for piece in found]
                georef, windowed = source.georef, source.windows is not None
                tiling = source.tiling.describe
                row["mask_relpath"] = str(row["mask_relpath"]).removesuffix(".png") + source.mask_suffix
            except ImageDecodeError as err:
                error, permanent = str(err), err.permanent
            except Exception as err:  # noqa: BLE001 - any read failure becomes this image's error row
                error = storage.redact(describe_read_error(err), secrets)
                report_failure(error, err, str(row["relpath"]), secrets)
        elapsed = float(batch["elapsed_ms"][i]) + (time.perf_counter() - started) * 1000
        if error or not pieces:
            _emit(
                out,
                row,
                None,
                settings.input_spec,
                georef=None,
                windowed=False,
                tiling=tiling,
                error=error or "the image has no pixels",
                permanent=permanent,
                elapsed_ms=elapsed,
            )
            continue
        if windowed:
            _write_manifest(row, pieces, georef, settings, elapsed, tiling)
        for piece in pieces:
            _emit(
                out,
                row,
                piece,
                settings.input_spec,
                georef=georef,
                windowed=windowed,
                tiling=tiling,
                error="",
                permanent=False,
                elapsed_ms=elapsed / len(pieces),
            )
    return to_batch(out)


def _emit(
    out: dict[str, list[Any]],
    row: Mapping[str, Any],
    piece: Piece | None,
    spec: InputSpec,
    *,
    georef: GeoRef | None,
    windowed: bool,
    tiling: str,
    error: str,
    permanent: bool,
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
    out["tiling"].append(tiling)
    out["error"].append(error)
    out["permanent"].append(permanent)
    out["elapsed_ms"].append(elapsed_ms)


def _write_manifest(
    row: Mapping[str, Any],
    pieces: Sequence[Piece],
    georef: GeoRef | None,
    settings: StageSettings,
    elapsed_ms: float,
    tiling: str,
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
        tiling=tiling,
        properties=str(row["properties"]),
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
    if isinstance(err, rasters.MissingGeoDependency):
        return str(err)
    return f"cannot read the source object: {type(err).__name__}: {err}"
