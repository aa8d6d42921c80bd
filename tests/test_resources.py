"""The model pool's sizing (textseg.plan.resources) over cluster capacities, without a Ray cluster."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import pytest
import yaml

from textseg.errors import JobError
from textseg.plan.resources import (
    ClusterCapacity,
    NodeType,
    ResourcesError,
    autoscaling_config_on_this_node,
    capacity_from,
    map_batches_kwargs,
    node_types_from_config,
    plan_model_pool,
    write_task_kwargs,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def node(cpus: int, gpus: int = 0, head: bool = False) -> dict[str, Any]:
    """A `ray.nodes()` entry."""
    resources: dict[str, float] = {"CPU": float(cpus), "memory": 1e9}
    if gpus:
        resources["GPU"] = float(gpus)
    if head:
        resources["node:__internal_head__"] = 1.0
    return {"Alive": True, "NodeID": f"{cpus}-{gpus}-{head}", "Resources": resources}


def test_auto_with_gpus_now_uses_one_actor_per_gpu() -> None:
    capacity = capacity_from([node(8, head=True), node(4, 1), node(4, 1)], (), autoscaler="none")
    pool = plan_model_pool("auto", None, capacity)
    assert (pool.use_gpu, pool.device, pool.actor_resources) == (True, "cuda", {"num_gpus": 1})
    assert (pool.min_actors, pool.max_actors, pool.initial_actors) == (2, 2, 2)


def test_auto_with_no_gpu_yet_but_addable_gpu_nodes_plans_the_reachable_gpu_pool() -> None:
    gpu_type = NodeType("gpu_node", {"CPU": 1, "GPU": 1}, max_workers=3)
    capacity = capacity_from([node(1, head=True)], [gpu_type], autoscaler="known", max_workers=8)
    assert (capacity.gpus_now, capacity.max_gpus, capacity.can_add_gpus) == (0, 3, True)
    pool = plan_model_pool("auto", None, capacity)
    assert pool.use_gpu and pool.device == "cuda"
    # Starts at one actor (its pending GPU request is what the autoscaler answers), may reach every GPU.
    assert (pool.min_actors, pool.max_actors, pool.initial_actors) == (1, 3, 3)


def test_our_cluster_yaml_gets_a_gpu_pool_of_its_gpu_workers_max() -> None:
    """cluster.yaml: CPU head, `gpu_worker` (1 GPU, 0..8), `cpu_worker` (0..4), 12 workers at most."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types, max_workers = node_types_from_config(config)
    assert {t.name: (t.gpus, t.max_workers) for t in types} == {"gpu_worker": (1, 8), "cpu_worker": (0, 4)}
    assert max_workers == 12
    capacity = capacity_from([node(8, head=True)], types, autoscaler="known", max_workers=max_workers)
    pool = plan_model_pool("auto", None, capacity)
    assert (pool.use_gpu, pool.min_actors, pool.max_actors) == (True, 1, 8)


def test_reachable_gpus_respect_the_cluster_max_workers_and_count_the_head() -> None:
    types = [NodeType("g4", {"CPU": 48, "GPU": 4}, 5), NodeType("g1", {"CPU": 4, "GPU": 1}, 10)]
    capacity = capacity_from([node(8, 1, head=True)], types, autoscaler="known", max_workers=6)
    # The head's GPU, then the biggest GPU nodes first within 6 workers: 5 x 4 + 1 x 1.
    assert capacity.max_gpus == 1 + 20 + 1
    # Present GPU workers count against their type's limit, never below what is there now.
    assert capacity_from([node(4, 2)] * 3, types[:1], autoscaler="known", max_workers=1).max_gpus == 6


CPU_ACTOR = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}


def test_auto_on_a_cpu_only_cluster_runs_one_actor_per_core_spread_over_the_nodes() -> None:
    capacity = capacity_from([node(8, head=True)] + [node(8)] * 3, (), autoscaler="none")
    pool = plan_model_pool("auto", None, capacity)
    assert (pool.use_gpu, pool.device) == (False, "cpu")
    # No CPU reserved: one actor per core, and the listing and part writes always find a CPU.
    assert pool.actor_resources == CPU_ACTOR
    assert (pool.min_actors, pool.max_actors, pool.initial_actors) == (1, 32, 32)


