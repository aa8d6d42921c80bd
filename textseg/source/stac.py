"""STAC as SOURCE: an item, a collection or catalog tree, or a saved STAC API search result -> shards.

Imagery on object stores is more and more published as STAC rather than as bare prefixes, and a STAC item
knows what a prefix listing cannot: which of a scene's files is the picture to label (its assets), when it
was taken and by what (its properties), and often its size and checksum. So a `.json` SOURCE whose
top-level `type` is a STAC Item (`Feature` with `stac_version`), `Collection`, `Catalog` or a
`FeatureCollection` of items is listed by the items it names (`plan_stac_shards`; any other JSON is a
ListingError).

Per item, one asset is labeled: `--stac-asset KEY`, else `visual`, else the item's only asset that is an
image (media type `image/...`) or has the role `data`, previews (roles `thumbnail`, `overview`) aside.
An item without such an asset is not dropped: it becomes a problem ref (an error row) that names the
item's asset keys, as does an item that cannot be read or parsed. relpath is
`<collection id>/<item id><asset extension>` (no collection folder when the item names none), so masks
are named by what users search STAC for, not by the storage layout of the provider. Relative hrefs are
resolved against the JSON file that holds them (pystac's RFC 3986 rules: `/key` stays on the same bucket),
every read goes through fsspec with the job's storage options (pystac's own StacIO knows none of them),
and http(s) asset hrefs are listed without a request (a failed read is an error row downstream).
The item's properties, with its id and collection, go to the metadata row's `source_properties`.

Fingerprint (`textseg.source.refs.fingerprint`'s form): the asset's `file:size` + `file:checksum`, else
`file:size` + the asset's or item's `updated`, else + the item's `datetime`; with none of them (an item
with a time range only) the object is looked up as a manifest line is (one HEAD); an http(s) asset is
then fingerprinted by its size alone.

Shards (one Ray listing task each, streaming): an item file is one shard; a search result one shard per
page, following `next` links to further saved pages on local disk or an object store (an http(s) `next`
is an API request, not a file: the pages after it are not listed, with a warning). A catalog is walked at
planning for MAX_PLANNED_LEVELS levels (one read per catalog, up to about `target` shards): each
catalog's `item` links become shards of ITEM_LINKS_PER_SHARD links (each task reads the catalog again and
its items, LOOKUP_THREADS at a time), and every deeper child one shard that walks its whole subtree, a
catalog at a time. Memory stays at one catalog document and one group of items per task; the driver keeps
catalog URIs only. Duplicate items (same collection and id) and mask-name collisions are found among the
items of one shard's group, after sorting them by relpath; items in different shards never meet, and a
catalog linked from two parents below the planned levels is listed by both. Listing assumes the catalog
does not change while the job plans and lists it (a shard names its links by position).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import fsspec

from textseg.image.rasters import lazy_import
from textseg.source.listing import MAX_PLANNED_LEVELS, TARGET_SHARDS
from textseg.source.manifests import LOOKUP_THREADS, _looked_up
from textseg.source.refs import ImageRef, ListingError, fingerprint, flag_collisions, protocol_name
from textseg.storage import StorageError, filesystem_for, read_bytes, redact_uri, uri_for

if TYPE_CHECKING:
    import pystac

    from textseg.source.listing import Shard

logger = logging.getLogger(__name__)

# Item links per shard of a catalog: ~1000 small reads per task, LOOKUP_THREADS at a time.
ITEM_LINKS_PER_SHARD = 1000

VISUAL_ASSET = "visual"  # STAC's conventional key for the true-colour picture of a scene
_PREVIEW_ROLES = frozenset({"thumbnail", "overview"})
_CATALOG_TYPES = frozenset({"Catalog", "Collection"})
_HTTP = ("http://", "https://")


class _Unreadable(Exception):
    """A STAC JSON file that cannot be used; str() completes "the STAC file '...' ..."."""


# ----------------------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class StacFileShard:
    """The items of one JSON file: a single Item, or one page (FeatureCollection) of a search result."""

    source: str  # SOURCE as shown in messages (no credentials)
    uri: str
    asset: str | None = None  # --stac-asset

    @property
    def name(self) -> str:
        return f"stac:{self.uri}"

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        try:
            doc = _load(self.uri, storage_options)
        except _Unreadable as err:
            return iter([_problem(self.uri, f"the STAC file {err}")])
        if doc.get("type") == "Feature":
            return _item_refs([(self.uri, self.uri, doc)], self.asset, storage_options)
        features = doc.get("features")
        if doc.get("type") != "FeatureCollection" or not isinstance(features, list):
            reason = "the STAC search result is no longer a FeatureCollection with a 'features' list"
            return iter([_problem(self.uri, reason)])
        entries = ((f"{self.uri}#/features/{i}", self.uri, f) for i, f in enumerate(features))
        return _item_refs(entries, self.asset, storage_options)


@dataclass(frozen=True)
class StacLinksShard:
    """The `item` links start..stop-1 (from 0, in the order `links` lists them) of a catalog or collection."""

    source: str
    uri: str
    start: int
    stop: int
    asset: str | None = None

    @property
    def name(self) -> str:
        return f"stac:{self.uri}#items={self.start + 1}-{self.stop}"

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        try:
            doc = _load_catalog(self.uri, storage_options)
        except _Unreadable as err:
            return iter([_problem(self.uri, f"the STAC catalog {err}")])
        hrefs = _link_hrefs(doc, self.uri, "item")[self.start : self.stop]
        return _linked_item_refs(hrefs, self.asset, storage_options)


@dataclass(frozen=True)
class StacTreeShard:
    """A catalog or collection with everything below it: its items, then its children's, depth first."""

    source: str
    uri: str
    asset: str | None = None
    # Catalogs other shards list (planned ones, other trees' roots): a link to one is not followed here.
    owned_elsewhere: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def name(self) -> str:
        return f"stac-tree:{self.uri}"

    def refs(self, storage_options: Mapping[str, Any] | None) -> Iterator[ImageRef]:
        listed = set(self.owned_elsewhere)
        stack = [self.uri]
        while stack:
            uri = stack.pop()
            if uri in listed:
                continue  # a loop, or a catalog linked from two parents: listed once
            listed.add(uri)
            try:
                doc = _load_catalog(uri, storage_options)
            except _Unreadable as err:
                yield _problem(uri, f"the STAC catalog {err}")
                continue
            hrefs = _link_hrefs(doc, uri, "item")
            for start in range(0, len(hrefs), ITEM_LINKS_PER_SHARD):
                yield from _linked_item_refs(
                    hrefs[start : start + ITEM_LINKS_PER_SHARD], self.asset, storage_options
                )
            stack.extend(reversed(_link_hrefs(doc, uri, "child")))


