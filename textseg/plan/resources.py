"""What the model stage asks the cluster for: GPU or CPU actors, how many, and what each reserves.

The pool is sized from the cluster's *capacity*, not from a snapshot of what is running: on an autoscaling
cluster whose GPU workers start at zero (our cluster.yaml), a snapshot shows no GPU, so `--device auto`
would run on CPU forever and `--device cuda` would get one actor forever. Capacity is the nodes alive now
plus what the autoscaler's node types can add (`max_workers` of each type). Ray keeps no copy of the
open-source autoscaler's node types where a driver can read them, so they come from, in order:

1. the cluster config an autoscaler may publish in Ray's GCS (`ray._private.state.state.get_cluster_config`,
   the source Ray Data itself uses; hosted platforms fill it, the open-source v1 and v2 autoscalers do
   not);
2. the autoscaling config file the head node's monitor process was started with (`--autoscaling-config`:
   `~/ray_bootstrap_config.yaml` under `ray up`, a temporary file under `ray.cluster_utils`), read on the
   head node, by the driver itself when it runs there (`ray job submit`) or by one zero-CPU task pinned
   to the head. Only node type names, resources and worker counts leave that file.

A head whose monitor has no autoscaling config is a cluster without an autoscaler: its capacity is its
nodes. A monitor that cannot be seen (KubeRay runs it in a separate container) leaves the node types
unknown: `auto` then goes by the GPUs present, and `cuda` trusts the user.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from textseg.errors import JobError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
# none: no autoscaler (capacity = the nodes); known: its node types were read; unknown: not readable.
Autoscaler = Literal["none", "known", "unknown"]

# A node type without a limit (max_count -1 in the GCS cluster config) counts as this many nodes, so that
# the pool stays finite; `--actors` sets the size outright.
UNLIMITED_NODES = 16
# Ray's default for a cluster config without a top-level `max_workers` (autoscaler/aws/defaults.yaml).
DEFAULT_MAX_WORKERS = 2
# Tasks queued on one model actor. Ray Data's actor autoscaler grows a pool only while
# tasks-in-flight / (actors * max_concurrency) >= 1.75, so a value of 1 would freeze the pool at its
# current size (Ray warns "will not allow it to scale up"); 2 also overlaps fetching the next batch.
TASKS_IN_FLIGHT_PER_ACTOR = 2
# How long the driver waits for the head node to report the autoscaler's node types.
HEAD_QUERY_TIMEOUT_S = 60.0
HEAD_RESOURCE = "node:__internal_head__"
# What a CPU model actor reserves, while it keeps one core busy (one torch thread): no CPU. One actor per
# core is the plan's own count; a reservation would only make the light tasks beside them (the listing,
# block splitting, metadata part writes: 1 CPU each) wait forever behind actors holding every CPU (on a
# 1-CPU node even half a CPU each did).
CPU_ACTOR_CPUS = 0
CPU_ACTOR_THREADS = 1  # torch threads of a CPU actor: one process per core, like a process pool


class ResourcesError(JobError, ValueError):
    """The cluster cannot provide what the job asks for; the message says which option to change.

    A `JobError` (exit status 2, one sentence) that is also a `ValueError`, like every other problem found
    before any work starts.
    """


@dataclass(frozen=True)
class NodeType:
    """A worker node type the autoscaler may launch: what one node has, and how many can run at once."""

    name: str
    resources: Mapping[str, float]
    max_workers: int

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def cpus(self) -> int:
        return int(self.resources.get("CPU", 0))


@dataclass(frozen=True)
class ClusterCapacity:
    """What the cluster has now and what its autoscaler can add (see the module docstring)."""

    gpus_now: int
    cpus_now: int
    # The largest CPU count of one node, alive now or of a node type the autoscaler can add: a
    # reservation up to this size fits on some node.
    largest_node_cpus: int
    # GPUs the cluster can reach: those present plus what the autoscaler's node types can add.
    max_gpus: int
    autoscaler: Autoscaler = "none"
    node_types: tuple[NodeType, ...] = ()
    # CPUs of each node alive now.
    node_cpus: tuple[int, ...] = ()

    @property
    def can_add_gpus(self) -> bool:
        return self.max_gpus > self.gpus_now

    @property
    def max_cpus(self) -> int:
        """CPUs the cluster can reach: those alive plus what the autoscaler's node types can add."""
        return self.cpus_now + sum(t.cpus * t.max_workers for t in self.node_types)


