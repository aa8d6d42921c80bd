"""Seeded tiny images and the bookkeeping every reliability test shares: rows per relpath, lost, duplicated.

Everything is made here from seeded numpy data with Pillow, so anyone can see and regenerate what a test
labels. Images are 12..40 px a side: the tiny CLIPSeg resizes them to 64 x 64 anyway.
"""

from __future__ import annotations

import collections
import io
import json
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

PROMPTS = "a red square,blue water,green field"
THRESHOLD = "0.5"


def tiny_png(seed: int, low: int = 12, high: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(low, high)), int(rng.integers(low, high))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (220, 20, 20)
    return encode(Image.fromarray(pixels), "PNG")


def encode(image: Image.Image, format: str, **params: object) -> bytes:  # noqa: A002 - Pillow's name
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def tiny_images(count: int, seed: int = 0) -> dict[str, bytes]:
    """`count` PNGs spread over three folders, some with spaces in their names."""
    return {f"d{i % 3}/img {i:02d}.png": tiny_png(seed * 1000 + i) for i in range(count)}


def write_tree(root: pathlib.Path, files: Mapping[str, bytes]) -> None:
    for relpath, data in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def label_args(source: str, dest: str, model_dir: pathlib.Path | str, *extra: str) -> list[str]:
    """`textseg label` arguments: tiny model, CPU, batches of 2."""
    return [
        "label",
        source,
        dest,
        "--model",
        str(model_dir),
        "--prompts",
        PROMPTS,
        "--threshold",
        THRESHOLD,
        "--device",
        "cpu",
        "--batch-size",
        "2",
        *extra,
    ]


def reference_masks(
    model_dir: pathlib.Path | str, images: Mapping[str, bytes], workdir: pathlib.Path
) -> dict[str, bytes]:
    """mask relpath -> the mask the in-process runner (same stage functions, no Ray) writes for each image:
    what every Ray run, killed or not, on disk or on S3, must write byte for byte."""
    from textseg.api import run_job
    from textseg.config import JobConfig

    write_tree(workdir / "images", images)
    run_job(
        JobConfig(
            source=str(workdir / "images"),
            dest=str(workdir / "masks-out"),
            model=str(model_dir),
            prompts=PROMPTS,
            threshold=float(THRESHOLD),
            device="cpu",
            batch_size=2,
            max_error_rate=1.0,
        ),
        runner="local",
    )
    return mask_bytes(fsspec.filesystem("file"), str(workdir / "masks-out"))


@dataclass
class Runs:
    """Every metadata row and run summary under one DEST, across all the runs that wrote there."""

    rows: list[dict]
    summaries: list[dict]

    @classmethod
    def read(cls, fs: fsspec.AbstractFileSystem, dest: str) -> Runs:
        tables = [
            pq.read_table(path, filesystem=fs) for path in sorted(fs.glob(f"{dest}/metadata/*/*.parquet"))
        ]
        rows = pa.concat_tables(tables).to_pylist() if tables else []
        summaries = [json.loads(fs.cat_file(path)) for path in sorted(fs.glob(f"{dest}/runs/*.json"))]
        return cls(rows, summaries)

    def ok_rows(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "ok"]

    def of_run(self, run_id: str) -> list[dict]:
        return [row for row in self.rows if row["run_id"] == run_id]

    @property
    def run_ids(self) -> list[str]:
        return sorted({row["run_id"] for row in self.rows})


def lost_and_duplicated(
    rows: Iterable[dict], expected: Iterable[str], key: str = "relpath"
) -> tuple[int, int]:
    """(expected relpaths without a row, rows beyond the first per relpath)."""
    counts = collections.Counter(row[key] for row in rows)
    expected = set(expected)
    lost = len(expected - set(counts))
    duplicated = sum(count - 1 for count in counts.values())
    return lost, duplicated


def mask_bytes(fs: fsspec.AbstractFileSystem, dest: str) -> dict[str, bytes]:
    """relpath under DEST/masks -> the PNG's bytes."""
    root = f"{dest.rstrip('/')}/masks/"
    return {
        path[len(root) :]: fs.cat_file(path)
        for path in fs.find(root)
        if not path.rsplit("/", 1)[-1].startswith(".")
    }


def mask_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as mask:
        assert mask.mode == "P"
        return np.asarray(mask)
