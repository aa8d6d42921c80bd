"""STAC as SOURCE: items, catalog trees and saved search results listed by their items' assets."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine

import textseg
from textseg.cli import build_parser, label_config_from_args
from textseg.config import from_mapping
from textseg.source.listing import ListingError, list_images, plan_shards
from textseg.source.refs import local_fingerprint
from textseg.source.stac import StacLinksShard, StacTreeShard
from textseg.storage import filesystem_for

PROPERTIES = {"datetime": "2023-06-01T10:20:30Z", "platform": "sentinel-2a", "eo:cloud_cover": 12.5}


def write_tif(path: pathlib.Path, seed: int, size: int = 64) -> bytes:
    """A small georeferenced RGB GeoTIFF (UTM 33N, 0.5 m pixels); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (3, size, size), dtype=np.uint8)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 6000000.0),
    }
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(pixels)
    return path.read_bytes()


def item(
    item_id: str,
    assets: dict[str, dict[str, Any]],
    collection: str | None = "sentinel-2",
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "geometry": None,
        "properties": dict(PROPERTIES if properties is None else properties),
        "links": [],
        "assets": assets,
    }
    if collection is not None:
        doc["collection"] = collection
    return doc


def catalog(kind: str, catalog_id: str, links: list[tuple[str, str]]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": kind,
        "stac_version": "1.0.0",
        "id": catalog_id,
        "description": catalog_id,
        "links": [{"rel": rel, "href": href} for rel, href in links],
    }
    if kind == "Collection":
        doc |= {"license": "CC-BY-4.0", "extent": {"spatial": {"bbox": [[0, 0, 1, 1]]}, "temporal": {}}}
    return doc


def search_page(features: list[dict[str, Any]], next_href: str | None = None) -> dict[str, Any]:
    links = [{"rel": "self", "href": "https://stac.example/search"}]
    if next_href is not None:
        links.append({"rel": "next", "href": next_href, "method": "GET"})
    return {"type": "FeatureCollection", "features": features, "links": links}


