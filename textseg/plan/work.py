"""What a run attempts: each listing shard's images, minus those DEST's state says are done.

One call of `list_work` is one listing task (a Ray read task, or a loop in this process). It lists its
shards, looks each batch of up to LOOKUP_BATCH images up in the done-index (`textseg.outputs.state`), and
yields the rest as work rows while the listing goes on, so decoding starts before listing ends. What it
listed and skipped it writes as a small tally file named by the task's shards, which a retried task
overwrites; the run summary adds the tallies up (`read_listing_tallies`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from textseg import storage
from textseg.outputs.state import DoneIndex
from textseg.source.listing import Shard
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
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ListingTally:
    listed: int = 0
    skipped: int = 0


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
    for batch in _ramped(refs, FIRST_ROWS, LOOKUP_BATCH):
        keys = [(r.relpath, r.fingerprint) for r in batch if r.problem is None]
        done = settings.index.done_relpaths(keys, settings.model_id, settings.ontology_hash)
        todo = [r for r in batch if r.problem is not None or r.relpath not in done]
        tally.listed += len(batch)
        tally.skipped += len(batch) - len(todo)
        block = min(len(batch), BLOCK_ROWS)
        for start in range(0, len(todo), block):
            yield work_table(todo[start : start + block])
    if settings.tally_uri is not None:
        _write_tally(shards, settings.tally_uri, settings.storage_options, tally)


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
        },
        schema=WORK_SCHEMA,
    )


def read_listing_tallies(tally_uri: str, storage_options: Mapping[str, Any]) -> ListingTally:
    """The tallies of every listing task of a run, added up (O(tasks) small reads, in parallel)."""
    fs, root = storage.filesystem_for(tally_uri, storage_options)
    paths = storage.glob(fs, f"{root}/*.json")
    with ThreadPoolExecutor(max_workers=16) as pool:
        tallies = list(pool.map(lambda p: json.loads(storage.read_bytes(fs, p)), paths))
    return ListingTally(sum(t["listed"] for t in tallies), sum(t["skipped"] for t in tallies))


def _write_tally(
    shards: Sequence[Shard], tally_uri: str, storage_options: Mapping[str, Any], tally: ListingTally
) -> None:
    fs, root = storage.filesystem_for(tally_uri, storage_options)
    name = hashlib.sha1("\0".join(s.name for s in shards).encode()).hexdigest()[:24]
    payload = {"listed": tally.listed, "skipped": tally.skipped, "shards": len(shards)}
    storage.write_bytes_atomic(fs, f"{root}/{name}.json", json.dumps(payload).encode())


def _ramped(items: Iterable[ImageRef], first: int, most: int) -> Iterator[list[ImageRef]]:
    """Batches of `first`, then twice the last, up to `most` items."""
    iterator, size = iter(items), first
    while batch := list(itertools.islice(iterator, size)):
        yield batch
        size = min(most, size * 2)
