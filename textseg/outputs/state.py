"""DEST's state: one row per image (its latest attempt), sorted by relpath; the skip check reads it.

A night's skip check must cost O(images), not O(runs x images), so no run reads earlier runs' metadata.
Instead every finished run is merged (`compact`) into one table under DEST/state/:

    DEST/state/CURRENT.json                  the live version: its files and their relpath ranges
    DEST/state/view-<version>/part-*.parquet  the current view: METADATA_SCHEMA rows, one per relpath,
                                             sorted by relpath across and within files
    DEST/state/merged/<run_id>               markers: runs already in the view

The skip check (`DoneIndex.skips`) takes a listing batch, sorted by relpath, and reads only the row
groups whose relpath statistics overlap it, usually one or two per batch. It skips an image whose latest
row has the listed fingerprint, the run's model and ontology, and is `ok` (already labeled) or an error
marked `permanent` (known bad: its bytes cannot be decoded; `--retry-errors` attempts those again).

Compaction splits a run's rows by the view's file ranges, merges each touched range with its file
(latest run wins), splits files that grew past TARGET_FILE_ROWS, copies untouched files (a server-side
copy on object stores), and then switches CURRENT.json atomically. A compaction killed at any point
leaves the previous version live and its run unmarked, so the next run merges it again; merging the same
rows twice changes nothing.
Rows without a relpath (a name that cannot become a mask path) are never skippable and stay out of it.

Readers: the folder CURRENT.json's `view` names holds exactly the current view (one row per image) and
never changes; other `view-*` folders are a compaction in progress (or one that was killed) and the
superseded view, which is removed right after the switch. So a reader takes the folder from CURRENT.json
(`read_current_view`), never a `view-*` glob.

Deleted sources: a finished run whose listing was complete (a folder, prefix or glob SOURCE, no --limit)
passes `Deletions` (the relpaths each listing task found, as small Parquet files in the run's scratch
area, with their ranges); each range's merge task anti-joins its rows against the listed relpaths in
its range and sets `status = 'deleted'` on rows that listing would have found but did not (same root,
matching the glob). The row keeps the rest of its latest attempt: its mask stays under DEST (textseg
never deletes outputs) and the row says which one is stale. An image that comes back is labeled again.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import posixpath
import re
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textseg import storage
from textseg.outputs.metadata import (
    METADATA_SCHEMA,
    STATUS_DELETED,
    STATUS_ERROR,
    STATUS_OK,
    conform_metadata,
    run_order,
)

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
DONE_KEY_COLUMNS = ("relpath", "source_fingerprint", "model_id", "ontology_hash", "status", "permanent")
# The columns deletion marking reads from a view file it does not otherwise rewrite.
DELETION_COLUMNS = ("relpath", "source_uri", "status")

# A run id starts with its UTC start time (`textseg.outputs.metadata.new_run_id`); ids from before sub-second
# precision ("20250101T000000Z-...") get a zero fraction so that both layouts order by time.
_RUN_ID_SUFFIX = r"-.*$"
_SECOND_STAMP = r"^(\d{8}T\d{6})Z$"
_SECOND_STAMP_AS_MICROSECONDS = r"\1.000000Z"

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


@dataclass(frozen=True)
class ViewFile:
    """One file of the view: its path relative to DEST and the relpath range it holds (inclusive)."""

    path: str
    first: str
    last: str
    rows: int


@dataclass(frozen=True)
class Skips:
    """What the skip check found for one listing batch: relpaths to skip, and why."""

    done: set[str]  # latest row ok: already labeled
    known_bad: set[str]  # latest row an error that cannot pass while the file is unchanged

    def __contains__(self, relpath: object) -> bool:
        return relpath in self.done or relpath in self.known_bad


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
        row with the same fingerprint, model and ontology (already labeled)."""
        return self.skips(keys, model_id, ontology_hash).done

    def skips(
        self,
        keys: Sequence[tuple[str, str]],
        model_id: str,
        ontology_hash: str,
        retry_errors: bool = False,
    ) -> Skips:
        """Of `keys` ((relpath, source_fingerprint) pairs), those a run skips: the latest attempt has the
        same fingerprint, model and ontology and is `ok`, or (unless `retry_errors`) an error marked
        `permanent` (a file whose fingerprint is unknown is never known bad: it may have changed)."""
        keys = [k for k in keys if k[0]]
        skips = Skips(set(), set())
        if not keys or not self.files:
            return skips
        relpaths = sorted(k[0] for k in keys)
        first, last = relpaths[0], relpaths[-1]
        wanted = pa.table({"relpath": [k[0] for k in keys], "wanted_fingerprint": [k[1] for k in keys]})
        for view_file in self.files:
            if view_file.last < first or view_file.first > last:
                continue
            table = self._read_range(view_file, first, last)
            if table.num_rows == 0:
                continue
            same_model = pc.equal(table["model_id"], model_id)
            table = table.filter(pc.and_(same_model, pc.equal(table["ontology_hash"], ontology_hash)))
            joined = table.join(wanted, "relpath", join_type="inner")
            same = joined.filter(pc.equal(joined["source_fingerprint"], joined["wanted_fingerprint"]))
            ok = pc.equal(same["status"], STATUS_OK)
            skips.done.update(same.filter(ok)["relpath"].to_pylist())
            if not retry_errors:
                bad = pc.and_(
                    pc.and_(pc.equal(same["status"], STATUS_ERROR), pc.fill_null(same["permanent"], False)),
                    pc.not_equal(same["source_fingerprint"], ""),
                )
                skips.known_bad.update(same.filter(bad)["relpath"].to_pylist())
        return skips

    def latest(self, relpaths: Sequence[str], columns: Sequence[str]) -> pa.Table:
        """The view's rows (`columns`, relpath among them) of those of `relpaths` it holds, read as the
        skip check reads: only the row groups whose relpath range overlaps theirs."""
        if "relpath" not in columns:
            raise ValueError("columns must include relpath")
        schema = pa.schema([METADATA_SCHEMA.field(c).with_nullable(True) for c in columns])
        keys = sorted(r for r in relpaths if r)
        if not keys:
            return schema.empty_table()
        wanted = pa.table({"relpath": keys})
        tables = [
            self._read_range(view_file, keys[0], keys[-1], columns).join(wanted, "relpath", join_type="inner")
            for view_file in self.files
            if not (view_file.last < keys[0] or view_file.first > keys[-1])
        ]
        return pa.concat_tables([t.select(list(columns)) for t in tables]) if tables else schema.empty_table()

    def _read_range(
        self, view_file: ViewFile, first: str, last: str, columns: Sequence[str] = DONE_KEY_COLUMNS
    ) -> pa.Table:
        """The rows of row groups whose relpath statistics overlap [first, last] (`columns` only)."""
        parquet = self._footer(view_file)
        column = parquet.schema_arrow.get_field_index("relpath")
        groups = []
        for i in range(parquet.num_row_groups):
            stats = parquet.metadata.row_group(i).column(column).statistics
            if stats is None or not stats.has_min_max or not (stats.max < first or stats.min > last):
                groups.append(i)
        key_schema = pa.schema([METADATA_SCHEMA.field(c).with_nullable(True) for c in columns])
        if not groups:
            return key_schema.empty_table()
        present = [c for c in columns if c in parquet.schema_arrow.names]  # older views lack some
        table = storage.call_with_retry(
            lambda: parquet.read_row_groups(groups, columns=present),
            f"read the state file '{view_file.path}'",
        )
        for name in columns:
            if name not in present:
                table = table.append_column(name, pa.nulls(table.num_rows, key_schema.field(name).type))
        return table.select(list(columns))

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
    return sorted((r for r in with_metadata if r not in merged), key=run_order)


