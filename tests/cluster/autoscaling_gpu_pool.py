"""An autoscaling cluster whose GPU workers start at zero, and the model pool textseg plans for it; run as a
script (it needs its own Ray, and its own session: everything in it is killed at the end).

    python -m tests.cluster.autoscaling_gpu_pool WORKDIR

`ray.cluster_utils.AutoscalingCluster` runs a real autoscaler (v1) with the fake multi-node provider: a
CPU head and a `gpu_node` type with {"CPU": 1, "GPU": 1} (fake GPUs), min_workers 0, max_workers 2, so
the cluster starts with no GPU. The scenario reads the capacity with textseg's real reader, plans the
pool for `--device auto`, and runs a small Ray Data job through `map_batches` with the planned arguments;
a stand-in for the model actor records its process and node for every batch. It prints one line
`RESULT {json}` for the test to assert on.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

import ray
from ray.cluster_utils import AutoscalingCluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

GPU_WORKERS = 2
ROWS, BATCH = 120, 2  # 60 model batches
BATCH_SECONDS = 0.5  # ~30 s for one actor alone: time enough for a second one to join and take work

# The fake provider's base config (ray/autoscaler/_private/fake_multi_node/example.yaml, which the
# installed Ray wheel does not ship), without its example worker types.
BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "textseg-fake",
    "max_workers": 4,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    # Long enough that no GPU node is taken away while the scenario runs.
    "idle_timeout_minutes": 5,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


class PrivateAutoscalingCluster(AutoscalingCluster):
    """`AutoscalingCluster` that shares the machine: it runs on a port of its own and never calls
    `ray stop --force` (which kills every Ray on the machine); the caller's session is its lifetime."""

    def __init__(self, workdir: pathlib.Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.workdir = workdir
        with socket.socket() as probe:
            probe.bind(("", 0))
            self.port = probe.getsockname()[1]
        self.address = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        # The fake provider starts worker nodes against this GCS (its default is port 6379).
        self._config["provider"]["gcs_address"] = self.address

    def _generate_config(
        self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False, **config_kwargs: Any
    ) -> dict:
        config = json.loads(json.dumps(BASE_CONFIG))
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {
            "resources": head_resources,
            "node_config": {},
            "max_workers": 0,
        }
        config.update(config_kwargs)
        return config

    def start(self, _system_config: dict | None = None, override_env: dict | None = None) -> None:
        config_file = self.workdir / "autoscaling.json"
        config_file.write_text(json.dumps(self._config))
        env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", **(override_env or {}))
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--port={self.port}",
            f"--autoscaling-config={config_file}",
            f"--num-cpus={int(self._head_resources.get('CPU', 1))}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def shutdown(self) -> None:
        """Kill every other process of this session: the head's and the worker nodes' Ray processes."""
        me = os.getpid()
        session = os.getsid(0)
        for pid in _pids_in_session(session):
            if pid != me:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass


class ModelStandIn:
    """The model actor's stand-in: which process on which node handled each batch."""

    def __init__(self) -> None:
        context = ray.get_runtime_context()
        self.actor = f"{os.getpid()}@{context.get_node_id()}"
        self.node = context.get_node_id()

    def __call__(self, batch: dict) -> dict:
        time.sleep(BATCH_SECONDS)
        count = len(batch["id"])
        return {"id": batch["id"], "actor": [self.actor] * count, "node": [self.node] * count}


def scenario(workdir: pathlib.Path) -> dict[str, Any]:
    from textseg.plan.resources import cluster_capacity, map_batches_kwargs, plan_model_pool

    cluster = PrivateAutoscalingCluster(
        workdir,
        head_resources={"CPU": 1},
        worker_node_types={
            "gpu_node": {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": GPU_WORKERS,
            }
        },
    )
    started = time.monotonic()
    cluster.start(override_env={"RAY_AUTH_MODE": "disabled"})
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
        capacity = cluster_capacity()
        pool = plan_model_pool("auto", None, capacity)
        kwargs = map_batches_kwargs(pool)
        strategy = kwargs["compute"]
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        run_started = time.monotonic()
        dataset = ray.data.range(ROWS, override_num_blocks=ROWS // BATCH).map_batches(
            ModelStandIn, batch_size=BATCH, batch_format="numpy", **kwargs
        )
        first_seen: dict[str, float] = {}
        batches: dict[str, int] = {}
        nodes_used: set[str] = set()
        rows = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows += len(batch["id"])
            for actor, node in zip(batch["actor"], batch["node"], strict=True):
                first_seen.setdefault(str(actor), round(time.monotonic() - run_started, 1))
                batches[str(actor)] = batches.get(str(actor), 0) + 1
                nodes_used.add(str(node))
        alive = [n for n in ray.nodes() if n["Alive"]]
        gpu_workers = [n["NodeID"] for n in alive if n["Resources"].get("GPU", 0) > 0 and n["NodeID"] != head]
        # The same reader off the head node (a driver elsewhere): it asks the head with a pinned task.
        elsewhere = ray.get(
            ray.remote(num_cpus=0)(_capacity_here)
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(gpu_workers[0], soft=False))
            .remote()
        )
        return {
            "capacity": {
                "gpus_now": capacity.gpus_now,
                "max_gpus": capacity.max_gpus,
                "autoscaler": capacity.autoscaler,
                "node_types": [[t.name, t.gpus, t.max_workers] for t in capacity.node_types],
            },
            "pool": {
                "use_gpu": pool.use_gpu,
                "device": pool.device,
                "min_actors": pool.min_actors,
                "max_actors": pool.max_actors,
                "initial_actors": pool.initial_actors,
                "actor_resources": pool.actor_resources,
            },
            "capacity_off_head": elsewhere,
            "strategy": [strategy.min_size, strategy.max_size, strategy.initial_size],
            "rows": rows,
            "actors": first_seen,
            "rows_per_actor": batches,
            "gpu_nodes_used": sorted(nodes_used - {head}),
            "gpu_worker_nodes": gpu_workers,
            "head": head,
            "run_seconds": round(time.monotonic() - run_started, 1),
            "total_seconds": round(time.monotonic() - started, 1),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def _capacity_here() -> dict[str, Any]:
    from textseg.plan.resources import cluster_capacity

    capacity = cluster_capacity()
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "gpus_now": capacity.gpus_now,
        "max_gpus": capacity.max_gpus,
        "autoscaler": capacity.autoscaler,
    }


def _pids_in_session(session: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] not in ("Z", "X"):
            pids.append(int(name))
    return pids


def main(argv: list[str]) -> int:
    if os.getsid(0) != os.getpid():
        # Run in a session of its own, so that shutdown() can kill exactly what this run started.
        return subprocess.run([sys.executable, "-m", __spec__.name, *argv], start_new_session=True).returncode
    workdir = pathlib.Path(argv[0])
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = scenario(workdir)
        status = 0
    except Exception:  # noqa: BLE001 - the test asserts on the result line
        result = {"crash": traceback.format_exc()}
        status = 1
    print("RESULT " + json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
