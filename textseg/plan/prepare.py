"""The plan of a run, made on the driver before any model loads: validate, then describe the work.

`prepare` fails fast on job-level problems (bad ontology, unknown model, unwritable DEST, missing
SOURCE) and describes SOURCE as listing shards; it lists nothing itself beyond a few folder levels, so
its memory does not grow with the number of images. Everything a stage needs is derived from the plan
once (`stage_settings`, `work_settings`), never copied field by field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass

from textseg import ontology as ontology_mod
from textseg import storage
from textseg.config import ConfigError, JobConfig
from textseg.image.pieces import WindowPlan
from textseg.labels.vectors import VectorSettings
from textseg.models import ModelRef, read_input_spec, read_model_gsd, resolve_model, with_presence_gate
from textseg.models.input_spec import InputSpec
from textseg.ontology import Ontology
from textseg.outputs.metadata import metadata_dir, new_run_id
from textseg.outputs.state import DoneIndex
from textseg.pipeline.settings import StageSettings, scratch_uri
from textseg.plan.summary import RunSummary, package_versions
from textseg.plan.work import WorkSettings
from textseg.source.listing import FolderShard, Shard, plan_shards, source_within


@dataclass
class JobPlan:
    config: JobConfig
    run_id: str
    ontology: Ontology
    model: ModelRef
    input_spec: InputSpec
    shards: list[Shard]
    summary: RunSummary
    started: float  # time.perf_counter() at the start of `prepare`
    started_wall: float  # time.time() at the same moment

    @property
    def scratch_uri(self) -> str:
        return scratch_uri(self.config.dest, self.run_id)

    @property
    def tally_uri(self) -> str:
        return storage.join_uri(self.scratch_uri, "listing")

    @property
    def metadata_uri(self) -> str:
        return storage.join_uri(self.config.dest, metadata_dir(self.run_id))

    @property
    def vector_settings(self) -> VectorSettings | None:
        """The user's polygon settings (the area filter applies after merging across borders): the job's
        tolerance and area, each class's own `min_area_m2`/`simplify_m` from the ontology over them, and
        what every polygon records (run, model, ontology)."""
        if not self.config.vectors:
            return None
        classes = dict(enumerate(self.ontology.classes, start=1))
        min_area = {i: c.min_area_m2 for i, c in classes.items() if c.min_area_m2 is not None}
        return VectorSettings(
            self.config.vector_simplify,
            {i: min_area.get(i, self.config.vector_min_area) for i in classes}
            if min_area
            else self.config.vector_min_area,
            simplify_m={i: c.simplify_m for i, c in classes.items() if c.simplify_m is not None},
            run_id=self.run_id,
            model_id=self.model.model_id,
            ontology_hash=self.ontology.stable_hash(),
        )

    @property
    def model_gsd(self) -> float | None:
        """Metres per pixel the model sees: --gsd, else what the model's config declares (`gsd_m`)."""
        return self.config.gsd if self.config.gsd is not None else read_model_gsd(self.model)

    @property
    def stage_settings(self) -> StageSettings:
        vectors = self.vector_settings
        return StageSettings(
            dest=self.config.dest,
            run_id=self.run_id,
            input_spec=self.input_spec,
            max_pixels=self.config.max_image_pixels,
            window_plan=WindowPlan(
                self.config.tile_size, self.config.tile_overlap, self.input_spec.size, self.model_gsd
            ),
            class_names=list(self.ontology.class_names),
            palette=list(self.ontology.palette()),
            thresholds=tuple(self.ontology.thresholds),
            score_kind=self.model.score_kind,
            model_id=self.model.model_id,
            ontology_hash=self.ontology.stable_hash(),
            # Pieces of tiles and scene blocks keep every sliver: the filter runs after the merge.
            vectors=None if vectors is None else dataclasses.replace(vectors, min_area_m2=0.0),
            instances=self.config.instances,
            storage_options=self.config.storage_options,
        )

    def work_settings(self, index: DoneIndex, write_tallies: bool = True) -> WorkSettings:
        return WorkSettings(
            index=index,
            model_id=self.model.model_id,
            ontology_hash=self.ontology.stable_hash(),
            tally_uri=self.tally_uri if write_tallies else None,
            limit=self.config.limit,
            retry_errors=self.config.retry_errors,
            # A complete listing of a folder, prefix or glob can tell which images are gone.
            record_listed=self.config.limit is None and all(isinstance(s, FolderShard) for s in self.shards),
            storage_options=self.config.storage_options,
        )


def load_ontology(config: JobConfig) -> Ontology:
    if config.prompts is not None:
        return ontology_mod.from_prompts(config.prompts, config.threshold)
    assert config.ontology is not None
    return ontology_mod.read_ontology(config.ontology, config.storage_options, config.threshold)


def prepare(config: JobConfig) -> JobPlan:
    """Validate and plan; raises on job-level problems. Lists only enough of SOURCE to shard it."""
    started, started_wall = time.perf_counter(), time.time()
    ontology = load_ontology(config)
    model = resolve_model(config.model)
    if config.presence_gate:
        model = with_presence_gate(model)
    input_spec = read_input_spec(model)
    dest_fs, dest_root = storage.filesystem_for(config.dest, config.storage_options)
    if not config.dry_run:
        storage.check_writable(dest_fs, dest_root)
    source_fs, _ = storage.filesystem_for(config.source, config.storage_options)
    exclude = config.dest if type(source_fs) is type(dest_fs) else None
    if exclude is not None and source_within(config.source, exclude, config.storage_options):
        source = storage.redact_uri(config.source).rstrip("/")
        raise ConfigError(
            f"SOURCE {source!r} is DEST {storage.redact_uri(config.dest)!r} or lies inside it, and a "
            "listing skips everything under DEST (else each run would label the last run's masks), so "
            f"nothing would be labeled: choose a DEST beside or below SOURCE, e.g. '{source}-labels'"
        )
    shards = plan_shards(
        config.source, config.storage_options, exclude_prefix=exclude, stac_asset=config.stac_asset
    )
    run_id = new_run_id()
    summary = RunSummary(
        run_id=run_id,
        config=config.to_public_dict(),
        versions=package_versions(),
        model_id=model.model_id,
        ontology_hash=ontology.stable_hash(),
        class_names=ontology.class_names,
        ontology=ontology.to_dict(),
        started_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        shards=len(shards),
        timings_s={"planning": round(time.perf_counter() - started, 3)},
    )
    return JobPlan(config, run_id, ontology, model, input_spec, shards, summary, started, started_wall)