@dataclass(frozen=True)
class ModelPool:
    """The model actor pool: where the model runs, how many actors, and what each reserves."""

    use_gpu: bool
    device: str  # "cuda" or "cpu", for torch
    min_actors: int
    max_actors: int
    # Actors created when the stage starts: the whole pool (see `map_batches_kwargs`).
    initial_actors: int
    actor_resources: dict[str, Any]  # {"num_gpus": 1}, or {"num_cpus": CPU_ACTOR_CPUS} spread over nodes


def plan_model_pool(device: str, actors: int | None, capacity: ClusterCapacity) -> ModelPool:
    """The model actor pool for `--device` and `--actors` on a cluster of this capacity.

    - `auto` means GPU actors when the cluster has a GPU now or its autoscaler can add GPU nodes (a
      pending GPU actor is what makes the autoscaler add one), CPU actors otherwise.
    - GPU: one GPU per actor; at least one actor per GPU present, at most `--actors` or every GPU the
      cluster can reach.
    - CPU: one actor per CPU alive now (or `--actors`), each decoding, labeling and writing its own
      images on one core with one torch thread (`textseg.pipeline.fused`), as a process pool would; the
      pool may grow to one per CPU the autoscaler can add.

    Raises `ResourcesError` for `--device cuda` when the cluster has no GPU and its autoscaler is known
    to be unable to add one.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ResourcesError(f"--device {device!r}: choose auto, cpu or cuda")
    if actors is not None and actors < 1:
        raise ResourcesError(f"--actors must be at least 1, got {actors}")
    gpus_reachable = capacity.max_gpus > 0
    if device == "cuda" and not gpus_reachable and capacity.autoscaler != "unknown":
        raise ResourcesError(
            "--device cuda, but the cluster has no GPU and its autoscaler cannot add one: use --device cpu "
            "or --device auto, or join a cluster with GPU workers (--ray-address)"
        )
    if device == "cuda" or (device == "auto" and gpus_reachable):
        most = actors or max(1, capacity.max_gpus)
        least = min(most, max(1, capacity.gpus_now))
        return ModelPool(True, "cuda", least, most, most, {"num_gpus": 1})
    most = actors or max(1, capacity.max_cpus)
    resources = {"num_cpus": CPU_ACTOR_CPUS, "scheduling_strategy": "SPREAD"}  # one per core on every node
    return ModelPool(False, "cpu", 1, most, actors or min(most, max(1, capacity.cpus_now)), resources)


def map_batches_kwargs(pool: ModelPool) -> dict[str, Any]:
    """Ray Data `map_batches` arguments for the model stage: the actor pool strategy and each actor's
    reservation (`compute=`; Ray 2.51+ deprecates `concurrency=`)."""
    from ray.data import ActorPoolStrategy

    strategy = ActorPoolStrategy(
        min_size=pool.min_actors,
        max_size=pool.max_actors,
        # ray#59144: Ray Data grows an actor pool only within its resource budget, which is the cluster
        # as it is now; a GPU pool started at 1 on a cluster with 0 or 1 GPU nodes has no GPU to spare,
        # so it stays at 1 until Ray Data's own cluster autoscaler asks for more nodes (in 2.60 one
        # round per >= 10 s, and it sees only node types that already have a node). Creating the whole
        # pool at once makes every actor a pending GPU request, which the Ray autoscaler answers with
        # GPU nodes directly; the actors start as the nodes join, with no growth decision left to Ray
        # Data. It also skips the actor-by-actor ramp-up on clusters that have the GPUs already.
        initial_size=pool.initial_actors,
        # Keep >= 2: a pool at 1 task per actor can never reach Ray Data's upscaling threshold (1.75),
        # whatever DataContext.max_tasks_in_flight_per_actor says.
        max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR,
    )
    return {"compute": strategy, **pool.actor_resources}


def write_task_kwargs(capacity: ClusterCapacity) -> dict[str, Any]:
    """Ray Data `map_batches` arguments for the write stage: no CPU reservation, at most one task per CPU
    the cluster can reach.

    Ray Data reserves each stage a share of the cluster's CPUs and lets a task start only within its
    stage's share; where CPUs are few (a laptop, a small cluster), decoding, which runs ahead of the
    model, takes every free CPU and the write stage waits for it to finish: the first masks landed only
    after the last image was labeled (2 cores, 20,000 images: at 70% of the run). Without a reservation
    writes start as labels arrive and share the CPUs with decoding.
    """
    from ray.data import TaskPoolStrategy

    return {"num_cpus": 0, "compute": TaskPoolStrategy(size=max(1, capacity.max_cpus))}


# Reading the capacity from a running cluster.


def cluster_capacity() -> ClusterCapacity:
    """The connected cluster's capacity: alive nodes from `ray.nodes()`, node types as the module
    docstring says."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    published = _published_node_types()
    if published is not None:
        node_types, max_workers = published
        return capacity_from(nodes, node_types, autoscaler="known", max_workers=max_workers, head_listed=True)
    answer = _head_autoscaling_config(nodes)
    if answer["state"] == "found":
        node_types, max_workers = node_types_from_config(answer["config"])
        return capacity_from(nodes, node_types, autoscaler="known", max_workers=max_workers)
    state: Autoscaler = "none" if answer["state"] == "none" else "unknown"
    return capacity_from(nodes, (), autoscaler=state)


