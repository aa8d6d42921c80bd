"""Worker and node faults on a multi-node Ray cluster: the model actor killed while loading and mid-batch, a
CPU worker killed mid-write, a worker node removed mid-write, and the CPU plan's actors killed while
loading, reading and writing. Every image is accounted for exactly once.

`ray.cluster_utils.Cluster` cannot share a process with the session's local Ray (`ray_session`), so the
cluster runs in tests/reliability/cluster_faults.py, a script in its own session; this test reads its
`RESULT` lines and compares the masks it wrote with the in-process runner's.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.reliability import cluster_faults
from tests.reliability.conftest import subprocess_env
from tests.reliability.dataset import reference_masks, tiny_images


@pytest.fixture(scope="module")
def cluster_results(tmp_path_factory: pytest.TempPathFactory, tiny_clipseg_dir: pathlib.Path) -> dict:
    from tests.reliability import procs

    workdir = tmp_path_factory.mktemp("cluster")
    ray_tmpdir = pathlib.Path(__import__("tempfile").mkdtemp(prefix="tsr-", dir="/tmp"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.cluster_faults", str(workdir), str(tiny_clipseg_dir)],
        env=subprocess_env(ray_tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    try:
        output, _ = proc.communicate(timeout=900)
        procs.wait_for(lambda: not procs.in_session(proc.pid))  # cluster.shutdown() has just killed them
        left = procs.in_session(proc.pid)
    finally:
        procs.kill_session(proc.pid)
        __import__("shutil").rmtree(ray_tmpdir, ignore_errors=True)
    text = output.decode(errors="replace")
    results = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
            results[result["scenario"]] = result
    reference = reference_masks(
        tiny_clipseg_dir,
        tiny_images(cluster_faults.IMAGES, seed=7),
        tmp_path_factory.mktemp("cluster-reference"),
    )
    return {
        "results": results,
        "log": text,
        "returncode": proc.returncode,
        "left": left,
        "workdir": workdir,
        "reference": reference,
    }


def _check(cluster_results: dict, scenario: str, fault: str, ledger) -> dict:
    result = cluster_results["results"].get(scenario)
    assert result is not None, cluster_results["log"][-5000:]
    assert "crash" not in result, result["crash"]
    ledger(fault, runs=1, images=result["images"], lost=result["lost"], duplicated=result["duplicated"])
    assert result["fault_error"] is None, result["fault_error"]
    assert (result["lost"], result["duplicated"], result["errors"]) == (0, 0, [])
    assert result["rows"] == result["ok"] == result["images"] == cluster_faults.IMAGES
    summary = result["summary"]
    assert summary["status"] == "succeeded" and summary["listed"] == summary["ok"] == cluster_faults.IMAGES
    masks_dir = cluster_results["workdir"] / f"{scenario}-masks"
    masks = {str(p.relative_to(masks_dir)): p.read_bytes() for p in masks_dir.rglob("*.png")}
    assert masks == cluster_results["reference"], "masks differ from the in-process runner's"
    assert result["multipart_requests"] == 0
    return result


@pytest.mark.parametrize(
    "scenario, fault, reader, writer",
    [
        (
            "processes",
            "Ray cluster: SIGKILL model actor (in __init__) + decode task (mid-read) + write task "
            "(mid-write)",
            "decode_stage",
            "write_stage",
        ),
        (
            "fused",
            "Ray cluster, CPU plan: SIGKILL the decode-label-write actor in __init__, mid-read, mid-write",
            "DecodeLabelWrite",
            "DecodeLabelWrite",
        ),
    ],
)
def test_killed_model_actors_and_cpu_workers_lose_and_duplicate_no_row(
    cluster_results: dict, ledger, scenario: str, fault: str, reader: str, writer: str
) -> None:
    result = _check(cluster_results, scenario, fault, ledger)
    assert len(result["faults"]) == 3
    assert "__init__" in result["faults"][0]
    assert reader in result["faults"][1] and "GET" in result["faults"][1]  # mid-read
    assert writer in result["faults"][2] and "PUT" in result["faults"][2]  # mid-write


def test_a_node_removed_mid_run_loses_and_duplicates_no_row(cluster_results: dict, ledger) -> None:
    result = _check(cluster_results, "node", "Ray cluster: worker node removed", ledger)
    assert len(result["faults"]) == 1 and result["faults"][0].startswith("removed")


def test_the_cluster_script_left_no_process_behind(cluster_results: dict) -> None:
    assert cluster_results["returncode"] == 0, cluster_results["log"][-5000:]
    assert cluster_results["left"] == []
