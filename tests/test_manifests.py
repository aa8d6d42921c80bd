"""textseg.source.manifests: Parquet, CSV (S3 Inventory's too) and text manifests planned as shards and
listed shard by shard, on local disk and on a real S3 protocol server (moto over loopback, through s3fs)."""

from __future__ import annotations

import gzip
import io
import pickle
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.s3_server import S3Server
from textseg.source import manifests
from textseg.source.listing import Shard, list_images, plan_shards
from textseg.source.manifests import CsvShard, ParquetShard, TextShard, plan_manifest_shards
from textseg.source.refs import ImageRef, ListingError, common_folder, fingerprint, is_image_name
from textseg.storage import filesystem_for

ETAG = "0123456789abcdef0123456789abcdef"
FAKE_S3 = {"key": "k", "secret": "s"}  # for manifests whose S3 objects are never requested


def _plan(manifest: str | Path, storage_options: dict[str, Any] | None = None, **sizes: int) -> list[Shard]:
    """plan_manifest_shards as plan_shards calls it, with shard sizes given."""
    fs, path = filesystem_for(str(manifest), storage_options)
    return plan_manifest_shards(fs, path, str(manifest), storage_options, None, **sizes)


def _listed(shards: Sequence[Shard], storage_options: dict[str, Any] | None = None) -> list[ImageRef]:
    return [ref for shard in shards for ref in shard.refs(storage_options)]


def _write_parquet(path: Path, columns: dict[str, Any], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (200, 10, 10)).save(path)
    return path


def _problems(refs: Sequence[ImageRef]) -> dict[str, str]:
    return {ref.uri: ref.problem or "" for ref in refs if ref.problem is not None}


# ----------------------------------------------------------------------------------------------------------
# Parquet


def test_parquet_sizes_and_etags_fingerprint_without_any_request(tmp_path: Path) -> None:
    # None of these files exists: a lookup would make each a "does not exist" problem.
    uris = [
        f"{tmp_path}/raw/b.jpg",
        f"{tmp_path}/raw/a.jpg",
        f"{tmp_path}/raw/sub/c.tif",
        f"{tmp_path}/raw/a.jpg",
    ]
    manifest = _write_parquet(
        tmp_path / "list.parquet", {"uri": uris, "size": [2, 1, 3, 1], "etag": ['"e2"', "e1", '"e3"', "e1"]}
    )
    refs = list(list_images(str(manifest)))
    assert [(r.relpath, r.fingerprint, r.size, r.problem) for r in refs] == [
        ("a.jpg", "size:1;etag:e1", 1, None),  # listed once, sorted by relpath
        ("b.jpg", "size:2;etag:e2", 2, None),
        ("sub/c.tif", "size:3;etag:e3", 3, None),
    ]
    assert refs[0].fingerprint == fingerprint({"size": 1, "ETag": '"e1"'})  # as a folder listing gives it
    assert refs[0].uri == f"{tmp_path}/raw/a.jpg"


def test_parquet_rows_without_a_fingerprint_are_looked_up(tmp_path: Path) -> None:
    _png(tmp_path / "raw" / "here.png")
    manifest = _write_parquet(
        tmp_path / "list.parquet",
        {
            "uri": [f"{tmp_path}/raw/here.png", f"{tmp_path}/raw/gone.png", f"{tmp_path}/raw/known.png"],
            "size": [None, None, 7],
            "last_modified": [None, None, datetime(2024, 5, 1, 12, tzinfo=timezone.utc)],
        },
    )
    refs = {r.uri.rsplit("/", 1)[1]: r for r in list_images(str(manifest))}
    here, gone, known = refs["here.png"], refs["gone.png"], refs["known.png"]
    assert here.problem is None and here.size == (tmp_path / "raw" / "here.png").stat().st_size
    assert here.fingerprint.startswith(f"size:{here.size};mtime:")
    assert gone.relpath == "" and "does not exist" in (gone.problem or "")
    assert known.problem is None and known.fingerprint == "size:7;mtime:2024-05-01T12:00:00+00:00"


