"""A labeling run's driver-side steps, shared by both runners: plan before any model loads, count after.

`prepare` fails fast on job-level problems (bad ontology, unknown model, unwritable DEST, missing SOURCE)
before any work starts, lists SOURCE, drops what an earlier run already labeled, and returns the rows to
attempt. `finish` counts what landed in this run's metadata and writes the run summary.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import importlib.metadata
import itertools
import logging
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from textseg import ontology as ontology_mod
from textseg import storage
from textseg.config import ConfigError, JobConfig
from textseg.incremental import done_keys
from textseg.listing import find_mask_collisions, list_images
from textseg.metadata import RunSummary, metadata_dir, new_run_id, run_started_at, summary_path
from textseg.models import ModelRef, read_input_spec, resolve_model
from textseg.models.input_spec import InputSpec
from textseg.ontology import Ontology
from textseg.scenes import VECTOR_PARTS, AssemblySettings, scratch_uri
from textseg.sources import WindowPlan
from textseg.stages import DecodeSettings, WriteSettings, work_rows
from textseg.vectors import VectorSettings

log = logging.getLogger(__name__)


@dataclass
class JobPlan:
    config: JobConfig
    run_id: str
    ontology: Ontology
    model: ModelRef
    input_spec: InputSpec
    rows: list[dict]  # the images this run attempts, as `stages.work_rows` made them
    summary: RunSummary
    started: float  # time.perf_counter() at the start of `prepare`

    @property
    def scratch_uri(self) -> str:
        return scratch_uri(self.config.dest, self.run_id)

    @property
    def decode_settings(self) -> DecodeSettings:
        return DecodeSettings(
            storage_options=self.config.storage_options,
            input_spec=self.input_spec,
            max_pixels=self.config.max_image_pixels,
            window_plan=WindowPlan(self.config.tile_size, self.config.tile_overlap),
            scratch_uri=self.scratch_uri,
        )

    @property
    def write_settings(self) -> WriteSettings:
        return WriteSettings(
            dest=self.config.dest,
            storage_options=self.config.storage_options,
            palette=self.ontology.palette(),
            class_names=self.ontology.class_names,
            model_id=self.model.model_id,
            ontology_hash=self.ontology.stable_hash(),
            run_id=self.run_id,
            scratch_uri=self.scratch_uri,
            vectors=self.piece_vector_settings,
        )

    @property
    def assembly_settings(self) -> AssemblySettings:
        return AssemblySettings(
            dest=self.config.dest,
            storage_options=self.config.storage_options,
            scratch_uri=self.scratch_uri,
            thresholds=tuple(self.ontology.thresholds),
            score_kind=self.model.score_kind,
            palette=self.ontology.palette(),
            class_names=self.ontology.class_names,
            model_id=self.model.model_id,
            ontology_hash=self.ontology.stable_hash(),
            run_id=self.run_id,
            vectors=self.piece_vector_settings,
        )

    @property
    def vector_settings(self) -> VectorSettings | None:
        if not self.config.vectors:
            return None
        return VectorSettings(self.config.vector_simplify, self.config.vector_min_area)

    @property
    def piece_vector_settings(self) -> VectorSettings | None:
        """For tiles and scene blocks: no area filter yet, so a building's sliver across a border survives
        until the merge joins it to the rest (`_merge_vectors` filters after merging)."""
        full = self.vector_settings
        return None if full is None else dataclasses.replace(full, min_area_m2=0.0)

    @property
    def vectors_uri(self) -> str:
        return storage.join_uri(self.config.dest, f"vectors/{self.run_id}.parquet")

    @property
    def metadata_uri(self) -> str:
        return storage.join_uri(self.config.dest, metadata_dir(self.run_id))


def load_ontology(config: JobConfig) -> Ontology:
    if config.prompts is not None:
        return ontology_mod.from_prompts(config.prompts, config.threshold)
    assert config.ontology is not None
    fs, path = storage.filesystem_for(config.ontology, config.storage_options)
    try:
        text = storage.read_bytes(fs, path).decode("utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"ontology file {storage.redact_uri(config.ontology)!r} does not exist") from err
    return ontology_mod.from_yaml_text(text, config.threshold)


def prepare(config: JobConfig) -> JobPlan:
    """Everything before the model: validate, list, skip what is done. Raises on job-level problems."""
    started = time.perf_counter()
    ontology = load_ontology(config)
    model = resolve_model(config.model)
    input_spec = read_input_spec(model)
    dest_fs, dest_root = storage.filesystem_for(config.dest, config.storage_options)
    if not config.dry_run:
        storage.check_writable(dest_fs, dest_root)
    source_fs, _ = storage.filesystem_for(config.source, config.storage_options)
    exclude = dest_root if type(source_fs) is type(dest_fs) else None
    refs = list(
        itertools.islice(
            list_images(config.source, config.storage_options, exclude_prefix=exclude), config.limit
        )
    )
    listed_at = time.perf_counter()
    collisions = find_mask_collisions(refs)
    problems = {
        relpath: "mask name collision with " + ", ".join(repr(o) for o in others)
        for relpath, others in collisions.items()
    }
    done = done_keys(dest_fs, dest_root)
    model_id, ontology_hash = model.model_id, ontology.stable_hash()
    todo = [r for r in refs if (r.relpath, r.fingerprint, model_id, ontology_hash) not in done]
    run_id = new_run_id()
    summary = RunSummary(
        run_id=run_id,
        config=config.to_public_dict(),
        versions=_versions(),
        model_id=model_id,
        ontology_hash=ontology_hash,
        class_names=ontology.class_names,
        started_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        listed=len(refs),
        skipped=len(refs) - len(todo),
        timings_s={"listing": round(listed_at - started, 3)},
    )
    return JobPlan(config, run_id, ontology, model, input_spec, work_rows(todo, problems), summary, started)


def finish(plan: JobPlan) -> RunSummary:
    """Count this run's metadata rows as they landed, write DEST/runs/<run_id>.json, return the summary."""
    summary = plan.summary
    dest_fs, dest_root = storage.filesystem_for(plan.config.dest, plan.config.storage_options)
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    pattern = storage.join_uri(dest_root, metadata_dir(plan.run_id) + "/*.parquet")
    for path in dest_fs.glob(pattern):
        table = pq.read_table(path, columns=["status", "error"], filesystem=dest_fs)
        statuses.update(table["status"].to_pylist())
        errors.update(e for e in table["error"].to_pylist() if e)
    summary.ok, summary.error = statuses["ok"], statuses["error"]
    summary.top_errors = errors.most_common(5)
    summary.timings_s["total"] = round(time.perf_counter() - plan.started, 3)
    summary.finished_at = dt.datetime.now(dt.timezone.utc).isoformat()
    accounted = summary.skipped + summary.ok + summary.error
    if accounted != summary.listed:
        summary.status = f"incomplete: {summary.listed - accounted} listed images have no row"
    elif summary.error_rate > plan.config.max_error_rate:
        summary.status = (
            f"failed: {summary.error} of {summary.attempted} images failed "
            f"({summary.error_rate:.1%} > --max-error-rate {plan.config.max_error_rate:.1%})"
        )
    else:
        summary.status = "succeeded"
    if plan.config.vectors:
        summary.polygons = _merge_vectors(plan)
    storage.write_bytes_atomic(
        dest_fs, storage.join_uri(dest_root, summary_path(plan.run_id)), summary.to_json().encode()
    )
    _remove_scratch(plan)
    # Temporaries of writers killed mid-write before this run started (a killed run being resumed).
    started_wall = time.time() - (time.perf_counter() - plan.started)
    owned = ("masks", "metadata", "runs", "vectors")
    removed = storage.remove_stale_temporaries(dest_fs, dest_root, owned, started_wall)
    if removed:
        log.info("removed %d temporary files of interrupted writes under DEST", len(removed))
    return summary


