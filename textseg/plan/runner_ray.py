"""The Ray Data plan: listing tasks -> blocks of WORK_BLOCK_ROWS -> decode, model, write -> sink.

    read_datasource(ListingDatasource)   one read task per listing shard: lists, skips what DEST's
                                         state says is done, streams work rows (textseg.plan.work)
    -> repartition       blocks of WORK_BLOCK_ROWS rows (Ray Data merges a read task's output into one)
    GPU actors (the stages apart, so the CPUs decode and encode while the GPUs label):
    -> decode_stage      CPU tasks: compressed bytes in, model-size uint8 pixels out
    -> repartition       blocks of exactly one model batch
    -> Labeler           one actor per GPU (textseg.plan.resources)
    -> write_stage       CPU tasks (no CPU reserved: resources.write_task_kwargs): masks, metadata rows
    CPU actors (one per core, no CPU reserved):
    -> DecodeLabelWrite  the three stages in each actor's process (textseg.pipeline.fused)
    -> MetadataDatasink  DEST/metadata/<run_id>/part-*.parquet, ~100 k rows a part, tallies back

The driver holds the plan (shards, the state's file list) and tallies, never a row per image, and never
imports torch. Rows carry compressed-image URIs into decoding and uint8 pixels out of it, so decoded
images never cross the object store; GPU actors ship uint8 labels, never float scores. Ray retries
failed tasks and restarts dead actors (an image that kills its worker twice becomes an error row:
textseg.plan.crash_ledger); every write is idempotent (masks are rewritten atomically under the same
name, part files are named by write task), so a retried task never duplicates a row. A stage that
raises on a batch retries it image by image (textseg.pipeline.batches); a `JobError` from any stage
ends the run at once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray
from ray.data import DataContext
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from textseg import storage
from textseg.errors import JobError, RunInterrupted, describe_exception
from textseg.outputs.metadata import Tally
from textseg.outputs.sinks import MetadataDatasink
from textseg.outputs.state import DoneIndex
from textseg.pipeline.decode import decode_stage
from textseg.pipeline.fused import DecodeLabelWrite
from textseg.pipeline.scenes import assemble_batch, manifest_uris
from textseg.pipeline.settings import StageSettings
from textseg.pipeline.write import write_stage
from textseg.plan.bounds import StartupWatchdog, cannot_join, ray_address_to_join
from textseg.plan.crash_ledger import RayCrashLedger
from textseg.plan.finish import finish, merge_pending_runs
from textseg.plan.prepare import JobPlan
from textseg.plan.progress import ProgressDisplay
from textseg.plan.ray_progress import RayProgress
from textseg.plan.resources import (
    CPU_ACTOR_THREADS,
    ClusterCapacity,
    ModelPool,
    cluster_capacity,
    map_batches_kwargs,
    plan_model_pool,
    write_task_kwargs,
)
from textseg.plan.summary import RunSummary
from textseg.plan.work import WorkSettings, list_work, read_listing_tallies
from textseg.source.listing import Shard

log = logging.getLogger(__name__)

# Rows per CPU task: enough to amortize task overhead, small enough to spread over every core.
CPU_TASK_BATCH = 16
# Work rows per block after the listing: about a second of decoding (GPU plan) or 3 s of all three
# stages on one core (CPU plan), so a shard's images spread over every core, the first masks land
# within seconds and the last blocks end close together, while the driver's per-block bookkeeping
# stays small at millions of images.
WORK_BLOCK_ROWS = 128
# Images per model call: a GPU keeps getting faster up to ~128; a CPU gains nothing past ~8.
GPU_BATCH, CPU_BATCH = 64, 8
SPREAD: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
# Workers' output reaches the driver (and `ray job logs`): the tracebacks behind error rows
# (textseg.pipeline.batches) and what a dying worker printed. Ray's own log lines (a token-auth notice
# on every start, Ray Data's execution plan) stay out unless --verbose: ERROR is raised to WARNING then.
RAY_INIT_OPTIONS: dict[str, Any] = {
    "include_dashboard": False,
    "logging_level": logging.ERROR,
    "log_to_driver": True,
}
PART_WRITER = {"num_cpus": 0.25}  # a part write is I/O; unlike the write stage's 0 CPU: never fused


def connect(address: str | None, verbose: bool = False) -> None:
    """Join `address` (a running cluster), or start an embedded local Ray when None. Without `verbose`,
    Ray's and Ray Data's Python loggers show errors only. An address that does not answer within seconds
    is a `JobError` (textseg.plan.bounds), not minutes of Ray's retries."""
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    if not ray.is_initialized():
        options = RAY_INIT_OPTIONS | ({"logging_level": logging.WARNING} if verbose else {})
        target = ray_address_to_join(address)
        try:
            ray.init(address=target, **options)
        except ConnectionError as err:  # it answers, but not as Ray (Ray gives up after ~20 s)
            raise JobError(cannot_join(target, err)) from None


