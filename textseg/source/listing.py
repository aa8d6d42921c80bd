"""SOURCE -> shards, and the listing of one shard: folders, prefixes and globs (manifests: `manifests`).

The driver never lists SOURCE whole. `plan_shards` checks SOURCE (a missing or forbidden SOURCE is a
ListingError before any model loads) and describes it as shards: a folder's own files, and each of its
subfolders' whole trees, expanded level by level until there are enough shards to keep a cluster's CPUs
listing in parallel (`target`). Each shard is listed by one task (`Shard.refs`), streaming. Every folder
belongs to exactly one shard, so mask-name collisions, which only happen inside one folder, are decided
by the shard that owns it (`textseg.source.refs.flag_collisions`).

SOURCE is one of:
- a folder or prefix: image files below it at any depth, found by extension (IMAGE_EXTENSIONS,
  case-insensitive); relpath is relative to it. Directory markers and other files are skipped.
- a glob ('s3://b/raw/**/*.jpg', '/data/*.png'): the image files that match; relpath is relative to the
  glob's folder before its first wildcard.
- a single image file: relpath is its name.
- a STAC item, collection, catalog or saved search result (a `.json` file): see `textseg.source.stac`.
- a manifest, any other file: see `textseg.source.manifests`.
`exclude_prefix` (a URI, e.g. DEST when it lies inside SOURCE) skips everything under it.

Within a shard, folders are listed in name order, files before subfolders. Local symlinks are followed; a
folder reached twice (a symlink loop) is listed once within a shard. On S3 a shard's prefix is listed
flat, a page at a time, so memory stays flat and deep trees (z/x/y tiles) cost one request per 1000 keys,
not one per folder.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import fsspec
import fsspec.asyn
from fsspec.core import has_magic
from fsspec.utils import glob_translate

from textseg.source.refs import (
    Excluded,
    FoundFile,
    ImageRef,
    ListingError,
    exists_literally,
    fingerprint,
    flag_collisions,
    info_for_listing,
    is_image_name,
    local_fingerprint,
    make_ref,
    protocol_name,
    relative_to,
)
from textseg.storage import (
    StorageError,
    call_with_retry,
    filesystem_for,
    is_local,
    is_transient,
    redact_uri,
    relpath_problem,
    split_credentials,
)

_S3_PAGE = 1000  # S3 returns at most 1000 keys per page: hand them over a page at a time

# Shards planned for a folder SOURCE: a few per CPU of a large cluster, so listing keeps up with decoding.
# Planning lists at most this many levels (one request per folder, by delimiter) to get there.
TARGET_SHARDS = 256
MAX_PLANNED_LEVELS = 3


class Shard(Protocol):
    """A part of SOURCE that one listing task lists completely."""

    @property
    def name(self) -> str:
        """Stable and unique within a run (tallies are named by it, so a retried task overwrites its own)."""
        ...

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        """The shard's images, collisions flagged, streamed."""
        ...


@dataclass(frozen=True)
class FolderShard:
    """A folder's own files (`recursive=False`) or its whole subtree, relpaths relative to `root`."""

    source: str  # SOURCE as shown in messages (no credentials)
    protocol: str  # SOURCE's filesystem, rebuilt in the task from storage options
    root: str
    folder: str
    recursive: bool
    pattern: str | None = None  # a glob's regex that paths must match
    maxdepth: int | None = None  # a glob without '**': matches lie exactly this many levels below root
    excluded: Excluded | None = None
    # Local disk: (st_dev, st_ino) of the folders other shards list, so a symlink into one of them (or a
    # loop back to an ancestor) does not list its images a second time under another name.
    owned_elsewhere: frozenset[tuple[int, int]] = field(default=frozenset(), compare=False)

    @property
    def name(self) -> str:
        return ("tree:" if self.recursive else "files:") + self.folder

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        fs, _ = filesystem_for(f"{self.protocol}://{self.folder}", storage_options)
        depth_below_root = (
            0 if self.folder == self.root else relative_to(self.folder, self.root).count("/") + 1
        )
        maxdepth = None if self.maxdepth is None else self.maxdepth - depth_below_root
        if not self.recursive:
            maxdepth = 1
        if maxdepth is not None and maxdepth < 1:
            return iter(())
        matcher = re.compile(self.pattern) if self.pattern else None
        found = (
            f
            for f in _walk(fs, self.folder, maxdepth, self.source, self.excluded, self.owned_elsewhere)
            if is_image_name(f.path)
            and not Excluded.covers(self.excluded, fs, f.path)
            and (matcher is None or matcher.match(f.path))
        )
        return flag_collisions(make_ref(fs, f, relative_to(f.path, self.root)) for f in found)