def test_a_listed_object_that_is_gone_fails_when_decoded_as_source_object_not_found(tmp_path: Path) -> None:
    """No request is made for a row with size and ETag, so a missing object is found by the decode stage."""
    from textseg.image.pieces import WindowPlan
    from textseg.models.input_spec import InputSpec
    from textseg.pipeline.decode import read_and_decode
    from textseg.pipeline.settings import StageSettings
    from textseg.plan.work import work_table

    _png(tmp_path / "raw" / "present.png")
    manifest = _write_parquet(
        tmp_path / "list.parquet",
        {
            "uri": [f"{tmp_path}/raw/present.png", f"{tmp_path}/raw/gone.png"],
            "size": [1, 1],
            "etag": ["a", "b"],
        },
    )
    refs = list(list_images(str(manifest)))
    assert [(r.relpath, r.problem) for r in refs] == [("gone.png", None), ("present.png", None)]
    settings = StageSettings(
        dest=str(tmp_path / "out"),
        run_id="run",
        input_spec=InputSpec((8, 8)),
        max_pixels=10**8,
        window_plan=WindowPlan(None, 64),
        class_names=["background", "thing"],
        palette=[0, 0, 0, 255, 0, 0],
        thresholds=(0.5,),
        score_kind="sigmoid",
        model_id="model",
        ontology_hash="ontology",
        vectors=None,
    )
    rows = work_table(refs).to_pydict()
    batch = {
        name: np.array(values, dtype=float if name == "elapsed_ms" else object)
        for name, values in rows.items()
    }
    decoded = read_and_decode(batch, settings)
    errors = dict(zip(decoded["relpath"], decoded["error"], strict=True))
    assert errors == {
        "gone.png": "source object not found (deleted or renamed after listing)",
        "present.png": "",
    }


def test_s3_inventory_parquet(tmp_path: Path) -> None:
    keys = [
        "raw/z.jpg",
        "raw/",  # a directory marker
        "raw/notes.txt",  # not an image
        "raw/a b.JPG",  # Parquet keys are not URL-encoded
        "raw/sub/old.png",  # an older version
        "raw/sub/deleted.png",  # a delete marker
        "",  # no key: a problem ref
        "raw/../escape.jpg",  # unsafe: a problem ref
    ]
    manifest = _write_parquet(
        tmp_path / "inventory.parquet",
        {
            "bucket": pa.array(["inv-bucket"] * len(keys)).dictionary_encode(),
            "key": keys,
            "version_id": ["v"] * len(keys),
            "is_latest": [True, True, True, True, False, True, True, True],
            "is_delete_marker": [False, False, False, False, False, True, False, False],
            "size": pa.array([5, 0, 3, 4, 6, None, None, 8], pa.int64()),
            "last_modified_date": pa.array(
                [datetime(2024, 1, 2, tzinfo=timezone.utc)] * len(keys), pa.timestamp("ms", tz="UTC")
            ),
            "e_tag": [ETAG, ETAG, ETAG, f"{ETAG}-2", ETAG, None, None, ETAG],
            "storage_class": ["STANDARD"] * len(keys),
        },
    )
    refs = list(list_images(str(manifest), FAKE_S3))
    assert [(r.uri, r.relpath, r.fingerprint) for r in refs if r.problem is None] == [
        ("s3://inv-bucket/raw/a b.JPG", "a b.JPG", f"size:4;etag:{ETAG}-2"),
        ("s3://inv-bucket/raw/z.jpg", "z.jpg", f"size:5;etag:{ETAG}"),
    ]
    problems = _problems(refs)
    assert problems.keys() == {f"{manifest}#row=7", "s3://inv-bucket/raw/../escape.jpg"}
    assert "row 7" in problems[f"{manifest}#row=7"] and "has no key" in problems[f"{manifest}#row=7"]
    assert "'..'" in problems["s3://inv-bucket/raw/../escape.jpg"]


def test_a_parquet_manifest_is_known_by_its_magic_bytes(tmp_path: Path) -> None:
    manifest = _write_parquet(
        tmp_path / "images.list", {"URI": ["s3://b/x/1.jpg"], "Size": [1], "ETag": ["e"]}
    )
    (shard,) = _plan(manifest, FAKE_S3)
    assert isinstance(shard, ParquetShard)
    assert [(r.uri, r.relpath, r.fingerprint) for r in shard.refs(FAKE_S3)] == [
        ("s3://b/x/1.jpg", "1.jpg", "size:1;etag:e")
    ]


