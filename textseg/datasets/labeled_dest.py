"""A labeled DEST as exports, reports and calibration read it: its current labeled images, streamed.

An image's current labels are its latest attempt in DEST's state (`textseg.outputs.state`): an older
run's row for it describes a mask that a later run has since overwritten. So the images are read run by
run and metadata part by metadata part (a part holds a few thousand rows), and a part's rows are kept
where the state says that run's `ok` row is the image's latest. An image's instances live in the
instance part named as its metadata part (`textseg.outputs.instances`), so they are read with it.
Memory is one part and its instances, whatever DEST's size; the driver never holds DEST's relpaths.

`split_of` gives an image a split from its relpath alone: an export re-run on a grown DEST keeps every
image where it was.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textseg import storage
from textseg.image.decoding import decode_image
from textseg.ontology import Ontology, from_mapping
from textseg.outputs.instances import instances_dir
from textseg.outputs.masks import decode_mask
from textseg.outputs.metadata import STATUS_OK, metadata_dir, run_order, summary_path
from textseg.outputs.state import DoneIndex


class LabeledDestError(ValueError):
    """DEST cannot be read as a labeled DEST; the message says why."""


@dataclass(frozen=True)
class LabeledImage:
    """One labeled image: its metadata row (`METADATA_SCHEMA`, status ok, its latest attempt) and its
    instance rows (`INSTANCE_SCHEMA`, in their order), or None when its run wrote none."""

    row: dict[str, Any]
    instances: list[dict[str, Any]] | None

    @property
    def relpath(self) -> str:
        return str(self.row["relpath"])

    @property
    def run_id(self) -> str:
        return str(self.row["run_id"])

    @property
    def class_names(self) -> list[str]:
        """Background first: `class_names[i]` names mask value i."""
        return list(self.row["class_names"])


def run_ids(dest: str, storage_options: Mapping[str, Any]) -> list[str]:
    """The runs that wrote metadata under DEST, oldest first (run ids sort by start time)."""
    fs, root = storage.filesystem_for(dest, storage_options)
    return sorted(storage.names(fs, storage.join_uri(root, "metadata")), key=run_order)


def iter_labeled(
    dest: str,
    storage_options: Mapping[str, Any],
    run_id: str | None = None,
    instances: bool = False,
) -> Iterator[LabeledImage]:
    """DEST's current labeled images (of run `run_id` only, if given), part by part; with `instances`,
    each with its instance rows. Raises LabeledDestError when DEST has no finished run or no such run."""
    fs, root = storage.filesystem_for(dest, storage_options)
    index = DoneIndex.load(dest, storage_options)
    if not index.files:
        raise LabeledDestError(f"{storage.redact_uri(dest)} has no finished `textseg label` run to read")
    runs = run_ids(dest, storage_options)
    if run_id is not None:
        if run_id not in runs:
            raise LabeledDestError(f"{storage.redact_uri(dest)} has no run {run_id!r}; its runs: {runs}")
        runs = [run_id]
    for run in runs:
        parts = storage.glob(fs, storage.join_uri(root, f"{metadata_dir(run)}/part-*.parquet"))
        for part in sorted(parts):
            yield from _current_rows(fs, root, index, run, part, instances)


def _current_rows(
    fs: Any, root: str, index: DoneIndex, run: str, part: str, with_instances: bool
) -> Iterator[LabeledImage]:
    table = pq.read_table(storage.call_with_retry(lambda: fs.open(part, "rb"), f"open {part}"))
    table = table.filter(pc.equal(table["status"], STATUS_OK))
    if table.num_rows == 0:
        return
    latest = index.latest(table["relpath"].to_pylist(), ["relpath", "run_id", "status"])
    current = {
        relpath
        for relpath, latest_run, status in zip(
            latest["relpath"].to_pylist(),
            latest["run_id"].to_pylist(),
            latest["status"].to_pylist(),
            strict=True,
        )
        if latest_run == run and status == STATUS_OK
    }
    by_relpath: dict[str, list[dict[str, Any]]] | None = None
    if with_instances:
        by_relpath = _instances_of_part(fs, root, run, posixpath.basename(part))
    for row in sorted(table.to_pylist(), key=lambda r: r["relpath"]):
        if row["relpath"] in current:
            found = None if by_relpath is None else by_relpath.get(row["relpath"], [])
            yield LabeledImage(row, found)


def _instances_of_part(fs: Any, root: str, run: str, name: str) -> dict[str, list[dict[str, Any]]] | None:
    """The instance rows written beside metadata part `name`, by relpath; None when the run wrote none."""
    path = storage.join_uri(root, f"{instances_dir(run)}/{name}")
    if not storage.exists(fs, path):
        return None
    by_relpath: dict[str, list[dict[str, Any]]] = {}
    for row in pq.read_table(
        storage.call_with_retry(lambda: fs.open(path, "rb"), f"open {path}")
    ).to_pylist():
        by_relpath.setdefault(row["relpath"], []).append(row)
    for rows in by_relpath.values():
        rows.sort(key=lambda r: r["instance"])
    return by_relpath


def run_ontology(dest: str, run_id: str, storage_options: Mapping[str, Any]) -> Ontology:
    """The ontology run `run_id` labeled with (names, prompts, thresholds, colours), from its summary."""
    fs, root = storage.filesystem_for(dest, storage_options)
    try:
        summary = json.loads(storage.read_bytes(fs, storage.join_uri(root, summary_path(run_id))))
    except FileNotFoundError:
        raise LabeledDestError(f"run {run_id!r} of {storage.redact_uri(dest)} has no summary") from None
    if not summary.get("ontology"):
        names = summary.get("class_names", [])[1:]
        return from_mapping({"classes": {name: {"prompts": [name]} for name in names}}, 0.5)
    return from_mapping(summary["ontology"], 0.5)


def read_mask(uri: str, storage_options: Mapping[str, Any]) -> np.ndarray:
    """An image's mask (PNG or GeoTIFF) -> (H, W) uint8 class indices (255 no data)."""
    fs, path = storage.filesystem_for(uri, storage_options)
    return decode_mask(storage.read_bytes(fs, path))


def read_image(uri: str, storage_options: Mapping[str, Any]) -> np.ndarray:
    """A source image as `textseg label` saw it (one decode path: orientation, modes, bombs refused) ->
    (H, W, 3) uint8 RGB."""
    fs, path = storage.filesystem_for(uri, storage_options)
    return np.asarray(decode_image(storage.read_bytes(fs, path)).image)


def parse_split(text: str) -> dict[str, float]:
    """`train=0.9,val=0.1` -> {"train": 0.9, "val": 0.1}; fractions must be positive and sum to 1."""
    split: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, _, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not name or fraction <= 0 or name in split:
            raise ValueError(f"--split must read like train=0.9,val=0.1; got {text!r}")
        split[name] = fraction
    if not split or abs(sum(split.values()) - 1.0) > 1e-6:
        raise ValueError(f"--split fractions must add up to 1; got {text!r}")
    return split


def split_of(relpath: str, split: Mapping[str, float], seed: int = 0) -> str:
    """The split an image falls in: a hash of (seed, relpath) placed on the cumulative fractions, so it
    never depends on which other images DEST holds."""
    digest = hashlib.sha256(f"{seed}\0{relpath}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    total = 0.0
    names: Sequence[str] = list(split)
    for name in names:
        total += split[name]
        if point < total:
            return name
    return names[-1]
