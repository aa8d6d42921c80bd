"""`textseg report`: the page opens in a real headless Chromium with no console error and its images
render; its numbers are the metadata's; its thumbnails are the images and their masks; every string from
DEST (relpaths, error reasons, class names) is escaped; a DEST with no ok image and an S3 DEST work, and no
credential reaches the page.

The browser is Debian's Chromium (`apt-get install -y chromium`) driven by Playwright for Python
(`pip install playwright`; no `playwright install`: nothing is downloaded). A machine without them fails
these tests with a message saying what to install: they must not be skipped in CI.
"""

from __future__ import annotations

import base64
import io
import pathlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from textseg.api import label
from textseg.cli import main
from textseg.datasets.report_preview import OVERLAY_ALPHA
from textseg.datasets.report_stats import ImageRecord, LeastConfident, Reservoir
from textseg.errors import reason_category
from textseg.outputs.state import read_current_view
from textseg.training.synth import write_synth_dataset

CHROMIUM = pathlib.Path("/usr/bin/chromium")
HOSTILE_IMAGE = 'a<b>&"c.png'  # labeled ok (400 x 300, the tiles 256 x 256): its relpath is on a card
BROKEN_IMAGE = "broken&<x>.png"  # text bytes: an error row
# Two names whose masks collide: both error rows, each reason naming the other, markup and all.
COLLIDING_STEM = "y<img src=x onerror=alert(1)>"
HOSTILE_CLASS = 'road<i>&"'  # a class name (prompt "road") in tables, legends and the SVG
SCREENSHOT_VARIANCE_FLOOR = 100.0  # a blank or one-colour page is ~0; tables and thumbnails are >1000


@dataclass(frozen=True)
class HostileDest:
    dest: pathlib.Path
    images: pathlib.Path
    first_run: str  # three tiles, all ok
    second_run: str  # the hostile image ok, the broken one and the colliding pair errors


@pytest.fixture(scope="module")
def hostile_dest(tmp_path_factory: pytest.TempPathFactory) -> HostileDest:
    root = tmp_path_factory.mktemp("report")
    write_synth_dataset(str(root / "synth"), 3, seed=5)
    images = root / "synth" / "images"
    spec = yaml.safe_load((root / "synth" / "ontology.yaml").read_text())
    spec["classes"] = {HOSTILE_CLASS if n == "road" else n: c for n, c in spec["classes"].items()}
    ontology = root / "ontology.yaml"
    ontology.write_text(yaml.safe_dump(spec, sort_keys=False))
    dest = root / "dest"
    options = dict(runner="local", model="demo", ontology=str(ontology), device="cpu", max_error_rate=1.0)
    first = label(str(images), str(dest), **options)
    assert first.ok == 3 and first.error == 0, first
    tile = images / "tile_00000.png"
    # Another size than the tiles', so that weighting by image pixels changes the shares.
    Image.open(tile).resize((400, 300)).save(images / HOSTILE_IMAGE)
    (images / BROKEN_IMAGE).write_bytes(b"<html>not an image</html>")
    for suffix in (".jpg", ".png"):
        shutil.copy(tile, images / f"{COLLIDING_STEM}{suffix}")
    second = label(str(images), str(dest), **options)
    assert (second.skipped, second.ok, second.error) == (3, 1, 3), second
    return HostileDest(dest, images, first.run_id, second.run_id)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: the report tests need a real browser; install it with "
            "`apt-get install -y chromium` (Debian's package)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: `pip install playwright` (no `playwright install`)")
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to start as root (CI containers) with its sandbox on.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@dataclass
class OpenedReport:
    page: Any  # a Playwright Page, loaded
    problems: list[str]  # console errors, uncaught exceptions, dialogs (alert() from injected markup)


def open_report(browser: Any, path: pathlib.Path) -> OpenedReport:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return OpenedReport(page, problems)


