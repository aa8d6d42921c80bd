"""A Ray Data datasink for metadata rows: one atomically written Parquet part file per write task.

Ray's own `write_parquet` streams into the final file name, so a killed run can leave a torn part file
that breaks every reader of DEST/metadata; this sink only says how to write one task's rows and leaves
the file handling to `textseg.metadata.write_metadata_part`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from textseg.metadata import write_metadata_part


class MetadataDatasink(Datasink[int]):
    def __init__(self, metadata_uri: str, storage_options: Mapping[str, Any], prefix: str = "part-"):
        self.metadata_uri = metadata_uri
        self.storage_options = dict(storage_options)
        self.prefix = prefix  # the passes of one run (images, assembled scenes) must not share part names

    def write(self, blocks: Iterable[Block], ctx: Any) -> int:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        table = pa.concat_tables(tables) if tables else None
        if table is None or table.num_rows == 0:
            return 0
        name = f"{self.prefix}{ctx.task_idx:06d}"
        write_metadata_part(table, self.metadata_uri, self.storage_options, name)
        return table.num_rows
