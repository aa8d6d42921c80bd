"""Processes from /proc (psutil is not a dependency): find Ray's workers and kill what a test started.

Linux only, like the rest of the reliability suite's fault injection.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    cmdline: str


def processes() -> Iterator[Proc]:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        proc = process(int(name))
        if proc is not None:
            yield proc


def process(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may hold spaces; the fields after it are space-separated.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, ppid, pgid, sid = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if state in ("Z", "X"):
        return None
    return Proc(pid, ppid, pgid, sid, cmdline)


def in_session(sid: int) -> list[Proc]:
    """Live processes of a session (a subprocess started with start_new_session=True and its children)."""
    return [proc for proc in processes() if proc.sid == sid or proc.pgid == sid]


def descendants(pid: int) -> list[Proc]:
    every = list(processes())
    found: list[Proc] = []
    parents = {pid}
    while True:
        more = [p for p in every if p.ppid in parents and p not in found]
        if not more:
            return found
        found.extend(more)
        parents |= {p.pid for p in more}


def kill_session(sid: int) -> list[Proc]:
    """SIGKILL the process group `sid` and every process still in session `sid` (Ray's raylet, GCS and
    workers of an embedded Ray started by that process); returns what is left, which should be nothing."""
    for _ in range(50):
        try:
            os.killpg(sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        left = in_session(sid)
        for proc in left:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not left:
            return []
        wait_for(lambda: not in_session(sid), attempts=20)
    return in_session(sid)


def pids_with_open(path: str) -> list[int]:
    """Processes that hold `path` open (any fd), e.g. a Ray worker reading a FIFO."""
    target = os.path.realpath(path)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                try:
                    if os.readlink(f"/proc/{name}/fd/{fd}") == target:
                        found.append(int(name))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return found


def pid_of_tcp_client(local_port: int) -> int | None:
    """The process owning the loopback TCP socket whose local port is `local_port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == local_port:
                        inodes.add(parts[9])
        except OSError:
            continue
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                try:
                    if os.readlink(f"/proc/{name}/fd/{fd}") in wanted:
                        return int(name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def wait_for(condition, attempts: int = 100) -> bool:  # type: ignore[no-untyped-def]
    """Poll `condition` (a cheap check of the world) a bounded number of times; no timing is asserted."""
    import time

    for _ in range(attempts):
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())