def test_parquet_without_a_uri_or_bucket_and_key_column_is_refused(tmp_path: Path) -> None:
    manifest = _write_parquet(tmp_path / "list.parquet", {"path": ["/a.jpg"]})
    with pytest.raises(ListingError, match="neither a 'uri' column nor 'bucket' and 'key'.*it has: path"):
        list_images(str(manifest))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(ListingError, match="cannot be read"):
        list_images(str(broken))


def test_empty_and_null_uris_are_problem_refs_never_dropped(tmp_path: Path) -> None:
    uris = ["s3://b/r/a.jpg", "", None, "  ", "s3://b/r//b.jpg"]
    manifest = _write_parquet(tmp_path / "list.parquet", {"uri": uris, "size": [1] * 5, "etag": ["e"] * 5})
    refs = _listed(_plan(manifest, FAKE_S3, shard_rows=100), FAKE_S3)
    problems = _problems(refs)
    assert {uri: "no uri" in why for uri, why in problems.items()} == {
        f"{manifest}#row=2": True,
        f"{manifest}#row=3": True,
        f"{manifest}#row=4": True,
        "s3://b/r//b.jpg": False,  # an empty segment: its relpath is unsafe
    }
    assert [(r.uri, r.relpath) for r in refs if r.problem is None] == [("s3://b/r/a.jpg", "a.jpg")]


def test_parquet_shards_cover_every_row_exactly_once(tmp_path: Path) -> None:
    count = 1000
    uris = [f"s3://b/tiles/{i % 7}/{i:05d}.png" for i in range(count)]
    # Row groups of 30 rows are gathered into shards of <= 100 rows; one group of 450 rows is split.
    small = _write_parquet(tmp_path / "small-groups.parquet", _uri_columns(uris), row_group_size=30)
    big = tmp_path / "one-big-group.parquet"
    with pq.ParquetWriter(
        big, pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])
    ) as w:
        w.write_table(pa.table(_uri_columns(uris[:450])), row_group_size=450)
        w.write_table(pa.table(_uri_columns(uris[450:])), row_group_size=100)
    for manifest in (small, big):
        shards = _plan(manifest, FAKE_S3, shard_rows=100)
        assert all(isinstance(s, ParquetShard) and s.last_row - s.first_row < 100 for s in shards)
        ranges = sorted((s.first_row, s.last_row) for s in shards if isinstance(s, ParquetShard))
        assert ranges[0][0] == 1 and ranges[-1][1] == count
        assert all(prev[1] + 1 == nxt[0] for prev, nxt in zip(ranges, ranges[1:], strict=False))
        assert len({s.name for s in shards}) == len(shards)
        assert [s.name for s in _plan(manifest, FAKE_S3, shard_rows=100)] == [
            s.name for s in shards
        ]  # stable
        by_shard = [list(shard.refs(FAKE_S3)) for shard in pickle.loads(pickle.dumps(shards))]
        assert all(_sorted_relpaths(refs) for refs in by_shard)
        listed = [ref.uri for refs in by_shard for ref in refs]
        assert sorted(listed) == sorted(uris)  # every row exactly once
    split = [
        s for s in _plan(big, FAKE_S3, shard_rows=100) if isinstance(s, ParquetShard) and s.row_groups == (0,)
    ]
    assert [(s.first_row, s.last_row) for s in split] == [
        (1, 100),
        (101, 200),
        (201, 300),
        (301, 400),
        (401, 450),
    ]


def test_collisions_within_a_shard_are_flagged(tmp_path: Path) -> None:
    uris = ["s3://b/r/a.png", "s3://b/r/b.jpg", "s3://b/r/a.jpg", "s3://b/r/c.tif"]
    manifest = _write_parquet(tmp_path / "list.parquet", _uri_columns(uris))
    refs = list(list_images(str(manifest), FAKE_S3))
    assert _problems(refs) == {
        "s3://b/r/a.jpg": "mask name collision with 'a.png'",
        "s3://b/r/a.png": "mask name collision with 'a.jpg'",
    }
    assert [r.relpath for r in refs if r.problem is None] == ["b.jpg", "c.tif"]