class ListingDatasource(Datasource):
    """SOURCE as Ray read tasks: each lists a group of shards and streams their work rows."""

    def __init__(self, shards: Sequence[Shard], settings: WorkSettings):
        self.shards = list(shards)
        self.settings = settings

    @property
    def task_count(self) -> int:
        """One read task per shard; --limit lists the first N images in SOURCE's order: one task."""
        return 1 if self.settings.limit is not None else max(1, len(self.shards))

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ReadTask]:
        count = max(1, min(self.task_count, parallelism))
        groups = [self.shards[i::count] for i in range(count)]
        return [
            ReadTask(
                functools.partial(list_work, group, self.settings),
                BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None),
            )
            for group in groups
            if group
        ]


def ray_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterable[Any]:
    """`map` as Ray tasks (one CPU each, retried on worker loss): the state compaction's steps. Even a
    single step runs in a task: a step holds its rows in memory, and the driver must not."""
    return ray.get([_call.remote(fn, item) for item in items])


@ray.remote(num_cpus=1, max_retries=3)
def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def run_ray(plan: JobPlan, pool: ModelPool | None = None) -> RunSummary:
    """Run the plan on the connected Ray cluster and close the run; raises `JobError` after writing the
    summary when the run cannot go on. `pool`: the model actors to run (default: planned from --device,
    --actors and the cluster's capacity); a GPU pool gets the plan with decoding and writing apart."""
    config = plan.config
    started = time.perf_counter()
    connect(config.ray_address, config.verbose)
    connected_s = round(time.perf_counter() - started, 3)
    capacity = cluster_capacity()
    pool = pool or plan_model_pool(config.device, config.actors, capacity)
    merge_pending_runs(plan, ray_map)
    index = DoneIndex.load(config.dest, config.storage_options)
    # Kept for the run's length: the ledger actor lives as long as this handle.
    crashes, _ledger_actor = RayCrashLedger.start(plan.run_id)
    progress, _progress_actor = RayProgress.start(plan.run_id)
    settings = dataclasses.replace(plan.stage_settings, crashes=crashes, progress=progress)
    # The write stage's cap is one task per CPU; Ray Data warns whenever a run has fewer blocks than that.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    # A scheduling strategy has no named parameter in map_batches: it travels as a Ray remote argument.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    context = DataContext.get_current()
    context.enable_progress_bars = config.verbose  # Ray Data's bars count blocks; ours count images
    sink = MetadataDatasink(plan.metadata_uri, config.storage_options)
    scene_sink = MetadataDatasink(plan.metadata_uri, config.storage_options, "part-scenes-")
    failure: str | None = None
    # Model actors that never get their resources end the run after --startup-timeout.
    actor_class = "Labeler" if pool.use_gpu else DecodeLabelWrite.__name__
    watchdog = StartupWatchdog(pool, config.startup_timeout, actor_class=actor_class)
    try:
        # SPREAD: listing, decoding and writing use every node's CPUs, not just the head's.
        work_settings = dataclasses.replace(plan.work_settings(index), progress=progress)
        source = ListingDatasource(plan.shards, work_settings)
        dataset = ray.data.read_datasource(  # SPREAD: DataContext's default scheduling strategy
            source,
            # One read task per shard: every task and block costs the driver ~2 KB of bookkeeping until
            # the run ends.
            override_num_blocks=source.task_count,
        )
        # A listing task's blocks arrive merged (Ray Data bundles a task's output up to 128 MiB): as one
        # block, a shard of thousands of images would be decoded by one task on one core.
        dataset = dataset.repartition(target_num_rows_per_block=WORK_BLOCK_ROWS, strict=True)
        batch_size = config.batch_size or (GPU_BATCH if pool.use_gpu else CPU_BATCH)
        if pool.use_gpu:
            dataset = _gpu_stages(dataset, plan, settings, pool, batch_size, crashes, capacity)
        else:
            dataset = dataset.map_batches(
                DecodeLabelWrite,
                fn_constructor_kwargs={
                    "model": plan.model,
                    "ontology": plan.ontology,
                    "settings": settings,
                    "device": pool.device,
                    "batch_size": batch_size,
                    "keep_scores": config.keeps_scores,
                    "compile": config.compile,
                    "torch_threads": CPU_ACTOR_THREADS,
                },
                batch_size=WORK_BLOCK_ROWS,
                batch_format="numpy",
                **map_batches_kwargs(pool),
            )

        # Not fused with the write stage: a fused stage would wait for a whole part's rows before
        # writing a single mask; this way masks land as images finish, and parts as rows add up.
        def execute() -> None:
            dataset.write_datasink(sink, ray_remote_args=PART_WRITER)
            manifests = manifest_uris(settings)
            if manifests:
                scenes: ray.data.Dataset = ray.data.from_items([{"manifest_uri": uri} for uri in manifests])
                scenes = scenes.map_batches(
                    functools.partial(assemble_batch, settings=settings),
                    batch_size=1,
                    batch_format="numpy",
                    num_cpus=1,
                )
                scenes.write_datasink(scene_sink)

        display = ProgressDisplay(progress.snapshot, shards=len(plan.shards))
        display.say(_starting(pool, len(plan.shards)))
        with watchdog:
            display.run(execute)
    except KeyboardInterrupt:  # Ctrl-C, or the watchdog: the summary is written either way
        failure = "failed: " + watchdog.failure if watchdog.failure else "interrupted"
    except Exception as err:  # noqa: BLE001 - the run summary is written before the run ends
        job_error = _job_error_in(err)
        secrets = storage.secret_values(config.storage_options)
        reason = str(job_error) if job_error else describe_exception(_root_cause(err))
        failure = "failed: " + storage.redact(reason, secrets)
        log.debug("the run ended early", exc_info=True)
    rows = Tally()
    rows.add(sink.tally)
    rows.add(scene_sink.tally)
    listing = read_listing_tallies(plan.tally_uri, config.storage_options)
    startup, plan.summary.mean_model_batch = progress.report(plan.started_wall)
    plan.summary.startup_s = {"connect": connected_s, **startup}
    summary = finish(plan, listing, rows, ray_map, failure)
    if failure == "interrupted":
        raise RunInterrupted(summary.run_id)
    if failure is not None:
        raise JobError(failure.removeprefix("failed: ") + f" (run summary: {summary.run_id})")
    return summary


