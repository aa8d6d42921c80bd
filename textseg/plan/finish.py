"""The end of a run on the driver: merge its rows into DEST's state, merge its polygons, write the run
summary, tidy the scratch area. Counts arrive as tallies from the stages; nothing here re-reads them.
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
import time

from textseg import storage
from textseg.errors import describe_exception
from textseg.labels.vector_merge import VECTOR_PARTS, merge_run_vectors
from textseg.outputs.instances import remove_orphan_instance_parts
from textseg.outputs.metadata import Tally, metadata_dir, run_started_at, summary_path
from textseg.outputs.state import MapFn, compact, pending_runs, update_view
from textseg.pipeline.settings import scratch_uri
from textseg.plan.prepare import JobPlan
from textseg.plan.summary import RunSummary, count_rows, decide_status
from textseg.plan.work import ListingTally, listing_deletions

log = logging.getLogger(__name__)


def merge_pending_runs(plan: JobPlan, map_fn: MapFn = map) -> None:
    """Before listing: merge runs that ended without merging (killed ones) into the state, so the skip
    check sees their `ok` rows and a killed night is finished by running the same command again; their
    polygons are merged and their scratch areas removed. One run at a time per DEST: a run still going
    on would be taken for a killed one."""
    config = plan.config
    pending = [r for r in pending_runs(config.dest, config.storage_options) if r != plan.run_id]
    if not pending:
        return
    started = time.perf_counter()
    rows = compact(config.dest, config.storage_options, pending, map_fn)
    log.info("merged %d earlier run(s) into DEST's state (%d images)", len(pending), rows)
    dest_fs, dest_root = storage.filesystem_for(config.dest, config.storage_options)
    for run_id in pending:
        parts = storage.glob(dest_fs, storage.join_uri(dest_root, f"{metadata_dir(run_id)}/part-*.parquet"))
        orphans = remove_orphan_instance_parts(
            config.dest, run_id, {posixpath.basename(p) for p in parts}, config.storage_options
        )
        if orphans:
            log.info("removed %d instance parts of run %s written without their metadata", orphans, run_id)
        scratch = scratch_uri(config.dest, run_id)
        fs, root = storage.filesystem_for(scratch, config.storage_options)
        if plan.vector_settings is not None and storage.exists(fs, f"{root}/{VECTOR_PARTS}"):
            # Its images are skipped from now on, so its polygons must land now or never.
            merge_run_vectors(
                scratch, config.dest, run_id, plan.vector_settings, config.storage_options, map_fn
            )
        storage.remove(fs, root)  # the killed run's scratch: everything in it is merged or redone
    plan.summary.timings_s["merge_pending_runs"] = round(time.perf_counter() - started, 3)


def finish(
    plan: JobPlan, listing: ListingTally, rows: Tally, map_fn: MapFn = map, failure: str | None = None
) -> RunSummary:
    """Close the run: `failure` is set when the run could not go on (the summary says why)."""
    summary = plan.summary
    config = plan.config
    summary.listed, summary.skipped, summary.known_bad = listing.listed, listing.skipped, listing.known_bad
    count_rows(summary, rows)
    labeled_at = time.perf_counter()
    summary.timings_s["labeling"] = round(labeled_at - plan.started - sum(summary.timings_s.values()), 3)
    try:
        # Only a run that listed SOURCE completely can tell which images are gone from it.
        deletions = None
        if failure is None and config.limit is None:
            deletions = listing_deletions(plan.shards, listing, config.storage_options)
        view = update_view(config.dest, config.storage_options, [plan.run_id], map_fn, deletions)
        summary.deleted = view.deleted
        summary.timings_s["state"] = round(time.perf_counter() - labeled_at, 3)
        if plan.vector_settings is not None and failure is None:
            summary.polygons = merge_run_vectors(
                plan.scratch_uri,
                config.dest,
                plan.run_id,
                plan.vector_settings,
                config.storage_options,
                map_fn,
            )
    except Exception as err:  # noqa: BLE001 - the run summary must still be written
        failure = (
            failure or f"failed: closing the run: {storage.redact(describe_exception(err), _secrets(plan))}"
        )
    summary.status = failure or decide_status(summary, config.max_error_rate)
    summary.timings_s["total"] = round(time.perf_counter() - plan.started, 3)
    summary.finished_at = dt.datetime.now(dt.timezone.utc).isoformat()
    dest_fs, dest_root = storage.filesystem_for(config.dest, config.storage_options)
    storage.write_bytes_atomic(
        dest_fs, storage.join_uri(dest_root, summary_path(plan.run_id)), summary.to_json().encode()
    )
    if failure is None:
        _remove_scratch(plan)
        # Temporaries of writers killed mid-write before this run started (a killed run being resumed).
        owned = ("masks", "metadata", "runs", "vectors", "state")
        removed = storage.remove_stale_temporaries(dest_fs, dest_root, owned, plan.started_wall)
        if removed:
            log.info("removed %d temporary files of interrupted writes under DEST", len(removed))
    return summary


def _secrets(plan: JobPlan) -> list[str]:
    return storage.secret_values(plan.config.storage_options)


def _remove_scratch(plan: JobPlan) -> None:
    """Drop this run's scratch area, those of runs that started before it (killed: one run at a time per
    DEST, and their rows and polygons were merged when this run started), and the scratch folder itself
    once empty (local disk)."""
    fs, root = storage.filesystem_for(plan.scratch_uri, plan.config.storage_options)
    storage.remove(fs, root)
    parent = root.rsplit("/", 1)[0]
    mine = run_started_at(plan.run_id)
    for other in storage.names(fs, parent):
        started = run_started_at(other)
        if started is not None and mine is not None and started <= mine:
            storage.remove(fs, f"{parent}/{other}")
    if storage.is_local(fs) and fs.exists(parent) and not fs.ls(parent):
        fs.rmdir(parent)