def test_excluded_prefix_is_skipped_and_does_not_count_for_the_root(tmp_path: Path) -> None:
    uris = ["s3://b/data/raw/a.jpg", "s3://b/data/out/masks/a.png", "s3://b/data/raw/sub/b.jpg"]
    manifest = _write_parquet(tmp_path / "list.parquet", _uri_columns(uris))
    refs = list(list_images(str(manifest), FAKE_S3, exclude_prefix="s3://b/data/out"))
    assert [(r.uri, r.relpath) for r in refs] == [
        ("s3://b/data/raw/a.jpg", "a.jpg"),
        ("s3://b/data/raw/sub/b.jpg", "sub/b.jpg"),
    ]
    local = [_png(tmp_path / "data" / name) for name in ("raw/a.png", "out/masks/a.png", "raw/sub/b.png")]
    text = tmp_path / "list.txt"
    text.write_text("".join(f"{path}\n" for path in local))
    excluded = list_images(str(text), exclude_prefix=f"{tmp_path}/data/out/")
    assert [(r.relpath, r.problem) for r in excluded] == [("a.png", None), ("sub/b.png", None)]


@pytest.mark.parametrize(
    "uris",
    [
        ["s3://b/a/x.jpg", "s3://b/a/y/z.jpg", "s3://b/ab.jpg"],
        ["s3://b/a/x.jpg", "s3a://b/a/y.jpg"],  # two schemes, one storage
        ["s3://b/a/x.jpg", " s3://b/a/deeper/y.jpg "],  # whitespace around an entry
        ["s3://b/only/one.jpg"],
        ["s3://b1/x.jpg", "s3://b2/y.jpg"],  # two buckets: relpaths keep them
        ["s3://b/a/x.jpg", "s3://b/a/x.jpg/y.jpg"],
        ["s3://b/é/x.jpg", "s3://b/é/ü/z.jpg", "s3://b/éa.jpg", "s3://b/e/x.jpg"],
    ],
)
def test_the_root_is_the_deepest_common_folder(tmp_path: Path, uris: list[str]) -> None:
    """Planning finds the root by pyarrow where it can, row by row where it must: both as common_folder."""
    manifest = _write_parquet(tmp_path / "list.parquet", _uri_columns(uris))
    paths = [filesystem_for(uri.strip(), FAKE_S3)[1] for uri in uris]
    depth = len(common_folder(paths))
    refs = list(list_images(str(manifest), FAKE_S3))
    assert sorted(r.relpath for r in refs) == sorted("/".join(p.split("/")[depth:]) for p in paths)


def test_the_image_key_pattern_is_is_image_name() -> None:
    names = ["a.jpg", "a.JPG", "a.Jpeg", ".jpg", "d/.png", "..jpg", "a..jpg", ".a.jpg", "d.jpg/", "d.jpg/x"]
    names += [
        "x.jpg.txt",
        "x.tar.gif",
        "x.jpgx",
        "x.jpg\n",
        "dir/sub/é ü.tif",
        "x",
        "x.",
        "a/b.WebP",
        "x.bmp",
    ]
    matches = pc.match_substring_regex(pa.array(names), manifests._IMAGE_KEY).to_pylist()
    assert matches == [is_image_name(name) for name in names]


# ----------------------------------------------------------------------------------------------------------
# CSV


def _inventory_csv(rows: Sequence[Sequence[str]]) -> bytes:
    return "".join(",".join(f'"{field}"' for field in row) + "\n" for row in rows).encode()