def test_cpu_pool_on_one_node_is_one_actor_per_core() -> None:
    pool = plan_model_pool("auto", None, capacity_from([node(2, head=True)], (), autoscaler="none"))
    assert (pool.max_actors, pool.initial_actors, pool.actor_resources) == (2, 2, CPU_ACTOR)
    pool = plan_model_pool("cpu", None, capacity_from([node(1, head=True)], (), autoscaler="none"))
    assert (pool.max_actors, pool.initial_actors) == (1, 1)


def test_cpu_pool_may_grow_onto_addable_node_types() -> None:
    # A 0-CPU head (a common setup) with 16-CPU workers that start at zero: one actor asks for the first
    # node, and the pool may grow to a core of each node the autoscaler can add.
    types = [NodeType("cpu_worker", {"CPU": 16}, 4)]
    capacity = capacity_from([node(0, head=True)], types, autoscaler="known", max_workers=4)
    pool = plan_model_pool("auto", None, capacity)
    assert (pool.use_gpu, pool.actor_resources) == (False, CPU_ACTOR)
    assert (pool.min_actors, pool.max_actors, pool.initial_actors) == (1, 64, 1)


def test_cuda_without_any_reachable_gpu_is_a_job_error() -> None:
    capacity = capacity_from([node(8, head=True)], [NodeType("cpu", {"CPU": 8}, 4)], autoscaler="known")
    with pytest.raises(ResourcesError) as raised:
        plan_model_pool("cuda", None, capacity)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, JobError)
    message = str(raised.value)
    assert "--device cpu" in message and "\n" not in message
    with pytest.raises(ResourcesError):
        plan_model_pool("cuda", 4, capacity_from([node(8, head=True)], (), autoscaler="none"))


def test_cuda_with_an_unreadable_autoscaler_trusts_the_user() -> None:
    # KubeRay runs the autoscaler in its own container: its node types cannot be read from the head.
    capacity = capacity_from([node(8, head=True)], (), autoscaler="unknown")
    pool = plan_model_pool("cuda", None, capacity)
    assert (pool.use_gpu, pool.min_actors, pool.max_actors) == (True, 1, 1)
    assert plan_model_pool("auto", None, capacity).use_gpu is False


def test_actors_caps_the_pool() -> None:
    gpu_type = NodeType("gpu", {"CPU": 4, "GPU": 1}, 8)
    capacity = capacity_from([node(8, head=True), node(4, 1)], [gpu_type], autoscaler="known")
    pool = plan_model_pool("auto", 3, capacity)
    assert (pool.min_actors, pool.max_actors, pool.initial_actors) == (1, 3, 3)
    many_now = capacity_from([node(8, head=True)] + [node(4, 1)] * 4, [gpu_type], autoscaler="known")
    pool = plan_model_pool("auto", 2, many_now)
    assert (pool.min_actors, pool.max_actors) == (2, 2)
    cpu = plan_model_pool("cpu", 3, capacity_from([node(8, head=True)], (), autoscaler="none"))
    assert (cpu.max_actors, cpu.initial_actors, cpu.actor_resources) == (3, 3, CPU_ACTOR)


def test_capacity_dataclass_is_usable_directly() -> None:
    capacity = ClusterCapacity(gpus_now=0, cpus_now=4, largest_node_cpus=4, max_gpus=2, autoscaler="known")
    assert plan_model_pool("auto", None, capacity).max_actors == 2


def test_map_batches_kwargs_start_the_whole_pool() -> None:
    from ray.data import ActorPoolStrategy

    gpu_type = NodeType("gpu", {"CPU": 1, "GPU": 1}, 3)
    pool = plan_model_pool("auto", None, capacity_from([node(1, head=True)], [gpu_type], autoscaler="known"))
    kwargs = map_batches_kwargs(pool)
    strategy = kwargs.pop("compute")
    assert kwargs == {"num_gpus": 1}
    assert isinstance(strategy, ActorPoolStrategy)
    assert (strategy.min_size, strategy.max_size, strategy.initial_size) == (1, 3, 3)
    assert strategy.max_tasks_in_flight_per_actor == 2