@dataclass(frozen=True)
class ListedFile:
    """The relpaths one listing task found (a Parquet file, column `relpath`, in the run's scratch
    area), with their range (inclusive), so a merge task reads only the files that overlap its range."""

    uri: str
    first: str
    last: str
    rows: int


@dataclass(frozen=True)
class Deletions:
    """A complete listing of a folder, prefix or glob SOURCE: a view row it would have found, had the file
    still been there, and did not is marked deleted. `covers` says which rows it would have found: those
    whose source URI is `root_uri/relpath`, whose path matches the glob (`pattern`, a regex of the path)
    and is not under `excluded` (DEST inside SOURCE)."""

    root_uri: str
    root_path: str
    pattern: str | None
    excluded: str | None
    listed: tuple[ListedFile, ...]

    def covers(self, relpath: str, source_uri: str) -> bool:
        if source_uri != f"{self.root_uri.rstrip('/')}/{relpath}":
            return False
        path = f"{self.root_path.rstrip('/')}/{relpath}"
        if self.excluded is not None and (path == self.excluded or path.startswith(self.excluded + "/")):
            return False
        return self.pattern is None or re.match(self.pattern, path) is not None


@dataclass(frozen=True)
class ViewUpdate:
    rows: int  # rows of the view after the update
    deleted: int = 0  # rows this update marked deleted


