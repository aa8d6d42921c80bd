"""The Ray plan's two shapes label alike: CPU actors that decode, label and write their own images
(`textseg.pipeline.fused`), and the GPU plan's decode tasks -> model actors -> write tasks, run here with
its model on the CPU. Both hand the model the batches it asked for, and report how they started."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from textseg.config import from_mapping
from textseg.outputs.masks import decode_png_mask
from textseg.plan.prepare import prepare
from textseg.plan.resources import ModelPool
from textseg.plan.runner_ray import run_ray

SPLIT_BATCH = 48  # does not divide the work blocks (WORK_BLOCK_ROWS): full batches must not depend on them
IMAGES = 4 * SPLIT_BATCH  # more than one work block


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(5)
    for i in range(IMAGES):
        pixels = rng.integers(0, 256, size=(24 + i % 5, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i:04d}.png")
    return root


def label(folder: pathlib.Path, dest: pathlib.Path, model_dir: pathlib.Path, pool: ModelPool | None):
    config = from_mapping(
        {"source": str(folder), "dest": str(dest), "model": str(model_dir), "prompts": "building,road"}
        | {"device": "cpu", "batch_size": SPLIT_BATCH if pool else 8}
    )
    return run_ray(prepare(config), pool)


def masks(dest: pathlib.Path) -> dict[str, np.ndarray]:
    rows = pq.read_table(dest / "metadata").to_pylist()
    assert len(rows) == IMAGES and {row["status"] for row in rows} == {"ok"}
    return {row["relpath"]: decode_png_mask(pathlib.Path(row["mask_uri"]).read_bytes()) for row in rows}


def test_split_and_fused_plans_write_the_same_masks_from_full_batches(
    folder: pathlib.Path, tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, ray_session: None
) -> None:
    fused = label(folder, tmp_path / "fused", tiny_clipseg_dir, None)
    # The GPU plan's shape with a CPU model: one actor, batches of 48 asked from work blocks of 128.
    split_pool = ModelPool(True, "cpu", 1, 1, 1, {"num_cpus": 0.5})
    split = label(folder, tmp_path / "split", tiny_clipseg_dir, split_pool)
    assert fused.ok == split.ok == IMAGES
    # Ray Data once handed actors 75-90 rows for 128 asked: here every batch is the size asked for.
    assert (fused.mean_model_batch, split.mean_model_batch) == (8.0, float(SPLIT_BATCH))
    fused_masks, split_masks = masks(tmp_path / "fused"), masks(tmp_path / "split")
    assert fused_masks.keys() == split_masks.keys()
    for relpath, mask in fused_masks.items():
        assert np.array_equal(mask, split_masks[relpath]), relpath
    for summary in (fused, split):
        startup = summary.startup_s
        assert startup["connect"] >= 0 and startup["model_startup"] > 0  # Ray was started already
        assert 0 < startup["first_model_ready"] <= startup["first_mask"] <= summary.timings_s["total"]
