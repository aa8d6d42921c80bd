"""Manifests (text, CSV, Parquet) -> shards, and the listing of one shard.

A manifest names the images of a job explicitly, and can name millions. The driver never holds its
entries: `plan_manifest_shards` streams over the manifest once (O(1) memory beyond one shard's rows) to
check what must hold for the whole job (all entries on one storage, no credentials in an entry: a
ListingError before any model loads) and to find the relpath root, the deepest folder that holds every
entry, which every shard needs before any is listed. That root is the common folder of the least and
the greatest entry (strings sharing a prefix sort together), so it takes two comparisons per entry, or,
for a Parquet or CSV batch, pyarrow's min and max (row by row only for a batch with odd entries). It
describes the manifest as shards of about SHARD_ROWS rows or SHARD_BYTES bytes, each a small frozen
dataclass that one task lists (`refs`), rebuilding its filesystems from the storage options (no
filesystem is pickled). A 1 M-row Parquet inventory plans in about a second.

Shapes, by name and content:
- Parquet (`.parquet`, or any file starting with the Parquet magic `PAR1`): a `uri` column, or S3
  Inventory's `bucket` + `key` columns. Column names are matched case-insensitively. Shards are runs of
  whole row groups of about SHARD_ROWS rows; a row group of more than twice that is split into row ranges
  of SHARD_ROWS (each such shard decodes the group's needed columns up to its range's end, so row groups
  of at most SHARD_ROWS list fastest). Planning reads the footer and the uri (or bucket, key) columns, a
  batch at a time.
- CSV (`.csv`, `.csv.gz`), RFC 4180 quoting, UTF-8. The first record decides the shape:
  - a header naming `uri`, or `bucket` and `key` (case-insensitive): those columns, with the same
    optional columns as Parquet;
  - else, when it has two or more fields and the first is a valid S3 bucket name: S3 Inventory's
    header-less CSV. Bucket and key are the first two columns; keys are URL-encoded there and decoded
    (`unquote_plus`: inventories write ' ' as '+' or '%20' and a real '+' as '%2B'). The other columns
    depend on the inventory's configuration, so they are recognized in S3's fixed field order by their
    values in the first shard: booleans in columns 4 and 5 are IsLatest and IsDeleteMarker (a versioned
    inventory, VersionId in column 3); after them, the first all-digit column is Size, the first
    ISO-8601 time LastModifiedDate, the first 32-hex-digit (+ '-parts') value the ETag;
  - else: a text manifest (a `.csv` of one path per line is one).
  A plain CSV is sharded by byte ranges of about SHARD_BYTES cut at record ends (a newline after an even
  number of '"', so quoted newlines never split a record). A gzip CSV cannot be entered mid-stream: it is
  one shard, streamed, and listed in successive chunks of SHARD_ROWS rows.
- Text (anything else): one URI or path per line (UTF-8, '\\n' or '\\r\\n'); blank lines and lines
  starting with '#' are skipped; a relative line is resolved against the manifest's folder on the
  manifest's storage. Sharded by byte ranges of about SHARD_BYTES cut at line ends.

Rows of a table manifest, and the fingerprint:
- Optional columns `size`, `etag` (or `e_tag`) and `last_modified` (or `last_modified_date`) give the
  fingerprint without any request: size + ETag (else size + time) in `textseg.source.refs.fingerprint`'s
  form, so an inventory's row fingerprints an object exactly as a prefix listing does (size + ETag, the
  quotes S3 puts around ETags stripped). Such a row is not looked up: an object that no longer exists is
  found when it is read (the decode stage's error "source object not found"), not here.
- A row without a size, or with neither ETag nor time, and every text line, is looked up (one HEAD each,
  LOOKUP_THREADS at a time per shard, retried): unavoidable for a text manifest, and what a Parquet or
  CSV manifest with size and ETag columns avoids. A line that does not exist, is a folder or is forbidden
  becomes a problem ref saying so.
- A `uri` manifest (text, or a `uri` column) lists images explicitly: every entry is taken as an image,
  whatever its extension. A `bucket` + `key` manifest is an inventory of a whole bucket: like a prefix
  listing, it keeps image names only (IMAGE_EXTENSIONS) and skips directory markers ('.../'), delete
  markers and versions that are not the latest; its images are on S3 (`s3://bucket/key`).
- A row with an empty uri, bucket or key is a problem ref (uri `<manifest>#row=N`, never dropped), as is
  an entry whose relpath is unsafe (`textseg.source.refs.make_ref`). Rows and lines are numbered from 1
  (CSV: data rows after the header), as messages and shard names show them.

Within a shard (a gzip CSV: within a chunk) entries are deduplicated, sorted by relpath (the order the
state's skip check and `flag_collisions` need) and checked for mask-name collisions. Duplicates and
collisions between entries in different shards are not found: one listing task never sees another's
rows. In a manifest sorted by key, as a prefix listing is, a folder's names lie together, so only names
on either side of a shard boundary escape; in one in random order, any may.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote_plus

import fsspec

from textseg.source.refs import (
    IMAGE_EXTENSIONS,
    Excluded,
    FoundFile,
    ImageRef,
    ListingError,
    fingerprint,
    flag_collisions,
    is_image_name,
    local_fingerprint,
    make_ref,
    protocol_name,
)
from textseg.storage import (
    StorageError,
    call_with_retry,
    filesystem_for,
    is_local,
    redact_uri,
    split_credentials,
    uri_for,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from textseg.source.listing import Shard

# Rows per shard of a Parquet manifest, and per chunk a gzip CSV is listed in: ~10-20 MB of entries.
SHARD_ROWS = 100_000
# Bytes per shard of a text or plain CSV manifest: ~100 k lines of typical URIs.
SHARD_BYTES = 8 * 1024 * 1024
# Concurrent lookups (HEAD) per listing task, for entries whose fingerprint the manifest does not give.
LOOKUP_THREADS = 16
_LOOKUP_CHUNK = 256  # entries looked up per batch, so results stream out and memory stays flat
_SCAN_BATCH_ROWS = 65_536  # rows per batch when Parquet is scanned
_CSV_BLOCK_BYTES = 1 << 20  # pyarrow's block size when a gzip CSV is streamed
_HEADER_BYTES = 64 * 1024  # read to find a CSV's first record (its header, or a first inventory row)
_SAMPLE_ROWS = 1_000  # rows of a header-less inventory CSV whose values tell its columns apart

PARQUET_MAGIC = b"PAR1"
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which spreadsheet programs put first
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, starting and ending alphanumeric.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_DIGITS = re.compile(r"\d+")
_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d.*")
_ETAG = re.compile(r"[0-9a-fA-F]{32}(-\d+)?")
_BOOLEAN = re.compile(r"(?i:true|false)")
# pyarrow (RE2) patterns for `_batch_range`. A URI the row-by-row path must see: whitespace that str.strip()
# removes at either end, '@' or '?' (credentials), or a trailing '/'.
_STRIPPED = r"[\s\p{Z}\x0b\x1c-\x1f\x85]"
_ODD_URI = rf"^{_STRIPPED}|{_STRIPPED}$|[@?]|/$"
# A key `is_image_name` accepts: a last segment with a non-dot character before its extension (as
# posixpath.splitext reads it), the extension one of IMAGE_EXTENSIONS in any case.
_IMAGE_KEY = r"(?i)(^|/)\.*[^./][^/]*\.(" + "|".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + ")$"


@dataclass(frozen=True)
class Columns:
    """Which columns of a table manifest hold what (their names in the file; None: absent)."""

    uri: str | None = None
    bucket: str | None = None
    key: str | None = None
    size: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    is_latest: str | None = None
    is_delete_marker: str | None = None
    url_encoded_keys: bool = False  # S3 Inventory's CSV
    csv_names: tuple[str, ...] = ()  # CSV: every column in file order (a shard's bytes have no header)

    def needed(self, *, fingerprints: bool) -> list[str]:
        """The columns to read: those naming the object, and to list it those fingerprinting it."""
        names: list[str | None]
        if self.uri is not None:
            names = [self.uri]
        else:
            names = [self.bucket, self.key, self.is_latest, self.is_delete_marker]
        if fingerprints:
            names += [self.size, self.etag, self.last_modified]
        return list(dict.fromkeys(name for name in names if name is not None))


@dataclass(frozen=True)
class Manifest:
    """What every shard of one manifest shares."""

    source: str  # the manifest as shown in messages (no credentials)
    uri: str  # the manifest, without credentials: its filesystem is rebuilt in the task from storage options
    protocol: str  # the manifest's storage: relative entries are on it
    path: str  # the manifest on its filesystem
    format: str  # "text", "csv" or "parquet"
    columns: Columns | None = None  # None: a text manifest
    excluded: Excluded | None = None
    storage: str = ""  # the storage of every listed image ('' when it lists none)
    root: str = ""  # relpath = path with this prefix (the deepest common folder, '/'-terminated) removed

    @property
    def word(self) -> str:
        """What messages call an entry's number."""
        return "line" if self.format == "text" else "row"

    def filesystem(self, storage_options: Mapping[str, Any] | None) -> fsspec.AbstractFileSystem:
        return filesystem_for(self.uri, storage_options)[0]

    def entries_filesystem(self, storage_options: Mapping[str, Any] | None) -> fsspec.AbstractFileSystem:
        return filesystem_for(f"{self.storage or self.protocol}://", storage_options)[0]