INVENTORY_ROWS = [
    ["inv-bucket", "raw/a+b.jpg", "12", "2024-01-01T00:00:00.000Z", ETAG, "STANDARD"],  # 'raw/a b.jpg'
    [
        "inv-bucket",
        "raw/c%2Bd.png",
        "13",
        "2024-01-01T00:00:00.000Z",
        f"{ETAG}-2",
        "STANDARD",
    ],  # 'raw/c+d.png'
    ["inv-bucket", "raw/", "0", "2024-01-01T00:00:00.000Z", ETAG, "STANDARD"],
    ["inv-bucket", "raw/notes.txt", "3", "2024-01-01T00:00:00.000Z", ETAG, "STANDARD"],
    ["inv-bucket", "raw/sub/%C3%A9t%C3%A9.jpg", "3", "2024-01-01T00:00:00.000Z", "", "STANDARD"],  # no ETag
]
INVENTORY_REFS = [
    ("s3://inv-bucket/raw/a b.jpg", "a b.jpg", f"size:12;etag:{ETAG}"),
    ("s3://inv-bucket/raw/c+d.png", "c+d.png", f"size:13;etag:{ETAG}-2"),
    ("s3://inv-bucket/raw/sub/été.jpg", "sub/été.jpg", "size:3;mtime:2024-01-01T00:00:00+00:00"),
]


@pytest.mark.parametrize("name", ["inventory.csv", "inventory.csv.gz"])
def test_s3_inventory_csv_without_header(tmp_path: Path, name: str) -> None:
    data = _inventory_csv(INVENTORY_ROWS)
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    shards = plan_shards(str(tmp_path / name), FAKE_S3)
    assert [type(s) for s in shards] == [CsvShard]
    refs = _listed(shards, FAKE_S3)
    assert [(r.uri, r.relpath, r.fingerprint) for r in refs] == INVENTORY_REFS
    assert all(r.problem is None for r in refs)


def test_versioned_s3_inventory_csv(tmp_path: Path) -> None:
    rows = [
        ["bkt", "k/new.jpg", "v2", "true", "false", "5", "2024-01-01T00:00:00.000Z", ETAG, "STANDARD"],
        ["bkt", "k/new.jpg", "v1", "false", "false", "4", "2023-01-01T00:00:00.000Z", ETAG, "STANDARD"],
        ["bkt", "k/gone.jpg", "v3", "true", "true", "", "2024-01-01T00:00:00.000Z", "", ""],
        ["bkt", "k/other.jpg", "v4", "true", "false", "6", "2024-01-01T00:00:00.000Z", ETAG, "GLACIER"],
    ]
    (tmp_path / "inventory.csv").write_bytes(_inventory_csv(rows))
    refs = list(list_images(str(tmp_path / "inventory.csv"), FAKE_S3))
    assert [(r.uri, r.fingerprint) for r in refs] == [
        ("s3://bkt/k/new.jpg", f"size:5;etag:{ETAG}"),
        ("s3://bkt/k/other.jpg", f"size:6;etag:{ETAG}"),
    ]


def test_csv_with_a_header(tmp_path: Path) -> None:
    manifest = tmp_path / "images.csv"
    manifest.write_text(
        "\ufeffURI,Size,ETag,note\n"
        's3://b/raw/x.jpg,10,"""quoted-etag""","a, note"\n'
        "s3://b/raw/sub/y.png,11,e2,\n"
        ",,,empty uri\n",
        encoding="utf-8",
    )
    refs = list(list_images(str(manifest), FAKE_S3))
    assert [(r.relpath, r.fingerprint, r.problem) for r in refs] == [
        ("", "", f"row 3 of the manifest '{manifest}' has no uri"),
        ("sub/y.png", "size:11;etag:e2", None),
        ("x.jpg", "size:10;etag:quoted-etag", None),
    ]


def test_plain_csv_byte_shards_never_split_a_quoted_newline(tmp_path: Path) -> None:
    lines = ["uri,size,etag,comment"]
    for i in range(300):
        comment = f'"line one\nline ""two"" of {i}"' if i % 3 == 0 else f"plain {i}"
        lines.append(f"s3://b/raw/{i % 5}/{i:04d}.jpg,{i},e{i},{comment}")
    manifest = tmp_path / "images.csv"
    manifest.write_text("\n".join(lines) + "\n")
    whole = _listed(_plan(manifest, FAKE_S3), FAKE_S3)
    shards = _plan(manifest, FAKE_S3, shard_bytes=500)
    assert len(shards) > 20 and all(isinstance(s, CsvShard) for s in shards)
    sharded = _listed(shards, FAKE_S3)
    assert len(whole) == 300 and sorted(sharded, key=lambda r: r.uri) == sorted(whole, key=lambda r: r.uri)


