"""The run's progress counter under Ray: one zero-CPU actor on the driver's node that stages add their
counts to without waiting (see `textseg.plan.progress`)."""

from __future__ import annotations

from typing import Any

import ray

from textseg.plan.progress import Counts, startup_seconds
from textseg.plan.run_actors import actor_named, start_on_driver_node


@ray.remote(num_cpus=0, max_restarts=-1)
class _Counts:
    def __init__(self) -> None:
        self.counts = Counts()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.add(counts)

    def snapshot(self) -> dict[str, int]:
        return self.counts.snapshot()

    def startup(self, started_wall: float) -> dict[str, float]:
        return startup_seconds(self.counts.snapshot(), self.counts.first_at, started_wall)


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

    def startup(self, started_wall: float) -> dict[str, float]:
        """`textseg.plan.progress.startup_seconds` of this run; {} when the counter cannot answer."""
        try:
            return dict(ray.get(self._actor().startup.remote(started_wall), timeout=30))
        except Exception:  # noqa: BLE001 - start-up seconds are a report, never a reason to fail a run
            return {}

    def counts(self) -> dict[str, int]:
        """Every count, the model's included; {} when the counter cannot answer (a report only)."""
        try:
            return dict(ray.get(self._actor().snapshot.remote(), timeout=30))
        except Exception:  # noqa: BLE001 - see startup
            return {}

    def _actor(self) -> Any:
        return actor_named(self.name)
