"""A Ray Data datasink for metadata rows: atomically written Parquet parts sized for readers.

Ray's own `write_parquet` streams into the final file name, so a killed run can leave a torn part file
that breaks every reader of DEST/metadata; this sink only says how to write one task's rows and leaves
the file handling to `textseg.outputs.metadata.write_metadata_part`. Ray hands each write call at least
`min_rows_per_write` rows (only a run's tail is smaller), so a 10 M-image run makes ~100 parts, not a
million. Each write returns its rows' `Tally`; `on_write_complete` adds them up on the driver, which is
how the run summary counts without reading a single part back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from textseg.outputs.metadata import Tally, write_metadata_part

# Rows per metadata part: ~100 k rows is tens of MB, the size Parquet readers (DuckDB, pandas) like.
PART_ROWS = 100_000


class MetadataDatasink(Datasink[Tally]):
    def __init__(
        self,
        metadata_uri: str,
        storage_options: Mapping[str, Any],
        prefix: str = "part-",
        part_rows: int = PART_ROWS,
    ):
        self.metadata_uri = metadata_uri
        self.storage_options = dict(storage_options)
        self.prefix = prefix  # the passes of one run (images, assembled scenes) must not share part names
        self.part_rows = part_rows
        self.tally = Tally()

    @property
    def min_rows_per_write(self) -> int:
        return self.part_rows

    def write(self, blocks: Iterable[Block], ctx: Any) -> Tally:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        table = pa.concat_tables(tables) if tables else None
        if table is None or table.num_rows == 0:
            return Tally()
        # Named by write task, so a retried task rewrites its own part instead of adding one.
        name = f"{self.prefix}{ctx.task_idx:06d}"
        write_metadata_part(table, self.metadata_uri, self.storage_options, name)
        return Tally.of(table)

    def on_write_complete(self, write_result: WriteResult[Tally]) -> None:
        for tally in write_result.write_returns:
            self.tally.add(tally)