def write_json(path: pathlib.Path, doc: Any) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def tif_asset(href: str, **extra: Any) -> dict[str, Any]:
    return {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized", **extra}


def by_id(refs: list[Any]) -> dict[str, Any]:
    """Refs keyed by their item's id (from `properties`, which problem refs carry too)."""
    return {json.loads(ref.properties)["id"]: ref for ref in refs}


def test_an_item_file_lists_its_visual_asset_named_by_collection_and_id(tmp_path):
    write_tif(tmp_path / "scenes" / "T33UUU.tif", 0)
    assets = {
        "visual": tif_asset("../scenes/T33UUU.tif", **{"file:size": 1234, "file:checksum": "1220abcd"}),
        "thumbnail": {"href": "thumb.png", "type": "image/png", "roles": ["thumbnail"]},
    }
    source = write_json(tmp_path / "items" / "item.json", item("S2A_T33UUU_20230601", assets))
    (ref,) = list(list_images(str(source)))
    assert ref.problem is None
    assert ref.uri == str(tmp_path / "scenes" / "T33UUU.tif")
    assert ref.relpath == "sentinel-2/S2A_T33UUU_20230601.tif"
    assert (ref.fingerprint, ref.size) == ("size:1234;etag:1220abcd", 1234)
    assert json.loads(ref.properties) == {
        "id": "S2A_T33UUU_20230601",
        "collection": "sentinel-2",
        **PROPERTIES,
    }


def test_a_catalog_collection_item_tree_with_relative_hrefs_lists_every_item_once(tmp_path):
    """catalog -> collections -> items, one collection nested deeper than planning reads; a child link back
    to the root and a child that does not exist. Any sharding lists the same refs."""
    root = tmp_path / "stac"
    write_json(
        root / "catalog.json",
        catalog(
            "Catalog",
            "root",
            [("self", "https://x/catalog.json"), ("child", "./landsat/collection.json"),
             ("child", "sentinel-2/collection.json"), ("child", "missing/catalog.json")],
        ),
    )  # fmt: skip
    write_json(
        root / "sentinel-2" / "collection.json",
        catalog(
            "Collection",
            "sentinel-2",
            [("item", "items/a/a.json"), ("item", "./items/b/b.json"), ("child", "../catalog.json"),
             ("child", "more/catalog.json"), ("parent", "../catalog.json")],
        ),
    )  # fmt: skip
    write_json(
        root / "sentinel-2" / "more" / "catalog.json", catalog("Catalog", "more", [("child", "x/c.json")])
    )
    write_json(
        root / "sentinel-2" / "more" / "x" / "c.json", catalog("Collection", "deep", [("item", "d.json")])
    )
    write_json(root / "landsat" / "collection.json", catalog("Collection", "landsat", [("item", "l.json")]))
    data = tmp_path / "data"
    items = {
        "sentinel-2/items/a/a.json": item("a", {"visual": tif_asset("../../../../data/a.tif")}),
        "sentinel-2/items/b/b.json": item("b", {"visual": tif_asset(str(data / "b.tif"))}),
        "sentinel-2/more/x/d.json": item("d", {"visual": tif_asset("d.tif")}, collection="deep"),
        "landsat/l.json": item("l", {"visual": tif_asset(f"file://{data / 'l.tif'}")}, collection="landsat"),
    }
    for name, doc in items.items():
        write_json(root / name, doc)
    expected_ok = {
        "sentinel-2/a.tif": str(tmp_path / "data" / "a.tif"),
        "sentinel-2/b.tif": str(tmp_path / "data" / "b.tif"),
        "deep/d.tif": str(root / "sentinel-2" / "more" / "x" / "d.tif"),
        "landsat/l.tif": str(tmp_path / "data" / "l.tif"),
    }
    source = str(root / "catalog.json")
    listings = {}
    for target in (256, 1):
        shards = plan_shards(source, target=target)
        pickle.loads(pickle.dumps(shards))  # shards travel to Ray listing tasks
        refs = [ref for shard in shards for ref in shard.refs(None)]
        ok = {ref.relpath: ref.uri for ref in refs if ref.problem is None}
        (missing,) = [ref for ref in refs if ref.problem is not None]
        assert ok == expected_ok
        assert missing.uri == str(root / "missing" / "catalog.json") and "does not exist" in missing.problem
        listings[target] = (shards, sorted(refs, key=lambda ref: ref.uri))
    assert listings[256][1] == listings[1][1]
    planned, trees = listings[256][0], listings[1][0]
    assert {type(shard) for shard in planned} == {StacLinksShard, StacTreeShard}  # `more/` is below planning
    assert f"stac-tree:{root / 'sentinel-2' / 'collection.json'}" in {shard.name for shard in trees}


def test_a_saved_search_result_follows_saved_next_pages_and_lists_http_assets_without_requests(
    tmp_path, caplog
):
    write_tif(tmp_path / "data" / "p1.tif", 1)
    first = search_page(
        [
            item("p1", {"visual": tif_asset(str(tmp_path / "data" / "p1.tif"))}),
            item("p1", {"visual": tif_asset(str(tmp_path / "data" / "p1.tif"))}),  # the same item twice
            item("p1", {"visual": tif_asset(str(tmp_path / "other" / "p1.tif"))}),  # another with its id
            item("web", {"visual": tif_asset("https://stac.example.invalid/web.tif?sig=SECRET")}),
        ],
        next_href="pages/2.json",
    )
    second = search_page(
        [
            item("twin", {"visual": tif_asset("twin.tif")}, collection="c"),
            item("twin", {"visual": {"href": "twin.png", "type": "image/png"}}, collection="c"),
            item("free", {"visual": tif_asset("free.tif")}, collection=None),
        ],
        next_href="https://stac.example.invalid/search?page=3",
    )
    write_json(tmp_path / "search.json", first)
    write_json(tmp_path / "pages" / "2.json", second)
    with caplog.at_level(logging.WARNING, logger="textseg.source.stac"):
        shards = plan_shards(str(tmp_path / "search.json"))
        refs = [ref for shard in shards for ref in shard.refs(None)]
    assert [shard.name for shard in shards] == [
        f"stac:{tmp_path / 'search.json'}",
        f"stac:{tmp_path / 'pages' / '2.json'}",
    ]
    assert "an API request rather than a saved page" in caplog.text
    assert [(ref.relpath, ref.problem is None) for ref in refs] == [
        ("", False),  # the second p1 with another asset
        ("sentinel-2/p1.tif", True),
        ("sentinel-2/web.tif", True),
        ("c/twin.png", False),
        ("c/twin.tif", False),
        ("free.tif", True),
    ]
    assert "same collection and id" in refs[0].problem and refs[0].uri == str(tmp_path / "other" / "p1.tif")
    web = refs[2]
    assert web.uri == "https://stac.example.invalid/web.tif"  # listed, never fetched; no secret kept
    assert web.fingerprint == f"size:0;mtime:{PROPERTIES['datetime']}"
    assert refs[3].problem == "mask name collision with 'c/twin.tif'"
    assert refs[5].uri == str(tmp_path / "pages" / "free.tif")


B04_B08 = {"B04": tif_asset("b4.tif", roles=["data"]), "B08": tif_asset("b8.tif", roles=["data"])}
THUMBNAIL = {"href": "t.png", "type": "image/png", "roles": ["thumbnail"]}
VISUAL_B08 = {"visual": tif_asset("v.tif"), "B08": tif_asset("b8.tif")}


@pytest.mark.parametrize(
    ("assets", "asked", "relpath", "problem"),
    [
        ({"visual": tif_asset("v.tif"), **B04_B08}, None, "s/x.tif", None),
        ({"B04": {"href": "b4.jp2", "roles": ["data"]}, "thumbnail": THUMBNAIL}, None, "s/x.jp2", None),
        (
            {"image": {"href": "i.png", "type": "image/png"}, "meta": {"href": "m.json"}},
            None,
            "s/x.png",
            None,
        ),
        (B04_B08, None, "", "no 'visual' asset and 2 image or data assets (B04, B08)"),
        ({"meta": {"href": "m.xml", "roles": ["metadata"]}}, None, "", "no image or data asset"),
        ({}, None, "", "(its assets: none)"),
        (VISUAL_B08, "B08", "s/x.tif", None),
        (VISUAL_B08, "B04", "", "has no asset 'B04' (its assets: B08, visual)"),
    ],
)
def test_asset_selection_rules(tmp_path, assets, asked, relpath, problem):
    (tmp_path / "v.tif").write_bytes(b"")
    source = write_json(tmp_path / "item.json", item("x", assets, collection="s"))
    (ref,) = list(list_images(str(source), stac_asset=asked))
    assert ref.relpath == relpath
    if problem is None:
        assert ref.problem is None
    else:
        assert problem in ref.problem and ref.uri == str(source) and json.loads(ref.properties)["id"] == "x"


def test_an_item_that_says_nothing_of_its_file_is_looked_up_and_a_bad_item_is_a_problem_ref(tmp_path):
    write_tif(tmp_path / "range.tif", 2)
    span = {
        "datetime": None,
        "start_datetime": "2020-01-01T00:00:00Z",
        "end_datetime": "2020-12-31T00:00:00Z",
    }
    features = [
        item("range", {"visual": tif_asset("range.tif")}, properties=span),
        item("gone", {"visual": tif_asset("gone.tif")}, properties=span),
        {"type": "Feature", "stac_version": "1.0.0", "id": "bad", "links": [], "assets": {}},  # no properties
        item("../up", {"visual": tif_asset("up.tif")}, collection=None),
    ]
    source = write_json(tmp_path / "search.json", search_page(features))
    refs = list(list_images(str(source)))
    ok = [ref for ref in refs if ref.problem is None]
    assert [(ref.relpath, ref.fingerprint) for ref in ok] == [
        ("sentinel-2/range.tif", local_fingerprint(os.stat(tmp_path / "range.tif")))
    ]
    problems = {ref.uri: ref.problem for ref in refs if ref.problem is not None}
    assert "does not exist" in problems[str(tmp_path / "gone.tif")]
    assert problems[f"{source}#/features/2"].startswith("not a valid STAC item: KeyError")
    assert "'..' segment" in problems[str(tmp_path / "up.tif")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        (json.dumps({"type": "Feature", "geometry": None, "properties": {}}), "is JSON but not STAC"),
        (json.dumps({"type": "Topology"}), "its top-level 'type' is 'Topology'"),
    ],
)
def test_a_json_source_that_is_not_stac_is_a_listing_error(tmp_path, content, message):
    (tmp_path / "source.json").write_text(content)
    with pytest.raises(ListingError, match=message):
        plan_shards(str(tmp_path / "source.json"))


