"""DEST's state: one row per image (its latest attempt), sorted by relpath; the skip check reads it.

A night's skip check must cost O(images), not O(runs x images), so no run reads earlier runs' metadata.
Instead every finished run is merged (`compact`) into one table under DEST/state/:

    DEST/state/CURRENT.json                  the live version: its files and their relpath ranges
    DEST/state/view-<version>/part-*.parquet  the current view: METADATA_SCHEMA rows, one per relpath,
                                             sorted by relpath across and within files
    DEST/state/merged/<run_id>               markers: runs already in the view

The skip check (`DoneIndex.done_relpaths`) takes a listing batch, sorted by relpath, and reads only the
row groups whose relpath statistics overlap it, usually one or two per batch. Compaction splits a run's
rows by the view's file ranges, merges each touched range with its file (latest run wins), splits files
that grew past TARGET_FILE_ROWS, copies untouched files (a server-side copy on object stores), and then
switches CURRENT.json atomically. A compaction killed at any point leaves the previous version live and
its run unmarked, so the next run merges it again; merging the same rows twice changes nothing.
Rows without a relpath (a name that cannot become a mask path) are never skippable and stay out of it.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import posixpath
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textseg import storage
from textseg.outputs.metadata import METADATA_SCHEMA, STATUS_OK

log = logging.getLogger(__name__)

STATE_DIR = "state"
CURRENT = f"{STATE_DIR}/CURRENT.json"
MERGED_DIR = f"{STATE_DIR}/merged"
STAGING_DIR = f"{STATE_DIR}/staging"
# A view file holds at most this many images (~60-100 MB of rows): large enough that a 10 M-image DEST is
# ~10 files, small enough that one merge task holds a file in memory.
TARGET_FILE_ROWS = 1_000_000
# Row groups are what a skip check reads: ~16 k rows keeps a 10 k-image listing batch to one or two groups.
ROW_GROUP_ROWS = 16_384
# The columns the skip check reads.
DONE_KEY_COLUMNS = ("relpath", "source_fingerprint", "model_id", "ontology_hash", "status")

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


@dataclass(frozen=True)
class ViewFile:
    """One file of the view: its path relative to DEST and the relpath range it holds (inclusive)."""

    path: str
    first: str
    last: str
    rows: int


class DoneIndex:
    """The live view's file list, shipped to listing tasks (a few entries per 10 M images)."""

    def __init__(
        self, dest: str, files: Sequence[ViewFile], version: str | None, storage_options: Mapping[str, Any]
    ):
        self.dest = dest
        self.files = list(files)
        self.version = version
        self.storage_options = dict(storage_options)
        self._footers: dict[str, pq.ParquetFile] = {}  # open files of this process; dropped when pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_footers": {}}

    @classmethod
    def load(cls, dest: str, storage_options: Mapping[str, Any]) -> DoneIndex:
        fs, root = storage.filesystem_for(dest, storage_options)
        path = storage.join_uri(root, CURRENT)
        try:
            current = json.loads(storage.read_bytes(fs, path))
        except FileNotFoundError:
            return cls(dest, [], None, storage_options)
        files = [ViewFile(**f) for f in current["files"]]
        return cls(dest, files, current["version"], storage_options)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def done_relpaths(self, keys: Sequence[tuple[str, str]], model_id: str, ontology_hash: str) -> set[str]:
        """Of `keys` ((relpath, source_fingerprint) pairs), the relpaths whose latest attempt is an `ok`
        row with the same fingerprint, model and ontology: those a run skips."""
        keys = [k for k in keys if k[0]]
        if not keys or not self.files:
            return set()
        relpaths = sorted(k[0] for k in keys)
        first, last = relpaths[0], relpaths[-1]
        wanted = pa.table({"relpath": [k[0] for k in keys], "wanted_fingerprint": [k[1] for k in keys]})
        done: set[str] = set()
        for view_file in self.files:
            if view_file.last < first or view_file.first > last:
                continue
            table = self._read_range(view_file, first, last)
            if table.num_rows == 0:
                continue
            table = table.filter(
                pc.and_(
                    pc.equal(table["status"], STATUS_OK),
                    pc.and_(
                        pc.equal(table["model_id"], model_id), pc.equal(table["ontology_hash"], ontology_hash)
                    ),
                )
            )
            joined = table.join(wanted, "relpath", join_type="inner")
            same = joined.filter(pc.equal(joined["source_fingerprint"], joined["wanted_fingerprint"]))
            done.update(same["relpath"].to_pylist())
        return done

    def _read_range(self, view_file: ViewFile, first: str, last: str) -> pa.Table:
        """The rows of row groups whose relpath statistics overlap [first, last] (key columns only)."""
        parquet = self._footer(view_file)
        column = parquet.schema_arrow.get_field_index("relpath")
        groups = []
        for i in range(parquet.num_row_groups):
            stats = parquet.metadata.row_group(i).column(column).statistics
            if stats is None or not stats.has_min_max or not (stats.max < first or stats.min > last):
                groups.append(i)
        if not groups:
            return pa.table({c: pa.array([], pa.string()) for c in DONE_KEY_COLUMNS})
        return storage.call_with_retry(
            lambda: parquet.read_row_groups(groups, columns=list(DONE_KEY_COLUMNS)),
            f"read the state file '{view_file.path}'",
        )

    def _footer(self, view_file: ViewFile) -> pq.ParquetFile:
        if view_file.path not in self._footers:
            fs, root = storage.filesystem_for(self.dest, self.storage_options)
            path = storage.join_uri(root, view_file.path)
            # Kept open: each later batch reads just its row groups (range requests on object stores).
            handle = storage.call_with_retry(lambda: fs.open(path, "rb"), f"open the state file '{path}'")
            self._footers[view_file.path] = pq.ParquetFile(handle)
        return self._footers[view_file.path]


