"""Known-bad files are not retried forever, and DEST has a current view.

An image whose bytes cannot be decoded fails the same way on every attempt: its error row is marked
`permanent` where the error is made, and re-runs skip it while its file is unchanged (`--retry-errors`
attempts it again); other failures are retried. DEST/state/ is the current view: one row per image, its
latest attempt, with images gone from SOURCE marked `deleted`; the README's one-liners read it.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import textseg.api
from textseg.cli import main
from textseg.image.decoding import ImageDecodeError, decode_image
from textseg.models.clipseg import ClipSegBackend
from textseg.outputs import state
from textseg.outputs.metadata import METADATA_SCHEMA, write_metadata_part
from textseg.outputs.state import DoneIndex, compact, read_current_polygons, read_current_view

try:
    import duckdb
except ImportError:  # optional: the pyarrow/pandas readers are checked either way
    duckdb = None

Label = Callable[..., tuple[int, dict]]


def _png(seed: int, black: bool = False) -> bytes:
    pixels = np.random.default_rng(seed).integers(1, 256, (24, 24, 3), dtype=np.uint8)
    if black:
        pixels[:] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def label(
    monkeypatch: pytest.MonkeyPatch, tiny_clipseg_dir: pathlib.Path, capsys: pytest.CaptureFixture
) -> Label:
    """`textseg label SOURCE DEST ...` in this process (the local runner, no Ray): (exit status, summary)."""
    run_job = textseg.api.run_job
    monkeypatch.setattr(textseg.api, "run_job", lambda config, runner="ray": run_job(config, "local"))

    def run(source: pathlib.Path, dest: pathlib.Path, *flags: str) -> tuple[int, dict]:
        model = ["--model", str(tiny_clipseg_dir), "--prompts", "cat,dog", "--device", "cpu"]
        code = main(["label", str(source), str(dest), *model, *flags])
        out = capsys.readouterr().out.splitlines()
        line = [text for text in out if text.startswith("run ")][-1]  # "run <run_id>: listed ..."
        run_id = line.split()[1].rstrip(":")
        summary = json.loads((dest / "runs" / f"{run_id}.json").read_text())
        summary["line"] = line
        return code, summary

    return run


def _rows(dest: pathlib.Path, run_id: str) -> dict[str, dict]:
    folder = dest / "metadata" / run_id
    if not folder.exists():
        return {}
    return {r["relpath"]: r for r in pq.read_table(folder).to_pylist()}


def test_undecodable_files_are_known_bad_until_they_change(tmp_path: pathlib.Path, label: Label) -> None:
    source, dest = tmp_path / "imgs", tmp_path / "out"
    source.mkdir()
    (source / "good1.png").write_bytes(_png(1))
    (source / "good2.png").write_bytes(_png(2))
    (source / "truncated.png").write_bytes(_png(3)[:300])
    (source / "page.jpg").write_bytes(b"<html><body>404 not found</body></html>\n")

    code, first = label(source, dest)
    assert code == 1 and (first["ok"], first["error"]) == (2, 2)
    rows = _rows(dest, first["run_id"])
    assert rows["truncated.png"]["error"].startswith("truncated image data")
    assert rows["page.jpg"]["error"].startswith("not an image")
    assert rows["truncated.png"]["permanent"] is True and rows["page.jpg"]["permanent"] is True
    assert rows["good1.png"]["permanent"] is None

    # The same files again: nothing to attempt, and this run's attempts are all that the status judges.
    code, again = label(source, dest)
    assert code == 0 and again["status"] == "succeeded"
    counts = ("listed", "skipped", "known_bad", "ok", "error")
    assert [again[k] for k in counts] == [4, 4, 2, 0, 0]
    assert "skipped 4 (2 already done, 2 known bad)" in again["line"]
    assert _rows(dest, again["run_id"]) == {}  # no new error rows

    # A file whose bytes changed (new fingerprint) is attempted again: this time it decodes.
    (source / "truncated.png").write_bytes(_png(3))
    code, fixed = label(source, dest)
    assert code == 0 and (fixed["skipped"], fixed["known_bad"], fixed["ok"], fixed["error"]) == (3, 1, 1, 0)
    assert _rows(dest, fixed["run_id"])["truncated.png"]["status"] == "ok"

    # --retry-errors attempts the known-bad ones: still bad, so this run fails on its own attempts.
    code, retried = label(source, dest, "--retry-errors")
    assert code == 1 and (retried["skipped"], retried["known_bad"], retried["error"]) == (3, 0, 1)
    assert list(_rows(dest, retried["run_id"])) == ["page.jpg"]
    assert retried["listed"] == retried["skipped"] + retried["ok"] + retried["error"]


def test_a_failure_that_may_pass_is_retried(
    tmp_path: pathlib.Path, label: Label, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, dest = tmp_path / "imgs", tmp_path / "out"
    source.mkdir()
    (source / "a.png").write_bytes(_png(1))
    (source / "black.png").write_bytes(_png(2, black=True))
    original = ClipSegBackend.score

    def flaky_score(self, pixel_values, prompt_embeddings):  # type: ignore[no-untyped-def]
        if (pixel_values[:, 0].flatten(1).std(1) < 1e-6).any():  # the all-black image is in this batch
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, pixel_values, prompt_embeddings)

    monkeypatch.setattr(ClipSegBackend, "score", flaky_score)
    code, first = label(source, dest)
    assert code == 1
    row = _rows(dest, first["run_id"])["black.png"]
    assert row["error"].startswith("the model stage failed") and row["permanent"] is False
    monkeypatch.setattr(ClipSegBackend, "score", original)
    code, again = label(source, dest)
    assert code == 0 and (again["skipped"], again["known_bad"], again["ok"]) == (1, 0, 1)
    assert _rows(dest, again["run_id"])["black.png"]["status"] == "ok"


def test_permanence_is_decided_where_the_decode_error_is_made() -> None:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"")
    assert caught.value.permanent
    out_of_memory = ImageDecodeError("out of memory: decoding the image needs more", permanent=False)
    copy = pickle.loads(pickle.dumps(out_of_memory))  # Ray ships exceptions between processes
    assert (str(copy), copy.permanent) == (str(out_of_memory), False)


def test_a_view_written_before_the_permanent_column_reads_as_transient(tmp_path: pathlib.Path) -> None:
    run = "20250101T000000Z-aaaaaa"
    rows = pa.Table.from_pylist(
        [
            {
                "source_uri": "/src/bad.png",
                "relpath": "bad.png",
                "status": "error",
                "error": "truncated image data: the PNG file ends before its pixel data is complete",
                "model_id": "m",
                "ontology_hash": "o",
                "source_fingerprint": "size:1",
                "run_id": run,
                "labeled_at": pd.Timestamp.now(tz="UTC"),
                "permanent": True,
            }
        ],
        schema=METADATA_SCHEMA,
    ).drop_columns(["permanent"])  # as an older version wrote it
    (tmp_path / "metadata" / run).mkdir(parents=True)
    pq.write_table(rows, tmp_path / "metadata" / run / "part-000000.parquet")
    assert compact(str(tmp_path), {}, [run]) == 1
    skips = DoneIndex.load(str(tmp_path), {}).skips([("bad.png", "size:1")], "m", "o")
    assert skips.known_bad == set() and skips.done == set()
    # A later run's row for it (same fingerprint, marked permanent) makes it known bad.
    later = "20250102T000000Z-bbbbbb"
    newer = pa.Table.from_pylist(
        [{**rows.to_pylist()[0], "run_id": later, "permanent": True}], METADATA_SCHEMA
    )
    write_metadata_part(newer, str(tmp_path / "metadata" / later), {}, "part-000000")
    compact(str(tmp_path), {}, [later])
    index = DoneIndex.load(str(tmp_path), {})
    assert index.skips([("bad.png", "size:1")], "m", "o").known_bad == {"bad.png"}
    assert index.skips([("bad.png", "size:2")], "m", "o").known_bad == set()  # the file changed
    assert index.skips([("bad.png", "size:1")], "m", "o", retry_errors=True).known_bad == set()


def _readme_view(dest: pathlib.Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The README's one-liners: pandas (pyarrow), and DuckDB when it is installed."""
    view = f"{dest}/" + json.load(open(f"{dest}/state/CURRENT.json"))["view"]
    frame = pd.read_parquet(view)
    if duckdb is None:
        return frame, None
    duckdb.sql(
        f"SET VARIABLE view = (SELECT '{dest}/' || view || '/*.parquet' FROM '{dest}/state/CURRENT.json')"
    )
    return frame, duckdb.sql("SELECT * FROM read_parquet(getvariable('view'))").df()


