"""jobs/k8s/ is what the API server, the KubeRay operator and textseg read at 2 a.m.: check it offline.

A broken manifest fails in one of three places, each later and quieter than the one before: `kubectl` refuses
it (schema), the operator marks the RayJob ValidationFailed at reconcile time, or the job starts and
textseg exits 2 on its config. These tests reproduce all three without a cluster:

- the RayJob and the RayCronJob are validated against KubeRay's own CRD schemas (tests/data/kuberay/, the v1
  schemas of KubeRay v1.7.0), made strict the way kubectl's default `--validate=strict` is: unknown fields
  fail, not only wrong types;
- the operator-side rules (name lengths, TTL only with shutdown, positive deadlines, replica bounds) and
  the shell command KubeRay builds from `entrypoint` are checked by hand;
- the ConfigMap's job YAML goes through `textseg.config.from_mapping`, as `jobs/label.py` would load it,
  and the paths it names are followed through the pods' volume mounts.

The checks are functions returning problems, so `test_a_broken_manifest_is_caught` can prove each of them
fires on a manifest with one thing broken.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from textseg.config import ConfigError, from_mapping
from textseg.ontology import OntologyError, from_yaml_text

jsonschema = pytest.importorskip("jsonschema")

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "jobs" / "k8s"
CRD_DIR = Path(__file__).resolve().parent / "data" / "kuberay"
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"

KNOWN_KINDS = {
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("batch/v1", "CronJob"),
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayCronJob"),
}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}

# KubeRay's name limits (v1.7.0): a RayCluster name is at most 53 characters; a RayJob's
# cluster is its name + 6, a RayCronJob's RayJobs are its name + up to 11 ("-<unix minutes>").
MAX_RAYJOB_NAME = 47
MAX_RAYCRONJOB_NAME = 36
GENERATE_NAME_SUFFIX = 5  # the API server appends 5 random characters to generateName
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

DAY_SECONDS = 24 * 3600
GPU_RESOURCE = "nvidia.com/gpu"
# KubeRay pastes `entrypoint` into a bash command line (`ray job submit ... -- <entrypoint> ; fi ; ...`).
SHELL_METACHARACTERS = re.compile(r"[;&|<>`$(){}\n\\]")
CREDENTIAL_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)
# Literal credentials in any text: an AWS access key id, or a credential-named key with a value after it.
LITERAL_SECRET = re.compile(
    r"\bA(KIA|SIA)[0-9A-Z]{16}\b|(aws_secret_access_key|secret_key|password)\s*[:=]\s*['\"]?[^\s'\"{}]{8,}",
    re.IGNORECASE,
)
FINAL_DEPLOYMENT_STATUSES = ("Complete", "Failed", "ValidationFailed")

Doc = dict[str, Any]
Problems = list[str]


# ----------------------------------------------------------------------------------------------------------
# Loading


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def _manifests() -> dict[str, tuple[Doc, ...]]:
    return {path.name: tuple(_load(path)) for path in sorted(K8S_DIR.glob("*.yaml"))}


def _the(kind: str, file: str) -> Doc:
    (doc,) = [d for d in _manifests()[file] if d.get("kind") == kind]
    return copy.deepcopy(doc)


def _configmaps() -> dict[str, Doc]:
    return {
        d["metadata"]["name"]: d for docs in _manifests().values() for d in docs if d["kind"] == "ConfigMap"
    }


@functools.cache
def _ray_pin() -> str:
    """The `ray[...]==X` that cluster.yaml installs: the Ray the image and `rayVersion` must match."""
    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    pins = {m for c in cluster["setup_commands"] for m in re.findall(r"ray\[[^\]]*\]==([\w.]+)", c)}
    assert len(pins) == 1, f"cluster.yaml should pin one Ray version, found {pins}"
    return pins.pop()


def _job_specs() -> dict[str, Doc]:
    """Every RayJob spec the cluster will see: rayjob.yaml's, and the copy a RayCronJob stamps out nightly."""
    return {
        "rayjob.yaml": _the("RayJob", "rayjob.yaml")["spec"],
        "raycronjob.yaml jobTemplate": _the("RayCronJob", "raycronjob.yaml")["spec"]["jobTemplate"],
    }


