"""The Ray Data plan: a thin composition of the stage functions and one model-actor class.

    from_items(rows) -> read_and_decode (CPU tasks) -> Labeler (actor pool: one GPU each, or CPU actors)
    -> encode_and_write (CPU tasks: PNG masks into DEST/masks/) -> MetadataDatasink (DEST/metadata/<run_id>/)

Rows carry compressed-image URIs into the decode tasks and model-size uint8 pixels out of them, so the
big decoded images never cross the object store; the actor ships uint8 labels, never float scores.
Ray retries failed tasks and restarts dead actors; every write is idempotent (masks are rewritten
atomically under the same name, part files are named by write task), so a retried task can never
duplicate a row.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import ray
from ray.data import ActorPoolStrategy, DataContext

from textseg.job import JobPlan
from textseg.labeler import Labeler
from textseg.metadata_datasink import MetadataDatasink
from textseg.scenes import assemble_batch, manifest_uris
from textseg.stages import encode_and_write, read_and_decode

# Rows per CPU task: enough to amortize task overhead, small enough to spread over every core.
CPU_TASK_BATCH = 16
# Images per model call: a GPU keeps getting faster up to ~128 (PERF.md); a CPU gains nothing past ~8.
GPU_BATCH, CPU_BATCH = 64, 8


def connect(address: str | None) -> None:
    """Join `address` (a running cluster), or start an embedded local Ray when None."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)


def actor_pool(requested: int | None, use_gpu: bool, gpus: int, cpus: int) -> tuple[int, dict[str, Any]]:
    """How many model actors, and what each reserves.

    GPU: one GPU per actor, one actor per GPU the cluster has now (at least one: an autoscaling cluster
    may start with none and add GPU nodes when the actor asks). The pool is sized explicitly, never left to
    grow from one (PERF.md: Ray's GPU pools can start small and scale slowly).
    CPU: half of the cluster's cores for the model (torch's threads follow the reservation through
    OMP_NUM_THREADS), the other half for decoding and encoding.
    """
    if use_gpu:
        return requested or max(1, gpus), {"num_gpus": 1}
    actors = requested or 1
    return actors, {"num_cpus": max(1, cpus // (2 * actors))}


def run_ray(plan: JobPlan) -> None:
    """Run the plan on the connected Ray cluster; the metadata lands under `plan.metadata_uri`."""
    if not plan.rows:
        return
    config = plan.config
    connect(config.ray_address)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    actors, actor_resources = actor_pool(config.actors, use_gpu, gpus, cpus)
    batch_size = config.batch_size or (GPU_BATCH if use_gpu else CPU_BATCH)
    DataContext.get_current().enable_progress_bars = True

    dataset: ray.data.Dataset = ray.data.from_items(plan.rows)
    dataset = dataset.map_batches(
        functools.partial(read_and_decode, settings=plan.decode_settings),
        batch_size=CPU_TASK_BATCH,
        batch_format="numpy",
        num_cpus=1,
    )
    dataset = dataset.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "model": plan.model,
            "ontology": plan.ontology,
            "device": "cuda" if use_gpu else "cpu",
            "batch_size": batch_size,
            "keep_scores": config.vectors,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        **actor_resources,
    )
    dataset = dataset.map_batches(
        functools.partial(encode_and_write, settings=plan.write_settings),
        batch_size=CPU_TASK_BATCH,
        batch_format="numpy",
        num_cpus=1,
    )
    dataset.write_datasink(MetadataDatasink(plan.metadata_uri, config.storage_options))
    assemble_scenes(plan)


def assemble_scenes(plan: JobPlan) -> None:
    """The second pass: one CPU task per windowed scene blends its windows into one mask and one row."""
    manifests = manifest_uris(plan.assembly_settings)
    if not manifests:
        return
    scenes: ray.data.Dataset = ray.data.from_items([{"manifest_uri": uri} for uri in manifests])
    scenes = scenes.map_batches(
        functools.partial(assemble_batch, settings=plan.assembly_settings),
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
    )
    scenes.write_datasink(MetadataDatasink(plan.metadata_uri, plan.config.storage_options, "part-scenes-"))
