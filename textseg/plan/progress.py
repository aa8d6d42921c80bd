"""Progress a user can read: images listed, labeled, skipped and failed while the run goes on.

The stages count what they finish (`textseg.pipeline.settings.ProgressCounter`): listing tasks the images
they list and skip, write tasks and scene assembly the rows they make. Under Ray the counts go to one
small actor on the driver's node (`textseg.plan.ray_progress`; fire-and-forget calls, one per block or
batch, never per image), in process to a plain counter (`LocalProgress`). The driver shows them
(`ProgressDisplay`): a bar on a terminal, and a plain line every LOG_EVERY_S seconds when stdout is a log
(a nightly job's), so Ray Data's block-counting progress is never what the user reads.

The counts are for display only: a retried task counts its rows again, and a restarted counter actor
starts from zero. The run summary's counts come from the metadata sink's tallies, which are exact.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from textseg.pipeline.settings import MODEL_CALLS, MODEL_IMAGES, MODEL_STARTUP_MS, MODELS_READY

LOG_EVERY_S = 30.0  # a plain progress line this often when stdout is not a terminal
REFRESH_S = 1.0  # how often a terminal's bar is redrawn
FIELDS = ("listed", "skipped", "ok", "error", "shards")
MODEL_FIELDS = (MODELS_READY, MODEL_STARTUP_MS, MODEL_CALLS, MODEL_IMAGES)


class Counts:
    """Counts added by the stages, and the wall-clock time (time.time()) at which each first rose above
    zero: when the first model became ready and the first image was labeled, for the run's start-up
    seconds (`startup_seconds`)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first_at: dict[str, float] = {}

    def add(self, counts: dict[str, int]) -> None:
        now = time.time()
        for name, value in counts.items():
            if value > 0:
                self.first_at.setdefault(name, now)
        self.counts.update(counts)

    def snapshot(self) -> dict[str, int]:
        return {field: self.counts[field] for field in (*FIELDS, *MODEL_FIELDS)}

    def report(self, started_wall: float) -> tuple[dict[str, float], float | None]:
        """(`startup_seconds`, `mean_model_batch`): what the run summary says of the run's start and of
        its model's batches."""
        counts = self.snapshot()
        return startup_seconds(counts, self.first_at, started_wall), mean_model_batch(counts)


def startup_seconds(
    counts: dict[str, int], first_at: dict[str, float], started_wall: float
) -> dict[str, float]:
    """What the run's summary says about its start (seconds): `first_model_ready` and `first_mask` after the
    run started, and `model_startup`, the mean time a model actor took to load, embed and warm up."""
    out = {
        name: round(first_at[key] - started_wall, 3)
        for name, key in (("first_model_ready", MODELS_READY), ("first_mask", "ok"))
        if key in first_at
    }
    if counts.get(MODELS_READY):
        out["model_startup"] = round(counts[MODEL_STARTUP_MS] / counts[MODELS_READY] / 1000, 3)
    return out


def mean_model_batch(counts: dict[str, int]) -> float | None:
    """Images per model call over the run, or None when the model saw no image."""
    return round(counts[MODEL_IMAGES] / counts[MODEL_CALLS], 2) if counts.get(MODEL_CALLS) else None


class LocalProgress:
    """The counter of the in-process runner."""

    def __init__(self) -> None:
        self._counts = Counts()
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self._lock:
            self._counts.add(counts)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return self._counts.snapshot()

    def report(self, started_wall: float) -> tuple[dict[str, float], float | None]:
        with self._lock:
            return self._counts.report(started_wall)


class ProgressDisplay:
    """Shows `snapshot()` counts while `run` runs (in a thread beside it); `shards` is the listing's total.

    Terminal: a tqdm bar of images done out of images listed so far ("listing 3/8 shards" until the
    listing ends), with skipped, failed and images/s. Otherwise: one line every LOG_EVERY_S seconds.
    """

    def __init__(
        self,
        snapshot: Callable[[], dict[str, int]],
        shards: int,
        stream: TextIO | None = None,
        every_s: float | None = None,
    ):
        self.snapshot = snapshot
        self.shards = shards
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else (REFRESH_S if self.tty else LOG_EVERY_S)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._bar: tqdm | None = None

    def say(self, text: str) -> None:
        """A status line of the run's own (start-up, phases), on the progress stream."""
        print(text, file=self.stream, flush=True)

    def run(self, work: Callable[[], Any]) -> Any:
        """`work()`, with the progress shown until it returns or raises."""
        thread = threading.Thread(target=self._loop, name="textseg-progress", daemon=True)
        thread.start()
        try:
            return work()
        finally:
            self._stop.set()
            thread.join(timeout=10)
            if self._bar is not None:
                self._bar.close()

    def line(self, counts: dict[str, int]) -> str:
        """e.g. `1,200 of 5,000 listed done (ok 1,190, failed 10, skipped 0), 94.1 images/s, ETA 40 s`."""
        done = counts["ok"] + counts["error"] + counts["skipped"]
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (counts["ok"] + counts["error"]) / elapsed
        listing = (
            "" if counts["shards"] >= self.shards else f" (listing: {counts['shards']}/{self.shards} shards)"
        )
        left = counts["listed"] - done
        eta = f", ETA {left / rate:.0f} s" if rate > 0 and not listing and left > 0 else ""
        return (
            f"{done:,} of {counts['listed']:,} listed done{listing}: labeled {counts['ok']:,}, "
            f"failed {counts['error']:,}, skipped {counts['skipped']:,}; {rate:.1f} images/s{eta}"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                counts = self.snapshot()
            except Exception:  # noqa: BLE001 - a display that cannot read its counts skips a beat
                continue
            if self.tty:
                self._draw(counts)
            else:
                print(self.line(counts), file=self.stream, flush=True)

    def _draw(self, counts: dict[str, int]) -> None:
        if self._bar is None:
            self._bar = tqdm(total=0, unit="img", file=self.stream, dynamic_ncols=True)
        done = counts["ok"] + counts["error"] + counts["skipped"]
        self._bar.total = counts["listed"]
        self._bar.n = done
        listing = "" if counts["shards"] >= self.shards else f"listing {counts['shards']}/{self.shards}"
        self._bar.set_postfix_str(
            ", ".join(
                part
                for part in (listing, f"failed {counts['error']}", f"skipped {counts['skipped']}")
                if part
            ),
            refresh=False,
        )
        self._bar.refresh()