def capacity_from(
    nodes: Sequence[Mapping[str, Any]],
    node_types: Iterable[NodeType],
    *,
    autoscaler: Autoscaler,
    max_workers: int | None = None,
    head_listed: bool = False,
) -> ClusterCapacity:
    """The capacity of alive `nodes` (`ray.nodes()` entries) plus what `node_types` can add.

    `max_workers` caps the worker nodes of all types together. Present GPU workers count against their
    type's `max_workers`, so reachable GPUs are the head's plus the node types' maximum (never fewer than
    present); with `head_listed` (the GCS cluster config lists the head's group too) the head is in the
    node types already.
    """
    resources = [node.get("Resources", {}) for node in nodes]
    gpus_now = int(sum(r.get("GPU", 0) for r in resources))
    node_cpus = tuple(int(r.get("CPU", 0)) for r in resources)
    types = tuple(t for t in node_types if t.max_workers > 0)
    head_gpus = 0 if head_listed else int(sum(r.get("GPU", 0) for r in resources if HEAD_RESOURCE in r))
    slots = math.inf if max_workers is None else max_workers
    addable = 0
    for node_type in sorted(types, key=lambda t: -t.gpus):
        count = min(node_type.max_workers, slots)
        if node_type.gpus <= 0 or count <= 0:
            continue
        addable += node_type.gpus * int(count)
        slots -= count
    largest = max([*node_cpus, *(t.cpus for t in types)], default=0)
    return ClusterCapacity(
        gpus_now=gpus_now,
        cpus_now=sum(node_cpus),
        largest_node_cpus=largest,
        max_gpus=max(gpus_now, head_gpus + addable),
        autoscaler=autoscaler,
        node_types=types,
        node_cpus=node_cpus,
    )


def node_types_from_config(config: Mapping[str, Any]) -> tuple[tuple[NodeType, ...], int]:
    """Worker node types and the cluster's `max_workers` from an autoscaling config (cluster.yaml's
    shape: `available_node_types`, `head_node_type`, `max_workers`), with the autoscaler's defaults: a
    type without `max_workers` gets the cluster's, the head type gets none."""
    cluster_max = int(config.get("max_workers", DEFAULT_MAX_WORKERS))
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head or not isinstance(spec, Mapping):
            continue
        resources = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
        types.append(NodeType(str(name), resources, int(spec.get("max_workers", cluster_max))))
    return tuple(types), cluster_max