def test_the_current_view_has_one_row_per_image_and_marks_deleted_sources(
    tmp_path: pathlib.Path, label: Label
) -> None:
    source, dest = tmp_path / "imgs", tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    for name, seed in (("a.png", 1), ("b.png", 2), ("sub/c.png", 3)):
        (source / name).write_bytes(_png(seed))
    (source / "sub" / "bad.png").write_bytes(b"not an image at all")
    assert label(source, dest)[0] == 1

    # Run 2: a changed, b deleted, d new.
    (source / "a.png").write_bytes(_png(11))
    (source / "b.png").unlink()
    (source / "d.png").write_bytes(_png(4))
    code, second = label(source, dest)
    assert code == 0 and (second["ok"], second["deleted"]) == (2, 1)
    assert ", 1 gone from SOURCE" in second["line"]

    # Run 3: b is back, d deleted, nothing else changed.
    (source / "b.png").write_bytes(_png(2))
    (source / "d.png").unlink()
    code, third = label(source, dest)
    assert code == 0 and (third["ok"], third["deleted"], third["known_bad"]) == (1, 1, 1)

    frame, via_duckdb = _readme_view(dest)
    for table in (frame, via_duckdb, read_current_view(str(dest)).to_pandas()):
        if table is None:
            continue
        latest = table.set_index("relpath")
        assert sorted(latest.index) == ["a.png", "b.png", "d.png", "sub/bad.png", "sub/c.png"]  # one each
        assert latest.loc["a.png", "run_id"] == second["run_id"] and latest.loc["a.png", "status"] == "ok"
        assert latest.loc["b.png", "run_id"] == third["run_id"] and latest.loc["b.png", "status"] == "ok"
        assert latest.loc["d.png", "status"] == "deleted"  # its mask is still there, and stale
        assert latest.loc["d.png", "mask_uri"].endswith("d.png")
        assert latest.loc["sub/bad.png", "status"] == "error" and bool(latest.loc["sub/bad.png", "permanent"])
        assert latest.loc["sub/c.png", "status"] == "ok"
    # Superseded views are gone: the folder CURRENT.json names is the only one.
    assert [p.name for p in (dest / "state").glob("view-*")] == [frame_view_folder(dest)]

    # A listing that stops early (--limit) cannot tell what is gone: nothing is marked.
    (source / "sub" / "c.png").unlink()
    code, limited = label(source, dest, "--limit", "1")
    assert code == 0 and limited["deleted"] == 0
    assert read_current_view(str(dest)).to_pandas().set_index("relpath").loc["sub/c.png", "status"] == "ok"
    # A source that lists nothing is taken for an outage, not for every image deleted.
    for path in sorted(source.rglob("*.png")):
        path.unlink()
    code, empty = label(source, dest)
    assert code == 0 and (empty["listed"], empty["deleted"]) == (0, 0)