class _Row(NamedTuple):
    """One entry of a manifest, resolved: its storage and path, and its fingerprint when the row gives it."""

    number: int  # line or row number, from 1
    protocol: str
    path: str | None  # None: the row names no object (see problem)
    size: int = 0
    fingerprint: str | None = None  # None: look it up
    problem: str | None = None


# ----------------------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class TextShard:
    """Lines first_line..last_line of a text manifest: the bytes [start, stop), whole lines."""

    manifest: Manifest
    start: int
    stop: int
    first_line: int
    last_line: int

    @property
    def name(self) -> str:
        return f"manifest:{self.manifest.source}#lines={self.first_line}-{self.last_line}"

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        fs = self.manifest.filesystem(storage_options)
        data = _read_range(fs, self.manifest, self.start, self.stop)
        rows = _text_rows(data, self.first_line, _Resolver.of(self.manifest), at_start=self.start == 0)
        return _listed(self.manifest, rows, storage_options, chunk_rows=None)


@dataclass(frozen=True)
class CsvShard:
    """Data rows first_row..last_row of a CSV manifest: the bytes [start, stop), whole records; or, for a
    gzip CSV (`compressed`), the whole file, listed in chunks of `chunk_rows` rows."""

    manifest: Manifest
    start: int
    stop: int
    first_row: int
    last_row: int
    compressed: bool = False
    header: bool = False  # compressed: the first line is a header to skip
    chunk_rows: int = SHARD_ROWS

    @property
    def name(self) -> str:
        return f"manifest:{self.manifest.source}#rows={self.first_row}-{self.last_row}"

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        columns = _table_columns(self.manifest)
        fs = self.manifest.filesystem(storage_options)
        resolver = _Resolver.of(self.manifest)
        include = columns.needed(fingerprints=True)
        if self.compressed:
            batches = _gzip_csv_batches(fs, self.manifest, columns.csv_names, include, header=self.header)
            rows = _batches_rows(batches, columns, 1, resolver)
            return _listed(self.manifest, rows, storage_options, chunk_rows=self.chunk_rows)
        data = _read_range(fs, self.manifest, self.start, self.stop)
        table = _parse_csv(data, self.manifest, columns.csv_names, include)
        rows = _table_rows(table, columns, self.first_row, resolver)
        return _listed(self.manifest, rows, storage_options, chunk_rows=None)