def _published_node_types() -> tuple[tuple[NodeType, ...], int | None] | None:
    """Node types from the cluster config in Ray's GCS, or None when no autoscaler published one."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as err:  # noqa: BLE001 - an older or unusual Ray: fall back to the head's file
        log.debug("no cluster config in the GCS: %s", err)
        return None
    if config is None or not config.node_group_configs:
        return None
    types = tuple(
        NodeType(
            group.name,
            {str(k): float(v) for k, v in group.resources.items()},
            group.max_count if group.max_count >= 0 else UNLIMITED_NODES,
        )
        for group in config.node_group_configs
    )
    gpu_cap = config.max_resources.get("GPU")
    if gpu_cap is not None:  # the cluster-wide GPU limit, as a limit on GPU nodes
        types = tuple(
            NodeType(t.name, t.resources, min(t.max_workers, int(gpu_cap) // t.gpus)) if t.gpus else t
            for t in types
        )
    return types, None


def _head_autoscaling_config(nodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`autoscaling_config_on_this_node` run on the head node: in this process when the driver is there,
    else as one zero-CPU task pinned to it. {"state": "unknown"} when it cannot be asked."""
    import ray

    try:
        gcs_address = ray.get_runtime_context().gcs_address
        here = ray.get_runtime_context().get_node_id()
        head = next((n["NodeID"] for n in nodes if HEAD_RESOURCE in n.get("Resources", {})), None)
        if head is None:
            return {"state": "unknown"}
        if head == here:
            return autoscaling_config_on_this_node(gcs_address)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=1)(autoscaling_config_on_this_node).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)
        )
        answer: dict[str, Any] = ray.get(task.remote(gcs_address), timeout=HEAD_QUERY_TIMEOUT_S)
        return answer
    except Exception as err:  # noqa: BLE001 - capacity falls back to the nodes alive now
        log.warning("cannot read the autoscaler's node types from the head node: %s", err)
        return {"state": "unknown"}


def autoscaling_config_on_this_node(gcs_address: str) -> dict[str, Any]:
    """The autoscaling config of the monitor process serving `gcs_address` on this machine.

    {"state": "found", "config": {available_node_types, head_node_type, max_workers}} (nothing else: the
    file also holds provider and SSH settings); {"state": "none"} when that monitor runs without an
    autoscaling config (no autoscaler); {"state": "unknown"} when no such monitor is visible here.
    """
    cmdline = _monitor_cmdline(gcs_address)
    if cmdline is None:
        return {"state": "unknown"}
    path = next((arg.split("=", 1)[1] for arg in cmdline if arg.startswith("--autoscaling-config=")), None)
    if not path:
        return {"state": "none"}
    import yaml

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        log.warning("cannot read the autoscaling config %s: %s", path, err)
        return {"state": "unknown"}
    kept = {
        "available_node_types": {
            name: {key: spec[key] for key in ("resources", "min_workers", "max_workers") if key in spec}
            for name, spec in (config.get("available_node_types") or {}).items()
            if isinstance(spec, Mapping)
        },
        "head_node_type": config.get("head_node_type"),
    }
    if "max_workers" in config:
        kept["max_workers"] = config["max_workers"]
    return {"state": "found", "config": kept}


def _monitor_cmdline(gcs_address: str) -> list[str] | None:
    """The argv of the Ray monitor (v1 or v2 autoscaler) started for `gcs_address`, from /proc."""
    port = gcs_address.rsplit(":", 1)[-1]
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(arg.endswith("monitor.py") and "autoscaler" in arg for arg in argv):
            continue
        address = next((a.split("=", 1)[1] for a in argv if a.startswith("--gcs-address=")), "")
        if address == gcs_address or address.rsplit(":", 1)[-1] == port:
            return argv
    return None
