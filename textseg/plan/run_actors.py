"""The run's small helper actors (the crash ledger, the progress counter): created on the driver's node,
so losing a worker node never loses them, and found by name from any worker, so the stages' handles on
them pickle as a name and never carry a Ray actor handle across processes."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

_HANDLES: dict[str, Any] = {}  # per process: actor name -> actor handle


def start_on_driver_node(actor_class: Any, name: str) -> Any:
    """Create the named actor on this (the driver's) node; the caller keeps the handle for the run."""
    node = ray.get_runtime_context().get_node_id()
    actor = actor_class.options(
        name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
    ).remote()
    _HANDLES[name] = actor
    return actor


def actor_named(name: str) -> Any:
    """The actor `name`, looked up once per process."""
    handle = _HANDLES.get(name)
    if handle is None:
        handle = _HANDLES[name] = ray.get_actor(name)
    return handle