def test_gzip_csv_is_one_shard_listed_in_chunks(tmp_path: Path) -> None:
    rows = [
        ["inv-bucket", f"raw/{i:04d}.jpg", "1", "2024-01-01T00:00:00.000Z", ETAG, "STANDARD"]
        for i in range(250)
    ]
    (tmp_path / "inventory.csv.gz").write_bytes(gzip.compress(_inventory_csv(rows)))
    (shard,) = _plan(tmp_path / "inventory.csv.gz", FAKE_S3, shard_rows=100)
    assert isinstance(shard, CsvShard) and shard.compressed and shard.name.endswith("#rows=1-250")
    refs = list(shard.refs(FAKE_S3))
    assert [r.relpath for r in refs] == [f"{i:04d}.jpg" for i in range(250)]


def test_a_csv_of_plain_lines_is_a_text_manifest(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "sub" / "a.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"{tmp_path}/data/sub/a.png\n{tmp_path}/data/sub/b, c.png\n")
    assert all(isinstance(s, TextShard) for s in plan_shards(str(manifest)))
    refs = list(list_images(str(manifest)))
    assert [(r.uri, r.problem is None) for r in refs] == [
        (f"{tmp_path}/data/sub/b, c.png", False),  # does not exist
        (f"{tmp_path}/data/sub/a.png", True),
    ]


# ----------------------------------------------------------------------------------------------------------
# Text


def _text_manifest(tmp_path: Path, count: int) -> Path:
    for i in range(0, count, 10):
        _png(tmp_path / "data" / f"{i % 4}" / f"{i:04d}.png")
    lines = ["# comment", ""]
    for i in range(count):
        lines.append(f"../data/{i % 4}/{i:04d}.png" if i % 2 else f"   {tmp_path}/data/{i % 4}/{i:04d}.png  ")
    manifest = tmp_path / "lists" / "all.txt"
    manifest.parent.mkdir()
    manifest.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    return manifest


def test_text_manifest_sharded_by_bytes_lists_the_same_refs(tmp_path: Path) -> None:
    manifest = _text_manifest(tmp_path, 200)
    whole = _listed(_plan(manifest))
    shards = _plan(manifest, shard_bytes=256)
    assert len(shards) > 20 and all(isinstance(s, TextShard) for s in shards)
    lines = [(s.first_line, s.last_line) for s in shards if isinstance(s, TextShard)]
    assert lines[0][0] == 1 and lines[-1][1] == 202
    assert all(prev[1] + 1 == nxt[0] for prev, nxt in zip(lines, lines[1:], strict=False))
    sharded = _listed(shards)
    assert len(whole) == 200 and sorted(sharded, key=lambda r: r.uri) == sorted(whole, key=lambda r: r.uri)
    assert sum(r.problem is None for r in whole) == 20  # the others do not exist
    assert {r.relpath for r in whole if r.problem is None} == {
        f"{i % 4}/{i:04d}.png" for i in range(0, 200, 10)
    }


def test_text_manifest_line_numbers_count_across_shards(tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "".join(f"s3://b/k/{i}.jpg\n" for i in range(50)) + "s3://AKIA:secret-key-value@b/x.jpg\n"
    )
    with pytest.raises(ListingError, match="line 51 .* embeds credentials") as caught:
        _plan(manifest, FAKE_S3, shard_bytes=100)
    assert "secret-key-value" not in str(caught.value)
    manifest.write_text("".join(f"s3://b/k/{i}.jpg\n" for i in range(50)) + f"{tmp_path}/local.jpg\n")
    with pytest.raises(ListingError, match="more than one storage"):
        _plan(manifest, FAKE_S3, shard_bytes=100)


def test_text_manifest_keeps_the_old_rules(tmp_path: Path) -> None:
    """The rules of the whole-file manifest reader this module replaced, in the listing's sorted order."""
    for name, body in {"a.jpg": b"a", "sub/c d.jpeg": b"ccc", "sub/deeper/é ü.tif": b"dddd"}.items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(body)
    manifest = tmp_path / "data" / "lists" / "train.txt"
    manifest.parent.mkdir()
    manifest.write_text(
        "\ufeff# training images\n\n../sub/deeper/é ü.tif\n"
        f"{tmp_path}/data/sub/c d.jpeg\n   ../a.jpg   \n../a.jpg\n../missing.jpg\n../sub\n",
        encoding="utf-8",
    )
    refs = list(list_images(str(manifest)))
    assert [(r.relpath, r.size) for r in refs if r.problem is None] == [
        ("a.jpg", 1),
        ("sub/c d.jpeg", 3),
        ("sub/deeper/é ü.tif", 4),
    ]
    problems = _problems(refs)
    assert "does not exist" in problems[f"{tmp_path}/data/missing.jpg"]
    assert "folder" in problems[f"{tmp_path}/data/sub"]


def test_a_manifest_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"/a.jpg\n" * 100 + b"\xff\xfe\n")
    with pytest.raises(ListingError, match="not a folder, an image .* or a text manifest"):
        _plan(manifest, shard_bytes=64)


