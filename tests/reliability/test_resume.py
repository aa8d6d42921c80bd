"""Incremental and resumable: `textseg label` SIGKILLed at several points is finished by running it again.

Each run is `python -m textseg.cli label ...` in its own session with its own embedded local Ray (not the
test session's Ray), over a folder of 30 tiny images and one broken file, with --batch-size 2. A run is
killed (the whole process group: driver, raylet, GCS, workers) at a moment the test observes, not at a
guessed time: while Ray starts, after a seeded-random number of masks, after the first metadata part.
Then the same command runs to the end. Throughout, a reader opens every mask it sees; none may ever be
partial. At the end the masks equal the in-process runner's byte for byte and every image has exactly one
`ok` row over all runs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import fsspec
import pytest

from tests.reliability import procs
from tests.reliability.conftest import subprocess_env
from tests.reliability.dataset import (
    PROMPTS,
    Runs,
    label_args,
    lost_and_duplicated,
    mask_bytes,
    tiny_images,
    tiny_png,
    write_tree,
)
from textseg.api import run_job
from textseg.cli import main
from textseg.config import JobConfig

IMAGES = 30
BROKEN = "d1/broken.png"  # fails in every run until it is fixed
SEED = 20240607


@dataclasses.dataclass
class RunRecord:
    kill_point: str | None
    returncode: int
    masks_seen: int = 0
    parts_seen: int = 0


@dataclasses.dataclass
class Watcher:
    """Reads every mask as soon as it appears or changes; a read that is not the reference mask is torn."""

    masks_root: pathlib.Path
    reference: dict[str, bytes]
    seen: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    reads: int = 0
    torn: list[str] = dataclasses.field(default_factory=list)

    def poll(self) -> int:
        visible = 0
        for folder, _, files in os.walk(self.masks_root):
            for name in files:
                if name.startswith("."):
                    continue  # a temporary file of an atomic write: never a mask
                path = os.path.join(folder, name)
                relpath = os.path.relpath(path, self.masks_root)
                try:
                    stat = os.stat(path)
                    key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                    visible += 1
                    if self.seen.get(relpath) == key:
                        continue
                    with open(path, "rb") as handle:
                        data = handle.read()
                except FileNotFoundError:
                    continue
                self.seen[relpath] = key
                self.reads += 1
                if data != self.reference.get(relpath):
                    self.torn.append(f"{relpath}: {len(data)} bytes")
        return visible


def _parts(dest: pathlib.Path) -> int:
    return len(list(dest.glob("metadata/*/part-*.parquet")))


def run_cli(
    args: list[str],
    env: dict[str, str],
    sessions: list[int],
    log: pathlib.Path,
    watcher: Watcher,
    kill_when: Callable[[int, int], bool] | None = None,
    kill_point: str | None = None,
) -> RunRecord:
    """Run `textseg label` in a new session; SIGKILL its whole session once `kill_when(masks, parts)`."""
    dest = watcher.masks_root.parent
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "textseg.cli", *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sessions.append(proc.pid)
    record = RunRecord(kill_point, 0)
    while proc.poll() is None:
        masks = watcher.poll()
        parts = _parts(dest)
        if kill_when is not None and kill_when(masks, parts):
            left = procs.kill_session(proc.pid)
            assert not left, f"processes of the killed run survived: {left}"
            record.masks_seen, record.parts_seen = masks, parts
            break
        time.sleep(0.02)  # polling interval of the observer, not a timing assumption
    record.returncode = proc.wait()
    watcher.poll()
    assert not procs.in_session(proc.pid), "a run left processes behind"
    return record


def plant_leftovers_of_a_killed_writer(dest: pathlib.Path) -> None:
    """What a writer SIGKILLed between creating its temporary file and renaming it leaves behind (an
    hour-old half-written temporary beside the masks, and a DEST probe), so the completed resume's
    clean-up is checked whether or not one of the kills above happened to land inside a write."""
    an_hour_ago = time.time() - 3600
    for leftover, data in (
        (dest / "masks" / "d0" / ".textseg-0badc0ffee.tmp", b"\x89PNG\r\n\x1a\n half"),
        (dest / ".textseg-probe-0badc0ffee", b"textseg write probe\n"),
    ):
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(data)
        os.utime(leftover, (an_hour_ago, an_hour_ago))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory, tiny_clipseg_dir: pathlib.Path) -> dict:
    """The chain of runs: three killed at different points, then one to the end. Returns what the tests
    assert on (the state of DEST and a record per run)."""
    root = tmp_path_factory.mktemp("resume")
    images = tiny_images(IMAGES, seed=1)
    src, dest = root / "src", root / "dest"
    write_tree(src, {**images, BROKEN: tiny_png(99)[:60]})
    reference_dest = root / "reference"
    run_job(
        JobConfig(
            source=str(src),
            dest=str(reference_dest),
            model=str(tiny_clipseg_dir),
            prompts=PROMPTS,
            threshold=0.5,
            device="cpu",
            batch_size=2,
            max_error_rate=1.0,
        ),
        runner="local",
    )
    reference = mask_bytes(fsspec.filesystem("file"), str(reference_dest))
    assert len(reference) == IMAGES

    ray_tmpdir = pathlib.Path(__import__("tempfile").mkdtemp(prefix="tsr-", dir="/tmp"))
    env = subprocess_env(ray_tmpdir)
    args = label_args(str(src), str(dest), tiny_clipseg_dir, "--max-error-rate", "1")
    masks_after = random.Random(SEED).randint(1, 12)
    kill_points: list[tuple[str, Callable[[int, int], bool]]] = [
        ("while Ray starts", lambda m, p: any(ray_tmpdir.glob("ray/session_*/logs"))),
        (f"after {masks_after} masks", lambda m, p: m >= masks_after),
        ("after its 1st metadata part", lambda m, p: p > parts_before[0]),
    ]
    parts_before = [0]
    watcher = Watcher(dest / "masks", reference)
    sessions: list[int] = []
    records = []
    try:
        for index, (point, condition) in enumerate(kill_points):
            parts_before[0] = _parts(dest)
            records.append(run_cli(args, env, sessions, root / f"run{index}.log", watcher, condition, point))
        plant_leftovers_of_a_killed_writer(dest)
        records.append(run_cli(args, env, sessions, root / "final.log", watcher))
    finally:
        for sid in sessions:
            procs.kill_session(sid)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    return {
        "src": src,
        "dest": dest,
        "images": images,
        "reference": reference,
        "records": records,
        "watcher": watcher,
        "log": (root / "final.log").read_text(errors="replace"),
    }


def test_runs_killed_at_any_point_are_finished_by_running_again(killed_and_resumed: dict, ledger) -> None:
    state = killed_and_resumed
    records: list[RunRecord] = state["records"]
    dest: pathlib.Path = state["dest"]
    runs = Runs.read(fsspec.filesystem("file"), str(dest))
    ok = Counter(row["relpath"] for row in runs.ok_rows())
    lost, duplicated = lost_and_duplicated(runs.ok_rows(), state["images"])
    per_run_duplicates = sum(lost_and_duplicated(runs.of_run(run_id), [])[1] for run_id in runs.run_ids)
    ledger(
        "SIGKILL of `textseg label`, then the same command: "
        + " / ".join(r.kill_point or "" for r in records[:-1]),
        runs=len(records),
        images=IMAGES + 1,
        lost=lost,
        duplicated=duplicated + per_run_duplicates,
    )

    assert [r.returncode for r in records[:-1]] == [-9, -9, -9], records  # each kill landed mid-run
    assert records[-1].returncode == 0, state["log"][-3000:]
    assert set(ok) == set(state["images"]) and max(ok.values()) == 1, ok  # one ok row per image, ever
    assert (lost, duplicated, per_run_duplicates) == (0, 0, 0)
    assert BROKEN not in ok and all(r["error"] for r in runs.rows if r["relpath"] == BROKEN)

    final = runs.summaries[-1]
    assert final["status"] == "succeeded"
    assert final["listed"] == final["skipped"] + final["ok"] + final["error"] == IMAGES + 1

    # Masks: exactly the in-process runner's, byte for byte; nothing half-written was ever visible.
    assert mask_bytes(fsspec.filesystem("file"), str(dest)) == state["reference"]
    watcher: Watcher = state["watcher"]
    assert watcher.reads >= IMAGES and not watcher.torn, watcher.torn
    hidden = [str(p.relative_to(dest)) for p in dest.rglob(".*")]
    assert not hidden, f"temporary files left after the completed resume: {hidden}"
    assert sorted(p.name for p in dest.iterdir()) == ["masks", "metadata", "runs", "state"]


def test_rerun_labels_only_new_changed_and_previously_failed_images(
    killed_and_resumed: dict, tmp_path, ledger, tiny_clipseg_dir, ray_session
) -> None:
    state = killed_and_resumed
    src, dest = tmp_path / "src", tmp_path / "dest"
    shutil.copytree(state["src"], src)  # copy2 keeps mtimes, so fingerprints stay as they were
    shutil.copytree(state["dest"], dest)
    changed, new = sorted(state["images"])[4], "d2/new image.png"
    (src / changed).write_bytes(tiny_png(500))
    (src / new).write_bytes(tiny_png(501))
    (src / BROKEN).write_bytes(tiny_png(502))  # fixed

    assert main(label_args(str(src), str(dest), tiny_clipseg_dir)) == 0
    runs = Runs.read(fsspec.filesystem("file"), str(dest))
    summary = runs.summaries[-1]
    attempted = runs.of_run(summary["run_id"])
    lost, duplicated = lost_and_duplicated(attempted, [changed, new, BROKEN])
    ledger(
        "re-run after an image changed, one was added, a failed one fixed",
        runs=1,
        images=IMAGES + 2,
        lost=lost,
        duplicated=duplicated,
    )
    assert sorted(r["relpath"] for r in attempted) == sorted([changed, new, BROKEN])
    assert all(r["status"] == "ok" for r in attempted)
    assert (summary["listed"], summary["skipped"], summary["ok"], summary["error"]) == (
        IMAGES + 2,
        IMAGES - 1,
        3,
        0,
    )
    assert (lost, duplicated) == (0, 0)


def test_cleanup_of_interrupted_writes_spares_a_concurrent_write_and_other_files(
    tmp_path: pathlib.Path,
) -> None:
    """Only textseg's own hidden files older than the run, in DEST's own folders, are removed."""
    from textseg import storage

    an_hour_ago, now = time.time() - 3600, time.time()
    files = {
        "masks/a/.textseg-0ld.tmp": an_hour_ago,  # a writer killed an hour ago: removed
        ".textseg-probe-0ld": an_hour_ago,  # a probe of a run killed right after it: removed
        "masks/a/.textseg-n0w.tmp": now,  # another run writing right now: kept
        "masks/a/x.png": an_hour_ago,  # a mask: kept
        "masks/a/.user-notes": an_hour_ago,  # not ours: kept
        "imgs/.textseg-0ld.tmp": an_hour_ago,  # not in a folder textseg owns (SOURCE inside DEST): kept
    }
    for relpath, mtime in files.items():
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_bytes(b"x")
        os.utime(tmp_path / relpath, (mtime, mtime))
    removed = storage.remove_stale_temporaries(
        fsspec.filesystem("file"), str(tmp_path), ("masks", "metadata"), now - 60
    )
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == [
        ".textseg-probe-0ld",
        "masks/a/.textseg-0ld.tmp",
    ]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        set(files) - {".textseg-probe-0ld", "masks/a/.textseg-0ld.tmp"}
    )
