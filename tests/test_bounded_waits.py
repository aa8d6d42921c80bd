"""Every wait of `textseg label` is bounded: what cannot work ends the run with exit 2 and one sentence on
stderr within a minute, Ctrl-C with exit 130, never with a traceback (textseg.plan.bounds).

Each test runs the real command in a subprocess with a private RAY_TMPDIR and no network need: the hub
is pointed at a closed local port, the unreachable Ray cluster is a closed local port, and GPUs are
hidden (CUDA_VISIBLE_DEVICES=""), so the tests behave the same on a machine with GPUs or internet.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from tests.reliability import procs
from tests.reliability.conftest import subprocess_env
from textseg.plan.bounds import INTERRUPT_SIGNAL, MainThreadInterrupt

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Generous for a loaded 2-core CI machine; every bound under test is far below it.
LIMIT_S = 60.0
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
TEXTSEG = os.path.join(os.path.dirname(sys.executable), "textseg")  # the console script users run


@pytest.fixture
def ray_tmpdir() -> Iterator[pathlib.Path]:
    """A short private RAY_TMPDIR (as in tests/reliability): Ray's socket paths must stay short."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="tsb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sessions() -> Iterator[list[int]]:
    """Sessions of the subprocesses a test started (start_new_session=True), killed whole at the end:
    an embedded Ray or a `ray start` cluster leaves its processes there."""
    started: list[int] = []
    yield started
    left = [proc for sid in started for proc in procs.kill_session(sid)]
    assert not left, f"processes survived the test: {left}"


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_images(folder: pathlib.Path, count: int, size: int = 32) -> pathlib.Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def label_args(source: pathlib.Path, dest: pathlib.Path, *extra: str) -> list[str]:
    return [TEXTSEG, "label", str(source), str(dest), "--prompts", "a,b", *extra]


def with_sigint(disposition: signal.Handlers) -> Callable[[], None]:
    """A `preexec_fn` giving the command this SIGINT disposition whatever the test runner's: SIG_DFL as
    in a terminal's foreground job (Python then installs its KeyboardInterrupt handler), SIG_IGN as in
    a job a script started with `&`."""

    def preexec() -> None:
        signal.signal(signal.SIGINT, disposition)

    return preexec