def _merge_vectors(plan: JobPlan) -> int:
    """Join the run's polygon parts into DEST/vectors/<run_id>.parquet, merging pieces cut by tile or
    window borders; returns the number of polygons written."""
    from textseg.vectors import filter_by_area, merge_across_borders, read_geoparquet, write_geoparquet

    fs, root = storage.filesystem_for(plan.scratch_uri, plan.config.storage_options)
    records = [
        r for path in sorted(fs.glob(f"{root}/{VECTOR_PARTS}/*.parquet")) for r in read_geoparquet(fs, path)
    ]
    settings = plan.vector_settings
    assert settings is not None
    merged = filter_by_area(merge_across_borders(records), settings) if records else []
    out_fs, out_path = storage.filesystem_for(plan.vectors_uri, plan.config.storage_options)
    write_geoparquet(merged, out_fs, out_path)
    return len(merged)


# A run's scratch area outlives it only when the run was killed; after this long it is certainly not a
# concurrent run's any more (a nightly job restarts within a day), so a finishing run removes it.
ABANDONED_SCRATCH_AGE = dt.timedelta(hours=24)


def _remove_scratch(plan: JobPlan) -> None:
    """Drop this run's scratch area, the areas of runs killed over a day ago, and the scratch folder
    itself once empty (local disk)."""
    fs, root = storage.filesystem_for(plan.scratch_uri, plan.config.storage_options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    parent = root.rsplit("/", 1)[0]
    cutoff = dt.datetime.now(dt.timezone.utc) - ABANDONED_SCRATCH_AGE
    for other in fs.ls(parent, detail=False) if fs.exists(parent) else []:
        started = run_started_at(other.rstrip("/").rsplit("/", 1)[-1])
        if started is not None and started < cutoff:
            fs.rm(other, recursive=True)
    if storage.is_local(fs) and fs.exists(parent) and not fs.ls(parent):
        fs.rmdir(parent)


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("textseg", "ray", "torch", "transformers", "pyarrow", "pillow", "fsspec", "s3fs"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