# ----------------------------------------------------------------------------------------------------------
# Planning


def plan_stac_shards(
    fs: fsspec.AbstractFileSystem,
    path: str,
    display: str,
    storage_options: Mapping[str, Any] | None,
    *,
    asset: str | None = None,
    target: int = TARGET_SHARDS,
) -> list[Shard]:
    """The STAC JSON at `path` checked and described as shards (the module docstring has the rules).

    Raises ListingError when it is not valid JSON or not STAC. Reads the SOURCE, and for a search result
    each saved page, for a catalog its catalogs of the first MAX_PLANNED_LEVELS levels (about `target`).
    """
    lazy_import("pystac")  # a missing geo extra is a clear sentence before any work
    uri = uri_for(fs, path)
    try:
        doc = _load(uri, storage_options)
    except _Unreadable as err:
        raise ListingError(f"SOURCE '{display}' ends in .json but {err}") from err
    kind = doc.get("type")
    if kind == "Feature" and "stac_version" in doc:
        return [StacFileShard(display, uri, asset)]
    if kind == "FeatureCollection":
        return _page_shards(display, uri, doc, asset, storage_options)
    if kind in _CATALOG_TYPES:
        return _catalog_shards(display, uri, doc, asset, storage_options, target)
    raise ListingError(
        f"SOURCE '{display}' is JSON but not STAC: its top-level 'type' is {kind!r}, not a STAC Item "
        "('Feature' with 'stac_version'), 'Collection', 'Catalog' or a 'FeatureCollection' of items"
    )