# ----------------------------------------------------------------------------------------------------------
# On S3


def test_manifests_on_s3_fingerprint_as_a_prefix_listing_does(s3_server: S3Server, s3_bucket: str) -> None:
    client, options = s3_server.client(), s3_server.storage_options
    for i in range(30):
        s3_server.put_object(s3_bucket, f"raw/{i % 3}/{i:03d}.jpg", b"x" * (i + 1))
    listed = {r.uri: r for r in list_images(f"s3://{s3_bucket}/raw/", options)}
    heads = {uri: client.head_object(Bucket=s3_bucket, Key=uri.split("/", 3)[3]) for uri in listed}
    keys = [uri.split("/", 3)[3] for uri in listed]
    parquet = io.BytesIO()
    pq.write_table(
        pa.table(
            {
                "bucket": [s3_bucket] * len(keys),
                "key": keys,
                "size": [heads[u]["ContentLength"] for u in listed],
                "e_tag": [heads[u]["ETag"] for u in listed],
            }
        ),
        parquet,
        row_group_size=7,
    )
    s3_server.put_object(s3_bucket, "lists/inventory.parquet", parquet.getvalue())
    shards = plan_shards(f"s3://{s3_bucket}/lists/inventory.parquet", options)
    assert len(shards) == 1  # 5 row groups of <= 7 rows make one shard
    pickled = pickle.loads(pickle.dumps(shards))
    refs = _listed(pickled, options)
    assert {r.uri: (r.relpath, r.fingerprint, r.size) for r in refs} == {
        uri: (ref.relpath, ref.fingerprint, ref.size) for uri, ref in listed.items()
    }
    small = _plan(f"s3://{s3_bucket}/lists/inventory.parquet", options, shard_rows=7)
    assert len(small) == 5 and sorted(r.uri for r in _listed(small, options)) == sorted(listed)