def _gpu_stages(
    dataset: ray.data.Dataset,
    plan: JobPlan,
    settings: StageSettings,
    pool: ModelPool,
    batch_size: int,
    crashes: RayCrashLedger,
    capacity: ClusterCapacity,
) -> ray.data.Dataset:
    """Decode tasks -> GPU actors -> write tasks: the CPUs decode and encode while the GPUs label."""
    from textseg.pipeline.label import Labeler  # torch: only a GPU plan's driver needs to name it

    dataset = dataset.map_batches(
        functools.partial(decode_stage, settings=settings),
        batch_size=CPU_TASK_BATCH,
        batch_format="numpy",
        num_cpus=1,
        **SPREAD,
    )
    # Blocks of exactly one model batch: Ray Data bundles whole blocks for an actor, so blocks cut by
    # size (128 MiB of pixels) or by the work blocks' rows would leave part-filled batches (seen: a mean
    # of 75-90 images where 128 were asked).
    dataset = dataset.repartition(target_num_rows_per_block=batch_size, strict=True)
    dataset = dataset.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "model": plan.model,
            "ontology": plan.ontology,
            "device": pool.device,
            "batch_size": batch_size,
            "keep_scores": plan.config.keeps_scores,
            "crashes": crashes,
            "progress": settings.progress,
            "compile": plan.config.compile,
            "instances": plan.config.instances,
        },
        batch_size=batch_size,
        batch_format="numpy",
        # Unlike the CPU stages' SPREAD, so Ray never fuses decoding into the model actors.
        scheduling_strategy="DEFAULT",
        **map_batches_kwargs(pool),
    )
    return dataset.map_batches(
        functools.partial(write_stage, settings=settings),
        batch_size=CPU_TASK_BATCH,
        batch_format="numpy",
        **write_task_kwargs(capacity),
        **SPREAD,
    )


def _starting(pool: ModelPool, shards: int) -> str:
    """What the first seconds of a run are spent on, said before they pass in silence."""
    count = (
        f"{pool.initial_actors}"
        if pool.initial_actors == pool.max_actors
        else (f"{pool.initial_actors} (up to {pool.max_actors})")
    )
    return (
        f"listing SOURCE in {shards} shard(s); starting {count} model actor(s) on {pool.device} "
        "(loading the model and embedding the prompts takes a few seconds to a minute)"
    )


def _job_error_in(err: BaseException) -> JobError | None:
    """The JobError a stage raised, found through Ray's wrappers (RayTaskError, UserCodeException; an
    actor that died in its constructor keeps only the text of the error)."""
    text = str(err)
    marker = f"{JobError.__module__}.{JobError.__qualname__}: "
    if marker in text:
        return JobError(text.split(marker, 1)[1].split("\n", 1)[0].strip())
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, JobError):
            return JobError(str(current).split("\n", 1)[0])
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException) and isinstance(cause, JobError):
            return cause
        current = current.__cause__ or current.__context__
    return None


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers, for a one-line reason."""
    current = err
    while True:
        nxt = getattr(current, "cause", None) or current.__cause__
        if not isinstance(nxt, BaseException) or nxt is current:
            return current
        current = nxt
