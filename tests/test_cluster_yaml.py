"""cluster.yaml is what `ray up` reads: check it the way Ray does, then check what textseg needs from it.

Ray validates a cluster config with `ray.autoscaler._private.util.validate_config`, against the JSON schema
shipped inside the ray package (`ray/autoscaler/ray-schema.json`), after `prepare_config` has merged the
provider's defaults. These tests use that same schema file and that same path, with no cloud calls.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ray_autoscaler = pytest.importorskip("ray.autoscaler")
jsonschema = pytest.importorskip("jsonschema")

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
RAY_SCHEMA = Path(ray_autoscaler.__file__).parent / "ray-schema.json"

# EC2 families whose instances carry GPUs or other accelerators (g4dn, g5, g6, p3, p4d, p5 ...).
ACCELERATED_FAMILY = re.compile(r"^(g\d|p\d|inf\d|trn\d|dl\d)")


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _node_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return cluster["available_node_types"]


def _gpu_worker_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in _node_types(cluster).items()
        if name != cluster["head_node_type"] and spec["resources"].get("GPU", 0) >= 1
    }


def _all_setup_commands(cluster: dict[str, Any]) -> list[str]:
    return [*cluster.get("setup_commands", []), *cluster.get("worker_setup_commands", [])]


def test_cluster_yaml_validates_against_rays_own_schema(cluster: dict[str, Any]) -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(cluster, schema)


def test_cluster_yaml_passes_the_validation_ray_up_runs(cluster: dict[str, Any]) -> None:
    # `ray up` -> _bootstrap_config: prepare_config (merge AWS defaults), then validate_config.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    # After the merge every node runs the common setup commands before its own.
    assert prepared["worker_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]


def test_a_gpu_worker_type_scales_from_min_to_max(cluster: dict[str, Any]) -> None:
    gpu_types = _gpu_worker_types(cluster)
    assert gpu_types, "cluster.yaml needs a worker type with resources: {GPU: 1} (or more)"
    for name, spec in gpu_types.items():
        assert spec.get("max_workers", 0) > spec.get("min_workers", 0), f"{name} cannot autoscale"
        assert ACCELERATED_FAMILY.match(spec["node_config"]["InstanceType"]), (
            f"{name} claims a GPU on a {spec['node_config']['InstanceType']}, which has none"
        )
    assert cluster["max_workers"] >= max(spec["max_workers"] for spec in gpu_types.values())


def test_head_node_type_has_no_gpu(cluster: dict[str, Any]) -> None:
    head = _node_types(cluster)[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not ACCELERATED_FAMILY.match(head["node_config"]["InstanceType"]), (
        "the head should be a CPU instance"
    )


def test_every_node_type_uses_one_ami(cluster: dict[str, Any]) -> None:
    # Different AMIs would mean different Pythons or drivers on the head and the workers.
    image_ids = {spec["node_config"].get("ImageId") for spec in _node_types(cluster).values()}
    assert len(image_ids) == 1 and None not in image_ids, image_ids


def test_setup_commands_install_this_project_from_its_file_mount(cluster: dict[str, Any]) -> None:
    mounts: dict[str, str] = cluster["file_mounts"]
    # `ray up` resolves the local side against the directory it runs in: the repository root.
    remote_repo = next(
        (remote for remote, local in mounts.items() if (REPO_ROOT / local).resolve() == REPO_ROOT), None
    )
    assert remote_repo, f"file_mounts must send the repository root to the nodes: {mounts}"
    install = re.compile(rf"pip install (-e )?{re.escape(remote_repo)}\b")
    assert any(install.search(c) for c in _all_setup_commands(cluster)), (
        f"no setup command pip-installs {remote_repo}"
    )
    assert ".gitignore" in cluster.get("rsync_filter", []), "without it .venv would be synced to every node"


def test_cluster_ray_version_matches_the_ray_that_launches_it(cluster: dict[str, Any]) -> None:
    # The bootstrap config is written by the local Ray and read by the cluster's autoscaler; Ray refuses
    # some mismatches outright (validate_config's "cluster_synced_files" error), so pin the same version.
    import ray

    pins = [m for c in _all_setup_commands(cluster) for m in re.findall(r"ray\[[^\]]*\]==([\w.]+)", c)]
    assert pins == [ray.__version__], (
        f"setup_commands pin ray {pins}, this environment has {ray.__version__}: update cluster.yaml or ray"
    )
