"""DEST's state: the done-index the skip check reads, and its compaction after each run."""

from __future__ import annotations

import datetime as dt
import json
import pathlib

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from textseg.outputs import state
from textseg.outputs.metadata import (
    METADATA_SCHEMA,
    new_run_id,
    run_order,
    run_started_at,
    write_metadata_part,
)
from textseg.outputs.state import DoneIndex, compact, latest_per_relpath, pending_runs


def _rows(run_id: str, relpaths: list[str], fingerprint: str = "size:1", status: str = "ok") -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    return pa.Table.from_pylist(
        [
            {
                "source_uri": f"/src/{r}",
                "relpath": r,
                "status": status,
                "error": None if status == "ok" else "cannot decode: bad bytes",
                "model_id": "m",
                "ontology_hash": "o",
                "source_fingerprint": fingerprint,
                "run_id": run_id,
                "labeled_at": now,
            }
            for r in relpaths
        ],
        schema=METADATA_SCHEMA,
    )


def _write_run(dest: pathlib.Path, run_id: str, table: pa.Table, parts: int = 1) -> None:
    step = -(-table.num_rows // parts)
    for k in range(parts):
        write_metadata_part(table.slice(k * step, step), str(dest / "metadata" / run_id), {}, f"part-{k:06d}")


def _view(dest: pathlib.Path) -> pa.Table:
    current = json.loads((dest / state.CURRENT).read_text())
    return pads.dataset(str(dest / current["view"])).to_table()


def test_a_run_merged_into_the_state_makes_its_ok_images_skippable(tmp_path: pathlib.Path) -> None:
    run = "20260101T000000Z-aaaaaa"
    _write_run(
        tmp_path,
        run,
        pa.concat_tables([_rows(run, ["a.png", "b.png"]), _rows(run, ["c.png"], status="error")]),
    )
    assert compact(str(tmp_path), {}, ["20260101T000000Z-aaaaaa"]) == 3
    index = DoneIndex.load(str(tmp_path), {})
    keys = [("a.png", "size:1"), ("b.png", "size:2"), ("c.png", "size:1"), ("d.png", "size:1")]
    # b changed (fingerprint), c failed, d is new: only a is done.
    assert index.done_relpaths(keys, "m", "o") == {"a.png"}
    assert index.done_relpaths(keys, "other-model", "o") == set()
    assert pending_runs(str(tmp_path), {}) == []


def test_the_view_keeps_one_row_per_image_its_latest_attempt(tmp_path: pathlib.Path) -> None:
    first, second = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"
    _write_run(tmp_path, first, _rows(first, ["a.png", "b.png"], status="error"))
    compact(str(tmp_path), {}, [first])
    _write_run(tmp_path, second, _rows(second, ["b.png", "c.png"]))
    compact(str(tmp_path), {}, [second])
    view = _view(tmp_path).sort_by("relpath")
    assert view["relpath"].to_pylist() == ["a.png", "b.png", "c.png"]
    assert view["run_id"].to_pylist() == [first, second, second]
    assert view["status"].to_pylist() == ["error", "ok", "ok"]
    # Only the live version's files remain: superseded views are removed.
    assert len(list((tmp_path / "state").glob("view-*"))) == 1


def test_merging_the_same_run_twice_changes_nothing(tmp_path: pathlib.Path) -> None:
    run = "20260101T000000Z-aaaaaa"
    _write_run(tmp_path, run, _rows(run, [f"{i:04d}.png" for i in range(50)]), parts=3)
    compact(str(tmp_path), {}, [run])
    once = _view(tmp_path).sort_by("relpath")
    compact(str(tmp_path), {}, [run])
    assert _view(tmp_path).sort_by("relpath").equals(once)


def test_large_views_are_split_into_sorted_files_and_lookups_read_only_their_range(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "TARGET_FILE_ROWS", 100)
    monkeypatch.setattr(state, "ROW_GROUP_ROWS", 10)
    run = "20260101T000000Z-aaaaaa"
    relpaths = [f"f{i // 50:02d}/{i:05d}.png" for i in range(450)]
    _write_run(tmp_path, run, _rows(run, relpaths), parts=4)
    compact(str(tmp_path), {}, [run])
    index = DoneIndex.load(str(tmp_path), {})
    assert [f.rows for f in index.files] == [100, 100, 100, 100, 50]
    assert all(a.last < b.first for a, b in zip(index.files, index.files[1:], strict=False))
    # A second run adds images in the middle of the key space: the range they fall in is rewritten.
    later = "20260102T000000Z-bbbbbb"
    _write_run(tmp_path, later, _rows(later, ["f03/new.png"]))
    compact(str(tmp_path), {}, [later])
    index = DoneIndex.load(str(tmp_path), {})
    assert index.rows == 451
    keys = [(r, "size:1") for r in relpaths[140:160]] + [("f03/new.png", "size:1")]
    assert index.done_relpaths(keys, "m", "o") == {k for k, _ in keys}


def test_a_compaction_killed_before_the_switch_leaves_the_previous_view_live(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"
    _write_run(tmp_path, first, _rows(first, ["a.png"]))
    compact(str(tmp_path), {}, [first])
    _write_run(tmp_path, second, _rows(second, ["b.png"]))

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # stands in for SIGKILL at the last moment before CURRENT.json is switched

    monkeypatch.setattr(state.storage, "write_bytes_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        compact(str(tmp_path), {}, [second])
    monkeypatch.undo()
    assert DoneIndex.load(str(tmp_path), {}).done_relpaths([("b.png", "size:1")], "m", "o") == set()
    assert pending_runs(str(tmp_path), {}) == [second]  # the next run merges it first
    compact(str(tmp_path), {}, pending_runs(str(tmp_path), {}))
    assert _view(tmp_path).num_rows == 2


def test_latest_per_relpath_prefers_the_newer_run() -> None:
    table = pa.concat_tables(
        [
            _rows("20260102T000000Z-b", ["x.png"], "new"),
            _rows("20260101T000000Z-a", ["x.png", "y.png"], "old"),
        ]
    )
    latest = latest_per_relpath(table)
    assert latest["relpath"].to_pylist() == ["x.png", "y.png"]
    assert latest["source_fingerprint"].to_pylist() == ["new", "old"]


# Two runs started within one second: the later one has the smaller random suffix; the middle id is from
# before run ids carried a fraction of a second.
RUNS_IN_START_ORDER = [
    "20260101T000000.100000Z-ffffff",
    "20260101T000000.900000Z-000000",
    "20260101T000001Z-000000",
    "20260101T000001.000001Z-000000",
]


def test_run_ids_order_by_start_time_within_one_second() -> None:
    started = dt.datetime(2026, 1, 1, 0, 0, 0, 100_000, tzinfo=dt.timezone.utc)
    first, second = new_run_id(started), new_run_id(started + dt.timedelta(milliseconds=1))
    assert sorted([second, first], key=run_order) == [first, second]
    assert sorted(reversed(RUNS_IN_START_ORDER), key=run_order) == RUNS_IN_START_ORDER
    assert run_started_at(RUNS_IN_START_ORDER[2]) == dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.timezone.utc)
    assert run_started_at("not-a-run") is None


def test_latest_per_relpath_prefers_the_run_that_started_later_within_one_second() -> None:
    # The older run's rows are stamped later (a slow run finishing after a fast one started): the start
    # time in the id decides, not labeled_at and not the random suffix.
    tables = [_rows(run, ["x.png"], run) for run in reversed(RUNS_IN_START_ORDER)]
    for newer, older in zip(RUNS_IN_START_ORDER[1:], RUNS_IN_START_ORDER, strict=False):
        pair = [t for t in tables if t["run_id"][0].as_py() in (newer, older)]
        assert latest_per_relpath(pa.concat_tables(pair))["source_fingerprint"].to_pylist() == [newer]