# ----------------------------------------------------------------------------------------------------------
# Compaction


def pending_runs(dest: str, storage_options: Mapping[str, Any]) -> list[str]:
    """Runs whose metadata is not merged into the view yet (killed runs, or a DEST from before the view
    existed), oldest first. Lists run names only: two listings of O(runs) names."""
    fs, root = storage.filesystem_for(dest, storage_options)
    with_metadata = storage.names(fs, storage.join_uri(root, "metadata"))
    merged = set(storage.names(fs, storage.join_uri(root, MERGED_DIR)))
    return sorted(r for r in with_metadata if r not in merged)


def compact(
    dest: str, storage_options: Mapping[str, Any], run_ids: Sequence[str], map_fn: MapFn = map
) -> int:
    """Merge these runs' metadata into the view and switch CURRENT.json to the result; returns the rows
    of the new view. `map_fn(fn, items)` runs the per-part and per-range steps (the Ray plan passes one
    that runs them as tasks); everything it is given is picklable and returns small values."""
    if not run_ids:
        return DoneIndex.load(dest, storage_options).rows
    fs, root = storage.filesystem_for(dest, storage_options)
    index = DoneIndex.load(dest, storage_options)
    version = f"{max(run_ids)}-{secrets.token_hex(3)}"
    parts = [
        storage.uri_for(fs, p)
        for run_id in run_ids
        for p in storage.glob(fs, storage.join_uri(root, f"metadata/{run_id}/*.parquet"))
    ]
    if not parts:  # runs that attempted nothing: the view stays as it is
        _mark_merged(fs, root, run_ids)
        return index.rows
    starts = [f.first for f in index.files]
    job = _Compaction(dest, dict(storage_options), version, starts)
    staged: dict[int, list[str]] = defaultdict(list)
    for pieces in map_fn(job.stage_part, parts):
        for range_index, path in pieces:
            staged[range_index].append(path)
    ranges = [
        (i, index.files[i] if index.files else None, sorted(staged.get(i, [])))
        for i in range(max(1, len(index.files)))
    ]
    results = list(map_fn(job.merge_range, ranges))
    files = sorted((f for result in results for f in result), key=lambda f: f.first)
    current = {"version": version, "view": f"{STATE_DIR}/view-{version}", "files": [asdict(f) for f in files]}
    storage.write_bytes_atomic(fs, storage.join_uri(root, CURRENT), json.dumps(current, indent=1).encode())
    _mark_merged(fs, root, run_ids)
    _remove_old_versions(fs, root, version)
    return sum(f.rows for f in files)


def _mark_merged(fs: fsspec.AbstractFileSystem, root: str, run_ids: Sequence[str]) -> None:
    for run_id in run_ids:
        storage.write_bytes_atomic(fs, storage.join_uri(root, f"{MERGED_DIR}/{run_id}"), b"")