def compact(
    dest: str, storage_options: Mapping[str, Any], run_ids: Sequence[str], map_fn: MapFn = map
) -> int:
    """Merge these runs' metadata into the view and switch CURRENT.json to the result; returns the rows
    of the new view (`update_view` without deletions)."""
    return update_view(dest, storage_options, run_ids, map_fn).rows


def update_view(
    dest: str,
    storage_options: Mapping[str, Any],
    run_ids: Sequence[str],
    map_fn: MapFn = map,
    deletions: Deletions | None = None,
) -> ViewUpdate:
    """Merge these runs' metadata into the view, mark what `deletions` says is gone, and switch
    CURRENT.json to the result. `map_fn(fn, items)` runs the per-part and per-range steps (the Ray plan
    passes one that runs them as tasks); everything it is given is picklable and returns small values."""
    index = DoneIndex.load(dest, storage_options)
    if not run_ids:
        return ViewUpdate(index.rows)
    fs, root = storage.filesystem_for(dest, storage_options)
    version = f"{max(run_ids, key=run_order)}-{secrets.token_hex(3)}"
    parts = [
        storage.uri_for(fs, p)
        for run_id in run_ids
        for p in storage.glob(fs, storage.join_uri(root, f"metadata/{run_id}/*.parquet"))
    ]
    if deletions is not None and not index.files:
        deletions = None  # nothing to mark
    starts = [f.first for f in index.files]
    job = _Compaction(dest, dict(storage_options), version, starts, deletions)
    if not parts and deletions is not None:
        # A run that attempted nothing rewrites the view only when its listing missed some image.
        if not sum(map_fn(job.count_deleted, index.files)):
            deletions = None
    if not parts and deletions is None:  # the view stays as it is
        _mark_merged(fs, root, run_ids)
        return ViewUpdate(index.rows)
    staged: dict[int, list[str]] = defaultdict(list)
    for pieces in map_fn(job.stage_part, parts):
        for range_index, path in pieces:
            staged[range_index].append(path)
    ranges = [
        (i, index.files[i] if index.files else None, sorted(staged.get(i, [])))
        for i in range(max(1, len(index.files)))
    ]
    results = list(map_fn(job.merge_range, ranges))
    files = sorted((f for result, _ in results for f in result), key=lambda f: f.first)
    current = {"version": version, "view": f"{STATE_DIR}/view-{version}", "files": [asdict(f) for f in files]}
    storage.write_bytes_atomic(fs, storage.join_uri(root, CURRENT), json.dumps(current, indent=1).encode())
    _mark_merged(fs, root, run_ids)
    _remove_old_versions(fs, root, version)
    return ViewUpdate(sum(f.rows for f in files), sum(deleted for _, deleted in results))