def _page_shards(
    display: str, uri: str, doc: dict[str, Any], asset: str | None, storage_options: Mapping[str, Any] | None
) -> list[Shard]:
    """One shard per saved page, following `next` links (each page is read here once, for its link)."""
    shards: list[Shard] = [StacFileShard(display, uri, asset)]
    seen = {uri}
    while following := _link_hrefs(doc, uri, "next"):
        uri = following[0]
        if uri.lower().startswith(_HTTP):
            logger.warning(
                "the search result '%s' continues at '%s', an API request rather than a saved page: the "
                "pages from there on are not listed (save them as files and link them as 'next')",
                display,
                redact_uri(uri),
            )
            break
        if uri in seen:
            break
        seen.add(uri)
        shards.append(StacFileShard(display, uri, asset))
        try:
            doc = _load(uri, storage_options)
        except _Unreadable:
            break  # its shard reports why, as an error row
    return shards


def _catalog_shards(
    display: str,
    root: str,
    root_doc: dict[str, Any],
    asset: str | None,
    storage_options: Mapping[str, Any] | None,
    target: int,
) -> list[Shard]:
    """Breadth first from the root: each catalog's item links in groups, deeper children as trees."""
    shards: list[Shard] = []
    trees: list[str] = []
    seen = {root}
    queue = deque([(root, 0)])
    while queue:
        uri, depth = queue.popleft()
        try:
            doc = root_doc if uri == root else _load_catalog(uri, storage_options)
        except _Unreadable:
            trees.append(uri)  # its shard reports why, as an error row
            continue
        count = len(_link_hrefs(doc, uri, "item"))
        shards += [
            StacLinksShard(display, uri, start, min(start + ITEM_LINKS_PER_SHARD, count), asset)
            for start in range(0, count, ITEM_LINKS_PER_SHARD)
        ]
        for child in _link_hrefs(doc, uri, "child"):
            if child in seen:
                continue
            seen.add(child)
            if depth + 1 < MAX_PLANNED_LEVELS and len(shards) + len(trees) + len(queue) < target:
                queue.append((child, depth + 1))
            else:
                trees.append(child)
    owned = frozenset(seen)
    return shards + [StacTreeShard(display, tree, asset, owned - {tree}) for tree in trees]


# ----------------------------------------------------------------------------------------------------------
# Reading STAC JSON


