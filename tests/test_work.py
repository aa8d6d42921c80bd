"""A listing task's blocks: small first (the first masks land within seconds), then up to BLOCK_ROWS."""

from __future__ import annotations

from pathlib import Path

from textseg.outputs.state import DoneIndex
from textseg.plan.work import BLOCK_ROWS, FIRST_ROWS, WorkSettings, list_work
from textseg.source.listing import plan_shards


def test_a_listing_tasks_blocks_start_small_and_double(tmp_path: Path) -> None:
    source = tmp_path / "imgs"
    source.mkdir()
    count = FIRST_ROWS * 7 + 5
    for i in range(count):
        (source / f"img{i:04d}.png").write_bytes(b"not decoded by the listing")
    settings = WorkSettings(DoneIndex.load(str(tmp_path / "out"), {}), "model", "hash", tally_uri=None)
    sizes = [block.num_rows for block in list_work(plan_shards(str(source)), settings)]
    assert sizes == [FIRST_ROWS, 2 * FIRST_ROWS, 4 * FIRST_ROWS, 5]
    assert sum(sizes) == count and max(sizes) <= BLOCK_ROWS