@dataclass(frozen=True)
class FileShard:
    """SOURCE is a single image."""

    source: str
    protocol: str
    path: str

    @property
    def name(self) -> str:
        return "file:" + self.path

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        fs, _ = filesystem_for(f"{self.protocol}://{self.path}", storage_options)
        info = info_for_listing(fs, self.path, f"SOURCE '{self.source}'")
        found = FoundFile(self.path, int(info.get("size") or 0), fingerprint(info))
        yield make_ref(fs, found, posixpath.basename(self.path))


def plan_shards(
    source: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    exclude_prefix: str | None = None,
    target: int = TARGET_SHARDS,
    stac_asset: str | None = None,
) -> list[Shard]:
    """SOURCE checked and described as shards (O(shards) memory; a few folder listings at most).

    Raises ListingError for a missing, forbidden or unreadable SOURCE. `stac_asset`: the asset of each
    STAC item to label (`textseg.source.stac`).
    """
    fs, path = filesystem_for(source, storage_options)
    display = redact_uri(source)
    fs.invalidate_cache(path)  # a long-lived process may hold a cached listing from before the change
    excluded = Excluded.of(exclude_prefix, storage_options)
    protocol = protocol_name(fs)
    if has_magic(path) and not exists_literally(fs, path, display):
        return _glob_shards(fs, protocol, path, display, excluded, target)
    info = info_for_listing(fs, path, f"SOURCE '{display}'")
    if info["type"] == "directory":
        root = path.rstrip("/") or "/"
        return _folder_shards(fs, FolderShard(display, protocol, root, root, True, excluded=excluded), target)
    if is_image_name(path):
        return [FileShard(display, protocol, path)]
    if path.lower().endswith(".json"):
        from textseg.source.stac import plan_stac_shards  # pystac is optional (the geo extra)

        return plan_stac_shards(fs, path, display, storage_options, asset=stac_asset, target=target)
    from textseg.source.manifests import plan_manifest_shards  # manifests import this module's types

    return plan_manifest_shards(fs, path, display, storage_options, excluded)


