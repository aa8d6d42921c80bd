"""The Python API: `textseg.label(...)` does what `textseg label` does, for notebooks and scripts."""

from __future__ import annotations

from typing import Any, Literal

from textseg.config import JobConfig, from_mapping
from textseg.plan.summary import RunSummary


def run_job(config: JobConfig, runner: Literal["ray", "local"] = "ray") -> RunSummary:
    """Plan, label and close one run. A dry run lists and checks the state only, in this process
    (streaming: flat memory at any size); its summary has `status == "dry run"`.

    Raises `textseg.errors.JobError` when the run could not go on (after writing its summary) and
    ValueError/OSError subclasses for problems found before any work.
    """
    from textseg.plan.prepare import prepare

    plan = prepare(config)
    if config.dry_run:
        from textseg.outputs.state import DoneIndex
        from textseg.plan.summary import count_problems
        from textseg.plan.work import ListingTally, list_work

        tally = ListingTally()
        index = DoneIndex.load(config.dest, config.storage_options)
        for work in list_work(plan.shards, plan.work_settings(index, write_tallies=False), tally):
            count_problems(plan.summary, work)  # e.g. mask-name collisions, which would be error rows
        plan.summary.listed, plan.summary.skipped = tally.listed, tally.skipped
        plan.summary.known_bad = tally.known_bad
        plan.summary.status = "dry run"
        return plan.summary
    if runner == "ray":
        from textseg.plan.runner_ray import run_ray

        return run_ray(plan)
    from textseg.plan.runner_local import run_local

    return run_local(plan, batch_size=config.batch_size or 8)


def label(source: str, dest: str, *, runner: Literal["ray", "local"] = "ray", **options: Any) -> RunSummary:
    """Label every image under `source` into `dest`; options are `textseg label`'s long names with
    underscores (`prompts="building,road"`, `model="demo"`, `storage_options={...}`).

    `runner="local"` runs in this process without Ray (small jobs, debugging). Returns the run summary;
    `summary.status` is "succeeded" unless too many images failed.
    """
    return run_job(from_mapping({"source": source, "dest": dest, **options}), runner)