def test_stac_asset_is_an_option_of_the_cli_and_of_job_files():
    args = build_parser(options_for=["label"]).parse_args(
        ["label", "catalog.json", "out", "--prompts", "a", "--stac-asset", "visual"]
    )
    assert label_config_from_args(args).stac_asset == "visual"
    values = {"source": "catalog.json", "dest": "out", "prompts": "a", "stac-asset": "B04"}
    assert from_mapping(values).stac_asset == "B04"


def test_label_a_stac_catalog_on_s3_end_to_end(tmp_path, s3_server, s3_bucket, tiny_clipseg_dir):
    """Catalog, collection, items and COGs in a bucket; items with an `image` and a `nir` asset, so only
    --stac-asset picks one; an item without `image` is an error row naming its assets."""
    options = s3_server.storage_options
    fs, _ = filesystem_for(f"s3://{s3_bucket}", options)
    root = f"{s3_bucket}/stac"
    for name, seed in (("one", 3), ("two", 4)):
        fs.pipe_file(f"{root}/scenes/{name}.tif", write_tif(tmp_path / f"{name}.tif", seed))
    documents = {
        "catalog.json": catalog("Catalog", "root", [("child", "sentinel-2/collection.json")]),
        "sentinel-2/collection.json": catalog(
            "Collection",
            "sentinel-2",
            [("item", "items/one.json"), ("item", "items/two.json"), ("item", "items/three.json")],
        ),
        "sentinel-2/items/one.json": item(
            "S2A_one", {"image": tif_asset("../../scenes/one.tif"), "nir": tif_asset("nir1.tif")}
        ),
        "sentinel-2/items/two.json": item(
            "S2A_two",
            {"image": tif_asset(f"s3://{root}/scenes/two.tif"), "nir": tif_asset("nir2.tif")},
            properties={**PROPERTIES, "platform": "sentinel-2b"},
        ),
        "sentinel-2/items/three.json": item("S2A_three", {"nir": tif_asset("nir3.tif")}),
    }
    for name, doc in documents.items():
        fs.pipe_file(f"{root}/{name}", json.dumps(doc).encode())
    dest = f"s3://{s3_bucket}/labels"
    summary = textseg.label(
        f"s3://{root}/catalog.json",
        dest,
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="a,b",
        device="cpu",
        stac_asset="image",
        max_error_rate=1.0,
        storage_options=options,
    )
    assert (summary.listed, summary.ok, summary.error) == (3, 2, 1)
    table = pq.read_table(
        f"{s3_bucket}/labels/metadata/{summary.run_id}", filesystem=filesystem_for(dest, options)[0]
    )
    rows = sorted(table.to_pylist(), key=lambda row: row["relpath"])
    assert [(row["relpath"], row["status"]) for row in rows] == [
        ("", "error"),
        ("sentinel-2/S2A_one.tif", "ok"),
        ("sentinel-2/S2A_two.tif", "ok"),
    ]
    assert "has no asset 'image' (its assets: nir)" in rows[0]["error"]
    assert rows[1]["source_uri"] == f"s3://{root}/scenes/one.tif"
    for row, platform in zip(rows[1:], ("sentinel-2a", "sentinel-2b"), strict=True):
        assert fs.exists(row["mask_uri"])
        properties = json.loads(row["source_properties"])
        assert (properties["datetime"], properties["platform"]) == (PROPERTIES["datetime"], platform)
        assert (properties["id"], properties["collection"]) == (row["relpath"][11:-4], "sentinel-2")