def source_within(source: str, prefix: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether SOURCE, a folder, prefix or glob, is `prefix` or lies under it: excluding `prefix` (DEST)
    from the listing then leaves nothing to list. A file SOURCE (an image, a manifest, STAC JSON) never
    is: its entries are listed wherever they lie. One or two metadata requests."""
    fs, path = filesystem_for(source, storage_options)
    excluded = Excluded.of(prefix, storage_options)
    if has_magic(path) and not exists_literally(fs, path, redact_uri(source)):
        literal = "/".join(itertools.takewhile(lambda part: not has_magic(part), path.split("/")))
        return Excluded.covers(excluded, fs, literal.rstrip("/") or "/")
    try:
        folder = fs.isdir(path)
    except OSError:  # plan_shards reports an unreachable SOURCE in its own words
        return False
    return bool(folder) and Excluded.covers(excluded, fs, path.rstrip("/") or "/")


def _glob_shards(
    fs: fsspec.AbstractFileSystem,
    protocol: str,
    pattern: str,
    display: str,
    excluded: Excluded | None,
    target: int,
) -> list[Shard]:
    """A glob walks from the folder before its first wildcard (as fsspec's glob)."""
    first_magic = min(index for index in (pattern.find(c) for c in "*?[") if index >= 0)
    slash = pattern.rfind("/", 0, first_magic)
    if slash < 0:
        raise ListingError(f"the glob '{display}' needs a fixed bucket or folder before its first wildcard")
    root = pattern[:slash] or "/"
    # Without '**' a match is exactly this many levels below root, so the walk need not go deeper.
    maxdepth = None if "**" in pattern else pattern[slash + 1 :].count("/") + 1
    info_for_listing(fs, root, f"the folder '{protocol}://{root}' of the glob '{display}'")
    whole = FolderShard(display, protocol, root, root, True, glob_translate(pattern), maxdepth, excluded)
    return _folder_shards(fs, whole, target)


def _folder_shards(fs: fsspec.AbstractFileSystem, whole: FolderShard, target: int) -> list[Shard]:
    return list(_split_folder(fs, whole, target))


def _split_folder(fs: fsspec.AbstractFileSystem, whole: FolderShard, target: int) -> list[FolderShard]:
    """Split a tree shard into its folder's own files plus one tree shard per subfolder, breadth first,
    until there are `target` shards or MAX_PLANNED_LEVELS levels were split. Only the folder names are
    kept; the files met on the way are counted by their own shard's task, not here."""
    done: list[FolderShard] = []
    frontier = [whole]
    planned = {_inode(whole.folder)} if is_local(fs) else set()  # a folder reached twice is split once
    for _ in range(MAX_PLANNED_LEVELS):
        if len(done) + len(frontier) >= target or not frontier:
            break
        next_frontier: list[FolderShard] = []
        for shard in frontier:
            if shard.maxdepth is not None and _depth(shard) + 1 >= shard.maxdepth:
                done.append(shard)  # matches lie in this folder's files or one level down: not worth it
                continue
            subfolders = _subfolders(fs, shard)
            if subfolders is None:
                done.append(shard)
                continue
            if is_local(fs):
                subfolders = [sub for sub in subfolders if _inode(sub) not in planned]
                planned.update(_inode(sub) for sub in subfolders)
            done.append(replace(shard, recursive=False))
            next_frontier += [replace(shard, folder=sub) for sub in subfolders]
        frontier = next_frontier
    # In the order a single depth-first walk lists: a folder's files, then its subfolders by name.
    shards = sorted(done + list(frontier), key=_walk_order)
    if not is_local(fs) or len(shards) == 1:
        return list(shards)
    owned = frozenset(_inode(s.folder) for s in shards)
    return [replace(s, owned_elsewhere=owned - {_inode(s.folder)}) for s in shards]


def _walk_order(shard: FolderShard) -> tuple[str, ...]:
    segments = () if shard.folder == shard.root else tuple(relative_to(shard.folder, shard.root).split("/"))
    return segments if shard.recursive else (*segments, "")


def _inode(folder: str) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _depth(shard: FolderShard) -> int:
    return 0 if shard.folder == shard.root else relative_to(shard.folder, shard.root).count("/") + 1


def _subfolders(fs: fsspec.AbstractFileSystem, shard: FolderShard) -> list[str] | None:
    """The folder's direct subfolders in name order, skipping excluded ones (one delimiter listing);
    None when the folder cannot be split safely: an object store "folder" whose name is not a plain
    segment ('raw//x.jpg' lists as a folder 'raw/'), which only a flat listing of the whole prefix sees
    as it is."""
    if is_local(fs):
        try:
            with os.scandir(shard.folder) as scan:
                names = sorted(e.path for e in scan if e.is_dir())
        except PermissionError as err:
            raise ListingError(
                f"access denied listing '{shard.folder}' under SOURCE '{shard.source}'"
            ) from err
    else:
        entries = call_with_retry(
            lambda: fs.ls(shard.folder, detail=True, refresh=True), f"list '{shard.source}'"
        )
        names = sorted(e["name"] for e in entries if e.get("type") == "directory")
        prefix = shard.folder.rstrip("/") + "/"
        if any(
            not n.startswith(prefix)
            or relpath_problem(n[len(prefix) :].rstrip("/"))
            or "/" in n[len(prefix) :].rstrip("/")
            for n in names
        ):
            return None
        names = [n.rstrip("/") for n in names]
    return [n for n in names if not Excluded.covers(shard.excluded, fs, n)]


# ----------------------------------------------------------------------------------------------------------
# Walkers: every file below root (at most maxdepth levels down), as FoundFile


def _walk(
    fs: fsspec.AbstractFileSystem,
    root: str,
    maxdepth: int | None,
    display: str,
    excluded: Excluded | None,
    owned_elsewhere: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[FoundFile]:
    """Callers still filter files by `excluded`; a walker that can skip the whole subtree does."""
    if is_local(fs):
        prune = lambda folder: Excluded.covers(excluded, fs, folder)  # noqa: E731
        yield from _walk_local(root, maxdepth, display, prune, owned_elsewhere)
    elif type(fs).__module__.startswith("s3fs") and hasattr(fs, "_iterdir"):
        yield from _walk_s3(fs, root, recursive=maxdepth != 1, display=display)
    else:
        # gcsfs, adlfs, ...: their find() is one flat listing too, returned whole rather than streamed.
        files = call_with_retry(lambda: fs.find(root, maxdepth=maxdepth, detail=True), f"list '{display}'")
        for name, info in sorted(files.items()):
            yield FoundFile(name, int(info.get("size") or 0), fingerprint(info))


def _walk_local(
    root: str,
    maxdepth: int | None,
    display: str,
    prune: Callable[[str], bool],
    owned_elsewhere: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[FoundFile]:
    """Depth-first in name order, files before subfolders, following symlinks; each folder listed once.

    Subfolders for which `prune` is true are not entered, nor folders in `owned_elsewhere`.
    """
    listed: set[tuple[int, int]] = set(owned_elsewhere)
    stack: list[tuple[str, int]] = [(root, 1)]
    while stack:
        folder, depth = stack.pop()
        try:
            folder_stat = os.stat(folder)
            if (folder_stat.st_dev, folder_stat.st_ino) in listed:
                continue  # a symlink loop, or a second link to a folder whose images are already listed
            listed.add((folder_stat.st_dev, folder_stat.st_ino))
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except FileNotFoundError:
            continue  # a subfolder deleted while we listed: its images are not part of SOURCE any more
        except PermissionError as err:
            raise ListingError(f"access denied listing '{folder}' under SOURCE '{display}': {err}") from err
        subfolders: list[str] = []
        for entry in entries:
            if entry.is_dir():  # follows symlinks
                if (maxdepth is None or depth < maxdepth) and not prune(entry.path):
                    subfolders.append(entry.path)
            elif entry.is_file():
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # deleted while we listed: it is not part of SOURCE any more
                except OSError as err:
                    yield FoundFile(entry.path, 0, "", f"cannot read its size and time: {err}")
                    continue
                yield FoundFile(entry.path, st.st_size, local_fingerprint(st))
            elif entry.is_symlink():
                yield FoundFile(entry.path, 0, "", "a broken symbolic link")
        stack.extend((subfolder, depth + 1) for subfolder in reversed(subfolders))


def _walk_s3(fs: Any, root: str, *, recursive: bool, display: str) -> Iterator[FoundFile]:
    """The keys under root in key order, one S3 page at a time.

    Uses s3fs's `_iterdir` (a paginated ListObjectsV2, each page retried by s3fs): fs.find would hold the
    whole listing in memory and fs.walk sends one request per "folder", both ruinous for millions of tiles.
    A flat listing also sees keys with '..', '.' or empty segments exactly as they are, so they become
    problem refs rather than confusing a folder-by-folder walk ('raw//x.jpg' lists as the folder 'raw/').
    """
    bucket, _, key = root.partition("/")
    prefix = f"{key.rstrip('/')}/" if key else ""
    # An abandoned listing needs no explicit close: the generator runs on fsspec's event loop, whose
    # async-generator hooks close it when it is garbage collected.
    pages = fs._iterdir(bucket, prefix=prefix, delimiter="" if recursive else "/")
    while True:
        try:
            page = fsspec.asyn.sync(fs.loop, _take, pages, _S3_PAGE)
        except PermissionError as err:
            raise ListingError(f"access denied listing SOURCE '{display}': {err}") from err
        except Exception as err:
            if is_transient(err):
                raise StorageError(
                    f"listing SOURCE '{display}' failed part-way: {type(err).__name__}: {err}; run again"
                ) from err
            raise
        if not page:
            return
        for info in page:
            if info.get("type") == "file" and not info["name"].endswith("/"):  # not a directory marker
                yield FoundFile(info["name"], int(info.get("size") or 0), fingerprint(info))


async def _take(pages: Any, count: int) -> list[dict[str, Any]]:
    """Up to `count` items from an async iterator; fewer only at its end."""
    items: list[dict[str, Any]] = []
    async for item in pages:
        items.append(item)
        if len(items) >= count:
            break
    return items


def list_images(
    source: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    exclude_prefix: str | None = None,
    stac_asset: str | None = None,
) -> Iterator[ImageRef]:
    """Every image under SOURCE, shard after shard, in this process: for small jobs, dry runs and tests.

    SOURCE is checked when this is called (ListingError), the listing itself streams.
    """
    options = {**split_credentials(source)[1], **(storage_options or {})}  # as JobConfig moves them
    shards = plan_shards(source, options, exclude_prefix=exclude_prefix, stac_asset=stac_asset)
    return itertools.chain.from_iterable(shard.refs(options) for shard in shards)
