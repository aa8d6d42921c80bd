"""The Python API: `textseg.label(...)` does what `textseg label` does, for notebooks and scripts."""

from __future__ import annotations

from typing import Any, Literal

from textseg.config import JobConfig, from_mapping
from textseg.metadata import RunSummary


def run_job(config: JobConfig, runner: Literal["ray", "local"] = "ray") -> RunSummary:
    """Plan, label and count one run. A dry run only plans: its summary has `status == "dry run"`."""
    from textseg.job import finish, prepare

    plan = prepare(config)
    if config.dry_run:
        plan.summary.status = "dry run"
        return plan.summary
    if runner == "ray":
        from textseg.runner_ray import run_ray

        run_ray(plan)
    else:
        from textseg.runner_local import run_local

        run_local(plan, batch_size=config.batch_size or 8)
    return finish(plan)


def label(source: str, dest: str, *, runner: Literal["ray", "local"] = "ray", **options: Any) -> RunSummary:
    """Label every image under `source` into `dest`; options are `textseg label`'s long names with
    underscores (`prompts="building,road"`, `model="demo"`, `storage_options={...}`).

    `runner="local"` runs in this process without Ray (small jobs, debugging). Returns the run summary;
    `summary.status` is "succeeded" unless too many images failed.
    """
    return run_job(from_mapping({"source": source, "dest": dest, **options}), runner)