def current_view_uris(dest: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files of the current view (one row per image known to DEST, its latest attempt), as URIs;
    [] before the first run. What the README's one-liners read through CURRENT.json."""
    index = DoneIndex.load(dest, storage_options or {})
    return [storage.join_uri(dest, f.path) for f in index.files]


def read_current_view(
    dest: str, storage_options: Mapping[str, Any] | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """The current view as one table (METADATA_SCHEMA, sorted by relpath): one row per image, its latest
    attempt, `status` ok, error or deleted. A compaction that switches the view while this reads it
    removes the files being read: then CURRENT.json is read again."""
    fs, root = storage.filesystem_for(dest, storage_options)
    for attempt in range(3):
        index = DoneIndex.load(dest, storage_options or {})
        try:
            tables = [_read_table(fs, storage.join_uri(root, f.path)) for f in index.files]
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    table = pa.concat_tables(tables) if tables else METADATA_SCHEMA.empty_table()
    return table.select(list(columns)) if columns is not None else table


def read_current_polygons(dest: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The current polygons of DEST/vectors/ (every run's partition read as one table, column `run` from
    the partition): those whose images all have, as their latest row in the current view, an `ok` row of
    the polygon's run. A polygon of an image relabeled since (a newer partition has its polygons), failed
    since, or gone from SOURCE is left out; so is a merged polygon (`source` 'a.png|b.png') one of whose
    images was, so nothing shown is stale (its other images' area has no polygon until they are
    relabeled too). Reads the whole dataset into memory: for notebooks; the README's DuckDB query does
    the same at any size."""
    import pyarrow.dataset as pads

    from textseg.labels.vector_merge import VECTORS_DIR
    from textseg.labels.vectors import SOURCES_SEPARATOR

    fs, root = storage.filesystem_for(dest, storage_options)
    folder = storage.join_uri(root, VECTORS_DIR)
    if not storage.exists(fs, folder):
        return pa.table({})
    polygons = pads.dataset(folder, filesystem=fs, format="parquet", partitioning="hive").to_table()
    if polygons.num_rows == 0:
        return polygons
    view = read_current_view(dest, storage_options, columns=["relpath", "run_id", "status"])
    view = view.filter(pc.equal(view["status"], STATUS_OK))
    current = pc.binary_join_element_wise(view["run_id"], view["relpath"], "\0").combine_chunks()
    sources = pc.split_pattern(polygons["source"].combine_chunks().cast(pa.string()), SOURCES_SEPARATOR)
    owner = pc.list_parent_indices(sources)
    runs = pc.take(polygons["run"].combine_chunks().cast(pa.string()), owner)
    found = pc.is_in(pc.binary_join_element_wise(runs, pc.list_flatten(sources), "\0"), value_set=current)
    stale = np.zeros(polygons.num_rows, dtype=bool)
    stale[pc.filter(owner, pc.invert(found)).to_numpy(zero_copy_only=False)] = True
    return polygons.filter(pa.array(~stale))


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
    deletions: Deletions | None = None

    def stage_part(self, part_uri: str) -> list[tuple[int, str]]:
        """Split one metadata part by view range into staging files; returns (range, staging path)."""
        fs, part_path = storage.filesystem_for(part_uri, self.storage_options)
        table = storage.call_with_retry(
            lambda: pq.read_table(pa.BufferReader(storage.read_bytes(fs, part_path))), f"read '{part_uri}'"
        )
        table = conform_metadata(table)
        table = table.filter(pc.not_equal(table["relpath"], ""))
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

    def merge_range(self, item: tuple[int, ViewFile | None, Sequence[str]]) -> tuple[list[ViewFile], int]:
        """One range: its view file plus its staged rows -> sorted, one row per relpath (latest run wins),
        rows the listing would have found but did not marked deleted, split into files of at most
        TARGET_FILE_ROWS; an untouched file is copied as it is. Returns the files and the rows marked."""
        range_index, old, staged = item
        fs, root = storage.filesystem_for(self.dest, self.storage_options)
        view = f"{STATE_DIR}/view-{self.version}"
        if not staged:
            if old is None:
                return [], 0
            if not self.count_deleted(old):
                target = f"{view}/{posixpath.basename(old.path)}"
                if storage.is_local(fs):
                    fs.makedirs(storage.join_uri(root, view), exist_ok=True)
                storage.call_with_retry(
                    lambda: fs.copy(storage.join_uri(root, old.path), storage.join_uri(root, target)),
                    f"copy '{old.path}'",
                )
                return [ViewFile(target, old.first, old.last, old.rows)], 0
        tables = [
            _read_table(fs, storage.join_uri(root, p)) for p in ([old.path] if old else []) + list(staged)
        ]
        merged, deleted = self._mark_deleted(latest_per_relpath(pa.concat_tables(tables)))
        files = []
        for k, start in enumerate(range(0, merged.num_rows, TARGET_FILE_ROWS)):
            chunk = merged.slice(start, TARGET_FILE_ROWS)
            path = f"{view}/part-{range_index:05d}-{k:03d}-{self.version}.parquet"
            _write_table(fs, storage.join_uri(root, path), chunk)
            relpaths = chunk["relpath"]
            files.append(ViewFile(path, relpaths[0].as_py(), relpaths[-1].as_py(), chunk.num_rows))
        return files, deleted

    def count_deleted(self, view_file: ViewFile) -> int:
        """How many rows of this view file the deletions would mark (reads three of its columns)."""
        if self.deletions is None:
            return 0
        fs, root = storage.filesystem_for(self.dest, self.storage_options)
        path = storage.join_uri(root, view_file.path)
        data = storage.call_with_retry(lambda: storage.read_bytes(fs, path), f"read '{path}'")
        return int(self._deleted(pq.read_table(pa.BufferReader(data), columns=list(DELETION_COLUMNS))).sum())

    def _mark_deleted(self, rows: pa.Table) -> tuple[pa.Table, int]:
        mark = self._deleted(rows)
        if not mark.any():
            return rows, 0
        status = pc.if_else(pa.array(mark), pa.scalar(STATUS_DELETED), rows["status"])
        index = rows.schema.get_field_index("status")
        return rows.set_column(index, rows.schema.field(index), status), int(mark.sum())

    def _deleted(self, rows: pa.Table) -> np.ndarray:
        """Which of these rows (sorted by relpath) the deletions mark: not deleted yet, not listed by
        this run, and in what its listing covers."""
        mark = np.zeros(rows.num_rows, dtype=bool)
        if self.deletions is None or rows.num_rows == 0:
            return mark
        relpaths = rows["relpath"]
        listed = self._listed_between(relpaths[0].as_py(), relpaths[-1].as_py())
        candidates = pc.and_(
            pc.invert(pc.is_in(relpaths, value_set=listed)), pc.not_equal(rows["status"], STATUS_DELETED)
        )
        indices = pc.indices_nonzero(candidates)
        if len(indices) == 0:
            return mark
        picked = zip(
            indices.to_pylist(),
            pc.take(relpaths, indices).to_pylist(),
            pc.take(rows["source_uri"], indices).to_pylist(),
            strict=True,
        )
        for i, relpath, source_uri in picked:
            mark[i] = self.deletions.covers(relpath, source_uri)
        return mark

    def _listed_between(self, first: str, last: str) -> pa.Array:
        """The relpaths this run's listing found in [first, last], from the listed files that overlap it."""
        assert self.deletions is not None
        arrays = [pa.array([], pa.string())]
        for listed in self.deletions.listed:
            if listed.last < first or listed.first > last:
                continue
            data = _read_uri(listed.uri, self.storage_options)
            column = pq.read_table(pa.BufferReader(data), columns=["relpath"])["relpath"]
            inside = pc.and_(pc.greater_equal(column, first), pc.less_equal(column, last))
            arrays.extend(column.filter(inside).chunks)
        return pa.concat_arrays([a.cast(pa.string()) for a in arrays])


def latest_per_relpath(table: pa.Table) -> pa.Table:
    """One row per relpath, the latest attempt, sorted by relpath. Latest: the run that started later
    (the time its id starts with), then the row made later, then the run id: two runs whose ids carry the
    same start time (second-precision ids of one second) are told apart by when their rows were made."""
    stamps = pc.replace_substring_regex(table["run_id"], pattern=_RUN_ID_SUFFIX, replacement="")
    started = pc.replace_substring_regex(
        stamps, pattern=_SECOND_STAMP, replacement=_SECOND_STAMP_AS_MICROSECONDS
    )
    ordered = table.append_column("_started", started).sort_by(
        [
            ("relpath", "ascending"),
            ("_started", "descending"),
            ("labeled_at", "descending"),
            ("run_id", "descending"),
        ]
    )
    ordered = ordered.drop_columns(["_started"])
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


def _read_uri(uri: str, storage_options: Mapping[str, Any]) -> bytes:
    fs, path = storage.filesystem_for(uri, storage_options)
    return storage.call_with_retry(lambda: storage.read_bytes(fs, path), f"read '{uri}'")


def _read_table(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    data = storage.call_with_retry(lambda: storage.read_bytes(fs, path), f"read '{path}'")
    # Bytes as an Arrow buffer, not a Python file object, whose reads through the GIL make pyarrow's
    # thread-pool teardown at exit more fragile (apache/arrow#50482).
    return conform_metadata(pq.read_table(pa.BufferReader(data)))
