"""An image that kills every process that touches it costs two worker deaths and becomes one error row;
the run goes on and ends with its summary (Ray alone would retry it forever). An image whose stage raises
becomes an error row too, and the traceback behind it reaches the driver's output."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from tests.reliability import poison_images, procs
from tests.reliability.conftest import Record, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_images_that_kill_their_workers_become_error_rows(
    tmp_path: pathlib.Path,
    tiny_clipseg_dir: pathlib.Path,
    ray_tmpdir: pathlib.Path,
    sessions: list[int],
    ledger: Record,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.poison_images", str(tmp_path), str(tiny_clipseg_dir)],
        env=subprocess_env(ray_tmpdir, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )
    sessions.append(proc.pid)
    output, _ = proc.communicate(timeout=600)
    text = output.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert lines, text[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    rows = result["rows"]
    ledger(
        "worker killed by the same image at every retry (model actor, decode task)",
        runs=1,
        images=poison_images.IMAGES,
        lost=poison_images.IMAGES - len(rows),
        duplicated=result["row_count"] - len(rows),
    )
    assert result["row_count"] == len(rows) == poison_images.IMAGES
    died = "the worker process died with this image in its batch, and again with the image alone"
    assert rows.pop("black.png") == ["error", f"the model stage failed: WorkerDied: {died}"]
    assert rows.pop("segfault.png") == ["error", f"decoding failed: WorkerDied: {died}"]
    raised = f"cannot read the source object: RuntimeError: {poison_images.RAISED}"
    assert rows.pop("raises.png") == ["error", raised]
    assert all(status == ["ok", None] for status in rows.values()), rows
    assert result["exit"] == 0
    summary = result["summary"]
    assert (summary["status"], summary["listed"], summary["ok"], summary["error"]) == ("succeeded", 9, 6, 3)
    top = sorted(map(tuple, summary["top_errors"]))
    categories = ["cannot read the source object", "decoding failed", "the model stage failed"]
    assert top == [(category, 1) for category in categories]
    # The worker's log line, forwarded by Ray with its process prefix, carries the traceback.
    report, *_ = [line for line in text.splitlines() if f"{raised} on " in line]  # once a process
    assert "pid=" in report and "'raises.png'" in report, report
    trace = text.split(report, 1)[1]
    assert "Traceback (most recent call last)" in trace and "in dying_open" in trace, trace[:3000]
    # Quiet where nothing failed: no weight-loading bars or Ray deprecation warnings from the workers.
    noise = [line for line in text.splitlines() if "Loading weights" in line or "DeprecationWarning" in line]
    assert not noise, noise
    assert not procs.descendants(proc.pid)
