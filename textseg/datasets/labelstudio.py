"""`textseg import-labelstudio EXPORT.json DEST2`: masks corrected in Label Studio, written back in
textseg's layout so that `textseg train DEST2` learns from them (and `textseg export DEST2` reads them).

EXPORT.json is what Label Studio's Export -> JSON writes for a project of tasks made by
`textseg export --format labelstudio` (`textseg.datasets.formats.labelstudio`): a list of tasks, each with
the `data` it was imported with and its `annotations`. A task's latest submitted annotation (skipped ones
are `was_cancelled`) is the image's corrected mask: its brush regions painted in order, a later region over
an earlier one, "no data" as 255 and the rest background. A task nobody submitted is left out: its labels
are DEST's, not a person's.

DEST2 gets what a `textseg label` run writes, as one run (`new_run_id`): masks/<relpath without
extension>.png (palette PNGs in the ontology's colours), metadata/<run_id>/part-*.parquet rows
(METADATA_SCHEMA: the task's source URI and relpath, model_id MODEL_ID, score 1 for every class), the
state merged, and runs/<run_id>.json with the ontology. An annotation that cannot become a mask (a label
outside the ontology, a region of another size) is an error row saying why; the other tasks still land.

The ontology is `--ontology FILE` (give the DEST's own to keep its class order and colours) or the labels
the annotations use, in the order they first appear (a first pass over the file). The file is read a
task at a time (`iter_tasks`): memory is one task and one mask, whatever the project's size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from textseg import storage
from textseg.config import parse_storage_options
from textseg.datasets.formats.labelstudio import NODATA_LABEL
from textseg.datasets.labelstudio_rle import decode_rle
from textseg.ontology import NODATA, Ontology, from_mapping, read_ontology
from textseg.outputs.masks import encode_png_mask
from textseg.outputs.metadata import (
    METADATA_SCHEMA,
    Tally,
    metadata_dir,
    metadata_row,
    new_run_id,
    summary_path,
    write_metadata_part,
)
from textseg.outputs.state import compact, pending_runs
from textseg.plan.summary import RunSummary, count_rows, decide_status, package_versions
from textseg.source.refs import mask_relpath

MODEL_ID = "labelstudio"  # the rows' model_id: a person's labels, reviewed in Label Studio
PART_ROWS = 10_000  # rows per metadata part: a few MB
READ_CHARS = 1 << 20  # how much of EXPORT.json is read at a time


def iter_tasks(export: str, storage_options: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The tasks of a Label Studio JSON export (a JSON list of objects), one at a time, read in pieces:
    a large project's export is GBs of RLE. Raises ValueError when the file is not such a list."""
    fs, path = storage.filesystem_for(export, storage_options)
    display = storage.redact_uri(export)
    with storage.call_with_retry(lambda: fs.open(path, "rb"), f"open '{display}'") as raw:
        yield from _JsonList(io.TextIOWrapper(raw, encoding="utf-8"), display)


class _JsonList:
    """The objects of a JSON list in a text stream, parsed one at a time (`json.JSONDecoder.raw_decode`
    on what has been read: the object and at most one more piece of the stream are in memory)."""

    def __init__(self, text: io.TextIOBase, display: str):
        self.text, self.display = text, display
        self.buffer, self.position, self.size = "", 0, READ_CHARS
        self.decoder = json.JSONDecoder()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._expect("[")
        if self._peek() == "]":
            return
        while True:
            task = self._value()
            if not isinstance(task, dict):
                raise ValueError(
                    f"{self.display} is not a Label Studio JSON export: it lists a {type(task).__name__}"
                )
            yield task
            if self._expect(",]") == "]":
                return

    def _read(self) -> bool:
        """Append the next piece of the stream, dropping what is parsed; False at its end."""
        chunk = self.text.read(self.size)
        self.buffer, self.position = self.buffer[self.position :] + chunk, 0
        return bool(chunk)

    def _peek(self) -> str:
        """The next character that is not whitespace ('' at the end of the stream), not consumed."""
        while True:
            while self.position < len(self.buffer) and self.buffer[self.position].isspace():
                self.position += 1
            if self.position < len(self.buffer):
                return self.buffer[self.position]
            if not self._read():
                return ""

    def _expect(self, allowed: str) -> str:
        char = self._peek()
        if not char or char not in allowed:
            found = repr(char) if char else "the end of the file"
            raise ValueError(
                f"{self.display} is not a Label Studio JSON export (a list of tasks): expected "
                f"{' or '.join(map(repr, allowed))}, found {found}"
            )
        self.position += 1
        return char

    def _value(self) -> Any:
        self._peek()
        while True:
            try:
                value, self.position = self.decoder.raw_decode(self.buffer, self.position)
                return value
            except json.JSONDecodeError as err:
                # Most likely the object goes on past what was read: read more, twice as much each time,
                # so that an object of any size is parsed a few times at most.
                self.size *= 2
                if not self._read():
                    raise ValueError(
                        f"{self.display} is not valid JSON (or ends inside a task): {err.msg}"
                    ) from None