@dataclass(frozen=True)
class _Compaction:
    """The two steps of a compaction, as picklable callables."""

    dest: str
    storage_options: Mapping[str, Any]
    version: str
    starts: Sequence[str]  # first relpath of each view file: range i is [starts[i], starts[i + 1])

    def stage_part(self, part_uri: str) -> list[tuple[int, str]]:
        """Split one metadata part by view range into staging files; returns (range, staging path)."""
        fs, part_path = storage.filesystem_for(part_uri, self.storage_options)
        table = storage.call_with_retry(
            lambda: pq.read_table(io.BytesIO(storage.read_bytes(fs, part_path))), f"read '{part_uri}'"
        )
        table = table.cast(METADATA_SCHEMA).filter(pc.not_equal(table["relpath"], ""))
        if table.num_rows == 0:
            return []
        ranges = [max(0, bisect.bisect_right(self.starts, r) - 1) for r in table["relpath"].to_pylist()]
        table = table.append_column("_range", pa.array(ranges, pa.int32()))
        _, root = storage.filesystem_for(self.dest, self.storage_options)
        run_id, name = part_path.rstrip("/").split("/")[-2:]
        out = []
        for range_index in sorted(set(ranges)):
            rows = table.filter(pc.equal(table["_range"], range_index)).drop_columns(["_range"])
            path = f"{STAGING_DIR}/{self.version}/r{range_index:05d}-{run_id}-{name}"
            _write_table(fs, storage.join_uri(root, path), rows)
            out.append((range_index, path))
        return out

    def merge_range(self, item: tuple[int, ViewFile | None, Sequence[str]]) -> list[ViewFile]:
        """One range: its view file plus its staged rows -> sorted, one row per relpath (latest run wins),
        split into files of at most TARGET_FILE_ROWS; an untouched file is copied as it is."""
        range_index, old, staged = item
        fs, root = storage.filesystem_for(self.dest, self.storage_options)
        view = f"{STATE_DIR}/view-{self.version}"
        if not staged:
            if old is None:
                return []
            target = f"{view}/{posixpath.basename(old.path)}"
            if storage.is_local(fs):
                fs.makedirs(storage.join_uri(root, view), exist_ok=True)
            storage.call_with_retry(
                lambda: fs.copy(storage.join_uri(root, old.path), storage.join_uri(root, target)),
                f"copy '{old.path}'",
            )
            return [ViewFile(target, old.first, old.last, old.rows)]
        tables = [
            _read_table(fs, storage.join_uri(root, p)) for p in ([old.path] if old else []) + list(staged)
        ]
        merged = latest_per_relpath(pa.concat_tables(tables))
        files = []
        for k, start in enumerate(range(0, merged.num_rows, TARGET_FILE_ROWS)):
            chunk = merged.slice(start, TARGET_FILE_ROWS)
            path = f"{view}/part-{range_index:05d}-{k:03d}-{self.version}.parquet"
            _write_table(fs, storage.join_uri(root, path), chunk)
            relpaths = chunk["relpath"]
            files.append(ViewFile(path, relpaths[0].as_py(), relpaths[-1].as_py(), chunk.num_rows))
        return files


def latest_per_relpath(table: pa.Table) -> pa.Table:
    """One row per relpath, the latest attempt (by run id, then time), sorted by relpath."""
    ordered = table.sort_by(
        [("relpath", "ascending"), ("run_id", "descending"), ("labeled_at", "descending")]
    )
    relpaths = ordered["relpath"]
    if ordered.num_rows <= 1:
        return ordered
    first_of_group = pc.not_equal(relpaths.slice(1), relpaths.slice(0, ordered.num_rows - 1))
    keep = pa.concat_arrays([pa.array([True]), first_of_group.combine_chunks()])
    return ordered.filter(keep)


def _remove_old_versions(fs: fsspec.AbstractFileSystem, root: str, version: str) -> None:
    """Views and staging areas of other versions: superseded ones, or leftovers of killed compactions."""
    state = storage.join_uri(root, STATE_DIR)
    for name in storage.names(fs, state):
        if name.startswith("view-") and name != f"view-{version}":
            storage.remove(fs, storage.join_uri(state, name))
    storage.remove(fs, storage.join_uri(root, STAGING_DIR))


def _write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS)
    storage.write_bytes_atomic(fs, path, buffer.getvalue())


def _read_table(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    data = storage.call_with_retry(lambda: storage.read_bytes(fs, path), f"read '{path}'")
    return pq.read_table(io.BytesIO(data)).cast(METADATA_SCHEMA)
