"""The progress a run shows: counts of images (not Ray's blocks), as a plain line when stdout is a log."""

from __future__ import annotations

import io
import threading

from textseg.plan.progress import LocalProgress, ProgressDisplay


def test_a_log_gets_plain_lines_counting_images_and_the_listing() -> None:
    counts = LocalProgress()
    stream = io.StringIO()  # not a terminal
    display = ProgressDisplay(counts.snapshot, shards=2, stream=stream, every_s=0.02)
    listed_one_shard, labeled = threading.Event(), threading.Event()

    def work() -> None:
        counts.add(listed=10, skipped=2)
        counts.add(shards=1)
        listed_one_shard.wait(0.5)
        counts.add(ok=5, error=1)
        counts.add(listed=4, shards=1)
        labeled.wait(0.5)

    display.run(work)
    lines = stream.getvalue().splitlines()
    assert lines, "no progress line was printed"
    assert any("(listing: 1/2 shards)" in line for line in lines), lines
    last = lines[-1]
    assert last.startswith("8 of 14 listed done: labeled 5, failed 1, skipped 2;"), last
    assert "images/s" in last and "listing" not in last


def test_the_line_has_an_eta_once_the_listing_is_complete() -> None:
    counts = LocalProgress()
    counts.add(listed=100, ok=50, shards=1)
    display = ProgressDisplay(counts.snapshot, shards=1, stream=io.StringIO())
    line = display.line(counts.snapshot())
    assert line.startswith("50 of 100 listed done: labeled 50, failed 0, skipped 0;")
    assert ", ETA " in line
