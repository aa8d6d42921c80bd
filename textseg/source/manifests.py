"""PLACEHOLDER: manifests (text, CSV, Parquet) -> shards. Being written."""

from __future__ import annotations


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