@pytest.fixture(params=["rayjob.yaml", "raycronjob.yaml jobTemplate"])
def job_spec(request: pytest.FixtureRequest) -> Doc:
    return _job_specs()[request.param]


# ----------------------------------------------------------------------------------------------------------
# The CRD schemas, made strict


def _strict(schema: Any) -> Any:
    """Structural schemas leave unknown fields to pruning; kubectl's strict field validation rejects them.

    Every object schema that lists `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`, so a typo such as
    `shutdownAfterJobFinish` fails here as it fails in `kubectl apply`.
    """
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items() if key != "properties"}
    if "properties" in schema:
        out["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _crd(kind: str) -> Doc:
    return yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())


@functools.cache
def _crd_validator(kind: str) -> Any:
    crd = _crd(kind)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(v1["schema"]["openAPIV3Schema"])
    if kind == "RayCronJob":
        # The saved file replaces jobTemplate's schema (identical to the RayJob spec's) by a marker.
        spec_props = schema["properties"]["spec"]["properties"]
        assert "x-textseg-same-as" in spec_props["jobTemplate"]
        spec_props["jobTemplate"] = copy.deepcopy(_rayjob_spec_schema())
    # OpenAPI v3.0 schemas are draft-4 style (boolean exclusiveMinimum, no $schema).
    return jsonschema.Draft4Validator(_strict(schema))


