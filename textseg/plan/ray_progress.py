"""The run's progress counter under Ray: one zero-CPU actor on the driver's node that stages add their
counts to without waiting (see `textseg.plan.progress`)."""

from __future__ import annotations

from typing import Any

import ray

from textseg.plan.progress import Counts
from textseg.plan.run_actors import actor_named, start_on_driver_node

REPORT_TIMEOUT_S = 5.0  # how long closing a run waits for the counter's report


@ray.remote(num_cpus=0, max_restarts=-1)
class _Counts:
    def __init__(self) -> None:
        self.counts = Counts()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.add(counts)

    def snapshot(self) -> dict[str, int]:
        return self.counts.snapshot()

    def report(self, started_wall: float) -> tuple[dict[str, float], float | None]:
        return self.counts.report(started_wall)


class RayProgress:
    """A handle on the run's counter actor that pickles as its name (stages find the actor by name)."""

    def __init__(self, name: str):
        self.name = name

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]

    @classmethod
    def start(cls, run_id: str) -> tuple[RayProgress, Any]:
        """Create the run's counter actor; the caller keeps the returned handle for the run's length."""
        name = f"textseg-progress-{run_id}"
        actor = start_on_driver_node(_Counts, name)
        return cls(name), actor

    def add(self, **counts: int) -> None:
        self._actor().add.remote(counts)  # not awaited: progress never slows a stage down

    def snapshot(self) -> dict[str, int]:
        return dict(ray.get(self._actor().snapshot.remote()))

    def report(self, started_wall: float) -> tuple[dict[str, float], float | None]:
        """`textseg.plan.progress.Counts.report` of this run; nothing when the counter does not answer
        within seconds (a report only: a run that was interrupted must still close promptly)."""
        try:
            startup, batch = ray.get(self._actor().report.remote(started_wall), timeout=REPORT_TIMEOUT_S)
            return dict(startup), batch
        except Exception:  # noqa: BLE001 - start-up seconds are a report, never a reason to fail a run
            return {}, None

    def _actor(self) -> Any:
        return actor_named(self.name)
