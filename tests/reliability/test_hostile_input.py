"""Hostile input end to end: `textseg label` with Ray over a local folder and over S3.

Every file in tests/reliability/hostile.py is either labeled correctly (its mask has the size a viewer
shows and equals its plain twin's mask pixel for pixel) or becomes an error row with a clear reason; on S3
also keys with '..', '.' or empty segments (error rows, never a write outside DEST) and names near S3's
1024-byte key limit (the proxy in front of moto refuses longer keys, as S3 does). Every listed file has
exactly one row, and listed == skipped + ok + error.
"""

from __future__ import annotations

import json
import pathlib
import posixpath
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.reliability.dataset import label_args, mask_bytes, mask_pixels, write_tree
from tests.reliability.faulty_s3 import S3_MAX_KEY_BYTES, FaultyS3Proxy
from tests.reliability.hostile import Expect, hostile_files
from tests.s3_server import S3Server
from textseg.cli import main

MASKS_PREFIX = "labels/masks/"
# Source keys that fit S3's limit; the first one's mask key fits exactly, the second one's is 4 bytes over.
LONG_FITS = "long/" + "f" * (S3_MAX_KEY_BYTES - len(MASKS_PREFIX) - len("long/") - len(".png")) + ".png"
LONG_OVER = "long/" + "o" * (S3_MAX_KEY_BYTES - len(MASKS_PREFIX) - len("long/") - len(".png") + 4) + ".png"
UNSAFE_KEYS = ["a/../b.png", "../escape.png", "c/./d.png", "e//f.png"]


def _mask_relpath(relpath: str) -> str:
    return posixpath.splitext(relpath)[0] + ".png"


def _rows(fs: fsspec.AbstractFileSystem, dest: str) -> tuple[list[dict], dict]:
    (summary_path,) = fs.glob(f"{dest}/runs/*.json")
    summary = json.loads(fs.cat_file(summary_path))
    parts = fs.glob(f"{dest}/metadata/{summary['run_id']}/*.parquet")
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts]).to_pylist(), summary


def check_files(
    rows: dict[str, dict], masks: dict[str, bytes], files: dict[str, tuple[bytes, Expect]]
) -> None:
    for relpath, (_, expect) in files.items():
        row = rows[relpath]
        if expect.reason is not None:
            assert row["status"] == "error" and row["error"].split(":")[0] == expect.reason, (
                relpath,
                row["error"],
            )
            assert row["mask_uri"] is None and _mask_relpath(relpath) not in masks
            continue
        assert row["status"] == "ok", (relpath, row["error"])
        labels = mask_pixels(masks[_mask_relpath(relpath)])
        assert (labels.shape[1], labels.shape[0]) == expect.size == (row["width"], row["height"]), relpath
        if expect.twin is not None:
            expected = mask_pixels(masks[_mask_relpath(expect.twin)]).copy()
            if expect.nodata is not None:
                assert expect.nodata.any()
                expected[expect.nodata] = 255
            assert np.array_equal(labels, expected), f"{relpath} is not labeled like {expect.twin}"


def _accounted(rows: list[dict], summary: dict, listed: int, key: str) -> tuple[int, int]:
    counts = Counter(row[key] for row in rows)
    duplicated = sum(count - 1 for count in counts.values())
    assert summary["listed"] == listed == summary["skipped"] + summary["ok"] + summary["error"]
    return listed - len(counts), duplicated


def test_hostile_files_in_a_local_folder_are_labeled_or_become_error_rows(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, ray_session: None, ledger
) -> None:
    files = hostile_files()
    write_tree(tmp_path / "src", {relpath: data for relpath, (data, _) in files.items()})
    dest = tmp_path / "not" / "there" / "yet"  # a DEST folder that does not exist yet is created
    assert main(label_args(str(tmp_path / "src"), str(dest), tiny_clipseg_dir, "--max-error-rate", "1")) == 0

    fs = fsspec.filesystem("file")
    rows, summary = _rows(fs, str(dest))
    lost, duplicated = _accounted(rows, summary, len(files), "relpath")
    ledger(
        "hostile input, local folder (bad bytes, bombs, modes, EXIF 1-8, animated, names)",
        runs=1,
        images=len(files),
        lost=lost,
        duplicated=duplicated,
    )
    assert (lost, duplicated) == (0, 0)
    check_files({row["relpath"]: row for row in rows}, mask_bytes(fs, str(dest)), files)


def test_hostile_keys_on_s3_are_labeled_or_become_error_rows_and_nothing_lands_outside_dest(
    s3_server: S3Server, s3_bucket: str, tiny_clipseg_dir: pathlib.Path, ray_session: None, ledger
) -> None:
    files = hostile_files()
    blank = files["names/with spaces/a b  c.png"][0]
    files[LONG_FITS] = (blank, Expect(size=(12, 12)))
    for relpath, (data, _) in files.items():
        s3_server.put_object(s3_bucket, f"raw/{relpath}", data)
    for key in [*UNSAFE_KEYS, LONG_OVER]:
        s3_server.put_object(s3_bucket, f"raw/{key}", blank)
    before = {obj["Key"] for obj in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}

    with FaultyS3Proxy(s3_server.endpoint_url) as proxy:  # no faults: only S3's 1024-byte key limit
        options = [
            f"--storage-option=client_kwargs.endpoint_url={proxy.endpoint_url}",
            f"--storage-option=key={s3_server.storage_options['key']}",
            f"--storage-option=secret={s3_server.storage_options['secret']}",
        ]
        args = label_args(
            f"s3://{s3_bucket}/raw/",
            f"s3://{s3_bucket}/labels",
            tiny_clipseg_dir,
            "--max-error-rate",
            "1",
            *options,
        )
        assert main(args) == 0
        multipart = proxy.requests(lambda r: "uploads" in r.query or "uploadId" in r.query)

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.storage_options)
    rows, summary = _rows(fs, f"{s3_bucket}/labels")
    listed = len(files) + len(UNSAFE_KEYS) + 1
    lost, duplicated = _accounted(rows, summary, listed, "source_uri")
    ledger(
        "hostile input, S3 (+ '..'/'.'/'//' keys, keys at and over 1024 bytes)",
        runs=1,
        images=listed,
        lost=lost,
        duplicated=duplicated,
    )
    assert (lost, duplicated) == (0, 0)
    by_uri = {row["source_uri"]: row for row in rows}
    check_files(
        {rel: by_uri[f"s3://{s3_bucket}/raw/{rel}"] for rel in files},
        mask_bytes(fs, f"{s3_bucket}/labels"),
        files,
    )
    for key in UNSAFE_KEYS:
        row = by_uri[f"s3://{s3_bucket}/raw/{key}"]
        assert row["status"] == "error" and "cannot become a mask path inside DEST" in row["error"], row
        assert row["mask_uri"] is None
    over = by_uri[f"s3://{s3_bucket}/raw/{LONG_OVER}"]
    assert over["status"] == "error" and over["error"].startswith("cannot write the mask"), over
    assert "too long" in over["error"]

    # Nothing outside DEST: every new key is under labels/, and no mask key has a '..' or '.' segment.
    after = {
        obj["Key"]
        for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for obj in page.get("Contents", [])
    }
    new = after - before
    assert new and all(key.startswith("labels/") for key in new), sorted(
        k for k in new if not k.startswith("labels/")
    )
    assert not any(segment in ("..", ".", "") for key in new for segment in key.split("/")), new
    assert not multipart, "a mask or part file was uploaded in parts: readers could see it half-written"
