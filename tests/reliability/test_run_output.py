"""What a user reads from `textseg label` on a local Ray when stdout is a log: textseg's own lines (start-up,
the closing summary with where the errors are), none of Ray's notices or block-counting progress; and
`textseg errors DEST` lists the failed images."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.reliability import procs
from tests.reliability.conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
RAY_NOISE = (
    "Total Progress",
    "Running Dataset",
    "Token authentication",
    "Starting execution",
    "Execution plan",
)


def test_a_run_prints_its_own_progress_and_says_where_the_errors_are(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, ray_tmpdir: pathlib.Path, sessions: list[int]
) -> None:
    source, dest = tmp_path / "imgs", tmp_path / "out"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(source / f"ok{i}.png")
    (source / "bad.png").write_text("<html>not found</html>")
    command = [sys.executable, "-m", "textseg.cli", "label", str(source), str(dest)]
    proc = subprocess.Popen(
        [*command, "--model", str(tiny_clipseg_dir), "--prompts", "a,b"],
        env=subprocess_env(ray_tmpdir, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=ROOT,
    )
    sessions.append(proc.pid)
    out, err = (text.decode(errors="replace") for text in proc.communicate(timeout=600))
    assert proc.returncode == 1, out + err  # 1 of 7 failed: above the default 1 % error rate
    assert re.search(r"starting \d+ model actor\(s\) on cpu", out), out  # one per core
    assert "listed 7, skipped 0 (already done), labeled 6, failed 1" in out, out
    assert "1 x not an image" in out, out
    assert f"`textseg errors {dest} --run " in out and f"{dest}/runs/" in out, out
    noise = [line for line in (out + err).splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, noise
    assert not procs.descendants(proc.pid)

    listed = subprocess.run(
        [sys.executable, "-m", "textseg.cli", "errors", str(dest)],
        env=subprocess_env(ray_tmpdir, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    relpath, reason = line.split("\t")
    assert relpath == "bad.png" and reason.startswith("not an image"), line
    assert "1 failed image(s) in run" in listed.stderr