def _load(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON object at `uri`; _Unreadable saying why not."""
    shown = f"'{redact_uri(uri)}'"
    try:
        fs, path = filesystem_for(uri, storage_options)
        data = read_bytes(fs, path)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise _Unreadable(f"{shown} does not exist") from err
    except PermissionError as err:
        raise _Unreadable(f"{shown} cannot be read: access denied ({err})") from err
    except (OSError, StorageError) as err:
        raise _Unreadable(f"{shown} cannot be read: {type(err).__name__}: {err}") from err
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Unreadable(f"{shown} is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise _Unreadable(f"{shown} is not a JSON object")
    return doc


def _load_catalog(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    doc = _load(uri, storage_options)
    if doc.get("type") not in _CATALOG_TYPES:
        raise _Unreadable(f"'{redact_uri(uri)}' is not a STAC Catalog or Collection")
    return doc


def _link_hrefs(doc: Mapping[str, Any], base: str, rel: str) -> list[str]:
    """The absolute hrefs of the document's links of this relation, in order (links without one skipped)."""
    links = doc.get("links")
    if not isinstance(links, list):
        return []
    return [
        _absolute(link["href"], base)
        for link in links
        if isinstance(link, dict) and link.get("rel") == rel and isinstance(link.get("href"), str)
    ]


def _absolute(href: str, base: str) -> str:
    """href resolved against the file `base` (local path or URI), local results as plain paths."""
    pystac_utils = lazy_import("pystac.utils")
    absolute: str = pystac_utils.make_absolute_href(href, base)
    return absolute.removeprefix("file://")


# ----------------------------------------------------------------------------------------------------------
# Items -> refs


class _Picked(NamedTuple):
    """An item's asset to label, located and named."""

    fs: fsspec.AbstractFileSystem
    path: str
    relpath: str
    size: int
    fingerprint: str | None  # None: look the object up
    properties: str


def _linked_item_refs(
    hrefs: list[str], asset: str | None, storage_options: Mapping[str, Any] | None
) -> Iterator[ImageRef]:
    """The refs of the items these links name, the item files read LOOKUP_THREADS at a time."""

    def load(uri: str) -> dict[str, Any] | _Unreadable:
        try:
            return _load(uri, storage_options)
        except _Unreadable as err:
            return err

    if not hrefs:
        return iter(())
    with ThreadPoolExecutor(max_workers=min(LOOKUP_THREADS, len(hrefs))) as pool:
        docs = list(pool.map(load, hrefs))
    return _item_refs(zip(hrefs, hrefs, docs, strict=True), asset, storage_options)


def _item_refs(
    entries: Iterable[tuple[str, str, Any]], asset: str | None, storage_options: Mapping[str, Any] | None
) -> Iterator[ImageRef]:
    """(where, base, item document or _Unreadable) -> refs: problems first, then the rest deduplicated,
    fingerprinted, sorted by relpath and checked for collisions. `where` names the item in problem refs,
    `base` is the file its relative hrefs are relative to."""
    problems: list[ImageRef] = []
    picked: dict[str, _Picked] = {}
    for where, base, doc in entries:
        found = _pick(where, base, doc, asset, storage_options)
        if isinstance(found, ImageRef):
            problems.append(found)
            continue
        earlier = picked.get(found.relpath)
        if earlier is None:
            picked[found.relpath] = found
        elif uri_for(earlier.fs, earlier.path) != uri_for(found.fs, found.path):
            other = redact_uri(uri_for(earlier.fs, earlier.path))
            reason = (
                f"another STAC item has the same collection and id ('{found.relpath}') but the asset "
                f"'{other}'; ids must be unique within a collection"
            )
            problems.append(_problem(uri_for(found.fs, found.path), reason, found.properties))
        # else: the same item twice is still one image, never labeled or counted twice
    yield from problems
    yield from flag_collisions(sorted(_fingerprinted(picked.values()), key=lambda ref: ref.relpath))


def _pick(
    where: str, base: str, doc: Any, asset: str | None, storage_options: Mapping[str, Any] | None
) -> _Picked | ImageRef:
    """The item's asset to label, or a problem ref saying why there is none."""
    if isinstance(doc, _Unreadable):
        return _problem(where, f"the STAC item file {doc}")
    stac = lazy_import("pystac")
    try:
        item: pystac.Item = stac.Item.from_dict(doc, href=base)
    except (stac.STACError, stac.STACTypeError, KeyError, TypeError, ValueError, AttributeError) as err:
        return _problem(where, f"not a valid STAC item: {type(err).__name__}: {err}")
    if not isinstance(item.id, str) or not item.id:
        return _problem(where, "the STAC item has no id")
    collection = item.collection_id if isinstance(item.collection_id, str) else None
    properties = json.dumps(
        {
            "id": item.id,
            "collection": collection,
            **{k: v for k, v in item.properties.items() if k not in ("id", "collection")},
        },
        ensure_ascii=False,
    )
    named = f"the STAC item '{item.id}'"
    key, missing = _asset_key(item.assets, asset)
    if key is None:
        return _problem(where, f"{named} {missing}", properties)
    chosen = item.assets[key]
    if not chosen.href:
        return _problem(where, f"{named} has no href in its asset '{key}'", properties)
    href = _absolute(chosen.href, base)
    try:
        fs, path = filesystem_for(href, storage_options)
    except StorageError as err:
        return _problem(href, f"{named}'s asset '{key}' cannot be opened: {err}", properties)
    relpath = "/".join(part for part in (collection, item.id) if part) + _extension(href)
    size, found = _fingerprint(chosen.extra_fields, item.properties, http=href.lower().startswith(_HTTP))
    return _Picked(fs, path, relpath, size, found, properties)


def _asset_key(assets: Mapping[str, pystac.Asset], asked: str | None) -> tuple[str | None, str]:
    """(the key of the asset to label, '') or (None, why there is none: "has no asset ...")."""
    keys = ", ".join(sorted(assets)) or "none"
    if asked is not None:
        if asked in assets:
            return asked, ""
        return None, f"has no asset '{asked}' (its assets: {keys})"
    if VISUAL_ASSET in assets:
        return VISUAL_ASSET, ""
    candidates = sorted(key for key, value in assets.items() if _is_picture(value))
    if len(candidates) == 1:
        return candidates[0], ""
    which = (
        f"{len(candidates)} image or data assets ({', '.join(candidates)})"
        if candidates
        else "no image or data asset"
    )
    return None, (
        f"has no '{VISUAL_ASSET}' asset and {which}, so none to label by default: choose one with "
        f"--stac-asset KEY (its assets: {keys})"
    )


def _is_picture(asset: pystac.Asset) -> bool:
    roles = set(asset.roles or ())
    if roles & _PREVIEW_ROLES:
        return False
    return (asset.media_type or "").lower().startswith("image/") or "data" in roles


def _extension(href: str) -> str:
    """'.tif' of 's3://b/x/B04.tif' or 'https://h/B04.tif?sig=..' ('' when the name has none)."""
    path = urlsplit(href).path if href.lower().startswith(_HTTP) else href
    return posixpath.splitext(posixpath.basename(path))[1]


def _fingerprint(
    asset_fields: Mapping[str, Any], properties: Mapping[str, Any], *, http: bool
) -> tuple[int, str | None]:
    """(size, fingerprint) from what the item says (the module docstring); None: look the object up."""
    raw_size = asset_fields.get("file:size")
    size = raw_size if isinstance(raw_size, int) and not isinstance(raw_size, bool) and raw_size >= 0 else 0
    checksum = asset_fields.get("file:checksum")
    if isinstance(checksum, str) and checksum:
        return size, fingerprint({"size": size, "ETag": checksum})
    times = (asset_fields.get("updated"), properties.get("updated"), properties.get("datetime"))
    time = next((str(value) for value in times if value), None)
    if time is not None:
        return size, fingerprint({"size": size, "updated": time})
    return size, (fingerprint({"size": size}) if http else None)


def _fingerprinted(picked: Iterable[_Picked]) -> Iterator[ImageRef]:
    """The picked assets as refs, those without a fingerprint looked up (per storage, as manifest lines)."""
    by_storage: dict[str, list[_Picked]] = {}
    for entry in picked:
        by_storage.setdefault(protocol_name(entry.fs), []).append(entry)
    for group in by_storage.values():
        fs = group[0].fs
        entries = [(entry.path, (entry.relpath, entry.size, entry.fingerprint)) for entry in group]
        for entry, ref in zip(group, _looked_up(fs, entries), strict=True):
            yield replace(ref, uri=redact_uri(ref.uri), properties=entry.properties)


def _problem(uri: str, reason: str, properties: str = "") -> ImageRef:
    return ImageRef(
        uri=redact_uri(uri), relpath="", fingerprint="", size=0, problem=reason, properties=properties
    )
