"""On an autoscaling cluster whose GPU workers start at zero, `--device auto` plans a GPU pool sized to the
GPUs the autoscaler can add, and the planned `map_batches` arguments make the autoscaler launch the GPU
nodes and the pool run more than one actor.

The cluster (`ray.cluster_utils.AutoscalingCluster`: a real v1 autoscaler, fake nodes as processes on
this machine) cannot share a process with the session's local Ray, so it runs in
tests/cluster/autoscaling_gpu_pool.py, a script in its own session; this test reads its `RESULT` line.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.cluster import autoscaling_gpu_pool as scenario
from tests.reliability import procs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("autoscaling")
    # Ray's socket paths must stay under 107 bytes, which pytest's tmp_path can exceed.
    ray_tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="tsa-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(
        RAY_TMPDIR=str(ray_tmpdir),
        RAY_USAGE_STATS_ENABLED="0",
        # A token in ~/.ray/auth_token would otherwise switch `ray start` to token auth.
        RAY_AUTH_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.autoscaling_gpu_pool", str(workdir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )
    try:
        output, _ = proc.communicate(timeout=300)
        procs.wait_for(lambda: not procs.in_session(proc.pid))
        left = procs.in_session(proc.pid)
    finally:
        procs.kill_session(proc.pid)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    text = output.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert lines, text[-5000:]
    found = json.loads(lines[-1].removeprefix("RESULT "))
    assert "crash" not in found, found["crash"]
    found["left"] = [p.cmdline for p in left]
    return found


def test_auto_plans_a_gpu_pool_from_the_autoscalers_node_types(result: dict) -> None:
    capacity, pool = result["capacity"], result["pool"]
    assert capacity["gpus_now"] == 0, "the GPU workers start at zero"
    assert capacity["autoscaler"] == "known"
    assert ["gpu_node", 1, scenario.GPU_WORKERS] in capacity["node_types"]
    assert capacity["max_gpus"] == scenario.GPU_WORKERS
    assert (pool["use_gpu"], pool["device"], pool["actor_resources"]) == (True, "cuda", {"num_gpus": 1})
    assert pool["max_actors"] >= 2 and pool["min_actors"] == 1
    # Read from a GPU worker node instead of the head (a driver elsewhere), the answer is the same.
    off_head = result["capacity_off_head"]
    assert off_head["node"] != result["head"]
    assert (off_head["autoscaler"], off_head["max_gpus"]) == ("known", scenario.GPU_WORKERS)
    assert result["strategy"] == [pool["min_actors"], pool["max_actors"], pool["initial_actors"]]


def test_the_autoscaler_launches_gpu_nodes_and_the_pool_runs_more_than_one_actor(result: dict) -> None:
    assert result["rows"] == scenario.ROWS
    assert len(result["gpu_worker_nodes"]) >= 2, result
    assert len(result["actors"]) >= 2, f"batches were processed by one actor only: {result['actors']}"
    assert len(result["gpu_nodes_used"]) >= 2, result
    assert result["head"] not in result["gpu_nodes_used"]
    assert not result["left"], f"processes survived the scenario: {result['left']}"
