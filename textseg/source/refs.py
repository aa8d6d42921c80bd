"""What a listing finds: image refs, their fingerprints and relpaths, and mask-name collisions.

Shared by every kind of SOURCE (`textseg.source.listing` for folders, prefixes and globs;
`textseg.source.manifests` for manifests). The listing decides what a run will attempt, so it accounts for
every image it finds: an image whose name cannot become a safe relative path, a broken symlink or a
manifest line that does not exist is not dropped but yielded with `problem` set, and becomes an `error`
row. Job-level problems (SOURCE missing, access denied) raise ListingError before any work.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

import fsspec

from textseg.storage import call_with_retry, filesystem_for, is_local, relpath_problem, uri_for

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"})


class ListingError(ValueError):
    """SOURCE cannot be listed (missing, forbidden, not a folder/image/manifest); the message says why."""


@dataclass(frozen=True)
class ImageRef:
    """One image found in SOURCE.

    uri: full URI for object stores ('s3://bucket/key'), absolute path on local disk; never with credentials.
    relpath: path relative to SOURCE, '/'-separated; always safe to join under DEST (`relpath_problem` is
        None), and '' when the name itself is the problem.
    fingerprint: "size:<n>;etag:<etag>" or "size:<n>;mtime:<mtime>": changes when the object changes, so an
        incremental run relabels it. '' when unknown (a problem ref).
    size: bytes, 0 when unknown.
    problem: None for an image to label; otherwise why it cannot be labeled (the runner writes an error row).
    properties: what the listing knows of the image beyond its object (a STAC item's properties), as a
        JSON object, or '' when nothing; it lands in the metadata row's `source_properties`.
    permanent: the problem stays while the object is unchanged (its name cannot become a mask path),
        unlike one that may pass (a mask-name collision ends when the other file goes); the error row's
        `permanent` column.
    """

    uri: str
    relpath: str
    fingerprint: str
    size: int
    problem: str | None = None
    properties: str = ""
    permanent: bool = False


class FoundFile(NamedTuple):
    """A file a walker found: its path on the filesystem, and its size and fingerprint or a problem."""

    path: str
    size: int
    fingerprint: str
    problem: str | None = None


def mask_relpath(relpath: str) -> str:
    """The mask's path relative to DEST/masks: relpath without its extension + '.png'.

    'a/b c.jpg' -> 'a/b c.png'. Raises ValueError for an unsafe relpath (see `relpath_problem`), so a ref
    whose `problem` was ignored can still never name a file outside DEST.
    """
    problem = relpath_problem(relpath)
    if problem is not None:
        raise ValueError(f"no mask path for an unsafe relpath: {problem}")
    return posixpath.splitext(relpath)[0] + ".png"


def make_ref(fs: fsspec.AbstractFileSystem, found: FoundFile, relpath: str) -> ImageRef:
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
            permanent=True,
        )
    return ImageRef(uri=uri, relpath=relpath, fingerprint=found.fingerprint, size=found.size)


def is_image_name(path: str) -> bool:
    return not path.endswith("/") and posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def relative_to(path: str, root: str) -> str:
    """path below root -> the part after root; '/'-separated as listed, not normalized."""
    prefix = root if root.endswith("/") else root + "/"
    if not path.startswith(prefix):
        raise AssertionError(f"listed {path!r} outside of {root!r}")
    return path[len(prefix) :]


def common_folder(paths: Sequence[str]) -> list[str]:
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


class Excluded(NamedTuple):
    """A subtree to skip (list_images' exclude_prefix): its storage protocol and path."""

    protocol: str
    path: str

    @classmethod
    def of(cls, exclude_prefix: str | None, storage_options: Mapping[str, Any] | None) -> Excluded | None:
        if exclude_prefix is None:
            return None
        fs, path = filesystem_for(exclude_prefix, storage_options)
        return cls(protocol_name(fs), path.rstrip("/"))

    @staticmethod
    def covers(excluded: Excluded | None, fs: fsspec.AbstractFileSystem, path: str) -> bool:
        if excluded is None or protocol_name(fs) != excluded.protocol:
            return False
        return path == excluded.path or path.startswith(excluded.path + "/")


def protocol_name(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def exists_literally(fs: fsspec.AbstractFileSystem, path: str, display: str) -> bool:
    """Whether a path with glob characters exists literally ('photos [2020]' is a folder, not a glob)."""
    try:
        call_with_retry(lambda: fs.info(path), f"look up '{display}'")
    except (FileNotFoundError, ValueError):
        return False
    return True


def info_for_listing(fs: fsspec.AbstractFileSystem, path: str, what: str) -> dict[str, Any]:
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


def fingerprint(info: Mapping[str, Any]) -> str:
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


def local_fingerprint(st: os.stat_result) -> str:
    return f"size:{st.st_size};mtime:{st.st_mtime!r}"


def flag_collisions(refs: Iterable[ImageRef]) -> Iterator[ImageRef]:
    """The refs, with those whose masks would share a name ('a.jpg' and 'a.png' -> 'a.png') turned into
    problem refs naming each other; labeling either would silently overwrite the other's mask.

    Streams in O(one name group) memory, given refs in which the names of one folder come in sorted order
    (as every listing here yields them: S3 keys in key order, local folders sorted, manifest chunks
    sorted). It relies on this: every relpath whose mask can be `stem.png` starts with `stem.`, and in a
    sorted sequence all names with a common prefix are adjacent, so once a name arrives that does not
    start with a pending stem's `stem.`, no later name can collide with it. Problem refs pass through.
    """
    pending: list[ImageRef] = []  # refs whose stem prefix is still open, in arrival order
    for ref in refs:
        if ref.problem is not None:
            yield ref
            continue
        still_open = [p for p in pending if ref.relpath.startswith(_stem(p.relpath) + ".")]
        if len(still_open) < len(pending):
            closed = [p for p in pending if p not in still_open]
            yield from _decided(closed, still_open + [ref])
            pending = still_open
        pending.append(ref)
    yield from _decided(pending, [])


def _decided(closed: list[ImageRef], still_open: list[ImageRef]) -> Iterator[ImageRef]:
    """The closed refs, each flagged when another closed or open ref has the same mask name."""
    by_mask: dict[str, list[str]] = {}
    for ref in closed + still_open:
        by_mask.setdefault(_stem(ref.relpath), []).append(ref.relpath)
    for ref in closed:
        others = sorted({r for r in by_mask[_stem(ref.relpath)] if r != ref.relpath})
        if others:
            reason = "mask name collision with " + ", ".join(repr(o) for o in others)
            yield replace(ref, problem=reason)  # the relpath is safe: its row keeps it
        else:
            yield ref


def _stem(relpath: str) -> str:
    return posixpath.splitext(relpath)[0]
