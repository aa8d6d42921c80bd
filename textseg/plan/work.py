"""What a run attempts: each listing shard's images, minus those DEST's state says are done.

One call of `list_work` is one listing task (a Ray read task, or a loop in this process). It lists its
shards, looks each batch of up to LOOKUP_BATCH images up in the done-index (`textseg.outputs.state`), and
yields the rest as work rows while the listing goes on, so decoding starts before listing ends. What it
listed and skipped it writes as a small tally file named by the task's shards, which a retried task
overwrites; the run summary adds the tallies up (`read_listing_tallies`). Skipped are images already
labeled and known-bad ones (an error that cannot pass while the file is unchanged; `known_bad` counts
them, and `--retry-errors` attempts them). With `record_listed`, a task also writes the relpaths it
listed beside its tally (compressed as they come: O(task) bytes, never on the driver), so that the end of
the run can mark the images a complete listing no longer finds (`listing_deletions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from textseg import storage
from textseg.outputs.state import Deletions, DoneIndex, ListedFile
from textseg.pipeline.settings import ProgressCounter
from textseg.source.listing import FolderShard, Shard
from textseg.source.refs import ImageRef, mask_relpath

# Images looked up in the done-index at once: large enough that a batch reads one or two row groups of
# the state per ~10 k images (sorted listings keep a batch's relpaths close together), small enough to
# stream.
LOOKUP_BATCH = 10_000
# Work rows per block handed to the decode stage. A task's first block is FIRST_ROWS and each next one
# twice the last, up to BLOCK_ROWS: a block moves through a stage as one task, so a first block of 1,000
# would hold back the first masks until 1,000 images were decoded, labeled and written.
BLOCK_ROWS = 1_000
FIRST_ROWS = 16

WORK_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("relpath", pa.string()),
        ("mask_relpath", pa.string()),
        ("fingerprint", pa.string()),
        ("error", pa.string()),
        ("elapsed_ms", pa.float64()),
        ("properties", pa.string()),
        ("permanent", pa.bool_()),  # the listing's problem cannot pass while the object is unchanged
    ]
)


@dataclass(frozen=True)
class WorkSettings:
    """What a listing task needs besides its shards."""

    index: DoneIndex
    model_id: str
    ontology_hash: str
    tally_uri: str | None  # DEST/_work/<run_id>/listing: one tally file per task; None writes none
    limit: int | None = None  # list no more than this many images (one task lists every shard)
    retry_errors: bool = False  # attempt known-bad images too
    record_listed: bool = False  # write the listed relpaths beside the tally (deleted-source marking)
    progress: ProgressCounter | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ListingTally:
    listed: int = 0
    skipped: int = 0  # already labeled, and known bad
    known_bad: int = 0  # of skipped: an error that cannot pass while the file is unchanged
    shards: int = 0  # shards whose listing is complete
    listed_files: list[ListedFile] | None = field(default_factory=list)  # None: some task recorded none


def list_work(
    shards: Sequence[Shard], settings: WorkSettings, tally: ListingTally | None = None
) -> Iterator[pa.Table]:
    """The work rows of these shards (WORK_SCHEMA blocks), done images left out. When the listing is
    exhausted, `tally` (if given) holds its counts and the tally file is written."""
    tally = tally if tally is not None else ListingTally()
    refs: Iterable[ImageRef] = itertools.chain.from_iterable(
        shard.refs(settings.storage_options) for shard in shards
    )
    if settings.limit is not None:
        refs = itertools.islice(refs, settings.limit)
    listed = _ListedWriter() if settings.record_listed and settings.tally_uri is not None else None
    for batch in _ramped(refs, FIRST_ROWS, LOOKUP_BATCH):
        keys = [(r.relpath, r.fingerprint) for r in batch if r.problem is None]
        skips = settings.index.skips(keys, settings.model_id, settings.ontology_hash, settings.retry_errors)
        todo = [r for r in batch if r.problem is not None or r.relpath not in skips]
        tally.listed += len(batch)
        tally.skipped += len(batch) - len(todo)
        tally.known_bad += len(skips.known_bad)
        if listed is not None:
            listed.add(r.relpath for r in batch if r.relpath)
        if settings.progress is not None:
            settings.progress.add(listed=len(batch), skipped=len(batch) - len(todo))
        block = min(len(batch), BLOCK_ROWS)
        for start in range(0, len(todo), block):
            yield work_table(todo[start : start + block])
    tally.shards += len(shards)
    if settings.tally_uri is not None:
        name = _task_name(shards)
        listed_file = None
        if listed is not None:
            uri = f"{settings.tally_uri}/{name}.listed.parquet"
            listed_file = listed.write(uri, settings.storage_options)
            if tally.listed_files is not None and listed_file is not None:
                tally.listed_files.append(listed_file)
        else:
            tally.listed_files = None
        _write_tally(name, settings.tally_uri, settings.storage_options, tally, listed, listed_file)
    if settings.progress is not None:
        settings.progress.add(shards=len(shards))


def work_table(refs: Sequence[ImageRef]) -> pa.Table:
    """Listed images -> work rows; a problem ref (its reason known before reading) starts as an error."""
    return pa.table(
        {
            "source_uri": [r.uri for r in refs],
            "relpath": [r.relpath for r in refs],
            "mask_relpath": [mask_relpath(r.relpath) if r.problem is None else "" for r in refs],
            "fingerprint": [r.fingerprint for r in refs],
            "error": [r.problem or "" for r in refs],
            "elapsed_ms": [0.0] * len(refs),
            "properties": [r.properties for r in refs],
            "permanent": [r.permanent for r in refs],
        },
        schema=WORK_SCHEMA,
    )


def read_listing_tallies(tally_uri: str, storage_options: Mapping[str, Any]) -> ListingTally:
    """The tallies of every listing task of a run, added up (O(tasks) small reads, in parallel)."""
    fs, root = storage.filesystem_for(tally_uri, storage_options)
    paths = storage.glob(fs, f"{root}/*.json")
    with ThreadPoolExecutor(max_workers=16) as pool:
        tallies = list(pool.map(lambda p: json.loads(storage.read_bytes(fs, p)), paths))
    recorded = all("listed_file" in t for t in tallies)
    return ListingTally(
        sum(t["listed"] for t in tallies),
        sum(t["skipped"] for t in tallies),
        sum(t.get("known_bad", 0) for t in tallies),
        sum(t.get("shards", 0) for t in tallies),
        [ListedFile(**t["listed_file"]) for t in tallies if t.get("listed_file")] if recorded else None,
    )


def listing_deletions(
    shards: Sequence[Shard], listing: ListingTally, storage_options: Mapping[str, Any]
) -> Deletions | None:
    """What a finished run may mark deleted in DEST's state: for a folder, prefix or glob SOURCE listed
    completely (every shard's task recorded what it listed; no --limit, whose listing stops early), the
    relpaths it found. None otherwise: a single image, a manifest or STAC SOURCE (a selection, whose
    left-out images still exist), an incomplete listing, or one that found nothing at all (an empty
    SOURCE is likelier an outage or a wrong mount than every image deleted)."""
    if not shards or listing.listed_files is None or listing.shards != len(shards) or not listing.listed:
        return None
    if not all(isinstance(s, FolderShard) for s in shards):
        return None
    kinds = {(s.protocol, s.root, s.pattern, s.excluded) for s in shards if isinstance(s, FolderShard)}
    if len(kinds) != 1:
        return None
    ((protocol, root, pattern, excluded),) = kinds
    fs, _ = storage.filesystem_for(f"{protocol}://{root}", storage_options)
    excluded_path = excluded.path if excluded is not None and excluded.protocol == protocol else None
    return Deletions(storage.uri_for(fs, root), root, pattern, excluded_path, tuple(listing.listed_files))


class _ListedWriter:
    """Relpaths as they are listed -> one compressed Parquet file in memory (column `relpath`)."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.first: str | None = None
        self.last: str | None = None

    def add(self, relpaths: Iterable[str]) -> None:
        values = list(relpaths)
        if not values:
            return
        low, high = min(values), max(values)
        self.first = low if self.first is None else min(self.first, low)
        self.last = high if self.last is None else max(self.last, high)
        self.rows += len(values)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.buffer, pa.schema([("relpath", pa.string())]))
        self.writer.write_table(pa.table({"relpath": pa.array(values, pa.string())}))

    def write(self, uri: str, storage_options: Mapping[str, Any]) -> ListedFile | None:
        if self.writer is None or self.first is None or self.last is None:
            return None
        self.writer.close()
        fs, path = storage.filesystem_for(uri, storage_options)
        storage.write_bytes_atomic(fs, path, self.buffer.getvalue())
        return ListedFile(uri, self.first, self.last, self.rows)


def _task_name(shards: Sequence[Shard]) -> str:
    return hashlib.sha1("\0".join(s.name for s in shards).encode()).hexdigest()[:24]


def _write_tally(
    name: str,
    tally_uri: str,
    storage_options: Mapping[str, Any],
    tally: ListingTally,
    listed: _ListedWriter | None,
    listed_file: ListedFile | None,
) -> None:
    fs, root = storage.filesystem_for(tally_uri, storage_options)
    payload: dict[str, Any] = {
        "listed": tally.listed,
        "skipped": tally.skipped,
        "known_bad": tally.known_bad,
        "shards": tally.shards,
    }
    if listed is not None:  # recorded (None: this task listed no relpath)
        payload["listed_file"] = None if listed_file is None else dataclasses.asdict(listed_file)
    storage.write_bytes_atomic(fs, f"{root}/{name}.json", json.dumps(payload).encode())


def _ramped(items: Iterable[ImageRef], first: int, most: int) -> Iterator[list[ImageRef]]:
    """Batches of `first`, then twice the last, up to `most` items."""
    iterator, size = iter(items), first
    while batch := list(itertools.islice(iterator, size)):
        yield batch
        size = min(most, size * 2)