def frame_view_folder(dest: pathlib.Path) -> str:
    return pathlib.PurePosixPath(json.loads((dest / state.CURRENT).read_text())["view"]).name


# The README's DuckDB query for the current polygons (getvariable('view') as set in _readme_view).
CURRENT_POLYGONS_SQL = """
WITH ok AS (SELECT relpath, run_id FROM read_parquet(getvariable('view')) WHERE status = 'ok'),
polygons AS (SELECT * FROM read_parquet('{dest}/vectors/*/*/*.parquet', hive_partitioning = true)),
parts AS (SELECT run, source, unnest(string_split(source, '|')) AS relpath
          FROM (SELECT DISTINCT run, source FROM polygons)),
current AS (SELECT run, source FROM parts LEFT JOIN ok ON ok.relpath = parts.relpath AND ok.run_id = parts.run
            GROUP BY run, source HAVING count(ok.relpath) = count(*))
SELECT polygons.* FROM polygons SEMI JOIN current USING (run, source)
"""


def test_the_current_polygons_are_those_of_each_images_latest_ok_row(
    tmp_path: pathlib.Path, label: Label
) -> None:
    pytest.importorskip("geopandas")
    assert (
        main(["synth", str(tmp_path / "pyramid"), "--xyz", "12/2200/1343", "--n", "2", "--size", "64"]) == 0
    )
    images, dest = tmp_path / "pyramid" / "images", tmp_path / "out"
    flags = ("--prompts", "land", "--threshold", "0", "--vectors")
    code, first = label(images, dest, *flags)  # one class over every pixel: the 4 tiles merge into one
    assert code == 0 and first["polygons"] == 1
    current = read_current_polygons(str(dest))
    assert current.num_rows == 1 and current["source"][0].as_py().count("|") == 3

    # One tile changes: its new polygon (newer partition) is current, the old merged one is stale.
    tile = images / "12" / "2200" / "1343.png"
    pixels = np.asarray(Image.open(tile)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(tile)
    code, second = label(images, dest, *flags)
    assert code == 0 and (second["ok"], second["polygons"]) == (1, 1)
    current = read_current_polygons(str(dest))
    assert current["source"].to_pylist() == ["12/2200/1343.png"]
    assert current["run"].to_pylist() == [second["run_id"]]
    if duckdb is not None:
        _readme_view(dest)  # sets the variable
        rows = duckdb.sql(CURRENT_POLYGONS_SQL.format(dest=dest)).df()
        assert rows["source"].tolist() == ["12/2200/1343.png"] and rows["run"].tolist() == [second["run_id"]]
