"""SOURCE (folder, prefix, glob, manifest) -> a stream of image refs (uri, relpath, fingerprint).

The listing decides what a run will attempt, so it accounts for every image it finds: an image whose name
cannot become a safe relative path (an S3 key with a literal '..', '.' or empty segment), a broken symlink or
a manifest line that does not exist is not dropped but yielded with `problem` set, and the runner turns it
into an `error` row. Job-level problems (SOURCE missing, access denied) raise ListingError before any work.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import fsspec
import fsspec.asyn
from fsspec.core import has_magic
from fsspec.utils import glob_translate

from textseg.storage import (
    StorageError,
    call_with_retry,
    filesystem_for,
    is_local,
    is_transient,
    read_bytes,
    redact_uri,
    relpath_problem,
    split_credentials,
    uri_for,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"})

# Manifest lines whose metadata is fetched concurrently: a HEAD request per line is ~20 ms on S3, so one at a
# time would take hours for a million-line manifest; 16 in flight keeps a single listing task busy but polite.
MANIFEST_LOOKUP_THREADS = 16
_MANIFEST_CHUNK = 256  # lines looked up per batch, so results stream out and memory stays flat

_S3_PAGE = 1000  # S3 returns at most 1000 keys per page: hand them over a page at a time


class ListingError(ValueError):
    """SOURCE cannot be listed (missing, forbidden, not a folder/image/manifest); the message says why."""


@dataclass(frozen=True)
class ImageRef:
    """One image found in SOURCE.

    uri: full URI for object stores ('s3://bucket/key'), absolute path on local disk; never with credentials.
    relpath: path relative to SOURCE, '/'-separated; always safe to join under DEST (`relpath_problem` is
        None), and '' when `problem` is set.
    fingerprint: "size:<n>;etag:<etag>" or "size:<n>;mtime:<mtime>": changes when the object changes, so an
        incremental run relabels it. '' when unknown (a problem ref).
    size: bytes, 0 when unknown.
    problem: None for an image to label; otherwise why it cannot be labeled (the runner writes an error row).
    """

    uri: str
    relpath: str
    fingerprint: str
    size: int
    problem: str | None = None


class _Found(NamedTuple):
    """A file a walker found: its path on the filesystem, and its size and fingerprint or a problem."""

    path: str
    size: int
    fingerprint: str
    problem: str | None = None


def list_images(
    source: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    exclude_prefix: str | None = None,
) -> Iterator[ImageRef]:
    """Every image under SOURCE, streamed as it is listed.

    SOURCE is checked when this is called, not when iteration starts, so a missing or forbidden SOURCE fails
    the job (ListingError) before any model loads; the listing itself then streams.

    SOURCE is one of:
    - a folder or prefix: image files below it at any depth, found by extension (IMAGE_EXTENSIONS,
      case-insensitive); relpath is relative to it. Directory markers and other files are skipped.
    - a glob ('s3://b/raw/**/*.jpg', '/data/*.png'): the image files that match; relpath is relative to the
      glob's folder before its first wildcard.
    - a single image file: relpath is its name.
    - a manifest, any other file (.txt, .csv, .lst, ...): one URI or path per line, blank lines and '#'
      comments skipped, relative lines resolved against the manifest's folder. Every line is taken as an
      image whatever its extension, duplicates once; relpath is relative to the deepest folder holding all of
      them. A line that does not exist or is a folder becomes a problem ref.
    `exclude_prefix` (a URI, e.g. DEST when it lies inside SOURCE) skips everything under it.

    Folders are listed in name order, files before subfolders. Local symlinks are followed; a folder reached
    twice (a symlink loop) is listed once. On S3 a prefix is listed flat, a page at a time, so memory stays
    flat and deep trees (z/x/y tiles) cost one request per 1000 keys, not one per folder.
    """
    fs, path = filesystem_for(source, storage_options)
    display = redact_uri(source)
    fs.invalidate_cache(path)  # a long-lived process may hold a cached listing from before the change
    excluded = _Excluded.of(exclude_prefix, storage_options)

    if has_magic(path) and not _exists(fs, path, display):
        return _list_glob(fs, path, display, excluded)
    info = _info_for_listing(fs, path, f"SOURCE '{display}'")
    if info["type"] == "directory":
        return _list_folder(fs, path.rstrip("/") or "/", display, excluded)
    if _is_image_name(path):
        found = _Found(path, int(info.get("size") or 0), _fingerprint(info))
        return iter([_ref(fs, found, posixpath.basename(path))])
    entries = _read_manifest(fs, path, display, storage_options, excluded)
    return _list_manifest_entries(entries)


def mask_relpath(relpath: str) -> str:
    """The mask's path relative to DEST/masks: relpath without its extension + '.png'.

    'a/b c.jpg' -> 'a/b c.png'. Raises ValueError for an unsafe relpath (see `relpath_problem`), so a ref
    whose `problem` was ignored can still never name a file outside DEST.
    """
    problem = relpath_problem(relpath)
    if problem is not None:
        raise ValueError(f"no mask path for an unsafe relpath: {problem}")
    return posixpath.splitext(relpath)[0] + ".png"


def find_mask_collisions(refs: Sequence[ImageRef]) -> dict[str, list[str]]:
    """relpath -> the other relpaths whose mask has the same name ('a.jpg' and 'a.png' both -> 'a.png').

    Only colliding relpaths are keys; the runner makes each of them an error row naming the others, because
    labeling either would silently overwrite (or be overwritten by) the other's mask. Problem refs are
    ignored. Names are compared case-sensitively, as S3 and Linux do.
    """
    by_mask: dict[str, list[str]] = {}
    for ref in refs:
        if ref.problem is None:
            by_mask.setdefault(mask_relpath(ref.relpath), []).append(ref.relpath)
    collisions: dict[str, list[str]] = {}
    for relpaths in by_mask.values():
        unique = sorted(set(relpaths))
        if len(unique) > 1:
            for relpath in unique:
                collisions[relpath] = [other for other in unique if other != relpath]
    return collisions


# ----------------------------------------------------------------------------------------------------------
# SOURCE kinds


def _list_folder(
    fs: fsspec.AbstractFileSystem, root: str, display: str, excluded: _Excluded | None
) -> Iterator[ImageRef]:
    """Image files at any depth below root."""
    for found in _walk(fs, root, None, display, excluded):
        if _is_image_name(found.path) and not _Excluded.covers(excluded, fs, found.path):
            yield _ref(fs, found, _relative_to(found.path, root))


def _list_glob(
    fs: fsspec.AbstractFileSystem, pattern: str, display: str, excluded: _Excluded | None
) -> Iterator[ImageRef]:
    """Image files matching a glob, walked from the folder before the first wildcard (as fsspec's glob)."""
    first_magic = min(index for index in (pattern.find(c) for c in "*?[") if index >= 0)
    slash = pattern.rfind("/", 0, first_magic)
    if slash < 0:
        raise ListingError(f"the glob '{display}' needs a fixed bucket or folder before its first wildcard")
    root = pattern[:slash] or "/"
    # Without '**' a match is exactly this many levels below root, so the walk need not go deeper.
    maxdepth = None if "**" in pattern else pattern[slash + 1 :].count("/") + 1
    _info_for_listing(fs, root, f"the folder '{uri_for(fs, root)}' of the glob '{display}'")
    matcher = re.compile(glob_translate(pattern))
    return (
        _ref(fs, found, _relative_to(found.path, root))
        for found in _walk(fs, root, maxdepth, display, excluded)
        if matcher.match(found.path)
        and _is_image_name(found.path)
        and not _Excluded.covers(excluded, fs, found.path)
    )


def _read_manifest(
    fs: fsspec.AbstractFileSystem,
    path: str,
    display: str,
    storage_options: Mapping[str, Any] | None,
    excluded: _Excluded | None,
) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """The files a manifest lists, in its order, once each: (filesystem, path, relpath)."""
    try:
        text = read_bytes(fs, path).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ListingError(
            f"SOURCE '{display}' is not a folder, an image (by extension) or a text manifest of URIs"
        ) from err
    folder = posixpath.dirname(path)
    entries: list[tuple[fsspec.AbstractFileSystem, str]] = []
    seen: set[str] = set()
    for line_number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" in entry or entry.startswith(("/", "~")):
            if split_credentials(entry)[1] or redact_uri(entry) != entry:
                raise ListingError(
                    f"line {line_number} of the manifest '{display}' embeds credentials "
                    f"('{redact_uri(entry)}'): remove them and pass credentials with --storage-option or "
                    "the AWS_* environment"
                )
            entry_fs, entry_path = filesystem_for(entry, storage_options)
        else:  # relative to the manifest's folder, on the manifest's filesystem
            entry_fs, entry_path = fs, posixpath.normpath(posixpath.join(folder, entry))
        if entry_path in seen or _Excluded.covers(excluded, entry_fs, entry_path):
            continue  # the same image twice is still one image: never labeled or counted twice
        seen.add(entry_path)
        entries.append((entry_fs, entry_path))
    protocols = sorted({_protocol_name(entry_fs) for entry_fs, _ in entries})
    if len(protocols) > 1:
        raise ListingError(
            f"the manifest '{display}' lists files on more than one storage ({', '.join(protocols)}): "
            "split it into one manifest per storage"
        )
    depth = len(_common_folder([entry_path for _, entry_path in entries]))
    return [
        (entry_fs, entry_path, "/".join(entry_path.split("/")[depth:])) for entry_fs, entry_path in entries
    ]


def _list_manifest_entries(entries: list[tuple[fsspec.AbstractFileSystem, str, str]]) -> Iterator[ImageRef]:
    """Each manifest entry looked up for its size and fingerprint, a chunk at a time, in manifest order."""
    with ThreadPoolExecutor(max_workers=MANIFEST_LOOKUP_THREADS) as pool:
        for start in range(0, len(entries), _MANIFEST_CHUNK):
            chunk = entries[start : start + _MANIFEST_CHUNK]
            for (entry_fs, _, relpath), found in zip(chunk, pool.map(_look_up, chunk), strict=True):
                yield _ref(entry_fs, found, relpath)


def _look_up(entry: tuple[fsspec.AbstractFileSystem, str, str]) -> _Found:
    """Size and fingerprint of one manifest line, or why it cannot be labeled."""
    fs, path, _ = entry
    try:
        if is_local(fs):
            st = os.stat(path)  # follows symlinks, unlike fsspec's local info
            if stat.S_ISDIR(st.st_mode):
                return _Found(path, 0, "", "listed in the manifest but it is a folder, not an image file")
            return _Found(path, st.st_size, _local_fingerprint(st))
        fs.invalidate_cache(path)
        info = call_with_retry(lambda: fs.info(path), f"look up '{uri_for(fs, path)}'")
    except (FileNotFoundError, NotADirectoryError):
        return _Found(path, 0, "", "listed in the manifest but does not exist")
    except PermissionError as err:
        return _Found(path, 0, "", f"listed in the manifest but access is denied: {err}")
    except (OSError, StorageError) as err:
        return _Found(
            path, 0, "", f"listed in the manifest but cannot be looked up: {type(err).__name__}: {err}"
        )
    if info.get("type") == "directory":
        return _Found(path, 0, "", "listed in the manifest but it is a folder, not an image file")
    return _Found(path, int(info.get("size") or 0), _fingerprint(info))


# ----------------------------------------------------------------------------------------------------------
# Walkers: every file below root (at most maxdepth levels down), as _Found


def _walk(
    fs: fsspec.AbstractFileSystem, root: str, maxdepth: int | None, display: str, excluded: _Excluded | None
) -> Iterator[_Found]:
    """Callers still filter files by `excluded`; a walker that can skip the whole subtree does."""
    if is_local(fs):
        yield from _walk_local(root, maxdepth, display, lambda folder: _Excluded.covers(excluded, fs, folder))
    elif type(fs).__module__.startswith("s3fs") and hasattr(fs, "_iterdir"):
        yield from _walk_s3(fs, root, recursive=maxdepth != 1, display=display)
    else:
        # gcsfs, adlfs, ...: their find() is one flat listing too, returned whole rather than streamed.
        files = call_with_retry(lambda: fs.find(root, maxdepth=maxdepth, detail=True), f"list '{display}'")
        for name, info in sorted(files.items()):
            yield _Found(name, int(info.get("size") or 0), _fingerprint(info))


def _walk_local(
    root: str, maxdepth: int | None, display: str, prune: Callable[[str], bool]
) -> Iterator[_Found]:
    """Depth-first in name order, files before subfolders, following symlinks; each folder listed once.

    Subfolders for which `prune` is true are not entered.
    """
    listed: set[tuple[int, int]] = set()
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
                    yield _Found(entry.path, 0, "", f"cannot read its size and time: {err}")
                    continue
                yield _Found(entry.path, st.st_size, _local_fingerprint(st))
            elif entry.is_symlink():
                yield _Found(entry.path, 0, "", "a broken symbolic link")
        stack.extend((subfolder, depth + 1) for subfolder in reversed(subfolders))


def _walk_s3(fs: Any, root: str, *, recursive: bool, display: str) -> Iterator[_Found]:
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
                yield _Found(info["name"], int(info.get("size") or 0), _fingerprint(info))


async def _take(pages: Any, count: int) -> list[dict[str, Any]]:
    """Up to `count` items from an async iterator; fewer only at its end."""
    items: list[dict[str, Any]] = []
    async for item in pages:
        items.append(item)
        if len(items) >= count:
            break
    return items


# ----------------------------------------------------------------------------------------------------------
# Small pieces


def _ref(fs: fsspec.AbstractFileSystem, found: _Found, relpath: str) -> ImageRef:
    uri = uri_for(fs, found.path)
    if found.problem is not None:
        return ImageRef(
            uri=uri, relpath="", fingerprint=found.fingerprint, size=found.size, problem=found.problem
        )
    problem = relpath_problem(relpath)
    if problem is not None:
        return ImageRef(
            uri=uri,
            relpath="",
            fingerprint=found.fingerprint,
            size=found.size,
            problem=f"its name cannot become a mask path inside DEST: {problem}; rename it",
        )
    return ImageRef(uri=uri, relpath=relpath, fingerprint=found.fingerprint, size=found.size)


def _is_image_name(path: str) -> bool:
    return not path.endswith("/") and posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _relative_to(path: str, root: str) -> str:
    """path below root -> the part after root; '/'-separated as listed, not normalized."""
    prefix = root if root.endswith("/") else root + "/"
    if not path.startswith(prefix):
        raise AssertionError(f"listed {path!r} outside of {root!r}")
    return path[len(prefix) :]


def _common_folder(paths: Sequence[str]) -> list[str]:
    """The longest run of leading path segments shared by the folders of `paths`."""
    if not paths:
        return []
    common = posixpath.dirname(paths[0]).split("/")
    for path in paths[1:]:
        folder = posixpath.dirname(path).split("/")
        length = 0
        while length < min(len(common), len(folder)) and common[length] == folder[length]:
            length += 1
        common = common[:length]
    return common


class _Excluded(NamedTuple):
    """A subtree to skip (list_images' exclude_prefix): its storage protocol and path."""

    protocol: str
    path: str

    @classmethod
    def of(cls, exclude_prefix: str | None, storage_options: Mapping[str, Any] | None) -> _Excluded | None:
        if exclude_prefix is None:
            return None
        fs, path = filesystem_for(exclude_prefix, storage_options)
        return cls(_protocol_name(fs), path.rstrip("/"))

    @staticmethod
    def covers(excluded: _Excluded | None, fs: fsspec.AbstractFileSystem, path: str) -> bool:
        if excluded is None or _protocol_name(fs) != excluded.protocol:
            return False
        return path == excluded.path or path.startswith(excluded.path + "/")


def _protocol_name(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def _exists(fs: fsspec.AbstractFileSystem, path: str, display: str) -> bool:
    """Whether a path with glob characters exists literally ('photos [2020]' is a folder, not a glob)."""
    try:
        call_with_retry(lambda: fs.info(path), f"look up '{display}'")
    except (FileNotFoundError, ValueError):
        return False
    return True


def _info_for_listing(fs: fsspec.AbstractFileSystem, path: str, what: str) -> dict[str, Any]:
    """fs.info(path), with a missing or forbidden SOURCE turned into a ListingError that says so.

    `what` names the thing in messages: "SOURCE 's3://b/raw'".
    """
    try:
        if is_local(fs):
            st = os.stat(path)
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
            return {"type": kind, "size": st.st_size, "mtime": st.st_mtime}
        return call_with_retry(lambda: fs.info(path), f"look up {what}")
    except (FileNotFoundError, NotADirectoryError) as err:
        reason = ""
        if not is_local(fs):
            bucket = path.split("/", 1)[0]
            if _bucket_missing(fs, bucket):
                reason = f": bucket '{bucket}' does not exist (or these credentials cannot see it)"
            else:
                reason = " (no object has this key or prefix)"
        raise ListingError(f"{what} does not exist{reason}") from err
    except PermissionError as err:
        raise ListingError(
            f"access denied reading {what}: check that the credentials (AWS_* environment or "
            f"--storage-option) may list and read it ({err})"
        ) from err


def _bucket_missing(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    """Whether an object store says this bucket does not exist (only asked to explain a missing SOURCE)."""
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False  # forbidden or unreachable: do not claim it is missing
    return False


def _fingerprint(info: Mapping[str, Any]) -> str:
    """ "size:<n>;etag:<etag>" when the store has an ETag, else "size:<n>;mtime:<time>"."""
    size = int(info.get("size") or 0)
    etag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "").strip('"')
    if etag:
        return f"size:{size};etag:{etag}"
    modified = next(
        (
            info[name]
            for name in ("mtime", "LastModified", "last_modified", "updated")
            if info.get(name) is not None
        ),
        None,
    )
    if isinstance(modified, datetime):
        modified = modified.isoformat()
    return f"size:{size};mtime:{modified}" if modified is not None else f"size:{size}"


def _local_fingerprint(st: os.stat_result) -> str:
    return f"size:{st.st_size};mtime:{st.st_mtime!r}"
