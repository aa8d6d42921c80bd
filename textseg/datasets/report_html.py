"""The report's one HTML page: tables, inline SVG histograms and preview cards, with no script at all.

The page must open from a laptop's disk or a bucket's browser with no internet: so no JavaScript library
from a CDN (none is needed: the histograms are SVG drawn here, the thumbnails data URIs). Every string
that comes from DEST (relpaths, error reasons, class names, summary values) goes through one escaping
function, which also replaces the values of secret storage options: a relpath may hold `<`, `&` or quotes,
and a reason must never show a credential. What the page shows is bounded (the previews asked for, the
most frequent error categories, the newest runs), so its size does not grow with DEST.

Numbers a reader (or a test) may want to take from the page carry their full value in `data-*`
attributes beside the rounded text: `data-stat` cells (`data-value`) and class rows (`data-class`,
`data-share`, `data-score`, `data-images`).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from textseg import storage
from textseg.datasets.report_preview import Preview, hex_color
from textseg.datasets.report_stats import HISTOGRAM_BINS, ClassStatistics, ErrorCategories
from textseg.ontology import Ontology

# Error categories shown, most frequent first; the rest are counted in one line.
ERROR_CATEGORIES_SHOWN = 20
# An example reason is cut after this many characters: a stack-trace-long reason must not fill the page.
REASON_CHARS = 300
# Summary keys shown elsewhere on the page (the ontology, errors from the rows) or too long to be useful.
SUMMARY_KEYS_NOT_SHOWN = ("ontology", "class_names", "top_errors", "error_examples")
SUMMARY_KEYS_FIRST = ("run_id", "status", "model_id")  # what a reviewer reads first
UNKNOWN_COLOR = "#888888"  # a class the report's ontology does not name (an older run's)

Escape = Callable[[object], str]


@dataclass(frozen=True)
class ReportContent:
    """Everything the page shows. summaries: the run's summary (a run's report) or the newest runs',
    newest first (DEST's); runs_total: how many runs DEST has. counts: `ok`, `error` and, for DEST,
    `deleted`: the rows the statistics and the error table are over."""

    dest: str
    run_id: str | None
    generated_at: str
    summaries: list[dict[str, Any]]
    runs_total: int
    ontology: Ontology
    counts: dict[str, int]
    classes: ClassStatistics
    errors: ErrorCategories
    sample: list[Preview]
    least_confident: list[Preview]
    seed: int


def render_page(content: ReportContent, secrets: Sequence[str]) -> str:
    """The whole page; `secrets` (storage option values) never appear in it."""

    def escape(value: object) -> str:
        return html.escape(storage.redact(str(value), secrets), quote=True)

    scope = f"run {content.run_id}" if content.run_id else "all runs (each image's latest attempt)"
    colors = {c.name: hex_color(c.color) for c in content.ontology.classes} | {"background": "#000000"}
    sections = [
        f'<h1>textseg report</h1><p class="meta">DEST <code>{escape(content.dest)}</code> · '
        f"{escape(scope)} · generated {escape(content.generated_at)}</p>",
        _runs_section(content, escape),
        _ontology_section(content.ontology, escape),
        _counts_section(content, escape),
        _classes_section(content, colors, escape),
        _histograms_section(content, colors, escape),
        _errors_section(content.errors, escape),
        _previews_section(
            "Random sample",
            f"{len(content.sample)} of {content.classes.images} labeled images, seed {content.seed}",
            content.sample,
            escape,
        ),
        _previews_section(
            "Least confident",
            "lowest mean score over the classes each image holds",
            content.least_confident,
            escape,
        ),
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>textseg report: {escape(content.dest)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def _runs_section(content: ReportContent, escape: Escape) -> str:
    if content.run_id is not None:
        summary = {k: v for k, v in content.summaries[0].items() if k not in SUMMARY_KEYS_NOT_SHOWN}
        first = {key: summary[key] for key in SUMMARY_KEYS_FIRST if key in summary}
        scalars = first | {k: v for k, v in summary.items() if not isinstance(v, Mapping)}
        tables = [_key_values("Run summary", scalars, escape)]
        tables += [_key_values(k, v, escape) for k, v in summary.items() if isinstance(v, Mapping)]
        return "<section><h2>Run</h2>" + "".join(tables) + "</section>"
    columns = ("run_id", "started_at", "status", "model_id", "listed", "skipped", "ok", "error")
    head = "".join(f"<th>{escape(c)}</th>" for c in columns) + "<th>total s</th>"
    rows = [
        "<tr>"
        + "".join(f"<td>{escape(_plain(s.get(c)))}</td>" for c in columns)
        + f"<td>{escape(_plain(s.get('timings_s', {}).get('total')))}</td></tr>"
        for s in content.summaries
    ]
    older = content.runs_total - len(content.summaries)
    note = f'<p class="meta">{older} older runs not shown</p>' if older > 0 else ""
    return (
        f"<section><h2>Runs ({content.runs_total})</h2><table><tr>{head}</tr>{''.join(rows)}</table>"
        f"{note}</section>"
    )


def _key_values(title: str, mapping: Mapping[str, Any], escape: Escape) -> str:
    rows = "".join(
        f"<tr><th>{escape(key)}</th><td>{escape(_plain(value))}</td></tr>" for key, value in mapping.items()
    )
    return f'<table class="kv"><caption>{escape(title)}</caption>{rows}</table>'


def _plain(value: Any) -> str:
    """A summary value as one line: lists joined, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    return str(value)


def _ontology_section(ontology: Ontology, escape: Escape) -> str:
    rows = "".join(
        f"<tr><td>{_swatch(hex_color(c.color), escape)}{escape(c.name)}</td>"
        f"<td>{escape(', '.join(c.prompts))}</td><td>{c.threshold:g}</td></tr>"
        for c in ontology.classes
    )
    return (
        "<section><h2>Ontology</h2><table><tr><th>class</th><th>prompts</th><th>threshold</th></tr>"
        f"{rows}</table></section>"
    )


def _counts_section(content: ReportContent, escape: Escape) -> str:
    labels = {"ok": "labeled images", "error": "error rows", "deleted": "gone from SOURCE"}
    rows = [
        f'<tr><th>{escape(labels.get(key, key))}</th><td data-stat="{escape(key)}" data-value="{value}">'
        f"{value}</td></tr>"
        for key, value in content.counts.items()
    ]
    share = content.classes.without_class_share
    shown = "–" if share is None else f"{_percent(share)} ({content.classes.without_class})"
    rows.append(
        f'<tr><th>images where no class was found</th><td data-stat="without-class" '
        f'data-value="{"" if share is None else repr(share)}">{shown}</td></tr>'
    )
    return f'<section><h2>Images</h2><table class="kv">{"".join(rows)}</table></section>'


def _class_order(content: ReportContent) -> list[str]:
    """The report's ontology's classes in their order, then any other class the images hold (runs with
    another ontology), by name."""
    names = content.ontology.class_names
    return names + sorted(set(content.classes.by_class) - set(names))


def _classes_section(content: ReportContent, colors: Mapping[str, str], escape: Escape) -> str:
    stats = content.classes
    rows = []
    for name in _class_order(content):
        share, score = stats.share(name), stats.mean_score(name)
        images = stats.totals(name).images
        score_attr = f' data-score="{score!r}"' if score is not None else ""
        bar = f'<span class="bar" style="width:{100 * share:.1f}px"></span>'
        rows.append(
            f'<tr data-class="{escape(name)}" data-share="{share!r}" data-images="{images}"{score_attr}>'
            f"<td>{_swatch(colors.get(name, UNKNOWN_COLOR), escape)}{escape(name)}</td>"
            f"<td>{bar}{_percent(share)}</td><td>{images}</td><td>{_score(score)}</td></tr>"
        )
    return (
        "<section><h2>Classes</h2><p class=\"meta\">pixel share: the class's pixels over all images' "
        "pixels; mean score: over all the class's pixels</p><table><tr><th>class</th><th>pixel share</th>"
        f"<th>images with it</th><th>mean score</th></tr>{''.join(rows)}</table></section>"
    )


def _histograms_section(content: ReportContent, colors: Mapping[str, str], escape: Escape) -> str:
    thresholds = {c.name: c.threshold for c in content.ontology.classes}
    figures = []
    for name in _class_order(content)[1:]:
        totals = content.classes.totals(name)
        if not any(totals.histogram):
            body = '<p class="meta">no image holds this class</p>'
        else:
            body = histogram_svg(
                totals.histogram, colors.get(name, UNKNOWN_COLOR), thresholds.get(name), name, escape
            )
        figures.append(f'<figure class="hist"><figcaption>{escape(name)}</figcaption>{body}</figure>')
    return (
        '<section><h2>Score histograms</h2><p class="meta">per-image mean score of each class, over the '
        f'images that hold it; dashed: the class\'s threshold</p><div class="grid">{"".join(figures)}'
        "</div></section>"
    )


def histogram_svg(bins: Sequence[int], color: str, threshold: float | None, name: str, escape: Escape) -> str:
    """Counts of HISTOGRAM_BINS equal bins over [0, 1] as an inline SVG bar chart (hover: the bin's
    range and count)."""
    width, height, left, bottom, top = 300, 120, 36, 20, 8
    plot_width, plot_height = width - left - 8, height - bottom - top
    peak = max(bins) or 1
    step = plot_width / len(bins)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram of {escape(name)}">'
    ]
    for index, count in enumerate(bins):
        bar = plot_height * count / peak
        low, high = index / HISTOGRAM_BINS, (index + 1) / HISTOGRAM_BINS
        parts.append(
            f'<rect x="{left + index * step:.1f}" y="{top + plot_height - bar:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{bar:.1f}" fill="{escape(color)}" stroke="#444" '
            f'stroke-width="0.5"><title>{low:.2f}–{high:.2f}: {count} images</title></rect>'
        )
    base = top + plot_height
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_width}" y2="{base}" stroke="#444"/>')
    for tick in (0.0, 0.5, 1.0):
        x = left + tick * plot_width
        parts.append(f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{base}" text-anchor="end">0</text>')
    if threshold is not None:
        x = left + threshold * plot_width
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{base}" stroke="#000" stroke-dasharray="3 2">'
            f"<title>threshold {threshold:g}</title></line>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _errors_section(errors: ErrorCategories, escape: Escape) -> str:
    if errors.total == 0:
        return '<section><h2>Errors</h2><p class="meta">no error rows</p></section>'
    rows = []
    for category, count, examples in errors.top(ERROR_CATEGORIES_SHOWN):
        items = "".join(
            f"<li><code>{escape(relpath)}</code>: {escape(_cut(reason))}</li>" for relpath, reason in examples
        )
        rows.append(
            f'<tr data-category="{escape(category)}" data-rows="{count}"><td>{escape(category)}</td>'
            f"<td>{count}</td><td><ul>{items}</ul></td></tr>"
        )
    hidden = len(errors.counts) - ERROR_CATEGORIES_SHOWN
    note = f'<p class="meta">{hidden} less frequent categories not shown</p>' if hidden > 0 else ""
    return (
        f"<section><h2>Errors ({errors.total})</h2><table><tr><th>category</th><th>rows</th>"
        f"<th>examples</th></tr>{''.join(rows)}</table>{note}</section>"
    )


def _cut(reason: str) -> str:
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + "…"


def _previews_section(title: str, note: str, previews: Sequence[Preview], escape: Escape) -> str:
    if not previews:
        return f'<section><h2>{escape(title)}</h2><p class="meta">no labeled image to show</p></section>'
    cards = "".join(_card(p, escape) for p in previews)
    return (
        f'<section><h2>{escape(title)}</h2><p class="meta">{escape(note)}</p>'
        f'<div class="grid">{cards}</div></section>'
    )


def _card(preview: Preview, escape: Escape) -> str:
    record = preview.record
    if preview.problem is not None:
        pictures = f'<p class="problem">{escape(preview.problem)}</p>'
    else:
        pictures = (
            f'<img src="{preview.image_src}" alt="{escape(record.relpath)}">'
            f'<img src="{preview.overlay_src}" alt="mask over {escape(record.relpath)}">'
        )
    legend = "".join(
        f"<li>{_swatch(entry.color, escape)}{escape(entry.name)} {_percent(entry.share)} · "
        f"{_score(entry.score)}</li>"
        for entry in preview.legend
    )
    confidence = "no class found" if record.confidence is None else f"confidence {record.confidence:.3f}"
    return (
        f'<figure class="card" data-relpath="{escape(record.relpath)}"><div class="pair">{pictures}</div>'
        f"<figcaption><code>{escape(record.relpath)}</code><br>run {escape(record.run_id)} · "
        f'{confidence}<ul class="legend">{legend}</ul></figcaption></figure>'
    )


def _swatch(color: str, escape: Escape) -> str:
    return f'<span class="swatch" style="background:{escape(color)}"></span>'


def _percent(share: float) -> str:
    return f"{100 * share:.2f} %"


def _score(score: float | None) -> str:
    return "–" if score is None else f"{score:.3f}"


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666;margin:4px 0}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.kv{display:inline-table;margin-right:16px}caption{text-align:left;font-weight:600}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #444;margin-right:6px;
vertical-align:-1px}
.bar{display:inline-block;height:10px;background:#4a90d9;margin-right:6px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{margin:0;border:1px solid #ddd;padding:6px;width:min-content;min-width:260px}
.pair{display:flex;gap:4px}
.legend{list-style:none;padding:0;margin:4px 0}
.problem{color:#a00}.hist{margin:0}svg text{font-size:10px;fill:#444}
ul{margin:0;padding-left:18px}code{word-break:break-all}
"""