def test_write_tasks_reserve_no_cpu_and_are_capped_at_the_reachable_cpus() -> None:
    from ray.data import TaskPoolStrategy

    cpu_type = NodeType("cpu", {"CPU": 8}, 4)
    capacity = capacity_from([node(2, head=True)], [cpu_type], autoscaler="known")
    kwargs = write_task_kwargs(capacity)
    strategy = kwargs.pop("compute")
    assert kwargs == {"num_cpus": 0}
    assert isinstance(strategy, TaskPoolStrategy) and strategy.size == 2 + 8 * 4


def test_node_types_from_config_fills_the_autoscaler_defaults() -> None:
    config = {
        "max_workers": 5,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8, "GPU": 1}},
            "gpu": {"resources": {"GPU": 2}},  # no max_workers: the cluster's
            "off": {"resources": {"GPU": 8}, "max_workers": 0},
        },
    }
    types, max_workers = node_types_from_config(config)
    assert max_workers == 5
    assert [(t.name, t.gpus, t.max_workers) for t in types] == [("gpu", 2, 5), ("off", 8, 0)]
    assert node_types_from_config({})[1] == 2  # Ray's default global max_workers
    capacity = capacity_from([node(8, 1, head=True)], types, autoscaler="known", max_workers=max_workers)
    assert capacity.max_gpus == 1 + 2 * 5


def test_the_head_side_reader_finds_its_monitors_config_and_keeps_only_node_types(
    tmp_path: pathlib.Path,
) -> None:
    """A stand-in monitor process (its argv is what Ray's monitor gets) and its autoscaling config."""
    config = {
        "cluster_name": "x",
        "max_workers": 3,
        "provider": {"type": "aws", "aws_credentials": {"aws_secret_access_key": "s3cr3t"}},
        "auth": {"ssh_private_key": "~/.ssh/key.pem"},
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2}, "node_config": {"InstanceType": "m5.large"}},
            "gpu": {"resources": {"GPU": 1}, "min_workers": 0, "max_workers": 3, "node_config": {"a": 1}},
        },
    }
    config_file = tmp_path / "bootstrap.yaml"
    config_file.write_text(yaml.safe_dump(config))
    monitor = tmp_path / "ray" / "autoscaler" / "_private" / "monitor.py"
    monitor.parent.mkdir(parents=True)
    monitor.write_text("import time\ntime.sleep(60)\n")
    address = "203.0.113.7:1"  # TEST-NET-3, port 1: no real GCS on this machine has it
    with_config = subprocess.Popen(
        [sys.executable, str(monitor), f"--gcs-address={address}", f"--autoscaling-config={config_file}"]
    )
    try:
        for _ in range(100):
            answer = autoscaling_config_on_this_node(address)
            if answer["state"] != "unknown":
                break
            subprocess.run([sys.executable, "-c", "pass"], check=True)  # give the child time to exec
    finally:
        with_config.kill()
        with_config.wait()
    assert answer["state"] == "found"
    assert "s3cr3t" not in repr(answer) and "ssh" not in repr(answer) and "node_config" not in repr(answer)
    types, max_workers = node_types_from_config(answer["config"])
    assert [(t.name, t.gpus, t.max_workers) for t in types] == [("gpu", 1, 3)] and max_workers == 3

    address = "203.0.113.7:2"
    plain = subprocess.Popen([sys.executable, str(monitor), f"--gcs-address={address}"])
    try:
        for _ in range(100):
            answer = autoscaling_config_on_this_node(address)
            if answer["state"] != "unknown":
                break
            subprocess.run([sys.executable, "-c", "pass"], check=True)
    finally:
        plain.kill()
        plain.wait()
    assert answer == {"state": "none"}  # a monitor without an autoscaling config: no autoscaler
    assert autoscaling_config_on_this_node("203.0.113.7:3") == {"state": "unknown"}