def run_label(
    args: list[str],
    env: dict[str, str],
    sessions: list[int],
    limit_s: float = LIMIT_S,
    sigint: signal.Handlers = signal.SIG_DFL,
) -> tuple[int, str, float]:
    """Run to the end (killed past `limit_s`, failing the test); (exit status, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        args,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=with_sigint(sigint),
    )
    sessions.append(proc.pid)
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"still running after {limit_s:g} s: {err.decode(errors='replace')[-2000:]}")
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - started


def last_line(stderr: str) -> str:
    """The sentence textseg printed: its last line on stderr (Ray may print warnings before it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def assert_job_error(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    sentence = last_line(stderr)
    assert sentence.startswith("textseg: "), stderr[-3000:]
    for needle in needles:
        assert needle in sentence, sentence
    return sentence


@pytest.mark.parametrize("sigint", [signal.default_int_handler, signal.SIG_IGN], ids=["sigint", "no-sigint"])
def test_the_watchdog_interrupts_a_main_thread_blocked_on_a_lock(sigint: object) -> None:
    """What a stuck dataset looks like to the watchdog: the main thread blocked on a lock, in a process
    that may ignore SIGINT (started with `&` from a script). With `_thread.interrupt_main` it would wait
    out its timeout (here 20 s; for a stuck run, forever), or not be interrupted at all."""
    previous = signal.signal(signal.SIGINT, sigint)
    try:
        with MainThreadInterrupt() as interrupt:
            threading.Timer(0.2, interrupt).start()
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                threading.Event().wait(20)
        assert time.monotonic() - started < 5
        assert signal.getsignal(INTERRUPT_SIGNAL) is signal.SIG_DFL  # left as it was found
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_unreachable_ray_address_ends_in_seconds(
    tmp_path: pathlib.Path, ray_tmpdir: pathlib.Path, sessions: list[int]
) -> None:
    images = write_images(tmp_path / "images", 2)
    address = f"127.0.0.1:{closed_port()}"
    args = label_args(images, tmp_path / "dest", "--model", "demo", "--ray-address", address)
    code, stderr, took = run_label(args, subprocess_env(ray_tmpdir), sessions)
    sentence = assert_job_error(
        code, stderr, f"cannot reach the Ray cluster at {address}", "ray start --head"
    )
    assert "connection refused" in sentence
    assert took < 30, took  # Ray alone retries for minutes


def test_ray_address_auto_without_a_recorded_cluster_says_so(
    tmp_path: pathlib.Path, ray_tmpdir: pathlib.Path, sessions: list[int]
) -> None:
    """Ray's own `auto` would join any Ray process found on the machine, even another process's private
    one that ends with it (and takes this run down with exit 1 and no summary)."""
    images = write_images(tmp_path / "images", 2)
    args = label_args(images, tmp_path / "dest", "--model", "demo", "--ray-address", "auto")
    code, stderr, took = run_label(args, subprocess_env(ray_tmpdir), sessions)
    assert_job_error(code, stderr, "--ray-address auto found no cluster started with `ray start`")
    assert took < 30, took


def test_an_unreachable_hub_ends_in_seconds_and_says_how_to_run_offline(
    tmp_path: pathlib.Path, ray_tmpdir: pathlib.Path, sessions: list[int]
) -> None:
    images = write_images(tmp_path / "images", 2)
    env = subprocess_env(
        ray_tmpdir, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf")
    )
    del env["HF_HUB_OFFLINE"]
    env.pop("TRANSFORMERS_OFFLINE", None)
    code, stderr, took = run_label(label_args(images, tmp_path / "dest", "--model", "clipseg"), env, sessions)
    assert_job_error(code, stderr, "cannot reach the Hugging Face hub", "--model demo", "HF_HUB_OFFLINE=1")
    assert took < 20, took  # huggingface_hub alone retries for ~25 s
    # Offline on purpose, with nothing cached: the same advice, minus the variable already set.
    env["HF_HUB_OFFLINE"] = "1"
    code, stderr, took = run_label(label_args(images, tmp_path / "dest", "--model", "clipseg"), env, sessions)
    assert_job_error(code, stderr, "not in the Hugging Face cache and HF_HUB_OFFLINE is set", "--model demo")
    assert took < 20, took


def test_device_cuda_without_a_gpu_ends_before_the_dataset_starts(  # ~10-20 s: one local Ray
    tmp_path: pathlib.Path, ray_tmpdir: pathlib.Path, sessions: list[int]
) -> None:
    images = write_images(tmp_path / "images", 2)
    args = label_args(images, tmp_path / "dest", "--model", "demo", "--device", "cuda")
    code, stderr, took = run_label(args, subprocess_env(ray_tmpdir, **NO_GPU), sessions)
    assert_job_error(code, stderr, "--device cuda", "no GPU", "--device cpu")
    assert took < LIMIT_S
    assert not (tmp_path / "dest" / "masks").exists()


@pytest.mark.slow
def test_gpus_that_never_arrive_end_the_run_after_the_startup_timeout(
    tmp_path: pathlib.Path, ray_tmpdir: pathlib.Path, sessions: list[int]
) -> None:
    """A cluster whose autoscaler cannot be seen (here: a head started without its monitor) may add GPU
    nodes, so `--device cuda` is trusted; when no GPU comes, the watchdog ends the run with a sentence
    naming what is pending, and the run summary is written. The command ignores SIGINT, as a nightly
    job started with `&` from a script does: the watchdog must not depend on it."""
    env = subprocess_env(ray_tmpdir, **NO_GPU)
    head = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--no-monitor",
            "--num-cpus=2",
            f"--port={closed_port()}",
            f"--dashboard-port={closed_port()}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the cluster's processes stay in this session, which `sessions` kills
    )
    sessions.append(head.pid)
    output, _ = head.communicate(timeout=120)
    recorded = ray_tmpdir / "ray" / "ray_current_cluster"
    assert head.returncode == 0 and recorded.is_file(), output.decode(errors="replace")[-3000:]
    images = write_images(tmp_path / "images", 2)
    dest = tmp_path / "dest"
    args = label_args(images, dest, "--model", "demo", "--device", "cuda", "--ray-address", "auto")
    code, stderr, took = run_label([*args, "--startup-timeout", "3"], env, sessions, sigint=signal.SIG_IGN)
    sentence = assert_job_error(
        code, stderr, "no model actor could start within 3 s", "1 GPU each", "--startup-timeout"
    )
    assert "run summary: " in sentence
    (summary,) = (dest / "runs").iterdir()
    assert json.loads(summary.read_text())["status"].startswith("failed: no model actor could start")
    assert took < LIMIT_S


@pytest.mark.slow
def test_ctrl_c_writes_the_summary_and_exits_130_without_a_traceback(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, ray_tmpdir: pathlib.Path, sessions: list[int]
) -> None:
    images = write_images(tmp_path / "images", 12000, size=24)  # still running 9 s after its start
    dest = tmp_path / "dest"
    watchdog_s = 4.0
    args = label_args(
        images,
        dest,
        "--model",
        str(tiny_clipseg_dir),
        "--device",
        "cpu",
        "--startup-timeout",
        f"{watchdog_s:g}",
    )
    proc = subprocess.Popen(
        args,
        env=subprocess_env(ray_tmpdir, **NO_GPU),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=with_sigint(signal.SIG_DFL),  # Ctrl-C reaches a terminal's foreground job
    )
    sessions.append(proc.pid)
    stdout: list[tuple[float, bytes]] = []
    stderr: list[bytes] = []
    readers = [
        threading.Thread(
            target=lambda: stdout.extend((time.monotonic(), x) for x in proc.stdout or []), daemon=True
        ),
        threading.Thread(target=lambda: stderr.extend(proc.stderr or []), daemon=True),
    ]
    for reader in readers:
        reader.start()

    def since_start() -> float:  # seconds since the run said it starts the model actors
        said = [at for at, line in stdout if b"model actor" in line]
        return time.monotonic() - said[0] if said else 0.0

    # Labeling has started once the first mask lands; past the watchdog's timeout (and a poll or two),
    # a watchdog that took the started model actor for a pending one would have ended the run.
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any((dest / "masks").rglob("*.png")) and since_start() > watchdog_s + 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, b"".join(stderr).decode(errors="replace")[-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole foreground group
    sent = time.monotonic()
    try:
        code = proc.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("still running a minute after Ctrl-C")
    took = time.monotonic() - sent
    for reader in readers:
        reader.join(timeout=10)
    text = b"".join(stderr).decode(errors="replace")
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    sentence = last_line(text)
    assert sentence.startswith("textseg: interrupted; the run's summary is written"), sentence
    assert "run the same command to finish it" in sentence
    (summary,) = (dest / "runs").iterdir()
    record = json.loads(summary.read_text())
    assert record["status"] == "interrupted"
    assert record["finished_at"] and record["ok"] + record["error"] < 12000, record  # stopped mid-run
    assert took < LIMIT_S
