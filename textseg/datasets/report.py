"""`textseg report DEST --out report.html`: one self-contained HTML page reviewing a run or the whole DEST.

What a reviewer needs before trusting a night's labels: the run summary (counts, timings, status, model,
ontology), each class's pixel share and mean score, how many images hold no class at all, the error
reasons by category with examples, per-class score histograms, and previews (image, mask overlay, legend)
of a random sample and of the least confident images.

One streaming pass over DEST's current labeled images (`iter_labeled`; of run `--run` only, if given)
feeds running sums, a reservoir and a bounded heap (`textseg.datasets.report_stats`); one pass over the
error rows (the run's metadata parts for a run's report, DEST's current view otherwise) counts their
categories. Only the previews' images and masks are read, at the end. Memory is one metadata part (or one
row group of the view) plus the kept records, whatever DEST's size, and the page's size is set by the
previews asked for (~40 KB each at 256 px), not by DEST's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from textseg import storage
from textseg.config import parse_storage_options
from textseg.datasets.labeled_dest import (
    LabeledDestError,
    LabeledImage,
    iter_labeled,
    run_ids,
    run_ontology,
)
from textseg.datasets.report_html import ReportContent, render_page
from textseg.datasets.report_preview import Preview, preview
from textseg.datasets.report_stats import (
    ClassStatistics,
    ErrorCategories,
    ImageRecord,
    LeastConfident,
    Reservoir,
)
from textseg.outputs.metadata import STATUS_ERROR, STATUS_OK, iter_errors, run_order, summary_path
from textseg.outputs.state import current_view_uris

DEFAULT_SAMPLE = 24  # enough to judge a run's labels at a glance, ~1 MB of thumbnails
DEFAULT_LEAST_CONFIDENT = 12  # where a reviewer looks first for what went wrong
MAX_PREVIEWS = 500  # per kind: at 256 px the page stays under ~50 MB, which a browser still opens quickly
DEFAULT_THUMB_SIZE = 256  # px, the longer side: a class's outline is legible, a card stays ~40 KB
THUMB_SIZES = (32, 1024)
RUNS_SHOWN = 50  # DEST's report lists its newest runs only: a year of nightly runs is 365
VIEW_COLUMNS = ["relpath", "status", "error"]


def report(
    dest: str,
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    least_confident: int = DEFAULT_LEAST_CONFIDENT,
    seed: int = 0,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    progress: bool = False,
) -> dict[str, int]:
    """Write the report of run `run_id` (or of DEST's current images) to `out`, a path or URI (either may
    embed S3 credentials: they join the storage options, as for `textseg label`, and never the page).
    Returns counts: images (labeled, current), errors (error rows), previews, bytes (the page's size)."""
    dest, dest_credentials = storage.split_credentials(dest)
    out, out_credentials = storage.split_credentials(out)
    options = {**dest_credentials, **out_credentials, **(storage_options or {})}  # as JobConfig moves them
    _check_sizes(sample, least_confident, thumb_size)
    runs = _summary_run_ids(dest, options)
    if not runs:
        raise LabeledDestError(f"{storage.redact_uri(dest)} holds no run summary (runs/*.json) to report on")
    if run_id is not None and run_id not in runs:
        raise LabeledDestError(
            f"{storage.redact_uri(dest)} has no run {run_id!r}; its newest runs: {runs[-5:]}"
        )
    shown = [run_id] if run_id is not None else runs[::-1][:RUNS_SHOWN]
    summaries = [_read_summary(dest, run, options) for run in shown]

    classes, sampler, lowest = _scan_images(dest, options, run_id, sample, least_confident, seed, progress)
    errors, deleted = _scan_problems(dest, options, run_id)
    counts = {"ok": classes.images, "error": errors.total} | ({"deleted": deleted} if run_id is None else {})

    sample_items = sorted(sampler.items, key=lambda r: r.relpath)
    cards = _previews([*sample_items, *lowest.items], dest, thumb_size, options, progress)
    content = ReportContent(
        dest=storage.redact_uri(dest),
        run_id=run_id,
        generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        summaries=summaries,
        runs_total=len(runs),
        ontology=run_ontology(dest, run_id or runs[-1], options),
        counts=counts,
        classes=classes,
        errors=errors,
        sample=[cards[r.run_id, r.relpath] for r in sample_items],
        least_confident=[cards[r.run_id, r.relpath] for r in lowest.items],
        seed=seed,
    )
    page = render_page(content, storage.secret_values(options)).encode()
    fs, path = storage.filesystem_for(out, options)
    storage.write_bytes_atomic(fs, path, page)
    return {"images": classes.images, "errors": errors.total, "previews": len(cards), "bytes": len(page)}


def _scan_images(
    dest: str,
    options: Mapping[str, Any],
    run_id: str | None,
    sample: int,
    least_confident: int,
    seed: int,
    progress: bool,
) -> tuple[ClassStatistics, Reservoir, LeastConfident]:
    """One pass over the current labeled images: the class statistics, the sample, the least confident."""
    classes, sampler, lowest = ClassStatistics(), Reservoir(sample, seed), LeastConfident(least_confident)
    bar = tqdm(desc="report: images", unit=" images", disable=not progress)
    for labeled in _labeled(dest, options, run_id):
        record = ImageRecord.of(labeled.row)
        classes.add(record)
        sampler.offer(record)
        lowest.offer(record)
        bar.update()
    bar.close()
    return classes, sampler, lowest


def _scan_problems(dest: str, options: Mapping[str, Any], run_id: str | None) -> tuple[ErrorCategories, int]:
    """One pass over the rows that are not ok: the error categories, and how many images are gone."""
    errors, deleted = ErrorCategories(), 0
    for status, relpath, reason in _problem_rows(dest, options, run_id):
        if status == STATUS_ERROR:
            errors.add(relpath, reason)
        else:
            deleted += 1
    return errors, deleted


def _check_sizes(sample: int, least_confident: int, thumb_size: int) -> None:
    for flag, value in (("--sample", sample), ("--least-confident", least_confident)):
        if not 0 <= value <= MAX_PREVIEWS:
            raise ValueError(
                f"{flag} must be between 0 and {MAX_PREVIEWS} (the page holds each preview); got {value}"
            )
    low, high = THUMB_SIZES
    if not low <= thumb_size <= high:
        raise ValueError(f"--thumb-size must be between {low} and {high} px; got {thumb_size}")


def _summary_run_ids(dest: str, options: Mapping[str, Any]) -> list[str]:
    """The runs with a summary under DEST/runs/, oldest first (run ids sort by start time)."""
    fs, root = storage.filesystem_for(dest, options)
    names = storage.names(fs, storage.join_uri(root, "runs"))
    return sorted((name.removesuffix(".json") for name in names if name.endswith(".json")), key=run_order)


def _read_summary(dest: str, run_id: str, options: Mapping[str, Any]) -> dict[str, Any]:
    fs, root = storage.filesystem_for(dest, options)
    summary: dict[str, Any] = json.loads(storage.read_bytes(fs, storage.join_uri(root, summary_path(run_id))))
    return summary


def _labeled(dest: str, options: Mapping[str, Any], run_id: str | None) -> Iterator[LabeledImage]:
    """DEST's current labeled images (of run `run_id` only, if given); none for a run that wrote no
    metadata (everything it listed was skipped)."""
    if run_id is not None and run_id not in run_ids(dest, options):
        return iter(())
    return iter_labeled(dest, options, run_id)


def _problem_rows(
    dest: str, options: Mapping[str, Any], run_id: str | None
) -> Iterator[tuple[str, str, str]]:
    """(status, relpath, reason) of the rows that are not ok: a run's error rows from its metadata parts,
    or DEST's current view's error and deleted rows, a row group at a time."""
    if run_id is not None:
        for relpath, reason in iter_errors(dest, run_id, options):
            yield STATUS_ERROR, relpath, reason
        return
    for uri in current_view_uris(dest, options):
        fs, path = storage.filesystem_for(uri, options)
        opened = storage.call_with_retry(
            functools.partial(fs.open, path, "rb"), f"open '{storage.redact_uri(uri)}'"
        )
        with opened as handle:
            for batch in pq.ParquetFile(handle).iter_batches(columns=VIEW_COLUMNS, use_threads=False):
                columns = (batch.column(name).to_pylist() for name in VIEW_COLUMNS)
                for relpath, status, reason in zip(*columns, strict=True):
                    if status != STATUS_OK:
                        yield status, relpath, reason or ""


def _previews(
    records: Sequence[ImageRecord], dest: str, size: int, options: Mapping[str, Any], progress: bool
) -> dict[tuple[str, str], Preview]:
    """The card of each record, by (run id, relpath): an image both sampled and least confident is read
    once. Colours are each image's run's palette."""
    palettes: dict[str, list[int]] = {}
    cards: dict[tuple[str, str], Preview] = {}
    for record in tqdm(records, desc="report: previews", unit=" images", disable=not progress):
        key = (record.run_id, record.relpath)
        if key in cards:
            continue
        if record.run_id not in palettes:
            palettes[record.run_id] = run_ontology(dest, record.run_id, options).palette()
        cards[key] = preview(record, palettes[record.run_id], size, options)
    return cards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", metavar="DEST", help="a DEST written by `textseg label` (folder or URI)")
    parser.add_argument("--out", required=True, help="where to write the HTML page (path or URI)")
    parser.add_argument(
        "--run", dest="run_id", help="report on this run only (default: DEST's current images)"
    )
    parser.add_argument(
        "--sample", type=int, default=DEFAULT_SAMPLE, help="previews of this many images drawn at random"
    )
    parser.add_argument(
        "--least-confident",
        type=int,
        default=DEFAULT_LEAST_CONFIDENT,
        help="previews of this many images of lowest mean score over the classes they hold",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    parser.add_argument(
        "--thumb-size", type=int, default=DEFAULT_THUMB_SIZE, help="longer side of a preview thumbnail, px"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    counts = report(
        args.dest,
        args.out,
        parse_storage_options(args.storage_options),
        args.run_id,
        args.sample,
        args.least_confident,
        args.seed,
        args.thumb_size,
        progress=not args.no_progress,
    )
    print(
        f"wrote {storage.redact_uri(args.out)} ({counts['bytes'] / 1e3:.0f} kB): {counts['images']} labeled "
        f"images, {counts['errors']} error rows, {counts['previews']} previews"
    )
    return 0