@dataclass(frozen=True)
class ParquetShard:
    """Rows first_row..last_row of a Parquet manifest, in `row_groups`, whose first row is `group_start`."""

    manifest: Manifest
    row_groups: tuple[int, ...]
    group_start: int
    first_row: int
    last_row: int

    @property
    def name(self) -> str:
        return f"manifest:{self.manifest.source}#rows={self.first_row}-{self.last_row}"

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        columns = _table_columns(self.manifest)
        fs = self.manifest.filesystem(storage_options)
        batches = _parquet_batches(fs, self.manifest, columns.needed(fingerprints=True), self.row_groups)
        rows = _batches_rows(self._in_range(batches), columns, self.first_row, _Resolver.of(self.manifest))
        return _listed(self.manifest, rows, storage_options, chunk_rows=None)

    def _in_range(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """The batches' rows first_row..last_row (a split row group's other ranges are not converted)."""
        row = self.group_start
        for batch in batches:
            end = row + batch.num_rows
            low, high = max(row, self.first_row), min(end, self.last_row + 1)
            if low < high:
                yield batch.slice(low - row, high - low)
            if end > self.last_row:
                return
            row = end


# ----------------------------------------------------------------------------------------------------------
# Planning


def plan_manifest_shards(
    fs: fsspec.AbstractFileSystem,
    path: str,
    display: str,
    storage_options: Mapping[str, Any] | None,
    excluded: Excluded | None,
    *,
    shard_rows: int | None = None,
    shard_bytes: int | None = None,
) -> list[Shard]:
    """The manifest at `path` checked and described as shards (the module docstring has the shapes).

    Streams over the whole manifest once, holding at most one shard's rows. Raises ListingError when its
    entries are on more than one storage, when an entry embeds credentials (naming its line or row), or
    when it is neither UTF-8 text nor a readable CSV or Parquet manifest. `shard_rows` and `shard_bytes`
    default to SHARD_ROWS and SHARD_BYTES. `storage_options` is not needed here (the filesystem is given)
    and is accepted for symmetry with the shards, which rebuild their filesystems from it.
    """
    rows_per_shard = shard_rows or SHARD_ROWS
    bytes_per_shard = shard_bytes or SHARD_BYTES
    size = _size(fs, path, display)
    lowered = path.lower()

    def manifest(kind: str) -> Manifest:
        return Manifest(display, uri_for(fs, path), protocol_name(fs), path, kind, excluded=excluded)

    if lowered.endswith(".csv.gz"):
        return _plan_gzip_csv(fs, manifest("csv"), rows_per_shard)
    if lowered.endswith(".csv"):
        planned = _plan_csv(fs, manifest("csv"), size, bytes_per_shard)
        if planned is not None:
            return planned
    elif lowered.endswith(".parquet") or _head(fs, path, size, display) == PARQUET_MAGIC:
        return _plan_parquet(fs, manifest("parquet"), rows_per_shard)
    return _plan_text(fs, manifest("text"), size, bytes_per_shard)


class _Survey:
    """What planning learns from every entry, in O(1) memory: the one storage they are on, and their
    deepest common folder. That is the common folder of the least and the greatest path (strings that
    share a prefix sort together), so two comparisons per entry find it."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.storage: str | None = None
        self.low: str | None = None
        self.high: str | None = None

    def add(self, rows: Iterable[_Row]) -> None:
        excluded = self.manifest.excluded
        for row in rows:
            path = row.path
            if path is None or _covers(excluded, row.protocol, path):
                continue
            if row.protocol != self.storage:
                if self.storage is not None:
                    raise _mixed_storages(self.manifest, self.storage, row.protocol)
                self.storage = row.protocol
            if self.low is None or self.high is None:
                self.low = self.high = path
            elif path < self.low:
                self.low = path
            elif path > self.high:
                self.high = path

    def add_batch(self, batch: pa.RecordBatch | pa.Table, columns: Columns, first_row: int) -> None:
        """A table manifest's rows: by pyarrow where `_batch_range` can, else row by row."""
        found = _batch_range(batch, columns, self.manifest.excluded)
        if found is None:
            self.add(_table_rows(batch, columns, first_row, _Resolver.of(self.manifest)))
            return
        protocol, low, high = found
        if low is not None and high is not None:
            self.add([_Row(first_row, protocol, low), _Row(first_row, protocol, high)])

    def planned(self, columns: Columns | None = None) -> Manifest:
        """The manifest with its columns, storage and relpath root."""
        root = ""
        if self.low is not None and self.high is not None:
            common = os.path.commonprefix([self.low, self.high])
            root = common[: common.rfind("/") + 1]
        return replace(self.manifest, columns=columns, storage=self.storage or "", root=root)


def _plan_text(fs: fsspec.AbstractFileSystem, manifest: Manifest, size: int, shard_bytes: int) -> list[Shard]:
    survey, resolver = _Survey(manifest), _Resolver.of(manifest)
    ranges: list[tuple[int, int, int, int]] = []  # start, stop, first line, last line
    line = 1
    for start, data in _pieces(fs, manifest, 0, size, shard_bytes, _last_line_end):
        lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        survey.add(_text_rows(data, line, resolver, at_start=start == 0))
        ranges.append((start, start + len(data), line, line + lines - 1))
        line += lines
    planned = survey.planned()
    return [TextShard(planned, start, stop, first, last) for start, stop, first, last in ranges]


def _plan_csv(
    fs: fsspec.AbstractFileSystem, manifest: Manifest, size: int, shard_bytes: int
) -> list[Shard] | None:
    """A plain CSV manifest's shards; None when its first record makes it a text manifest."""
    first = _read_range(fs, manifest, 0, min(size, _HEADER_BYTES))
    bom = len(_BOM) if first.startswith(_BOM) else 0
    header_end = _first_record_end(first, bom)
    fields = _csv_fields(first[bom:header_end], manifest)
    columns = _named_columns(fields)
    if columns is None and not _looks_like_inventory(fields):
        return None
    names = tuple(fields) if columns is not None else _positional_names(len(fields))
    data_start = header_end if columns is not None else bom
    survey = _Survey(manifest)
    ranges: list[tuple[int, int, int, int]] = []  # start, stop, first row, last row
    row = 1
    for start, data in _pieces(fs, manifest, data_start, size, shard_bytes, _last_record_end):
        if columns is None:  # a header-less inventory: its columns are recognized by their values
            columns = _inventory_columns(_parse_csv(data, manifest, names, None).slice(0, _SAMPLE_ROWS))
        table = _parse_csv(data, manifest, names, columns.needed(fingerprints=False))
        survey.add_batch(table, columns, row)
        ranges.append((start, start + len(data), row, row + table.num_rows - 1))
        row += table.num_rows
    planned = survey.planned(columns or Columns(bucket=names[0], key=names[1], csv_names=names))
    return [
        CsvShard(planned, start, stop, first_row, last_row) for start, stop, first_row, last_row in ranges
    ]


def _plan_gzip_csv(fs: fsspec.AbstractFileSystem, manifest: Manifest, chunk_rows: int) -> list[Shard]:
    try:
        with fs.open(manifest.path, "rb", compression="gzip") as stream:
            first_line = stream.readline()
    except (OSError, EOFError) as err:
        raise ListingError(f"the manifest '{manifest.source}' is not a readable gzip file: {err}") from err
    fields = _csv_fields(first_line.removeprefix(_BOM), manifest)
    columns = _named_columns(fields)
    header = columns is not None
    if columns is None:
        if not _looks_like_inventory(fields):
            raise ListingError(
                f"the gzip CSV manifest '{manifest.source}' has neither a header naming 'uri' (or 'bucket' "
                "and 'key') nor S3 Inventory's header-less bucket,key,... rows"
            )
        names = _positional_names(len(fields))
        sample = next(_gzip_csv_batches(fs, manifest, names, None, header=False))
        columns = _inventory_columns(sample.slice(0, _SAMPLE_ROWS))
    survey = _Survey(manifest)
    row = 1
    for batch in _gzip_csv_batches(
        fs, manifest, columns.csv_names, columns.needed(fingerprints=False), header=header
    ):
        survey.add_batch(batch, columns, row)
        row += batch.num_rows
    planned = survey.planned(columns)
    return [CsvShard(planned, 0, -1, 1, row - 1, compressed=True, header=header, chunk_rows=chunk_rows)]


def _plan_parquet(fs: fsspec.AbstractFileSystem, manifest: Manifest, shard_rows: int) -> list[Shard]:
    with _open_parquet(fs, manifest) as parquet:
        columns = _parquet_columns(parquet.schema_arrow.names, manifest)
        metadata = parquet.metadata
        group_rows = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
        survey = _Survey(manifest)
        batches = parquet.iter_batches(
            batch_size=_SCAN_BATCH_ROWS, columns=columns.needed(fingerprints=False)
        )
        row = 1
        for batch in _arrow_errors(batches, manifest):
            survey.add_batch(batch, columns, row)
            row += batch.num_rows
    planned = survey.planned(columns)
    shards: list[Shard] = []
    run: list[int] = []  # small row groups gathered into the next shard
    run_start = row = 1
    for group, count in enumerate(group_rows):
        if run and (row - run_start + count > shard_rows or count > 2 * shard_rows):
            shards.append(ParquetShard(planned, tuple(run), run_start, run_start, row - 1))
            run = []
        if count > 2 * shard_rows:  # too large for one task: ranges of its rows
            for first in range(row, row + count, shard_rows):
                last = min(first + shard_rows, row + count) - 1
                shards.append(ParquetShard(planned, (group,), row, first, last))
        elif count:
            if not run:
                run_start = row
            run.append(group)
        row += count
    if run:
        shards.append(ParquetShard(planned, tuple(run), run_start, run_start, row - 1))
    return shards


def _mixed_storages(manifest: Manifest, *protocols: str) -> ListingError:
    return ListingError(
        f"the manifest '{manifest.source}' lists files on more than one storage "
        f"({', '.join(sorted(protocols))}): split it into one manifest per storage"
    )


def _covers(excluded: Excluded | None, protocol: str, path: str) -> bool:
    """`Excluded.covers`, given the storage's name rather than a filesystem."""
    if excluded is None or protocol != excluded.protocol:
        return False
    return path == excluded.path or path.startswith(excluded.path + "/")


# ----------------------------------------------------------------------------------------------------------
# Entries -> rows


@dataclass(frozen=True)
class _Resolver:
    """A manifest entry (a URI, an absolute or a relative path) -> its storage and path, as
    `filesystem_for` would give them, without building a filesystem per entry."""

    manifest: Manifest
    folder: str

    @classmethod
    def of(cls, manifest: Manifest) -> _Resolver:
        return cls(manifest, posixpath.dirname(manifest.path))

    def row(self, number: int, entry: str, size: int = 0, found: str | None = None) -> _Row:
        if "://" not in entry and not entry.startswith(("/", "~")):
            path = posixpath.normpath(posixpath.join(self.folder, entry))
            return _Row(number, self.manifest.protocol, path, size, found)
        if ("@" in entry or "?" in entry) and _embeds_credentials(entry):
            raise ListingError(
                f"{self.manifest.word} {number} of the manifest '{self.manifest.source}' embeds credentials "
                f"('{redact_uri(entry)}'): remove them and pass credentials with --storage-option or the "
                "AWS_* environment"
            )
        scheme, sep, rest = entry.partition("://")
        scheme = scheme.lower() if sep else "file"
        try:
            protocol, strip = _storage_of(scheme)
        except (ValueError, ImportError) as err:
            raise ListingError(
                f"{self.manifest.word} {number} of the manifest '{self.manifest.source}' names an unknown or "
                f"unavailable storage ('{redact_uri(entry)}'): {err}"
            ) from err
        return _Row(number, protocol, strip(f"{scheme}://{rest}" if sep else entry), size, found)


@lru_cache(maxsize=64)
def _storage_of(scheme: str) -> tuple[str, Callable[[str], str]]:
    """A URI scheme's storage name (s3a is s3) and how its filesystem turns a URI into a path."""
    cls = fsspec.get_filesystem_class(scheme)
    protocol = cls.protocol
    return (protocol if isinstance(protocol, str) else protocol[0]), cls._strip_protocol


def _embeds_credentials(entry: str) -> bool:
    try:
        return bool(split_credentials(entry)[1]) or redact_uri(entry) != entry
    except StorageError:  # an access key without its secret
        return True


def _text_rows(data: bytes, first_line: int, resolver: _Resolver, *, at_start: bool) -> Iterator[_Row]:
    try:
        text = data.decode("utf-8-sig" if at_start else "utf-8")
    except UnicodeDecodeError as err:
        raise ListingError(
            f"SOURCE '{resolver.manifest.source}' is not a folder, an image (by extension) or a text "
            "manifest of URIs"
        ) from err
    for number, line in enumerate(text.split("\n"), start=first_line):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield resolver.row(number, entry)


def _batches_rows(
    batches: Iterable[pa.RecordBatch], columns: Columns, first_row: int, resolver: _Resolver
) -> Iterator[_Row]:
    row = first_row
    for batch in batches:
        yield from _table_rows(batch, columns, row, resolver)
        row += batch.num_rows


def _table_rows(
    table: pa.RecordBatch | pa.Table, columns: Columns, first_row: int, resolver: _Resolver
) -> Iterator[_Row]:
    """A table manifest's rows, numbered from first_row, as entries; the rows it skips are left out."""
    count = table.num_rows
    present = set(table.column_names)

    def values(name: str | None) -> Iterable[Any]:
        if name is None or name not in present:
            return itertools.repeat(None, count)
        return table.column(name).to_pylist()

    sizes, etags = values(columns.size), list(values(columns.etag))
    # A time only matters without an ETag, and turning a column of times into Python is slow.
    times = itertools.repeat(None, count) if all(etags) else values(columns.last_modified)
    numbers = range(first_row, first_row + count)
    source = resolver.manifest.source
    if columns.uri is not None:
        for number, uri, size, etag, modified in zip(
            numbers, values(columns.uri), sizes, etags, times, strict=False
        ):
            entry = uri.strip() if isinstance(uri, str) else ""
            if not entry:
                yield _Row(number, "", None, problem=f"row {number} of the manifest '{source}' has no uri")
                continue
            yield resolver.row(number, entry, *_given(size, etag, modified))
        return
    versions = columns.is_latest in present or columns.is_delete_marker in present
    flags = zip(values(columns.is_latest), values(columns.is_delete_marker), strict=False)
    rows = zip(numbers, values(columns.bucket), values(columns.key), sizes, etags, times, flags, strict=False)
    for number, bucket, key, size, etag, modified, (latest, deleted) in rows:
        if versions and (_flag(deleted) is True or _flag(latest) is False):
            continue  # a delete marker or an older version: not the object s3://bucket/key reads
        if not bucket or not key:
            missing = "bucket" if not bucket else "key"
            yield _Row(number, "", None, problem=f"row {number} of the manifest '{source}' has no {missing}")
            continue
        key = unquote_plus(key) if columns.url_encoded_keys else str(key)
        if key.endswith("/") or not is_image_name(key):
            continue  # a directory marker or not an image: an inventory lists every object
        yield _Row(number, "s3", f"{bucket}/{key}", *_given(size, etag, modified))


def _batch_range(
    batch: pa.RecordBatch | pa.Table, columns: Columns, excluded: Excluded | None
) -> tuple[str, str | None, str | None] | None:
    """The storage and the least and greatest path of a batch's entries (None, None: it has none), by
    pyarrow: what `_table_rows` + `_Survey.add` find, ~50x faster. None when the batch needs the row by
    row path to be exact: a null or empty uri, whitespace around one, '@' or '?' (credentials), a
    trailing '/', more than one scheme or a relative path; keys to URL-decode; flags of other types."""
    import pyarrow.compute as pc

    if batch.num_rows == 0:
        return None
    if columns.uri is not None:
        uris = _strings(batch.column(columns.uri))
        if uris is None or uris.null_count or pc.any(pc.match_substring_regex(uris, _ODD_URI)).as_py():
            return None
        low, high = (text or "" for text in _least_greatest(uris))
        scheme, sep, _ = low.partition("://")
        prefix = f"{scheme}://"
        # Every string between the least and the greatest shares their common prefix: all have this scheme.
        if not sep or scheme != scheme.lower() or not high.startswith(prefix):
            return None
        try:
            protocol, strip = _storage_of(scheme)
        except (ValueError, ImportError):
            return None
        if strip(low) != low[len(prefix) :] or strip(high) != high[len(prefix) :]:
            return None  # this storage's paths are not the URIs less the scheme
        paths = pc.utf8_slice_codeunits(uris, len(prefix))
    else:
        bucket, key = _strings(batch.column(columns.bucket)), _strings(batch.column(columns.key))
        if bucket is None or key is None:
            return None
        if columns.url_encoded_keys and pc.any(pc.match_substring_regex(key, "[%+]")).as_py():
            return None
        keep = pc.and_(_nonempty(bucket), pc.and_(_nonempty(key), pc.match_substring_regex(key, _IMAGE_KEY)))
        for name, skip_when in ((columns.is_delete_marker, True), (columns.is_latest, False)):
            if name is not None and name in batch.column_names:
                skipped = _flag_is(batch.column(name), skip_when)
                if skipped is None:
                    return None
                keep = pc.and_(keep, pc.invert(skipped))
        keep = pc.fill_null(keep, False)
        paths = pc.binary_join_element_wise(bucket.filter(keep), key.filter(keep), "/")
        protocol = "s3"
    if excluded is not None and excluded.protocol == protocol:
        inside = pc.or_(pc.equal(paths, excluded.path), pc.starts_with(paths, excluded.path + "/"))
        paths = paths.filter(pc.invert(pc.fill_null(inside, False)))
    if len(paths) == 0:
        return protocol, None, None
    return (protocol, *_least_greatest(paths))


def _strings(column: Any) -> Any:
    """A string column as pyarrow strings (a dictionary-encoded one decoded), or None for other types."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return None
    return column.cast(pa.string())


def _nonempty(column: Any) -> Any:
    import pyarrow.compute as pc

    return pc.fill_null(pc.not_equal(column, ""), False)


def _flag_is(column: Any, value: bool) -> Any:
    """Where a flag column (booleans, or 'true'/'false' text) holds `value` (as `_flag` reads it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(column.type):
        return pc.fill_null(pc.equal(column, value), False)
    text = _strings(column)
    if text is None:
        return None
    normalized = pc.utf8_lower(pc.utf8_trim_whitespace(text))
    return pc.fill_null(pc.equal(normalized, "true" if value else "false"), False)


def _least_greatest(strings: Any) -> tuple[str | None, str | None]:
    import pyarrow.compute as pc

    extremes = pc.min_max(strings)
    return extremes["min"].as_py(), extremes["max"].as_py()


def _flag(value: Any) -> bool | None:
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    return value if isinstance(value, bool) else None


def _given(size: Any, etag: Any, modified: Any) -> tuple[int, str | None]:
    """(size, fingerprint) from a row's columns; the fingerprint is None when they do not give one."""
    if size is None or size == "":
        return 0, None
    try:
        size = int(size)
    except (TypeError, ValueError):
        return 0, None
    etag = etag.strip().strip('"') if isinstance(etag, str) else ""
    if etag:
        return size, fingerprint({"size": size, "ETag": etag})
    if isinstance(modified, str):
        modified = _parse_time(modified.strip())
    if modified is None:
        return size, None
    return size, fingerprint({"size": size, "LastModified": modified})


def _parse_time(text: str) -> datetime | str | None:
    """An inventory's '2024-05-01T12:00:00.000Z' as the datetime a listing gives; other text as it is."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return text


# ----------------------------------------------------------------------------------------------------------
# A shard's rows -> refs


def _listed(
    manifest: Manifest,
    rows: Iterable[_Row],
    storage_options: Mapping[str, Any] | None,
    *,
    chunk_rows: int | None,
) -> Iterator[ImageRef]:
    """The rows as refs, a chunk of chunk_rows rows at a time (None: all at once): deduplicated, sorted
    by relpath, looked up where the manifest gives no fingerprint, and collisions flagged."""
    fs = manifest.entries_filesystem(storage_options)
    if chunk_rows is None:
        yield from _chunk_refs(manifest, fs, rows)
        return
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, chunk_rows)):
        yield from _chunk_refs(manifest, fs, chunk)


def _chunk_refs(
    manifest: Manifest, fs: fsspec.AbstractFileSystem, rows: Iterable[_Row]
) -> Iterator[ImageRef]:
    root, excluded = manifest.root, manifest.excluded
    problems: list[ImageRef] = []
    entries: dict[str, tuple[str, int, str | None]] = {}  # path -> relpath, size, fingerprint (None: look up)
    for row in rows:
        path = row.path
        if path is None:
            uri = f"{manifest.source}#{manifest.word}={row.number}"
            problems.append(ImageRef(uri=uri, relpath="", fingerprint="", size=0, problem=row.problem))
            continue
        if row.protocol != manifest.storage:
            raise _mixed_storages(manifest, manifest.storage or manifest.protocol, row.protocol)
        if path in entries or _covers(excluded, row.protocol, path):
            continue  # the same image twice is still one image: never labeled or counted twice
        if not path.startswith(root):
            changed = f"the manifest '{manifest.source}' changed after the job was planned: run it again"
            problems.append(make_ref(fs, FoundFile(path, 0, "", changed), ""))
            continue
        entries[path] = (path[len(root) :], row.size, row.fingerprint)
    yield from problems
    ordered = sorted(entries.items(), key=lambda entry: entry[1][0])
    yield from flag_collisions(_looked_up(fs, ordered))


def _looked_up(
    fs: fsspec.AbstractFileSystem, entries: Sequence[tuple[str, tuple[str, int, str | None]]]
) -> Iterator[ImageRef]:
    """The entries in their order as refs; those without a fingerprint looked up, a chunk at a time."""
    pool: ThreadPoolExecutor | None = None
    try:
        for start in range(0, len(entries), _LOOKUP_CHUNK):
            chunk = entries[start : start + _LOOKUP_CHUNK]
            unknown = [path for path, (_, _, found) in chunk if found is None]
            looked_up: dict[str, FoundFile] = {}
            if unknown:
                pool = pool or ThreadPoolExecutor(max_workers=LOOKUP_THREADS)
                looked_up = dict(
                    zip(unknown, pool.map(lambda path: _look_up(fs, path), unknown), strict=True)
                )
            for path, (relpath, size, found) in chunk:
                yield make_ref(
                    fs, looked_up[path] if found is None else FoundFile(path, size, found), relpath
                )
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _look_up(fs: fsspec.AbstractFileSystem, path: str) -> FoundFile:
    """Size and fingerprint of one manifest entry, or why it cannot be labeled."""
    try:
        if is_local(fs):
            st = os.stat(path)  # follows symlinks, unlike fsspec's local info
            if stat.S_ISDIR(st.st_mode):
                return FoundFile(path, 0, "", "listed in the manifest but it is a folder, not an image file")
            return FoundFile(path, st.st_size, local_fingerprint(st))
        fs.invalidate_cache(path)
        info = call_with_retry(lambda: fs.info(path), f"look up '{uri_for(fs, path)}'")
    except (FileNotFoundError, NotADirectoryError):
        return FoundFile(path, 0, "", "listed in the manifest but does not exist")
    except PermissionError as err:
        return FoundFile(path, 0, "", f"listed in the manifest but access is denied: {err}")
    except (OSError, StorageError) as err:
        reason = f"listed in the manifest but cannot be looked up: {type(err).__name__}: {err}"
        return FoundFile(path, 0, "", reason)
    if info.get("type") == "directory":
        return FoundFile(path, 0, "", "listed in the manifest but it is a folder, not an image file")
    return FoundFile(path, int(info.get("size") or 0), fingerprint(info))


# ----------------------------------------------------------------------------------------------------------
# Reading manifests


def _size(fs: fsspec.AbstractFileSystem, path: str, display: str) -> int:
    if is_local(fs):
        return os.stat(path).st_size
    info = call_with_retry(lambda: fs.info(path), f"look up the manifest '{display}'")
    return int(info.get("size") or 0)


def _head(fs: fsspec.AbstractFileSystem, path: str, size: int, display: str) -> bytes:
    if size < len(PARQUET_MAGIC):
        return b""
    return call_with_retry(
        lambda: fs.cat_file(path, start=0, end=len(PARQUET_MAGIC)), f"read the manifest '{display}'"
    )


def _read_range(fs: fsspec.AbstractFileSystem, manifest: Manifest, start: int, stop: int) -> bytes:
    if stop <= start:
        return b""
    return call_with_retry(
        lambda: fs.cat_file(manifest.path, start=start, end=stop),
        f"read bytes {start}-{stop} of the manifest '{manifest.source}'",
    )


def _pieces(
    fs: fsspec.AbstractFileSystem,
    manifest: Manifest,
    start: int,
    size: int,
    piece_bytes: int,
    record_end: Callable[[bytes], int],
) -> Iterator[tuple[int, bytes]]:
    """The bytes [start, size) as (offset, piece): pieces of about piece_bytes, each ending where
    `record_end` says a record ends (a longer record makes a longer piece); the last ends the file."""
    position, pending, pending_start = start, b"", start
    while position < size:
        stop = min(size, position + piece_bytes)
        block = pending + _read_range(fs, manifest, position, stop)
        position = stop
        cut = len(block) if position >= size else record_end(block)
        if cut:
            yield pending_start, block[:cut]
        pending, pending_start = block[cut:], pending_start + cut


def _last_line_end(block: bytes) -> int:
    return block.rfind(b"\n") + 1


def _last_record_end(block: bytes) -> int:
    """The offset just past the last newline of `block` that ends a CSV record, 0 if none. `block` starts
    at a record; a newline ends one when an even number of '"' precede it (RFC 4180: a quoted field
    doubles its quotes, so only a newline inside a quoted field has an odd number before it)."""
    end = block.rfind(b"\n")
    if end < 0:
        return 0
    quotes = block.count(b'"', 0, end)
    while quotes % 2:
        previous = block.rfind(b"\n", 0, end)
        if previous < 0:
            return 0
        quotes -= block.count(b'"', previous, end)
        end = previous
    return end + 1


def _first_record_end(block: bytes, start: int) -> int:
    """The offset just past the first CSV record from `start` (the block's end when it holds no more)."""
    quotes, end = 0, start
    while (newline := block.find(b"\n", end)) >= 0:
        quotes += block.count(b'"', end, newline)
        end = newline + 1
        if quotes % 2 == 0:
            return end
    return len(block)


def _csv_fields(record: bytes, manifest: Manifest) -> list[str]:
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ListingError(f"the CSV manifest '{manifest.source}' is not UTF-8 text") from err
    return next(csv.reader(io.StringIO(text, newline="")), [])


def _positional_names(count: int) -> tuple[str, ...]:
    return tuple(f"column_{i + 1}" for i in range(count))


def _looks_like_inventory(fields: Sequence[str]) -> bool:
    return len(fields) >= 2 and _BUCKET_NAME.fullmatch(fields[0]) is not None and bool(fields[1])


def _named_columns(header: Sequence[str]) -> Columns | None:
    """A CSV header's columns, or None when it names neither `uri` nor `bucket` and `key`."""
    columns = _columns_by_name(header)
    return None if columns is None else replace(columns, csv_names=tuple(header))


def _parquet_columns(names: Sequence[str], manifest: Manifest) -> Columns:
    columns = _columns_by_name(names)
    if columns is None:
        raise ListingError(
            f"the Parquet manifest '{manifest.source}' has neither a 'uri' column nor 'bucket' and 'key' "
            f"columns (it has: {', '.join(names) or 'none'})"
        )
    return columns


def _columns_by_name(names: Sequence[str]) -> Columns | None:
    """The columns named (case-insensitively, the first of equal names) uri, or bucket and key, with the
    optional fingerprint and version columns."""
    by_name: dict[str, str] = {}
    for name in names:
        by_name.setdefault(name.strip().lower(), name)

    def pick(*candidates: str) -> str | None:
        return next((by_name[name] for name in candidates if name in by_name), None)

    uri, bucket, key = pick("uri"), pick("bucket"), pick("key")
    if uri is None and (bucket is None or key is None):
        return None
    inventory = uri is None
    return Columns(
        uri=uri,
        bucket=bucket if inventory else None,
        key=key if inventory else None,
        size=pick("size"),
        etag=pick("etag", "e_tag"),
        last_modified=pick("last_modified", "last_modified_date"),
        is_latest=pick("is_latest") if inventory else None,
        is_delete_marker=pick("is_delete_marker") if inventory else None,
    )


def _inventory_columns(sample: pa.RecordBatch | pa.Table) -> Columns:
    """A header-less S3 Inventory CSV's columns, recognized by the values of a sample of its rows."""
    names = tuple(sample.column_names)
    values = [[value for value in sample.column(name).to_pylist() if value] for name in names]

    def all_match(index: int, pattern: re.Pattern[str]) -> bool:
        return (
            index < len(values) and bool(values[index]) and all(pattern.fullmatch(v) for v in values[index])
        )

    def first(start: int, pattern: re.Pattern[str]) -> str | None:
        return next((names[i] for i in range(start, len(names)) if all_match(i, pattern)), None)

    # Bucket, Key[, VersionId, IsLatest, IsDeleteMarker], then the optional fields in S3's order.
    versioned = all_match(3, _BOOLEAN) and all_match(4, _BOOLEAN)
    rest = 5 if versioned else 2
    return Columns(
        bucket=names[0],
        key=names[1],
        size=first(rest, _DIGITS),
        etag=first(rest, _ETAG),
        last_modified=first(rest, _ISO_TIME),
        is_latest=names[3] if versioned else None,
        is_delete_marker=names[4] if versioned else None,
        url_encoded_keys=True,
        csv_names=names,
    )


def _table_columns(manifest: Manifest) -> Columns:
    if manifest.columns is None:
        raise AssertionError(f"the table manifest '{manifest.source}' was planned without its columns")
    return manifest.columns


def _csv_options(names: Sequence[str], include: Sequence[str] | None, **read: Any) -> dict[str, Any]:
    """pyarrow.csv options: the columns named (no header), `include` of them (None: all) as strings."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    wanted = list(names if include is None else include)
    return {
        "read_options": pcsv.ReadOptions(column_names=list(names), use_threads=False, **read),
        "parse_options": pcsv.ParseOptions(newlines_in_values=True),
        "convert_options": pcsv.ConvertOptions(
            include_columns=wanted, column_types=dict.fromkeys(wanted, pa.string())
        ),
    }


def _parse_csv(
    data: bytes, manifest: Manifest, names: Sequence[str], include: Sequence[str] | None
) -> pa.Table:
    """Whole CSV records without a header -> a table of `include` (None: all) columns, as strings."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if not data.strip():
        wanted = names if include is None else include
        return pa.table({name: pa.array([], pa.string()) for name in wanted})
    try:
        return pcsv.read_csv(pa.py_buffer(data), **_csv_options(names, include))
    except pa.ArrowInvalid as err:
        raise _unreadable(manifest, err) from err


def _gzip_csv_batches(
    fs: fsspec.AbstractFileSystem,
    manifest: Manifest,
    names: Sequence[str],
    include: Sequence[str] | None,
    *,
    header: bool,
) -> Iterator[pa.RecordBatch]:
    """A gzip CSV's records (after its header line when `header`) streamed as batches of strings."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    options = _csv_options(names, include, skip_rows=1 if header else 0, block_size=_CSV_BLOCK_BYTES)
    with fs.open(manifest.path, "rb") as raw:
        try:
            yield from pcsv.open_csv(pa.input_stream(raw, compression="gzip"), **options)
        except (pa.ArrowInvalid, OSError, EOFError) as err:
            if "Empty CSV file" in str(err):
                return
            raise _unreadable(manifest, err) from err


def _open_parquet(fs: fsspec.AbstractFileSystem, manifest: Manifest) -> Any:
    """A pyarrow ParquetFile of the manifest (a context manager: closing it closes the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if is_local(fs):
            return pq.ParquetFile(manifest.path)
        # Exact ranged reads: a read-ahead cache would fetch far past the row groups a shard reads.
        return pq.ParquetFile(fs.open(manifest.path, "rb", cache_type="none"))
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(manifest, err) from err


def _parquet_batches(
    fs: fsspec.AbstractFileSystem, manifest: Manifest, columns: Sequence[str], row_groups: Sequence[int]
) -> Iterator[pa.RecordBatch]:
    with _open_parquet(fs, manifest) as parquet:
        batches = parquet.iter_batches(
            batch_size=_SCAN_BATCH_ROWS, row_groups=list(row_groups), columns=list(columns)
        )
        yield from _arrow_errors(batches, manifest)


def _arrow_errors(batches: Iterable[pa.RecordBatch], manifest: Manifest) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(manifest, err) from err


def _unreadable(manifest: Manifest, err: BaseException) -> ListingError:
    # pyarrow's CSV messages end with the offending row, which may hold anything: keep the reason only.
    reason = ": ".join(str(err).split(": ")[:2])
    return ListingError(f"the manifest '{manifest.source}' cannot be read: {reason}")
