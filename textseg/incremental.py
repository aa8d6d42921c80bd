"""Which images an earlier run already labeled, read from DEST's metadata (SPEC.md: Incremental by default).

An image is done when some run wrote an `ok` row with the same relpath, source fingerprint, model id and
ontology hash. Part files that cannot be read (a run killed mid-write) are skipped with a warning: at
worst their images are labeled again, never lost.
"""

from __future__ import annotations

import logging

import fsspec
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textseg import storage
from textseg.metadata import DONE_KEY_COLUMNS, STATUS_OK

log = logging.getLogger(__name__)

DoneKey = tuple[str, str, str, str]


def done_keys(fs: fsspec.AbstractFileSystem, dest_root: str) -> set[DoneKey]:
    """(relpath, source_fingerprint, model_id, ontology_hash) of every `ok` row under DEST/metadata/."""
    pattern = storage.join_uri(dest_root, "metadata/*/*.parquet")
    keys: set[DoneKey] = set()
    for path in sorted(fs.glob(pattern)):
        try:
            table = pq.read_table(path, columns=[*DONE_KEY_COLUMNS, "status"], filesystem=fs)
        except Exception as err:  # noqa: BLE001 - a torn part file only means relabeling
            log.warning("skipping unreadable metadata file %s: %s", path, type(err).__name__)
            continue
        table = table.filter(pc.equal(table["status"], STATUS_OK))
        keys.update(zip(*(table[c].to_pylist() for c in DONE_KEY_COLUMNS), strict=True))
    return keys
