"""The reliability suite's ledger: every test records the fault it injected and how the rows came out, and
the session ends with that table (fault, runs, images, rows lost, rows duplicated; the last two must be 0).

Also the pieces the subprocess tests share: a short RAY_TMPDIR per test (Ray's socket paths must stay
under 107 bytes, which pytest's tmp_path can exceed) and an environment without the caller's Ray address
or credentials.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.reliability import procs


@dataclass(frozen=True)
class LedgerRow:
    test: str
    fault: str
    runs: int
    images: int
    lost: int
    duplicated: int


_LEDGER = pytest.StashKey[list[LedgerRow]]()

Record = Callable[..., None]


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Record:
    """record(fault, runs=, images=, lost=, duplicated=): one row of the closing table per call."""
    rows = request.config.stash.setdefault(_LEDGER, [])

    def record(fault: str, *, runs: int, images: int, lost: int, duplicated: int) -> None:
        rows.append(LedgerRow(request.node.name, fault, runs, images, lost, duplicated))

    return record


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    rows = config.stash.get(_LEDGER, [])
    if not rows:
        return
    header = ("fault injected", "runs", "images", "rows lost", "rows duplicated")
    table = [(row.fault, str(row.runs), str(row.images), str(row.lost), str(row.duplicated)) for row in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(
            cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)
        )

    terminalreporter.section("reliability: faults injected and rows accounted for")
    terminalreporter.write_line(line(header))
    terminalreporter.write_line("-+-".join("-" * width for width in widths))
    for cells in table:
        terminalreporter.write_line(line(cells))
    lost, duplicated = sum(row.lost for row in rows), sum(row.duplicated for row in rows)
    terminalreporter.write_line(f"total: {len(rows)} faults, {lost} rows lost, {duplicated} rows duplicated")


@pytest.fixture
def ray_tmpdir() -> Iterator[pathlib.Path]:
    """A short private RAY_TMPDIR for a subprocess's own Ray; removed afterwards."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="tsr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def subprocess_env(ray_tmpdir: pathlib.Path, **extra: str) -> dict[str, str]:
    """The environment for a `textseg label` subprocess: no inherited Ray address or AWS settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(
        RAY_TMPDIR=str(ray_tmpdir),
        RAY_USAGE_STATS_ENABLED="0",  # no network: nothing to report to
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@pytest.fixture
def sessions() -> Iterator[list[int]]:
    """Session ids of subprocesses a test started with start_new_session=True; each is SIGKILLed whole at
    the end (an embedded Ray leaves its raylet, GCS and workers in that session)."""
    started: list[int] = []
    yield started
    left = [proc for sid in started for proc in procs.kill_session(sid)]
    assert not left, f"processes survived the test: {left}"
