"""One bad batch never ends a night: stage failures become error rows for exactly the images they touched,
and job-level problems found inside the stages end the run with one sentence, exit 2 and a summary."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import textseg
from textseg.cli import main
from textseg.errors import JobError, reason_category
from textseg.models.clipseg import ClipSegBackend
from textseg.outputs.metadata import Tally
from textseg.pipeline.batches import isolate, rows_to_batch


def _write_images(folder: pathlib.Path, count: int, poisoned: int | None = None) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(1, 256, (24, 24, 3), dtype=np.uint8)
        if i == poisoned:
            pixels[:] = 0  # the model stage is made to fail on an all-black image
        Image.fromarray(pixels).save(folder / f"img{i}.png")


def _batch(relpaths: list[str]) -> dict:
    return rows_to_batch([{"relpath": r, "error": "", "elapsed_ms": 0.0} for r in relpaths])


def test_a_batch_that_raises_is_retried_image_by_image() -> None:
    calls: list[int] = []

    def stage(batch: dict) -> dict:
        calls.append(len(batch["relpath"]))
        if any(r == "bad" and not e for r, e in zip(batch["relpath"], batch["error"], strict=True)):
            raise RuntimeError("boom secret-token-123")
        return batch

    out = isolate(stage, _batch(["a", "bad", "c"]), "the model stage", {"token": "secret-token-123"})
    assert list(out["relpath"]) == ["a", "bad", "c"]
    assert list(out["error"]) == ["", "the model stage failed: RuntimeError: boom ***", ""]
    assert calls[0] == 3 and calls[1:] == [1, 1, 1, 1]  # the batch, then each image, then bad as an error


def test_a_job_error_is_never_turned_into_error_rows() -> None:
    def stage(batch: dict) -> dict:
        raise JobError("the model cannot be loaded")

    with pytest.raises(JobError):
        isolate(stage, _batch(["a", "b"]), "the model stage", {})


def test_error_counts_group_by_reason_category() -> None:
    assert reason_category("cannot read the source object: TimeoutError: read timed out") == (
        "cannot read the source object"
    )
    import pyarrow as pa

    table = pa.table(
        {
            "status": ["ok", "error", "error", "error"],
            "error": [
                None,
                "decode: truncated file a",
                "decode: truncated file b",
                "the model stage failed: x",
            ],
        }
    )
    tally = Tally.of(table)
    assert (tally.ok, tally.error) == (1, 3)
    assert tally.top_errors() == [("decode", 2), ("the model stage failed", 1)]


def test_a_model_that_fails_on_one_image_fails_only_that_image(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ClipSegBackend.score

    def flaky_score(self, pixel_values, prompt_embeddings):  # type: ignore[no-untyped-def]
        if (pixel_values[:, 0].flatten(1).std(1) < 1e-6).any():  # an all-black image is in this batch
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, pixel_values, prompt_embeddings)

    monkeypatch.setattr(ClipSegBackend, "score", flaky_score)
    _write_images(tmp_path / "imgs", 6, poisoned=3)
    summary = textseg.label(
        str(tmp_path / "imgs"),
        str(tmp_path / "out"),
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="cat,dog",
        batch_size=4,
        max_error_rate=0.5,
    )
    assert (summary.listed, summary.ok, summary.error) == (6, 5, 1)
    assert summary.top_errors == [("the model stage failed", 1)]
    rows = {r["relpath"]: r for r in pq.read_table(tmp_path / "out" / "metadata").to_pylist()}
    assert rows["img3.png"]["status"] == "error"
    assert "illegal memory access" in rows["img3.png"]["error"]
    assert all(rows[f"img{i}.png"]["status"] == "ok" for i in (0, 1, 2, 4, 5))


def test_a_model_that_cannot_load_in_the_actors_ends_the_run_with_exit_2(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, ray_session: None, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_clipseg_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # the driver never opens the weights
    _write_images(tmp_path / "imgs", 3)
    dest = tmp_path / "out"
    args = ["label", str(tmp_path / "imgs"), str(dest), "--model", str(broken), "--prompts", "cat"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be loaded" in err[0] and "Traceback" not in err[0]
    (summary_path,) = (dest / "runs").glob("*.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"].startswith("failed: ") and "cannot be loaded" in summary["status"]


class _Died(BaseException):
    """Stands in for a worker process that dies: nothing in the stage can catch it."""


class _Ledger:
    """The crash ledger's contract in memory (textseg.plan.crash_ledger keeps it in a Ray actor)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def batch_retried(self, key: str) -> bool:
        return self.begin(key) > 0

    def batch_done(self, key: str) -> None:
        self.end(key)

    def begin(self, key: str) -> int:
        earlier = self.open.get(key, 0)
        self.open[key] = earlier + 1
        return earlier

    def end(self, key: str) -> None:
        self.open.pop(key, None)


def test_an_image_that_kills_its_worker_twice_becomes_an_error_row() -> None:
    seen: list[list[str]] = []

    def stage(batch: dict) -> dict:
        seen.append(list(batch["relpath"]))
        if any(r == "bad" and not e for r, e in zip(batch["relpath"], batch["error"], strict=True)):
            raise _Died
        return batch

    ledger = _Ledger()
    for _attempt in range(2):  # the batch dies, then its retry dies on `bad` alone
        with pytest.raises(_Died):
            isolate(stage, _batch(["a", "bad", "c"]), "decoding", {}, ledger)
    out = isolate(stage, _batch(["a", "bad", "c"]), "decoding", {}, ledger)
    assert seen == [["a", "bad", "c"], ["a"], ["bad"], ["a"], ["bad"], ["c"]]
    assert list(out["relpath"]) == ["a", "bad", "c"]
    assert list(out["error"]) == [
        "",
        "decoding failed: WorkerDied: the worker process died with this image in its batch, and again "
        "with the image alone",
        "",
    ]
    assert ledger.open == {}, "every mark of a batch or image that came through is ended"
