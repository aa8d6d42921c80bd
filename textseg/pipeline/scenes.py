"""Windows of a large scene -> one mask: the scratch layout and the assembly of a scene.

The windows of a scene are scored independently by the model actors (as uint8-quantized class scores,
on an H100) and parked under `DEST/_work/<run_id>/scenes/<key>/` by the write tasks, next to the scene's
manifest, which the decode task wrote after it had read every window. Once the streaming pass is done,
one assembly task per scene blends the windows block by block (`textseg.image.windows.blend`, feathered: no
seams), turns the blended scores into labels (`textseg.labels.postprocess`, the same rule as whole images),
writes the mask (a tiled GeoTIFF for georeferenced rasters, streamed block by block; a PNG otherwise) and
returns the scene's one metadata row. Memory is bounded by a block plus the windows overlapping it.

A window that failed leaves an `.error` file instead of scores; its scene then becomes one error row.
The assembly imports torch (for the shared label rule): it runs in its own CPU tasks, not the decode ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from textseg import storage
from textseg.image import rasters
from textseg.image.rasters import GeoRef
from textseg.image.windows import Window, blend, grid_windows, quantize_scores
from textseg.labels.scene_instances import SceneRegions
from textseg.labels.vector_merge import VECTOR_PARTS
from textseg.labels.vectors import NO_POLYGONS, image_polygons, write_geoparquet
from textseg.outputs.instances import INSTANCE_FIELD
from textseg.outputs.masks import encode_png_mask
from textseg.outputs.metadata import metadata_row, stage_rows_schema
from textseg.pipeline.batches import report_failure
from textseg.pipeline.settings import StageSettings

MANIFEST = "scene.json"
BLOCK_SIZE = 512  # output blocks: the GeoTIFF mask's internal tiles


def scene_key(relpath: str) -> str:
    """A short, storage-safe folder name per scene (relpaths may hold spaces, unicode, deep folders)."""
    return hashlib.sha1(relpath.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class SceneManifest:
    source_uri: str
    relpath: str
    mask_relpath: str
    fingerprint: str
    width: int
    height: int
    overlap: int
    windows: list[tuple[int, int, int, int]]  # (x0, y0, width, height)
    georef: GeoRef | None
    decode_ms: float
    tiling: str = ""
    properties: str = ""

    def window_objects(self) -> list[Window]:
        return [Window(*w) for w in self.windows]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SceneManifest:
        values = json.loads(data)
        georef = values.pop("georef")
        windows = [tuple(w) for w in values.pop("windows")]
        return cls(**values, windows=windows, georef=GeoRef(**georef) if georef else None)


def window_result_path(scene_dir: str, window: Window) -> str:
    return f"{scene_dir}/{window.x0}_{window.y0}.npz"


def write_window_result(
    fs: fsspec.AbstractFileSystem,
    scene_dir: str,
    window: Window,
    scores: np.ndarray,
    nodata: np.ndarray | None,
    elapsed_ms: float,
) -> None:
    """scores: (1 + K, h, w) uint8 quantized class scores of one window (background first)."""
    buffer = io.BytesIO()
    nodata_array = np.zeros((0, 0), dtype=bool) if nodata is None else nodata
    np.savez(buffer, scores=scores, nodata=nodata_array, elapsed_ms=np.float64(elapsed_ms))
    storage.write_bytes_atomic(fs, window_result_path(scene_dir, window), buffer.getvalue())


def write_window_error(fs: fsspec.AbstractFileSystem, scene_dir: str, window: Window, reason: str) -> None:
    path = window_result_path(scene_dir, window).removesuffix(".npz") + ".error"
    storage.write_bytes_atomic(fs, path, reason.encode())


def manifest_uris(settings: StageSettings) -> list[str]:
    """The scenes this run windowed (their manifests), found in the scratch area."""
    fs, root = storage.filesystem_for(settings.scratch_uri, settings.storage_options)
    return [storage.uri_for(fs, p) for p in storage.glob(fs, f"{root}/scenes/*/{MANIFEST}")]


def assemble_batch(batch: dict[str, np.ndarray], settings: StageSettings) -> pa.Table:
    """Ray/in-process stage: manifest URIs (column `manifest_uri`) -> one metadata row per scene (with
    its instances beside it under --instances)."""
    table = pa.Table.from_pylist(
        [assemble_scene(str(uri), settings) for uri in batch["manifest_uri"]],
        schema=stage_rows_schema(settings.instances),
    )
    settings.count_rows(table)
    return table


def assemble_scene(manifest_uri: str, settings: StageSettings) -> dict[str, Any]:
    """Blend one scene's windows, write its mask, and return its metadata row (`stage_rows_schema`).

    Its instances (--instances) are the connected regions of the blended label map, whatever the backend:
    a region cut by window borders is one instance (`SceneRegions`). A detector's queries (SAM 3's) belong
    to one window each, so a scene's objects are its regions, as for the semantic backends."""
    started = time.perf_counter()
    fs, manifest_path = storage.filesystem_for(manifest_uri, settings.storage_options)
    manifest = SceneManifest.from_json(storage.read_bytes(fs, manifest_path))
    scene_dir = manifest_path.rsplit("/", 1)[0]
    secrets = settings.secrets
    error = _first_window_error(fs, scene_dir, manifest.window_objects())
    blender = _SceneBlender(fs, scene_dir, manifest, settings)
    mask_uri = None
    found: list[dict[str, Any]] = []  # its instances (--instances): none for an error row
    if error is None:
        try:
            _write_mask(blender.blocks(), manifest, settings)
            mask_uri = storage.join_uri(settings.dest, f"masks/{manifest.mask_relpath}")
            if blender.regions is not None:
                found = blender.regions.instances()
            if blender.polygons:
                scratch_fs, scratch_root = storage.filesystem_for(
                    settings.scratch_uri, settings.storage_options
                )
                part = f"{scratch_root}/{VECTOR_PARTS}/scene-{scene_key(manifest.relpath)}.parquet"
                write_geoparquet(blender.polygons, scratch_fs, part)
        except Exception as err:  # noqa: BLE001 - a failed assembly is this scene's error row
            error = storage.redact(f"cannot assemble the scene's mask: {type(err).__name__}: {err}", secrets)
            report_failure(error, err, manifest.relpath, secrets)
            found = []
    elapsed = manifest.decode_ms + blender.model_ms + (time.perf_counter() - started) * 1000
    instances = {INSTANCE_FIELD: found} if settings.instances else {}
    return instances | metadata_row(
        source_uri=manifest.source_uri,
        relpath=manifest.relpath,
        fingerprint=manifest.fingerprint,
        mask_uri=mask_uri,
        error=error,
        width=manifest.width,
        height=manifest.height,
        counts=blender.counts,
        score_sums=blender.score_sums,
        georef=manifest.georef,
        elapsed_ms=elapsed,
        class_names=settings.class_names,
        model_id=settings.model_id,
        ontology_hash=settings.ontology_hash,
        run_id=settings.run_id,
        tiling=manifest.tiling,
        properties=manifest.properties,
        notes=[storage.redact(note, secrets) for note in blender.notes],
    )


