"""The run's crash ledger: one small Ray actor that remembers which work was in flight when a worker died.

Ray retries a task whose worker process died, and restarts a dead actor and retries its task, without
limit. That is right for a lost node, and an endless loop for an image that kills every process that
touches it. Stages therefore mark work in flight here (`textseg.pipeline.batches.isolate`): a CPU task
once when it starts, keyed by its Ray task id (the same on every retry), and a model actor each batch,
so a retry knows it is one; a retried batch then marks each image before it runs it, so the next retry
fails exactly the image that was in flight at the second death and goes on with the rest.

Cost while nothing dies: one awaited call per CPU task (a block of rows, not an image), and two calls
per batch that a model actor sends without waiting for the answer (a retried call always runs in a
restarted actor, and only a restarted actor waits); two awaited calls per image of a retried batch.
The actor lives on the driver's node, so losing a worker node does not lose it; its memory is one entry
per task of the run.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import ray

from textseg.plan.run_actors import actor_named, start_on_driver_node


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class _Ledger:
    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def begin(self, key: str) -> int:
        earlier = self._open.get(key, 0)
        self._open[key] = earlier + 1
        return earlier

    def end(self, key: str) -> None:
        self._open.pop(key, None)


class RayCrashLedger:
    """The stages' side of the ledger (`textseg.pipeline.batches.CrashLedger`); pickles as its name."""

    def __init__(self, name: str):
        self.name = name
        self._task: str | None = None
        self._retried = False

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]

    @classmethod
    def start(cls, run_id: str) -> tuple[RayCrashLedger, Any]:
        """Create the run's ledger actor; the caller keeps the returned handle for the run's length."""
        name = f"textseg-crashes-{run_id}"
        actor = start_on_driver_node(_Ledger, name)
        return cls(name), actor

    def batch_retried(self, key: str) -> bool:
        context = ray.get_runtime_context()
        if context.get_actor_id() is None:
            # A task: marked once, by its Ray task id (the same on every retry); all its batches follow.
            task = context.get_task_id()
            if task is not None and task != self._task:
                self._task = task
                self._retried = ray.get(self._actor().begin.remote(task)) > 0
            return self._retried
        # An actor's retried call runs in the restarted actor: only a restarted one waits for the answer.
        marked = self._actor().begin.remote(key)
        return bool(_restarted_actor() and ray.get(marked) > 0)

    def batch_done(self, key: str) -> None:
        if ray.get_runtime_context().get_actor_id() is not None:
            self._actor().end.remote(key)

    def begin(self, key: str) -> int:
        return int(ray.get(self._actor().begin.remote(key)))

    def end(self, key: str) -> None:
        # Awaited: a death right after an image must not leave that image marked in flight.
        ray.get(self._actor().end.remote(key))

    def _actor(self) -> Any:
        return actor_named(self.name)


@functools.cache
def _restarted_actor() -> bool:
    """Whether this process is a restarted actor: constant for the process's life, and a query to Ray's
    control store each time it is asked, so asked once (its internal deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