def write_report(dest: str, out: pathlib.Path, *flags: str) -> pathlib.Path:
    assert main(["report", dest, "--out", str(out), "--no-progress", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def whole_report(hostile_dest: HostileDest, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_report(str(hostile_dest.dest), tmp_path_factory.mktemp("out") / "report.html")


def stat(page: Any, name: str) -> str:
    return str(page.get_attribute(f'[data-stat="{name}"]', "data-value"))


def test_report_loads_without_errors_and_every_image_renders(
    whole_report: pathlib.Path, browser: Any
) -> None:
    opened = open_report(browser, whole_report)
    assert opened.problems == []
    widths = opened.page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    # 4 labeled images, each sampled and least confident (the defaults exceed 4): 2 thumbnails per card.
    assert len(widths) == 4 * 2 * 2 and min(widths) > 0, widths
    assert opened.page.evaluate("document.querySelectorAll('svg rect').length") > 0  # the histograms
    shot = np.asarray(Image.open(io.BytesIO(opened.page.screenshot(full_page=True))).convert("L"), float)
    assert shot.var() > SCREENSHOT_VARIANCE_FLOOR
    opened.page.close()


def test_report_numbers_are_those_of_the_metadata(
    hostile_dest: HostileDest, whole_report: pathlib.Path, browser: Any
) -> None:
    view = read_current_view(str(hostile_dest.dest))
    ok = view.filter(pc.equal(view["status"], "ok")).to_pylist()
    errors = view.filter(pc.equal(view["status"], "error")).to_pylist()
    opened = open_report(browser, whole_report)
    page = opened.page
    assert (stat(page, "ok"), stat(page, "error"), stat(page, "deleted")) == (
        str(len(ok)),
        str(len(errors)),
        "0",
    )

    pixels = np.array([r["width"] * r["height"] for r in ok], float)
    fractions = np.array([r["class_pixel_fraction"] for r in ok], float)  # (images, classes)
    scores = np.array([[np.nan if s is None else s for s in r["class_mean_score"]] for r in ok], float)
    class_pixels = fractions * pixels[:, None]
    shown = {
        row[0]: row[1:]
        for row in page.evaluate(
            "[...document.querySelectorAll('tr[data-class]')].map(r => [r.dataset.class, "
            "Number(r.dataset.share), Number(r.dataset.score), Number(r.dataset.images), r.innerText])"
        )
    }
    assert list(shown) == ok[0]["class_names"]
    for k, name in enumerate(ok[0]["class_names"]):
        share, score, images, text = shown[name]
        present = fractions[:, k] > 0
        assert share == pytest.approx(class_pixels[:, k].sum() / pixels.sum(), abs=1e-9)
        assert score == pytest.approx(
            np.nansum(scores[present, k] * class_pixels[present, k]) / class_pixels[present, k].sum(),
            abs=1e-6,
        )
        assert images == present.sum()
        assert f"{100 * share:.2f} %" in text
    without = np.mean([not (r[1:] > 0).any() for r in fractions])
    assert float(stat(page, "without-class")) == pytest.approx(without)

    categories = {}
    for r in errors:
        categories[reason_category(r["error"])] = categories.get(reason_category(r["error"]), 0) + 1
    rows = page.evaluate(
        "[...document.querySelectorAll('tr[data-category]')].map(r => [r.dataset.category, r.dataset.rows])"
    )
    assert {category: int(count) for category, count in rows} == categories
    assert opened.problems == []
    page.close()


def test_a_runs_report_counts_only_that_runs_rows(
    hostile_dest: HostileDest, tmp_path: pathlib.Path, browser: Any
) -> None:
    for run_id, expected in ((hostile_dest.first_run, ("3", "0")), (hostile_dest.second_run, ("1", "3"))):
        parts = pq.read_table(hostile_dest.dest / "metadata" / run_id)
        statuses = parts["status"].to_pylist()
        assert (str(statuses.count("ok")), str(statuses.count("error"))) == expected
        opened = open_report(
            browser, write_report(str(hostile_dest.dest), tmp_path / f"{run_id}.html", "--run", run_id)
        )
        assert (stat(opened.page, "ok"), stat(opened.page, "error")) == expected
        relpaths = opened.page.evaluate(
            "[...document.querySelectorAll('figure.card')].map(c => c.dataset.relpath)"
        )
        assert set(relpaths) == {
            r for r, s in zip(parts["relpath"].to_pylist(), statuses, strict=True) if s == "ok"
        }
        assert run_id in opened.page.inner_text("table.kv")  # the run summary
        assert opened.problems == []
        opened.page.close()


def test_every_string_from_dest_is_escaped(whole_report: pathlib.Path, browser: Any) -> None:
    markup = whole_report.read_text()
    for hostile in (HOSTILE_IMAGE, BROKEN_IMAGE, COLLIDING_STEM, HOSTILE_CLASS):
        assert hostile not in markup  # only its escaped form is
    opened = open_report(browser, whole_report)
    page = opened.page
    assert opened.problems == []  # the colliding name's onerror=alert(1) never ran
    assert page.evaluate("document.querySelectorAll('b, i, script, img:not([src^=\"data:\"])').length") == 0
    cards = page.evaluate(
        "[...document.querySelectorAll('figure.card')].map(c => [c.dataset.relpath, c.innerText])"
    )
    assert any(relpath == HOSTILE_IMAGE and HOSTILE_IMAGE in text for relpath, text in cards)
    errors = page.inner_text("table:has(tr[data-category])")
    assert BROKEN_IMAGE in errors and f"mask name collision with '{COLLIDING_STEM}.png'" in errors
    assert HOSTILE_CLASS in page.inner_text("body")
    labels = page.evaluate("[...document.querySelectorAll('svg')].map(s => s.getAttribute('aria-label'))")
    assert f"score histogram of {HOSTILE_CLASS}" in labels
    page.close()


def test_thumbnails_are_the_image_and_its_mask_over_it(
    hostile_dest: HostileDest, tmp_path: pathlib.Path, browser: Any
) -> None:
    out = write_report(str(hostile_dest.dest), tmp_path / "small.html", "--thumb-size", "128")
    opened = open_report(browser, out)
    sources = opened.page.evaluate(
        "[...document.querySelectorAll('figure.card[data-relpath=\"tile_00001.png\"] img')].map(i => i.src)"
    )
    opened.page.close()
    image, overlay = (
        np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"), float)
        for src in sources[:2]
    )
    source = Image.open(hostile_dest.images / "tile_00001.png").convert("RGB")
    assert image.shape == overlay.shape == (128, 128, 3)
    expected = np.asarray(source.resize((128, 128), Image.Resampling.LANCZOS), float)
    assert np.abs(image - expected).mean() < 4  # JPEG's loss only

    mask_file = Image.open(hostile_dest.dest / "masks" / "tile_00001.png")
    palette = np.array(mask_file.getpalette()[:768], float).reshape(256, 3)  # the colours the run wrote
    labels = np.asarray(mask_file.resize((128, 128), Image.Resampling.NEAREST))
    labeled = labels != 0
    blended = expected.copy()
    blended[labeled] = (1 - OVERLAY_ALPHA) * expected[labeled] + OVERLAY_ALPHA * palette[labels[labeled]]
    assert labeled.mean() > 0.05
    assert np.abs(overlay - blended).mean() < 5
    assert np.abs(overlay - image)[labeled].mean() > 3 * np.abs(overlay - blended)[labeled].mean()


def test_a_dest_without_a_labeled_image_reports_its_errors(tmp_path: pathlib.Path, browser: Any) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "notes.png").write_bytes(b"plain text, not an image")
    (images / "empty.jpg").write_bytes(b"")
    summary = label(
        str(images), str(tmp_path / "dest"), runner="local", model="demo", prompts="building", device="cpu"
    )
    assert (summary.ok, summary.error) == (0, 2)
    opened = open_report(browser, write_report(str(tmp_path / "dest"), tmp_path / "report.html"))
    page = opened.page
    assert opened.problems == []
    assert (stat(page, "ok"), stat(page, "error"), stat(page, "without-class")) == ("0", "2", "")
    assert page.evaluate("document.images.length") == 0
    assert page.inner_text("body").count("no labeled image to show") == 2
    rows = page.evaluate("[...document.querySelectorAll('tr[data-category]')].map(r => r.dataset.category)")
    assert sorted(rows) == sorted(
        reason_category(e) for e in read_current_view(str(tmp_path / "dest"))["error"].to_pylist()
    )
    page.close()


def test_an_s3_dest_reports_through_s3_and_never_shows_credentials(
    s3_server: Any, s3_bucket: str, tmp_path: pathlib.Path, browser: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synth_dataset(str(tmp_path / "synth"), 2, seed=9)
    options = s3_server.storage_options
    summary = label(
        str(tmp_path / "synth" / "images"),
        f"s3://{s3_bucket}/dest",
        runner="local",
        model="demo",
        ontology=str(tmp_path / "synth" / "ontology.yaml"),
        device="cpu",
        storage_options=options,
    )
    assert summary.ok == 2
    key, secret = options["key"], options["secret"]
    endpoint = options["client_kwargs"]["endpoint_url"]
    capsys.readouterr()
    code = main(
        [
            "report",
            f"s3://{key}:{secret}@{s3_bucket}/dest",  # credentials in the URI: they must not reach the page
            "--out",
            f"s3://{s3_bucket}/reports/report.html",
            "--no-progress",
            "--storage-option",
            f"client_kwargs.endpoint_url={endpoint}",
            "--storage-option",
            f"client_kwargs.region_name={options['client_kwargs']['region_name']}",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert key not in printed.out + printed.err and secret not in printed.out + printed.err
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="reports/report.html")["Body"].read()
    markup = body.decode()
    assert key not in markup and secret not in markup
    local = tmp_path / "report.html"
    local.write_bytes(body)
    opened = open_report(browser, local)
    assert opened.problems == []
    assert stat(opened.page, "ok") == "2"
    widths = opened.page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 2 * 2 * 2 and min(widths) > 0  # the thumbnails were read from the bucket
    assert f"s3://{s3_bucket}/dest" in opened.page.inner_text("p.meta")
    opened.page.close()


def _record(relpath: str, confidence: float) -> ImageRecord:
    return ImageRecord(relpath, "run", relpath, relpath, 1, ("background",), (1.0,), (None,), confidence)


def test_the_sample_and_the_least_confident_stay_bounded_and_right() -> None:
    records = [_record(f"{i:05d}", float((i * 7919) % 10_000) / 10_000) for i in range(10_000)]
    lowest = LeastConfident(12)
    sampler = Reservoir(10, seed=3)
    for record in records:
        lowest.offer(record)
        sampler.offer(record)
    assert lowest.items == sorted(records, key=lambda r: r.confidence or 0.0)[:12]
    assert len(sampler.items) == 10 and len({r.relpath for r in sampler.items}) == 10
    again = Reservoir(10, seed=3)
    for record in records:
        again.offer(record)
    assert again.items == sampler.items  # the same seed, the same sample
    # Uniform: over 400 seeds, each of 50 records is drawn 400 x 5 / 50 = 40 times on average.
    drawn = dict.fromkeys(range(50), 0)
    for seed in range(400):
        small = Reservoir(5, seed)
        for record in records[:50]:
            small.offer(record)
        for record in small.items:
            drawn[int(record.relpath)] += 1
    assert 15 < min(drawn.values()) and max(drawn.values()) < 70