def reviewed_annotation(task: Mapping[str, Any]) -> dict[str, Any] | None:
    """The task's latest submitted annotation (by update time, then its place in the list), or None when
    nobody submitted one. Label Studio keeps every annotator's; a skipped task's is `was_cancelled`."""
    submitted = [
        (str(a.get("updated_at") or a.get("created_at") or ""), i, a)
        for i, a in enumerate(task.get("annotations") or [])
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    return max(submitted, key=lambda entry: entry[:2])[2] if submitted else None


def _brush_results(annotation: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for result in annotation.get("result") or []:
        if isinstance(result, dict) and str(result.get("type", "")).lower() == "brushlabels":
            yield result


def _label_of(result: Mapping[str, Any]) -> str:
    names = (result.get("value") or {}).get("brushlabels") or []
    if len(names) != 1:
        raise ValueError(f"brush region {result.get('id')!r} has labels {names}: a pixel takes one class")
    return str(names[0])


def export_ontology(export: str, storage_options: Mapping[str, Any]) -> Ontology:
    """The classes the export's submitted annotations paint, in the order they first appear."""
    names: dict[str, None] = {}
    for task in iter_tasks(export, storage_options):
        for result in _brush_results(reviewed_annotation(task) or {}):
            for name in (result.get("value") or {}).get("brushlabels") or []:
                if name != NODATA_LABEL:
                    names[str(name)] = None
    if not names:
        raise ValueError(f"{storage.redact_uri(export)} holds no submitted brush annotation to import")
    return from_mapping({"classes": {name: {"prompts": [name]} for name in names}}, 0.5)


def corrected_mask(annotation: Mapping[str, Any], height: int, width: int, ontology: Ontology) -> np.ndarray:
    """An annotation's brush regions -> (H, W) uint8 class indices: painted in order (a later region
    over an earlier one), "no data" as 255, unpainted pixels background. Raises ValueError for a region
    that is not a class of `ontology`, not Label Studio's RLE, or of another size than the image."""
    index = {name: i for i, name in enumerate(ontology.class_names) if i} | {NODATA_LABEL: NODATA}
    labels = np.zeros((height, width), dtype=np.uint8)
    for result in _brush_results(annotation):
        name = _label_of(result)
        if name not in index:
            raise ValueError(
                f"label {name!r} is not a class of the ontology {ontology.class_names[1:]}: add it to "
                "--ontology, or leave --ontology out to take the export's labels"
            )
        value = result.get("value") or {}
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise ValueError(f"brush region {result.get('id')!r} is not in Label Studio's RLE format")
        size = (result.get("original_height"), result.get("original_width"))
        if size != (height, width):
            raise ValueError(
                f"brush region {result.get('id')!r} is {size[1]}x{size[0]}, the image {width}x{height}"
            )
        labels[decode_rle(value["rle"], height, width)] = index[name]
    return labels


def import_labelstudio(
    export: str,
    dest: str,
    storage_options: Mapping[str, Any] | None = None,
    ontology_file: str | None = None,
    progress: bool = False,
) -> tuple[RunSummary, int]:
    """Write the export's reviewed tasks to DEST as one run (module docstring); returns its summary and
    how many tasks were left out (not reviewed, or not made by `textseg export`)."""
    options = dict(storage_options or {})
    started, started_wall = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    fs, root = storage.filesystem_for(dest, options)
    dest = storage.uri_for(fs, root)  # absolute on local disk: mask_uri must not depend on the cwd
    storage.check_writable(fs, root)
    if ontology_file is not None:
        ontology = read_ontology(ontology_file, options, 0.5)
    else:
        ontology = export_ontology(export, options)
    run_id = new_run_id(started_wall)
    parts = _Parts(storage.join_uri(dest, metadata_dir(run_id)), options)
    importer = _TaskImport(fs, root, ontology, run_id)
    listed = left_out = 0
    bar = tqdm(desc="import-labelstudio", unit=" tasks", disable=not progress)
    for task in iter_tasks(export, options):
        listed += 1
        row = importer.row(task)
        if row is None:
            left_out += 1
        else:
            parts.add(row)
        bar.update()
    bar.close()
    parts.flush()
    compact(dest, options, pending_runs(dest, options))
    summary = RunSummary(
        run_id=run_id,
        config={
            "command": "import-labelstudio",
            "export": storage.redact_uri(export),
            "dest": dest,
            "ontology": ontology_file,
        },
        versions=package_versions(),
        model_id=MODEL_ID,
        ontology_hash=ontology.stable_hash(),
        class_names=ontology.class_names,
        started_at=started_wall.isoformat(),
        ontology=ontology.to_dict(),
        listed=listed,
        skipped=left_out,
    )
    count_rows(summary, parts.tally)
    summary.status = decide_status(summary, 0.0)
    summary.timings_s["total"] = round(time.perf_counter() - started, 3)
    summary.finished_at = dt.datetime.now(dt.timezone.utc).isoformat()
    storage.write_bytes_atomic(fs, storage.join_uri(root, summary_path(run_id)), summary.to_json().encode())
    return summary, left_out


class _TaskImport:
    """One task -> its corrected mask under DEST/masks/ and its metadata row."""

    def __init__(self, fs: Any, root: str, ontology: Ontology, run_id: str):
        self.fs, self.root, self.ontology, self.run_id = fs, root, ontology, run_id
        self.palette = ontology.palette()
        self.hash = ontology.stable_hash()

    def row(self, task: Mapping[str, Any]) -> dict[str, Any] | None:
        """The task's metadata row (an error row when its annotation cannot become a mask), or None for a
        task nobody submitted or one without the `data` textseg's export gives (relpath, source_uri)."""
        data = task.get("data") or {}
        annotation = reviewed_annotation(task)
        if annotation is None or not data.get("relpath") or not data.get("source_uri"):
            return None
        started = time.perf_counter()
        relpath = str(data["relpath"])
        fields: dict[str, Any] = {
            "source_uri": str(data["source_uri"]),
            "relpath": relpath,
            "fingerprint": str(data.get("source_fingerprint") or ""),
            "class_names": self.ontology.class_names,
            "model_id": MODEL_ID,
            "ontology_hash": self.hash,
            "run_id": self.run_id,
            "georef": None,
            "notes": f"Label Studio task {task.get('id')}, annotation {annotation.get('id')}",
        }
        try:
            height, width = _size(data)
            labels = corrected_mask(annotation, height, width, self.ontology)
            mask_path = storage.join_uri(self.root, f"masks/{mask_relpath(relpath)}")
            storage.write_bytes_atomic(self.fs, mask_path, encode_png_mask(labels, self.palette))
        except ValueError as err:
            return metadata_row(
                **fields,
                mask_uri=None,
                error=f"label studio: {err}",
                width=0,
                height=0,
                counts=[],
                score_sums=[],
                elapsed_ms=1000 * (time.perf_counter() - started),
                permanent=True,
            )
        counts = np.bincount(labels[labels != NODATA], minlength=len(self.ontology.class_names)).tolist()
        return metadata_row(
            **fields,
            mask_uri=storage.uri_for(self.fs, mask_path),
            error=None,
            width=width,
            height=height,
            counts=counts,
            score_sums=counts,  # a person's label: score 1 for every pixel of it
            elapsed_ms=1000 * (time.perf_counter() - started),
        )


def _size(data: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of the task's image, as `textseg export` records it in the task's data."""
    try:
        return int(data["height"]), int(data["width"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the task's data has no image width and height (data.width, data.height)") from None


class _Parts:
    """Metadata rows written as parts of PART_ROWS, tallied as they are written."""

    def __init__(self, metadata_uri: str, storage_options: Mapping[str, Any]):
        self.metadata_uri, self.storage_options = metadata_uri, storage_options
        self.rows: list[dict[str, Any]] = []
        self.written = 0
        self.tally = Tally()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=METADATA_SCHEMA)
        write_metadata_part(table, self.metadata_uri, self.storage_options, f"part-{self.written:06d}")
        self.tally.add(Tally.of(table))
        self.rows, self.written = [], self.written + 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "export", metavar="EXPORT.json", help="Label Studio's Export -> JSON file (path or URI)"
    )
    parser.add_argument("dest", metavar="DEST2", help="folder or URI to write the corrected masks under")
    parser.add_argument(
        "--ontology",
        metavar="FILE",
        help="the classes in mask-value order: the DEST's ontology YAML (default: the export's labels)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        metavar="KEY=VALUE",
        help="an fsspec option for EXPORT.json and DEST2 (repeat it), e.g. client_kwargs.endpoint_url=URL",
    )


def run(args: argparse.Namespace) -> int:
    summary, left_out = import_labelstudio(
        args.export,
        args.dest,
        parse_storage_options(args.storage_options),
        args.ontology,
        progress=not args.no_progress,
    )
    print(
        f"import {summary.run_id}: {summary.ok} corrected masks, {summary.error} failed, {left_out} tasks "
        f"left out (not submitted in Label Studio, or not made by `textseg export`)"
    )
    for category, count in summary.top_errors:
        print(f"  {count} x {summary.error_examples[category]}")
    print(f"run summary: {storage.join_uri(summary.config['dest'], summary_path(summary.run_id))}")
    return 0 if summary.error == 0 else 1