def test_text_and_csv_manifests_on_s3_in_byte_shards(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = s3_server.storage_options
    for i in range(40):
        s3_server.put_object(s3_bucket, f"raw/{i % 2}/{i:03d}.png", b"p" * (i + 1))
    text = "".join(
        f"../{i % 2}/{i:03d}.png\n" if i % 2 else f"s3://{s3_bucket}/raw/{i % 2}/{i:03d}.png\n"
        for i in range(40)
    )
    s3_server.put_object(s3_bucket, "raw/lists/images.txt", (text + "../gone.png\n").encode())
    inventory = _inventory_csv([[s3_bucket, f"raw/{i % 2}/{i:03d}.png", str(i + 1)] for i in range(40)])
    s3_server.put_object(s3_bucket, "raw/lists/inventory.csv", inventory)
    monkeypatch.setattr(manifests, "SHARD_BYTES", 200)
    text_shards = plan_shards(f"s3://{s3_bucket}/raw/lists/images.txt", options)
    csv_shards = plan_shards(f"s3://{s3_bucket}/raw/lists/inventory.csv", options)
    assert len(text_shards) > 5 and len(csv_shards) > 5
    text_refs, csv_refs = _listed(text_shards, options), _listed(csv_shards, options)
    expected = {f"s3://{s3_bucket}/raw/{i % 2}/{i:03d}.png": f"{i % 2}/{i:03d}.png" for i in range(40)}
    assert {r.uri: r.relpath for r in text_refs if r.problem is None} == expected
    assert all(r.fingerprint.startswith(f"size:{r.size};etag:") for r in text_refs if r.problem is None)
    assert _problems(text_refs) == {
        f"s3://{s3_bucket}/raw/gone.png": "listed in the manifest but does not exist"
    }
    # The inventory gives sizes but no ETag or time: its rows are looked up, and fingerprint as the text's.
    assert {r.uri: (r.relpath, r.fingerprint) for r in csv_refs} == {
        r.uri: (r.relpath, r.fingerprint) for r in text_refs if r.problem is None
    }


# ----------------------------------------------------------------------------------------------------------
# Scale


def _uri_columns(uris: Sequence[str]) -> dict[str, Any]:
    return {
        "uri": list(uris),
        "size": pa.array(range(len(uris)), pa.int64()),
        "etag": [f"e{i}" for i in range(len(uris))],
    }


def _sorted_relpaths(refs: Sequence[ImageRef]) -> bool:
    relpaths = [r.relpath for r in refs if r.problem is None]
    return relpaths == sorted(relpaths)


def _python_peak(work: Callable[[], Any]) -> int:
    """Peak bytes of Python objects allocated while `work` (a callable) runs."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Lists the shards of a manifest whose numbers are given (or all) in a fresh process: its peak RSS in KiB.
_LIST_IN_A_PROCESS = """
import resource, sys
from textseg.source.listing import plan_shards
shards = plan_shards(sys.argv[1], {"key": "k", "secret": "s"})
chosen = shards if sys.argv[2] == "all" else [shards[int(n)] for n in sys.argv[2].split(",")]
listed = sum(1 for shard in chosen for _ in shard.refs({"key": "k", "secret": "s"}))
print(listed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _listed_in_a_process(manifest: Path, which: str) -> tuple[int, int]:
    """(refs listed, peak RSS in KiB) of listing some shards of `manifest` in a fresh Python process."""
    done = subprocess.run(
        [sys.executable, "-c", _LIST_IN_A_PROCESS, str(manifest), which],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    listed, peak = done.stdout.split()
    return int(listed), int(peak)


def test_a_200k_row_parquet_manifest_is_planned_and_listed_in_bounded_memory(tmp_path: Path) -> None:
    count = 200_000
    keys = [f"raw/{i // 1000:03d}/tile_{i:06d}.jpg" for i in range(count)]
    etags = pc.binary_join_element_wise(
        pa.array([ETAG[:26]] * count), pa.array([f"{i:06x}" for i in range(count)]), ""
    )
    columns = {
        "bucket": pa.array(["big-bucket"] * count).dictionary_encode(),
        "key": keys,
        "size": pa.array(range(count), pa.int64()),
        "e_tag": etags,
    }
    manifest = _write_parquet(tmp_path / "inventory.parquet", columns, row_group_size=25_000)
    del keys, etags, columns
    shards: list[Shard] = []
    plan_peak = _python_peak(lambda: shards.extend(plan_shards(str(manifest), FAKE_S3)))
    assert len(shards) == 2  # of SHARD_ROWS rows
    assert plan_peak < 8 * 1024 * 1024  # no Python string per row (the keys alone take ~20 MB)

    listed = [(ref.relpath, ref.fingerprint, ref.problem) for shard in shards for ref in shard.refs(FAKE_S3)]
    expected = [
        (f"{i // 1000:03d}/tile_{i:06d}.jpg", f"size:{i};etag:{ETAG[:26]}{i:06x}", None) for i in range(count)
    ]
    assert listed == expected  # every row once; sorted within each shard (and here across them)

    # Listing both shards takes no more memory than listing one: it follows a shard, not the manifest
    # (holding all 200 k refs would take ~100 MB more).
    one, one_peak = _listed_in_a_process(manifest, "0")
    both, both_peak = _listed_in_a_process(manifest, "all")
    assert (one, both) == (count // 2, count)
    assert both_peak < one_peak + 30 * 1024
