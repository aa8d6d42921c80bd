"""Bounds on the waits of a run's start, so that none of them hangs: each ends in one sentence.

- Joining a Ray cluster: `ray.init(address=...)` retries an unreachable address for minutes, so the
  address it would use (`--ray-address`, RAY_ADDRESS, or the cluster `ray start` recorded) is probed
  with one TCP connect of `RAY_CONNECT_TIMEOUT_S` first (`ray_address_to_join`). `--ray-address auto`
  joins only a cluster `ray start` recorded: Ray's own `auto` also takes any GCS process it finds on
  the machine, which may be the private Ray of another process (a notebook, another run) that ends
  with it, and this run's driver with it, silently (exit 1, no summary).
- Model actors that never get their resources (GPUs an autoscaler could add but does not, GPUs held by
  other jobs): `StartupWatchdog` ends the run when no model actor has started `--startup-timeout`
  seconds after the dataset began. "Started" means a worker process was given to the actor (its
  constructor is loading the model, or has loaded it); a slow model download is not a wait for
  resources. Resources the cluster cannot have at all are found before the dataset starts
  (`textseg.plan.resources.plan_model_pool`).
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from textseg.errors import JobError
from textseg.plan.resources import ModelPool

log = logging.getLogger(__name__)

RAY_CONNECT_TIMEOUT_S = 5.0
# How often the watchdog asks Ray's control store about the model actors (one small call).
STARTUP_POLL_S = 2.0
START_HINT = "check --ray-address or start it with `ray start --head`"


def ray_address_to_join(address: str | None) -> str | None:
    """What to pass to `ray.init(address=...)` for `--ray-address`, after checking that the cluster it
    leads to answers. None (the default) is Ray's: RAY_ADDRESS, else the cluster `ray start` recorded on
    this machine, else a new local Ray; `auto` is the same without the new local Ray.

    Ray's own `auto` would also join a GCS process found on the machine (another process's private Ray),
    so `auto` with a recorded cluster is passed on as None, which joins the recorded one. None and `auto`
    stay as they are otherwise: only they make Ray send the local cluster's authentication token. Raises
    `JobError` (one sentence) when the address does not answer within RAY_CONNECT_TIMEOUT_S, or when
    `auto` finds no cluster to join.
    """
    env_address = os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto"):
        if address != "local":
            check_reachable(address, "--ray-address")
        return address
    if env_address is not None:
        if env_address not in ("auto", "local"):
            check_reachable(env_address, "RAY_ADDRESS")
        return address
    try:
        import ray._private.services as services
        import ray._private.utils as ray_utils

        record = ray_utils.get_ray_address_file(None)
        recorded = ray_utils.read_ray_address(None)
    except (ImportError, AttributeError) as err:  # another Ray: leave the lookup to ray.init
        log.debug("cannot look up the local Ray cluster: %s", err)
        return address
    if recorded is not None:
        check_reachable(recorded, f"recorded by `ray start` in {record}")
        return None
    if address is None:
        return None  # a new local Ray of this run's own
    found = sorted(services.find_gcs_addresses())
    private = f": only the private Ray of other processes ({', '.join(found)})" if found else ""
    raise JobError(
        f"--ray-address auto found no cluster started with `ray start` on this machine{private}; "
        "start one with `ray start --head`, pass a cluster's address to --ray-address, or leave "
        "--ray-address out to run on a local Ray of this run's own"
    )


def check_reachable(
    address: str, where: str = "--ray-address", timeout_s: float = RAY_CONNECT_TIMEOUT_S
) -> None:
    """One TCP connect to `address` (host:port, or ray://host:port for Ray Client); `JobError` when it
    fails. An address without a port is left to `ray.init` to reject."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    host = host.strip("[]") or "127.0.0.1"
    started = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except socket.gaierror:
        reason = f"unknown host {host!r}"
    except ConnectionRefusedError:
        reason = "connection refused: nothing listens there"
    except TimeoutError:
        reason = f"no answer within {timeout_s:g} s"
    except OSError as err:
        reason = err.strerror or type(err).__name__
    log.debug("probing %s took %.1f s", address, time.monotonic() - started)
    shown = address if where == "--ray-address" else f"{address} ({where})"
    raise JobError(f"cannot reach the Ray cluster at {shown} ({reason}); {START_HINT}")


def cannot_join(address: str | None, err: BaseException) -> str:
    """The sentence for a `ray.init` that reached `address` but could not join a cluster there."""
    cause = f"{err} {err.__cause__ or ''}"
    if "InvalidAuthToken" in cause or "token authentication" in cause.lower():
        return (
            f"cannot join the Ray cluster at {address or 'this machine'}: it asks for an authentication "
            "token; set RAY_AUTH_MODE=token with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
            "(`ray get-auth-token` on its head node), or use --ray-address auto on the head node"
        )
    text = " ".join(str(err).split()) or type(err).__name__
    return f"cannot join the Ray cluster at {address or 'this machine'} ({text}); {START_HINT}"


# The watchdog's own signal: SIGINT may be ignored (a job started with `&` from a script inherits
# SIG_IGN), and then neither Ctrl-C's path nor `_thread.interrupt_main` reaches the main thread.
INTERRUPT_SIGNAL = signal.SIGUSR1


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class MainThreadInterrupt:
    """While open (`with ... as interrupt`), `interrupt()` from any thread raises KeyboardInterrupt in
    the main thread at once, even where it is blocked on a lock or a socket, whatever SIGINT's
    disposition: a real signal (INTERRUPT_SIGNAL) interrupts the blocking call, where
    `_thread.interrupt_main` only marks SIGINT pending until the call returns, which for a dataset
    whose model actors never start is never. Opened outside the main thread (signal handlers can only
    be set there), it falls back to `_thread.interrupt_main`."""

    def __init__(self) -> None:
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> Callable[[], None]:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(INTERRUPT_SIGNAL, _raise_interrupt)
            self._installed = True
        return self.interrupt

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(INTERRUPT_SIGNAL, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def interrupt(self) -> None:
        main = threading.main_thread().ident
        if self._installed and main is not None:
            signal.pthread_kill(main, INTERRUPT_SIGNAL)
        else:
            _thread.interrupt_main()


class StartupWatchdog:
    """While open (`with`), ends the run when no model actor has started within `timeout_s`.

    A thread asks Ray's control store every `poll_s` whether an actor of the model stage (Ray Data's
    `MapWorker(MapBatches(<actor_class>))`) of this job has a worker process. Once one has, the watchdog
    is done. When `timeout_s` passes first, it sets `failure` (one sentence naming what is pending) and
    interrupts the main thread (KeyboardInterrupt), which stops the dataset; the runner then closes the
    run with that sentence. Where the control store cannot be read, a GPU pool on a cluster without any
    GPU still counts as waiting.
    """

    def __init__(
        self, pool: ModelPool, timeout_s: float, actor_class: str = "Labeler", poll_s: float = STARTUP_POLL_S
    ):
        self.pool = pool
        self.timeout_s = timeout_s
        self.actor_class = actor_class
        self.poll_s = poll_s
        self.failure: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._interrupt = MainThreadInterrupt()

    def __enter__(self) -> StartupWatchdog:
        import ray

        job = ray.get_runtime_context().get_job_id()
        self._interrupt.__enter__()
        self._thread = threading.Thread(target=self._loop, args=(job,), name="textseg-startup", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)
        self._interrupt.__exit__()

    def _loop(self, job: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._done.wait(min(self.poll_s, max(0.0, deadline - time.monotonic()) + 0.05)):
            try:
                waiting = self.waiting(job)
            except Exception as err:  # noqa: BLE001 - a watchdog that cannot look never ends a run
                log.debug("the start-up watchdog cannot read the actor table: %s", err)
                waiting = None
            if waiting == 0:
                return  # a model actor started: the wait for resources is over
            if time.monotonic() < deadline:
                continue
            if waiting is None and not (self.pool.use_gpu and _cluster("GPU")[1] == 0):
                return  # cannot tell; nothing to say
            with self._lock:
                if self._done.is_set():
                    return
                self.failure = self.describe(waiting or self.pool.initial_actors)
                self._interrupt.interrupt()
            return

    def waiting(self, job: str) -> int | None:
        """0 when some model actor of `job` has started; else how many wait for resources; None when no
        model actor of this job is in Ray's actor table (yet, or under another class name)."""
        import ray
        import ray._private.state

        table: dict[str, dict[str, Any]] = ray._private.state.actors(job_id=ray.JobID.from_hex(job))
        mine = [
            actor
            for actor in table.values()
            if str(actor.get("ActorClassName", "")).startswith("MapWorker(")
            and f"({self.actor_class})" in str(actor.get("ActorClassName", ""))
        ]
        if not mine:
            return None
        started = [
            a
            for a in mine
            if a.get("State") == "ALIVE"
            or a.get("NumRestarts", 0)
            or a.get("Pid", 0)
            or (a.get("Address") or {}).get("Port", 0)
        ]
        return 0 if started else sum(1 for a in mine if a.get("State") != "DEAD")

    def describe(self, waiting: int) -> str:
        """The sentence: what is pending, what the cluster has, what to do."""
        resources = self.pool.actor_resources
        if self.pool.use_gpu:
            kind, each = "GPU", resources.get("num_gpus", 1)
            fix = "add GPU nodes (or see why the autoscaler adds none), use --device cpu"
        else:
            kind, each = "CPU", resources.get("num_cpus", 1)
            fix = "free or add CPUs, lower --actors"
        free, total = _cluster(kind)
        return (
            f"no model actor could start within {self.timeout_s:g} s: {waiting} model actor(s) waiting for "
            f"{each:g} {kind} each, and the cluster has {free:g} {kind}(s) free of {total:g}; {fix}, or wait "
            "longer with --startup-timeout"
        )


def _cluster(resource: str) -> tuple[float, float]:
    """(free, total) of a resource in the connected cluster."""
    import ray

    return ray.available_resources().get(resource, 0.0), ray.cluster_resources().get(resource, 0.0)
