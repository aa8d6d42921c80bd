"""What the model stage asks the cluster for: GPU or CPU actors, how many, and what each reserves.

Sized from the cluster's *capacity*, not a snapshot of what is running: on an autoscaling cluster whose
GPU workers start at zero (our cluster.yaml), `--device auto` must still choose GPUs, so that the actors'
requests make the autoscaler add GPU nodes. Capacity = the nodes alive now plus what the autoscaler's
node types can add (`max_workers` of each type), read from the cluster config the autoscaler publishes in
Ray's GCS; a cluster without an autoscaler publishes none, and its capacity is its nodes.

- `auto`: GPU actors when the cluster has a GPU now or its autoscaler can add one; CPU actors otherwise.
- GPU pool: one GPU per actor; it starts with one actor per GPU present (at least one, which is what
  makes the autoscaler add the first GPU node) and grows to `--actors` or every GPU the cluster can reach.
- CPU pool: each actor reserves half of the largest node's CPUs (the other half decodes and encodes), so
  a reservation always fits on one node; one actor unless `--actors` says more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from textseg.errors import JobError

log = logging.getLogger(__name__)


class ResourcesError(JobError):
    """The cluster cannot provide what the job asks for (e.g. --device cuda with no GPU anywhere)."""


@dataclass(frozen=True)
class ClusterCapacity:
    gpus_now: int
    cpus_now: int
    largest_node_cpus: int  # of the nodes alive now and the node types the autoscaler can add
    max_gpus: int  # GPUs the cluster can reach: present ones plus what its autoscaler can add
    autoscaling: bool  # an autoscaler published its node types


@dataclass(frozen=True)
class ModelPool:
    use_gpu: bool
    device: str  # "cuda" or "cpu": what the model actors run on
    min_actors: int
    max_actors: int
    actor_resources: dict[str, float]  # Ray resources each actor reserves


def cluster_capacity() -> ClusterCapacity:
    """The connected cluster's capacity (see the module docstring)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus_now = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    cpus_now = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
    largest = max((int(n["Resources"].get("CPU", 0)) for n in nodes), default=1)
    groups = _autoscaler_node_groups()
    max_gpus = gpus_now
    if groups:
        addable = sum(int(g["resources"].get("GPU", 0)) * max(0, g["max_count"]) for g in groups)
        # Present GPU nodes are counted in their group's max_count already; the head's GPUs are not.
        max_gpus = max(gpus_now, addable)
        largest = max([largest, *(int(g["resources"].get("CPU", 0)) for g in groups)])
    return ClusterCapacity(gpus_now, cpus_now, max(1, largest), max_gpus, bool(groups))


def _autoscaler_node_groups() -> list[dict[str, Any]]:
    """Node types as the autoscaler published them: resources and max_count each ([] when none)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as err:  # noqa: BLE001 - an older or unusual Ray: treat it as not autoscaling
        log.debug("no autoscaler cluster config: %s", err)
        return []
    if config is None:
        return []
    return [
        {"resources": dict(g.resources), "max_count": g.max_count if g.max_count >= 0 else 10**6}
        for g in config.node_group_configs
    ]


def plan_model_pool(device: str, actors: int | None, capacity: ClusterCapacity) -> ModelPool:
    """The model actor pool for `--device` and `--actors` on a cluster of this capacity."""
    gpu_reachable = capacity.max_gpus > 0
    if device == "cuda" and not gpu_reachable:
        raise ResourcesError(
            "--device cuda, but the cluster has no GPU and its autoscaler cannot add one: use --device cpu, "
            "or join a cluster with GPU workers (--ray-address)"
        )
    if device == "cuda" or (device == "auto" and gpu_reachable):
        most = actors or max(1, capacity.max_gpus)
        least = min(most, max(1, capacity.gpus_now))
        return ModelPool(True, "cuda", least, most, {"num_gpus": 1})
    per_actor = max(1, capacity.largest_node_cpus // 2)
    count = actors or 1
    return ModelPool(False, "cpu", count, count, {"num_cpus": per_actor})


def map_batches_kwargs(pool: ModelPool) -> dict[str, Any]:
    """Ray Data `map_batches` arguments for the model stage's actor pool."""
    from ray.data import ActorPoolStrategy

    strategy = ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)
    return {"compute": strategy, **pool.actor_resources}