def _rayjob_spec_schema() -> Doc:
    (v1,) = [v for v in _crd("RayJob")["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]["properties"]["spec"]


def schema_problems(doc: Doc) -> Problems:
    validator = _crd_validator(doc["kind"])
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


# ----------------------------------------------------------------------------------------------------------
# Pod-template helpers


def _groups(spec: Doc) -> list[tuple[str, Doc]]:
    """(name, group) for the head and every worker group of a RayJob spec's cluster."""
    cluster = spec.get("rayClusterSpec") or {}
    groups = [("head", cluster.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs") or []]
    return groups


def _ray_container(group: Doc) -> Doc:
    # KubeRay treats the first container as the Ray container.
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return containers[0]


def _gpus(group: Doc) -> int:
    resources = _ray_container(group).get("resources") or {}
    return int((resources.get("limits") or {}).get(GPU_RESOURCE, 0))


def _pod_specs(doc: Any) -> Iterator[Doc]:
    """Every pod spec (a mapping with `containers`) anywhere in a manifest."""
    if isinstance(doc, dict):
        if isinstance(doc.get("containers"), list):
            yield doc
        for value in doc.values():
            yield from _pod_specs(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _pod_specs(item)


def _configmap_file(pod: Doc, container: Doc, path: str) -> tuple[str, str] | None:
    """(ConfigMap name, key) that provides `path` in this container, following its volume mounts."""
    target = PurePosixPath(path)
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        mount_path = PurePosixPath(mount["mountPath"])
        if target.parent != mount_path or mount.get("subPath"):
            continue
        source = volumes.get(mount["name"], {}).get("configMap")
        if source is None:
            continue
        items = source.get("items")
        if items is None:
            return source["name"], target.name
        for item in items:
            if item["path"] == target.name:
                return source["name"], item["key"]
    return None


def _configmap_text(
    pod: Doc, container: Doc, path: str, configmaps: dict[str, Doc]
) -> tuple[str | None, str]:
    """(the file's text, or None, and a description of where it should have come from)."""
    found = _configmap_file(pod, container, path)
    if found is None:
        return (
            None,
            f"no ConfigMap volume of container {container.get('name')!r} is mounted to provide {path}",
        )
    name, key = found
    data = (configmaps.get(name) or {}).get("data") or {}
    if key not in data:
        return None, f"{path} comes from ConfigMap {name!r} key {key!r}, which the manifests do not define"
    return data[key], f"ConfigMap {name!r} key {key!r}"


# ----------------------------------------------------------------------------------------------------------
# Checks: each returns the problems it finds, [] when the spec is fine


def metadata_problems(doc: Doc) -> Problems:
    """KubeRay derives cluster, Service and RayJob names from these; too long or not DNS-1035 is refused."""
    meta = doc.get("metadata") or {}
    generated = "name" not in meta
    name = meta.get("generateName") if generated else meta["name"]
    if not name:
        return [f"{doc['kind']} has neither metadata.name nor metadata.generateName"]
    # What the API server makes of it: generateName plus 5 random lowercase alphanumerics.
    full = name + "x" * GENERATE_NAME_SUFFIX if generated else name
    limit = MAX_RAYJOB_NAME if doc["kind"] == "RayJob" else MAX_RAYCRONJOB_NAME
    if len(full) > limit:
        return [f"{doc['kind']} name {name!r} may reach {len(full)} characters, KubeRay allows {limit}"]
    if not DNS1035_LABEL.match(full):
        return [f"{doc['kind']} name {name!r} is not a DNS-1035 label"]
    return []


def lifecycle_problems(spec: Doc) -> Problems:
    """The cluster must go away after the job, and a stuck job must end before the next night's starts."""
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(
            "shutdownAfterJobFinishes must be true, or the Ray cluster (GPUs included) outlives the job"
        )
    ttl = spec.get("ttlSecondsAfterFinished")
    if type(ttl) is not int or ttl < 0:
        problems.append(f"ttlSecondsAfterFinished must be a non-negative integer, got {ttl!r}")
    deadline = spec.get("activeDeadlineSeconds")
    if type(deadline) is not int or deadline <= 0:
        problems.append(f"activeDeadlineSeconds must be a positive integer, got {deadline!r}")
    elif type(ttl) is int and deadline + ttl >= DAY_SECONDS:
        problems.append(f"activeDeadlineSeconds {deadline} + TTL {ttl} lets a run overlap the next night's")
    if spec.get("submissionMode") != "K8sJobMode":
        problems.append(f"submissionMode should be K8sJobMode, got {spec.get('submissionMode')!r}")
    return problems


def cluster_problems(spec: Doc) -> Problems:
    """A CPU head, GPU workers scaling from 0, CPU workers: KubeRay's cluster rules and textseg's needs."""
    cluster = spec.get("rayClusterSpec")
    if not cluster:
        return ["rayClusterSpec is missing: the RayJob must create its own cluster"]
    problems = []
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true, or worker groups never leave minReplicas")
    for name, group in _groups(spec):
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            problems.append(f"group {name} has no container")
    head = cluster.get("headGroupSpec") or {}
    if (head.get("rayStartParams") or {}).get("num-gpus") != "0":
        problems.append('the head needs rayStartParams num-gpus: "0" so that no model actor lands there')
    if _gpus(head):
        problems.append("the head asks for a GPU")
    workers = cluster.get("workerGroupSpecs") or []
    for group in workers:
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if type(low) is not int or type(high) is not int or not 0 <= low <= high:
            problems.append(
                f"group {group.get('groupName')}: need 0 <= minReplicas <= maxReplicas, got {low}, {high}"
            )
    gpu_groups = [g for g in workers if _gpus(g) > 0]
    if not gpu_groups:
        problems.append(f"no worker group has {GPU_RESOURCE} limits")
    for group in gpu_groups:
        name = group.get("groupName")
        if group.get("minReplicas") != 0 or group.get("replicas", 0) != 0:
            problems.append(f"GPU group {name} must start from 0 (replicas and minReplicas 0)")
        if not isinstance(group.get("maxReplicas"), int) or group["maxReplicas"] < 1:
            problems.append(f"GPU group {name} needs maxReplicas >= 1")
        tolerations = group["template"]["spec"].get("tolerations") or []
        if not any(t.get("key") == GPU_RESOURCE and t.get("operator") == "Exists" for t in tolerations):
            problems.append(f"GPU group {name} does not tolerate the {GPU_RESOURCE} taint of GPU nodes")
    if not [g for g in workers if _gpus(g) == 0]:
        problems.append("no CPU worker group for decoding and encoding")
    return problems


def image_problems(spec: Doc, ray_pin: str) -> Problems:
    """One image everywhere (the submitter uses the head's), carrying the Ray that cluster.yaml pins."""
    problems = []
    cluster = spec.get("rayClusterSpec") or {}
    if cluster.get("rayVersion") != ray_pin:
        problems.append(
            f"rayVersion {cluster.get('rayVersion')!r} differs from cluster.yaml's ray=={ray_pin}"
        )
    images = {str(c.get("image")) for pod in _pod_specs(cluster) for c in pod["containers"]}
    if len(images) != 1:
        problems.append(f"the Ray pods use different images: {sorted(images)}")
    for image in images:
        # A placeholder (REPLACE/textseg:latest) says nothing; Ray's own images carry the version as tag.
        name, _, tag = image.rpartition(":")
        if name.endswith("rayproject/ray") and not tag.startswith(ray_pin):
            problems.append(f"image {image} is another Ray than cluster.yaml's {ray_pin}")
    return problems


def entrypoint_problems(spec: Doc, configmaps: dict[str, Doc]) -> Problems:
    """`python jobs/label.py --config PATH` as one plain command; a ConfigMap mount on the head has PATH."""
    entrypoint = str(spec.get("entrypoint", ""))
    if SHELL_METACHARACTERS.search(entrypoint):
        return [f"entrypoint {entrypoint!r} has shell syntax, which KubeRay's submit command line would run"]
    argv = shlex.split(entrypoint)
    if argv[:2] != ["python", "jobs/label.py"] or "--config" not in argv[:-1]:
        return [f"entrypoint {entrypoint!r} should be `python jobs/label.py --config PATH`"]
    head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}
    pod = (head.get("template") or {}).get("spec") or {}
    container = _ray_container(head)
    problems = []
    if not container.get("workingDir"):
        problems.append(
            "jobs/label.py is relative: the head container needs the repository as its workingDir"
        )
    text, origin = _configmap_text(pod, container, argv[argv.index("--config") + 1], configmaps)
    if text is None:
        problems.append(origin)
    return problems


def job_config_problems(spec: Doc, configmaps: dict[str, Doc]) -> Problems:
    """The mounted job YAML must load as jobs/label.py loads it, and ask for the GPUs the cluster can add."""
    argv = shlex.split(str(spec.get("entrypoint", "")))
    if "--config" not in argv[:-1]:
        return ["no --config in the entrypoint"]
    head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}
    pod, container = (head.get("template") or {}).get("spec") or {}, _ray_container(head)
    text, origin = _configmap_text(pod, container, argv[argv.index("--config") + 1], configmaps)
    if text is None:
        return [origin]
    values = yaml.safe_load(text)
    if not isinstance(values, dict):
        return [f"{origin} is not a mapping of option names to values"]
    try:
        config = from_mapping(values)
    except (ConfigError, ValueError) as err:
        return [f"{origin} is not a valid textseg job: {err}"]
    problems = []
    if config.ray_address != "auto":
        problems.append(
            f"{origin}: ray-address must be auto (join the job's cluster), got {config.ray_address!r}"
        )
    if config.storage_options:
        problems.append(
            f"{origin} carries storage options or URI credentials; credentials belong in a Secret"
        )
    if config.ontology is not None:
        ontology_text, ontology_origin = _configmap_text(pod, container, config.ontology, configmaps)
        if ontology_text is None:
            problems.append(f"ontology: {ontology_origin}")
        else:
            try:
                from_yaml_text(ontology_text, default_threshold=config.threshold)
            except OntologyError as err:
                problems.append(f"{ontology_origin} is not a valid ontology: {err}")
    # The cluster starts with no GPU: `auto` would see none and fall back to CPU actors, and an unset actor
    # count would ask for one GPU only. textseg's runner sizes its pool from these two settings.
    capacity = sum(
        g["maxReplicas"] * _gpus(g) for _, g in _groups(spec)[1:] if type(g.get("maxReplicas")) is int
    )
    if config.device != "cuda":
        problems.append(f"{origin}: device must be cuda (the GPU group starts at 0), got {config.device!r}")
    if config.actors is None or not 1 <= config.actors <= capacity:
        problems.append(
            f"{origin}: actors must be 1..{capacity} (GPU maxReplicas x GPUs), got {config.actors}"
        )
    return problems


def secret_problems(doc: Doc) -> Problems:
    """Credential-like env vars come from a Secret (or not at all: IRSA); no Secret with values is shipped."""
    problems = []
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"Secret {doc['metadata'].get('name')} carries values in the repository")
    for pod in _pod_specs(doc):
        for container in pod["containers"]:
            for env in container.get("env") or []:
                if not CREDENTIAL_ENV.search(env.get("name", "")):
                    continue
                if "value" in env or "secretKeyRef" not in (env.get("valueFrom") or {}):
                    problems.append(f"env {env.get('name')} of {container.get('name')} is not a secretKeyRef")
    return problems


def rayjob_problems(doc: Doc) -> Problems:
    """Everything above, for a RayJob document (the unit `test_a_broken_manifest_is_caught` breaks)."""
    spec, configmaps = doc.get("spec") or {}, _configmaps()
    return [
        *schema_problems(doc),
        *metadata_problems(doc),
        *lifecycle_problems(spec),
        *cluster_problems(spec),
        *image_problems(spec, _ray_pin()),
        *entrypoint_problems(spec, configmaps),
        *job_config_problems(spec, configmaps),
        *secret_problems(doc),
    ]


# ----------------------------------------------------------------------------------------------------------
# The manifests as files


def test_every_manifest_has_a_known_apiversion_kind_and_name() -> None:
    assert set(_manifests()) >= {"configmap.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"}
    for file, docs in _manifests().items():
        assert docs, f"{file} holds no document"
        for doc in docs:
            assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, f"{file}: {doc.get('kind')}"
            meta = doc.get("metadata") or {}
            assert meta.get("name") or meta.get("generateName"), f"{file}: {doc['kind']} without a name"


def test_no_manifest_or_readme_contains_a_literal_credential() -> None:
    for path in [*K8S_DIR.glob("*.yaml"), K8S_DIR / "README.md"]:
        match = LITERAL_SECRET.search(path.read_text())
        assert match is None, f"{path.name}: {match.group(0)[:24]}..."
    for file, docs in _manifests().items():
        for doc in docs:
            assert secret_problems(doc) == [], file


# ----------------------------------------------------------------------------------------------------------
# RayJob and RayCronJob: KubeRay's schemas and rules


@pytest.mark.parametrize(("kind", "file"), [("RayJob", "rayjob.yaml"), ("RayCronJob", "raycronjob.yaml")])
def test_kuberay_objects_validate_against_kuberays_crd_schema(kind: str, file: str) -> None:
    doc = _the(kind, file)
    assert schema_problems(doc) == []
    assert metadata_problems(doc) == []


def test_strict_crd_schema_rejects_unknown_fields_and_wrong_types() -> None:
    # The strictness is what makes the schema test worth having: prove it bites.
    typo = _the("RayJob", "rayjob.yaml")
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    number_param = _the("RayJob", "rayjob.yaml")
    number_param["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    text_replicas = _the("RayJob", "rayjob.yaml")
    text_replicas["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    cron_typo = _the("RayCronJob", "raycronjob.yaml")
    cron_typo["spec"]["jobTemplate"]["rayClusterSpec"]["enableInTreeAutoScaling"] = True
    for broken in (typo, number_param, text_replicas, cron_typo):
        assert schema_problems(broken), broken["spec"]


def test_raycronjob_job_template_is_an_exact_copy_of_rayjob_spec() -> None:
    # rayjob.yaml is the source of truth; a CRD field cannot include another file, so the copy must agree.
    assert (
        _the("RayCronJob", "raycronjob.yaml")["spec"]["jobTemplate"] == _the("RayJob", "rayjob.yaml")["spec"]
    )


def test_raycronjob_schedule_is_a_plain_daily_cron_line() -> None:
    spec = _the("RayCronJob", "raycronjob.yaml")["spec"]
    # KubeRay takes a standard five-field line and refuses TZ= prefixes (time zones go in `timeZone`).
    assert re.fullmatch(r"\d{1,2} \d{1,2} \* \* \*", spec["schedule"]), spec["schedule"]
    assert spec.get("suspend") is not True, "suspended: nothing would ever run"


def test_rayjob_runs_label_py_with_a_config_its_configmap_mount_provides(job_spec: Doc) -> None:
    assert entrypoint_problems(job_spec, _configmaps()) == []
    assert (REPO_ROOT / "jobs" / "label.py").is_file()


def test_mounted_job_yaml_is_a_valid_textseg_job_that_asks_for_gpus(job_spec: Doc) -> None:
    assert job_config_problems(job_spec, _configmaps()) == []


def test_finished_runs_delete_their_cluster_and_stuck_runs_end_before_the_next_night(job_spec: Doc) -> None:
    assert lifecycle_problems(job_spec) == []


def test_cpu_head_gpu_workers_from_zero_and_cpu_workers(job_spec: Doc) -> None:
    assert cluster_problems(job_spec) == []


def test_ray_pods_share_one_image_and_cluster_yamls_ray_version(job_spec: Doc) -> None:
    assert image_problems(job_spec, _ray_pin()) == []


def _cluster(doc: Doc) -> Doc:
    return doc["spec"]["rayClusterSpec"]


def _gpu_group(doc: Doc) -> Doc:
    group = _cluster(doc)["workerGroupSpecs"][0]
    assert _gpus(group), "the mutations expect the GPU group first"
    return group


def _pod_of(group: Doc) -> Doc:
    return group["template"]["spec"]


def _config_at(path: str) -> Callable[[Doc], None]:
    return lambda d: d["spec"].update(entrypoint=f"python jobs/label.py --config {path}")


# One thing broken each; `test_a_broken_manifest_is_caught` requires some check to notice.
MUTATIONS: dict[str, Callable[[Doc], Any]] = {
    "no shutdownAfterJobFinishes": lambda d: d["spec"].pop("shutdownAfterJobFinishes"),
    "shutdownAfterJobFinishes false": lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
    "no ttlSecondsAfterFinished": lambda d: d["spec"].pop("ttlSecondsAfterFinished"),
    "no activeDeadlineSeconds": lambda d: d["spec"].pop("activeDeadlineSeconds"),
    "deadline of two days": lambda d: d["spec"].update(activeDeadlineSeconds=2 * DAY_SECONDS),
    "HTTPMode": lambda d: d["spec"].update(submissionMode="HTTPMode"),
    "no autoscaling": lambda d: _cluster(d).update(enableInTreeAutoscaling=False),
    "GPU group from 1": lambda d: _gpu_group(d).update(minReplicas=1),
    "GPU group max 0": lambda d: _gpu_group(d).update(maxReplicas=0),
    "no GPU limit": lambda d: _pod_of(_gpu_group(d))["containers"][0]["resources"]["limits"].pop(
        GPU_RESOURCE
    ),
    "no GPU toleration": lambda d: _pod_of(_gpu_group(d)).pop("tolerations"),
    "head may get GPUs": lambda d: _cluster(d)["headGroupSpec"]["rayStartParams"].pop("num-gpus"),
    "other rayVersion": lambda d: _cluster(d).update(rayVersion="2.9.3"),
    "config path not mounted": _config_at("/etc/elsewhere/job.yaml"),
    "config key missing": _config_at("/etc/textseg/missing.yaml"),
    "shell in entrypoint": lambda d: d["spec"].update(
        entrypoint="cd /opt/textseg && python jobs/label.py --config /etc/textseg/job.yaml"
    ),
    "no workingDir": lambda d: _pod_of(_cluster(d)["headGroupSpec"])["containers"][0].pop("workingDir"),
    "inline secret": lambda d: _pod_of(_cluster(d)["headGroupSpec"])["containers"][0].update(
        env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-secret"}]
    ),
    "name too long": lambda d: d["metadata"].update(generateName="textseg-label-" + "x" * 40 + "-"),
    "unknown field": lambda d: d["spec"].update(ttlSecondsAfterFinish=600),
    "wrong type": lambda d: _gpu_group(d).update(maxReplicas="8"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_broken_manifest_is_caught(mutation: str) -> None:
    doc = _the("RayJob", "rayjob.yaml")
    assert rayjob_problems(doc) == [], "the unbroken RayJob must pass before breaking it means anything"
    MUTATIONS[mutation](doc)
    assert rayjob_problems(doc), f"{mutation}: no check noticed"


def test_a_job_config_that_would_fall_back_to_cpu_is_caught() -> None:
    spec = _the("RayJob", "rayjob.yaml")["spec"]
    configmaps = copy.deepcopy(_configmaps())
    job = yaml.safe_load(configmaps["textseg-job"]["data"]["job.yaml"])
    for broken in (
        {**job, "device": "auto"},
        {k: v for k, v in job.items() if k != "actors"},
        {**job, "actors": 99},
    ):
        configmaps["textseg-job"]["data"]["job.yaml"] = yaml.safe_dump(broken)
        assert job_config_problems(spec, configmaps), broken
    configmaps["textseg-job"]["data"]["job.yaml"] = yaml.safe_dump({**job, "dest": "s3://AK:SECRET@bucket/x"})
    assert job_config_problems(spec, configmaps)
    configmaps["textseg-job"]["data"]["job.yaml"] = yaml.safe_dump({**job, "max-error-rate": 5})
    assert job_config_problems(spec, configmaps)


# ----------------------------------------------------------------------------------------------------------
# cronjob.yaml: the batch/v1 CronJob form


def _cronjob() -> Doc:
    return _the("CronJob", "cronjob.yaml")


def _submitter_pod() -> Doc:
    return _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _script() -> str:
    container = _submitter_pod()["containers"][0]
    assert container["command"][-1] == "-c", container["command"]
    return container["args"][0]


def test_cronjob_forbids_overlap_skips_late_nights_and_bounds_history() -> None:
    spec = _cronjob()["spec"]
    assert re.fullmatch(r"\d{1,2} \d{1,2} \* \* \*", spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert (
        isinstance(spec["startingDeadlineSeconds"], int) and 0 < spec["startingDeadlineSeconds"] < DAY_SECONDS
    )
    assert 0 <= spec["successfulJobsHistoryLimit"] <= 10 and 0 <= spec["failedJobsHistoryLimit"] <= 10
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job.get("activeDeadlineSeconds"), int), "a pod stuck on a missing ConfigMap must end"
    assert _submitter_pod()["restartPolicy"] in ("Never", "OnFailure")  # Jobs refuse Always
    assert _submitter_pod()["containers"][0]["image"]


def test_cronjob_service_account_may_do_what_its_script_does() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()["cronjob.yaml"]}
    account = _submitter_pod()["serviceAccountName"]
    assert ("ServiceAccount", account) in docs
    bindings = [d for (kind, _), d in docs.items() if kind == "RoleBinding"]
    roles = [
        docs[("Role", b["roleRef"]["name"])]
        for b in bindings
        if {"kind": "ServiceAccount", "name": account} in b["subjects"] and b["roleRef"]["kind"] == "Role"
    ]
    granted = {
        verb
        for role in roles
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for verb in rule["verbs"]
    }
    script = _script()
    # `kubectl get rayjobs -l ...` is a list; create and delete are what they say.
    used = {
        verb
        for verb, call in [
            ("list", "kubectl get"),
            ("create", "kubectl create"),
            ("delete", "kubectl delete"),
        ]
        if call in script
    }
    assert used <= granted, f"the script needs {sorted(used - granted)} on rayjobs.ray.io"


def test_cronjob_creates_rayjob_yaml_from_the_configmap_the_readme_makes() -> None:
    # The CronJob form keeps no copy of the RayJob: its ConfigMap is made from rayjob.yaml itself.
    created = re.findall(r"kubectl create -f (\S+)", _script())
    assert len(created) == 1, created
    pod = _submitter_pod()
    found = _configmap_file(pod, pod["containers"][0], created[0])
    assert found, f"{created[0]} is not provided by a ConfigMap mount of the submitter"
    name, key = found
    readme = (K8S_DIR / "README.md").read_text()
    make = f"kubectl create configmap {name} --from-file={key}=jobs/k8s/rayjob.yaml"
    assert make in readme, f"README.md should tell how to make ConfigMap {name}: `{make}`"
    assert make in (K8S_DIR / "cronjob.yaml").read_text(), "cronjob.yaml's header should say the same"


def test_cronjob_script_selects_the_labels_rayjob_yaml_sets() -> None:
    (selector,) = re.findall(r"selector=(\S+)", _script())
    labels = _the("RayJob", "rayjob.yaml")["metadata"]["labels"]
    wanted = dict(pair.split("=", 1) for pair in selector.split(","))
    assert wanted.items() <= labels.items(), f"{selector} does not match rayjob.yaml's labels {labels}"
    assert "generateName" in _the("RayJob", "rayjob.yaml")["metadata"], "each night needs its own name"


# The script itself, run by /bin/sh against a fake kubectl that logs its calls and answers `get` from a file.
FAKE_KUBECTL = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
if [ "$1" = get ]; then
  if [ -n "${FAKE_GET_FAILS:-}" ]; then echo 'Error from server (Forbidden)' >&2; exit 1; fi
  cat "$FAKE_RUNS"
fi
"""


def _run_script(tmp_path: Path, runs: list[str], get_fails: bool = False) -> tuple[int, list[str], str]:
    if shutil.which("sh") is None:
        pytest.skip("no POSIX shell")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    (tmp_path / "runs").write_text("".join(f"{line}\n" for line in runs))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_LOG": str(tmp_path / "log"),
        "FAKE_RUNS": str(tmp_path / "runs"),
        **({"FAKE_GET_FAILS": "1"} if get_fails else {}),
    }
    result = subprocess.run(["sh", "-c", _script()], env=env, capture_output=True, text=True, timeout=30)
    log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    return result.returncode, log, result.stdout + result.stderr


def _creates(log: list[str]) -> list[str]:
    return [call for call in log if call.startswith("create")]


def test_cronjob_script_creates_tonights_run_when_earlier_ones_finished(tmp_path: Path) -> None:
    rc, log, out = _run_script(tmp_path, ["textseg-label-a=Complete", "textseg-label-b=Failed"])
    assert rc == 0, out
    assert _creates(log) == ["create -f /etc/textseg-rayjob/rayjob.yaml"]
    assert not [call for call in log if call.startswith("delete")]


def test_cronjob_script_skips_the_night_while_a_run_is_active(tmp_path: Path) -> None:
    # Empty: created a moment ago, before the operator wrote a status.
    for i, active in enumerate(["textseg-label-b=Running", "textseg-label-b=", "textseg-label-b=Retrying"]):
        rc, log, out = _run_script(tmp_path / str(i), ["textseg-label-a=Complete", active])
        assert rc == 0, out
        assert _creates(log) == [], f"{active}: a second run was started beside it"
        assert "still active" in out


def test_cronjob_script_keeps_the_newest_seven_finished_runs(tmp_path: Path) -> None:
    runs = [f"textseg-label-{i}={FINAL_DEPLOYMENT_STATUSES[i % 3]}" for i in range(10)]
    rc, log, out = _run_script(tmp_path, runs)
    assert rc == 0, out
    assert _creates(log)
    assert [call for call in log if call.startswith("delete")] == [
        "delete rayjob textseg-label-0 textseg-label-1 textseg-label-2"
    ]


def test_cronjob_script_fails_instead_of_creating_when_kubectl_cannot_list(tmp_path: Path) -> None:
    rc, log, _ = _run_script(tmp_path, [], get_fails=True)
    assert rc != 0
    assert _creates(log) == []