def _first_window_error(fs: fsspec.AbstractFileSystem, scene_dir: str, windows: list[Window]) -> str | None:
    for window in windows:
        path = window_result_path(scene_dir, window)
        if storage.exists(fs, path.removesuffix(".npz") + ".error"):
            reason = storage.read_bytes(fs, path.removesuffix(".npz") + ".error").decode()
            return f"window at x={window.x0}, y={window.y0}: {reason}"
        if not storage.exists(fs, path):
            return f"window at x={window.x0}, y={window.y0} has no result (its task was lost)"
    return None


class _SceneBlender:
    """Blends a scene's windows into labeled blocks, row-major, keeping only the windows still needed.

    After `blocks()` is exhausted, `counts`/`score_sums` hold the scene's per-class pixel counts and score
    sums, and `model_ms` the model time its windows took (stored with each window's scores).
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        scene_dir: str,
        manifest: SceneManifest,
        settings: StageSettings,
    ):
        self.fs, self.scene_dir, self.manifest, self.settings = fs, scene_dir, manifest, settings
        self.windows = manifest.window_objects()
        self.loaded: dict[Window, tuple[np.ndarray, np.ndarray | None]] = {}
        self.counts = [0] * len(settings.class_names)
        self.score_sums = [0.0] * len(settings.class_names)
        self.model_ms = 0.0
        self.polygons: list[dict[str, Any]] = []
        self.notes: list[str] = []  # what the scene's ok row lacks, and why (`image_polygons`)
        self.regions: SceneRegions | None = None  # the scene's instances, under --instances
        if settings.instances:
            self.regions = SceneRegions(manifest.width, manifest.height, settings.class_names)

    def blocks(self) -> Iterator[tuple[Window, np.ndarray]]:
        """(block, labels (h, w) uint8) for every BLOCK_SIZE block of the scene."""
        import torch

        from textseg.labels.postprocess import ClassGrouping, labels_from_scores

        thresholds = self.settings.thresholds
        grouping = ClassGrouping(tuple(range(1, len(thresholds) + 1)), thresholds)
        width, height = self.manifest.width, self.manifest.height
        for block in grid_windows(width, height, BLOCK_SIZE):
            for window in [w for w in self.loaded if w.y1 <= block.y0]:
                del self.loaded[window]  # blocks are row-major: windows above are done
            pieces = [(w, self._load(w)) for w in self.windows if block.intersection(w) is not None]
            scores = blend(block, [(w, s) for w, (s, _) in pieces], width, height, self.manifest.overlap)
            nodata = np.zeros(block.shape, dtype=bool)
            for window, (_, window_nodata) in pieces:
                common = block.intersection(window)
                if window_nodata is not None and common is not None:
                    nodata[common.relative_to(block).slices] |= window_nodata[
                        common.relative_to(window).slices
                    ]
            result = labels_from_scores(
                torch.from_numpy(scores),
                grouping,
                self.settings.score_kind,
                torch.from_numpy(nodata) if nodata.any() else None,
            )
            labels = result.labels.numpy()
            quantized = quantize_scores(scores)
            if self.regions is not None:
                self.regions.add(block, labels, quantized)
            georef = self.manifest.georef
            if self.settings.vectors is not None and georef is not None and not self._polygons_failed:
                self.polygons += image_polygons(
                    labels,
                    georef.window_georef(block),
                    self.settings.class_names,
                    quantized,
                    self.manifest.relpath,
                    self.settings.vectors,
                    self.notes,
                )
                if self._polygons_failed:
                    self.polygons = []  # all of the scene's polygons or none, never a scene with holes
            self.counts = [a + b for a, b in zip(self.counts, result.class_pixel_count, strict=True)]
            self.score_sums = [a + b for a, b in zip(self.score_sums, result.class_score_sum, strict=True)]
            yield block, labels

    @property
    def _polygons_failed(self) -> bool:
        return any(note.startswith(NO_POLYGONS) for note in self.notes)

    def _load(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        if window not in self.loaded:
            data = storage.read_bytes(self.fs, window_result_path(self.scene_dir, window))
            with np.load(io.BytesIO(data), allow_pickle=False) as result:
                nodata = result["nodata"] if result["nodata"].size else None
                self.loaded[window] = (result["scores"], nodata)
                self.model_ms += float(result["elapsed_ms"])
        return self.loaded[window]


def _write_mask(
    blocks: Iterator[tuple[Window, np.ndarray]], manifest: SceneManifest, settings: StageSettings
) -> None:
    """A Cloud Optimized GeoTIFF streamed block by block (palette and class names inside) for
    georeferenced rasters; a PNG otherwise."""
    fs, root = storage.filesystem_for(settings.dest, settings.storage_options)
    path = storage.join_uri(root, f"masks/{manifest.mask_relpath}")
    if manifest.mask_relpath.endswith(".tif") and manifest.georef is not None:
        rasters.write_geotiff_mask(
            fs,
            path,
            manifest.georef,
            blocks,
            settings.palette,
            block_size=BLOCK_SIZE,
            class_names=settings.class_names,
        )
        return
    labels = np.empty((manifest.height, manifest.width), dtype=np.uint8)
    for block, block_labels in blocks:
        labels[block.slices] = block_labels
    storage.write_bytes_atomic(fs, path, encode_png_mask(labels, settings.palette))
