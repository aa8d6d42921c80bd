"""GeoTIFF masks are Cloud Optimized GeoTIFFs: GDAL's COG rules hold, the palette, class names and nodata
survive, overviews are sampled nearest, and one window read over S3 fetches that window, not the file.

`cog_problems` checks what GDAL's `validate_cloud_optimized_geotiff.py` checks (its GDAL Python bindings are
not installed here), through what rasterio exposes of GDAL (the TIFF metadata domain: IFD and tile offsets),
plus a parse of the TIFF structure with `struct` that GDAL's script leaves to GDAL: every IFD before any
tile data.
"""

from __future__ import annotations

import json
import pathlib
import struct

import fsspec
import numpy as np
import pytest
import rasterio
import s3fs.core

from textseg.image import rasters
from textseg.image.rasters import MASK_NODATA, GeoRef, write_geotiff_mask
from textseg.image.windows import Window, grid_windows
from textseg.storage import filesystem_for
from textseg.training.synth import render_scene, synth_ontology

UTM_33N = "EPSG:32633"
BLOCK = 512
GHOST_PREFIX = b"GDAL_STRUCTURAL_METADATA_SIZE="
NO_OVERVIEWS_WARNING = "the file is larger than 512xH or Wx512; internal overviews are recommended"


# ----------------------------------------------------------------------------------------------------------
# The validator


def cog_problems(path: str | pathlib.Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a local file by the rules of GDAL's validate_cloud_optimized_geotiff.py.

    As the script (GDAL 3.x, `validate(ds, check_tiled=True, full_check=True)`): a GeoTIFF; over 512 px
    a side tiled and (warning) with internal overviews; the main IFD right after the header and GDAL's
    structural metadata ("ghost area"), none declared KNOWN_INCOMPATIBLE_EDITION; overviews by
    decreasing size, each tiled, their IFDs after the main one and in order; the first tile of the
    smallest overview after its IFD, each larger level's data after the smaller one's, full resolution
    last; and, as the ghost area promises, tiles in row-major order, each led by its size as a uint4 and
    trailed by its last 4 bytes repeated. Also, from the TIFF structure itself: all IFDs precede all
    tile data (LAYOUT=IFDS_BEFORE_DATA).
    """
    errors: list[str] = []
    warnings: list[str] = []
    with rasterio.open(path) as ds:
        if ds.driver != "GTiff":
            return [f"the file is not a GeoTIFF but {ds.driver}"], []
        width, height = ds.width, ds.height
        levels = [_level(ds, path, None)] + [_level(ds, path, i) for i in range(len(ds.overviews(1)))]
    raw = pathlib.Path(path).read_bytes()
    bigtiff = raw[2:4] in (b"+\x00", b"\x00+")
    main = levels[0]
    if width > 512 or height > 512:
        if main["block"][1] == width and main["block"][1] > 1024:
            errors.append("the file is larger than 512xH or Wx512 but not tiled")
        if len(levels) == 1:
            warnings.append(NO_OVERVIEWS_WARNING)

    ghost = ""
    expected_ifd = 16 if bigtiff else 8
    if main["ifd"] not in (8, 16):
        if raw[expected_ifd : expected_ifd + len(GHOST_PREFIX)] == GHOST_PREFIX:
            start = expected_ifd + len(GHOST_PREFIX)
            size = int(raw[start : start + 6])
            pattern_len = len(GHOST_PREFIX) + len("000000 bytes\n")
            ghost = raw[expected_ifd + pattern_len : expected_ifd + pattern_len + size].decode("latin-1")
            if "KNOWN_INCOMPATIBLE_EDITION=YES" in ghost:
                errors.append("KNOWN_INCOMPATIBLE_EDITION=YES is declared in the file")
            expected_ifd += pattern_len + size
            expected_ifd += expected_ifd % 2  # an IFD starts on a word boundary
        if main["ifd"] != expected_ifd:
            errors.append(f"the main IFD should be at {expected_ifd}, it is at {main['ifd']}")

    for i, level in enumerate(levels[1:]):
        bigger = levels[i]
        if level["width"] > bigger["width"] or level["height"] > bigger["height"]:
            errors.append(f"overview {i} is larger than the level before it")
        if level["block"][1] == level["width"] and level["block"][1] > 1024:
            errors.append(f"overview {i} is not tiled")
        if level["ifd"] < bigger["ifd"]:
            errors.append(f"the IFD of overview {i} ({level['ifd']}) precedes the one before it")

    firsts = [_first_offset(level) for level in levels]
    if firsts[-1] and firsts[-1] < levels[-1]["ifd"]:
        errors.append("the first tile of the smallest level precedes its IFD")
    for i in range(len(firsts) - 2, 0, -1):
        if firsts[i] and firsts[i] < firsts[i + 1]:
            errors.append(f"the data of overview {i - 1} precedes that of overview {i}")
    if len(firsts) >= 2 and firsts[0] and firsts[0] < firsts[1]:
        errors.append("the full-resolution data precedes the smallest overview's")

    row_major = "BLOCK_ORDER=ROW_MAJOR" in ghost
    leader = "BLOCK_LEADER=SIZE_AS_UINT4" in ghost
    trailer = "BLOCK_TRAILER=LAST_4_BYTES_REPEATED" in ghost
    for name, level in zip(["main", *(f"overview {i}" for i in range(len(levels) - 1))], levels, strict=True):
        last = 0
        for (x, y), (offset, size) in level["tiles"].items():
            if not offset:
                continue
            if row_major and offset < last:
                errors.append(f"{name}: tile ({x}, {y}) precedes the one before it")
            if leader and struct.unpack("<I", raw[offset - 4 : offset])[0] != size:
                errors.append(f"{name}: tile ({x}, {y}) is not led by its size")
            if trailer and size >= 4 and raw[offset + size - 4 : offset + size] != raw[offset + size :][:4]:
                errors.append(f"{name}: tile ({x}, {y}) is not trailed by its last 4 bytes")
            last = offset

    ifds, data_start = tiff_structure(raw)
    if max(ifds) >= data_start:
        errors.append(f"an IFD at {max(ifds)} follows tile data starting at {data_start}")
    return errors, warnings


def _level(ds: rasterio.io.DatasetReader, path: str | pathlib.Path, ovr: int | None) -> dict:
    """IFD offset, size, block shape and {(x, y): (tile offset, tile size)} of the image or an overview."""
    if ovr is None:
        width, height, block = ds.width, ds.height, ds.block_shapes[0]
    else:
        with rasterio.open(path, overview_level=ovr) as level:
            width, height, block = level.width, level.height, level.block_shapes[0]
    rows, cols = -(-height // block[0]), -(-width // block[1])

    def item(name: str) -> int:
        return int(ds.get_tag_item(name, "TIFF", bidx=1, ovr=ovr) or 0)

    tiles = {
        (x, y): (item(f"BLOCK_OFFSET_{x}_{y}"), item(f"BLOCK_SIZE_{x}_{y}"))
        for y in range(rows)
        for x in range(cols)
    }
    return {"ifd": item("IFD_OFFSET"), "width": width, "height": height, "block": block, "tiles": tiles}


def _first_offset(level: dict) -> int:
    """The offset of the first tile with data in row-major order, 0 when none has (the script's rule)."""
    return next((offset for offset, _ in level["tiles"].values() if offset), 0)


def tiff_structure(raw: bytes) -> tuple[list[int], int]:
    """(offsets of every IFD in the chain, the smallest tile data offset), parsed from the TIFF bytes."""
    order = "<" if raw[:2] == b"II" else ">"
    bigtiff = struct.unpack(order + "H", raw[2:4])[0] == 43
    if bigtiff:
        head, entry, count_fmt, offset_fmt = 16, 20, "Q", "Q"
        offset = struct.unpack(order + "Q", raw[8:16])[0]
    else:
        head, entry, count_fmt, offset_fmt = 8, 12, "H", "I"
        offset = struct.unpack(order + "I", raw[4:8])[0]
    sizes = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8: the types tile offsets come in
    ifds: list[int] = []
    data_offsets: list[int] = []
    while offset:
        assert offset >= head, f"an IFD inside the header, at {offset}"
        ifds.append(offset)
        count_size = struct.calcsize(count_fmt)
        (entries,) = struct.unpack(order + count_fmt, raw[offset : offset + count_size])
        for k in range(entries):
            at = offset + count_size + k * entry
            tag, kind = struct.unpack(order + "HH", raw[at : at + 4])
            (count,) = struct.unpack(order + offset_fmt, raw[at + 4 : at + 4 + struct.calcsize(offset_fmt)])
            if tag != 324:  # TileOffsets
                continue
            field = at + 4 + struct.calcsize(offset_fmt)
            item_size = sizes[kind]
            value_at = field  # values that fit the field are inline, else the field holds their offset
            if count * item_size > struct.calcsize(offset_fmt):
                (value_at,) = struct.unpack(
                    order + offset_fmt, raw[field : field + struct.calcsize(offset_fmt)]
                )
            item_fmt = {2: "H", 4: "I", 8: "Q"}[item_size]
            values = struct.unpack(order + item_fmt * count, raw[value_at : value_at + item_size * count])
            data_offsets += [v for v in values if v]
        next_at = offset + count_size + entries * entry
        (offset,) = struct.unpack(order + offset_fmt, raw[next_at : next_at + struct.calcsize(offset_fmt)])
    return ifds, min(data_offsets)


# ----------------------------------------------------------------------------------------------------------
# Fixtures


def _georef(width: int, height: int) -> GeoRef:
    return GeoRef(UTM_33N, (0.5, 0.0, 500000.0, 0.0, -0.5, 6000000.0), width, height)


def _stripes(width: int, height: int) -> np.ndarray:
    """1-px columns of class 1 or 3 at random (an average of neighbours would make 2), rows of class 4 at
    random, and a corner of no-data: a mask whose overviews show whether they were averaged."""
    rng = np.random.default_rng(1)
    labels = np.where(rng.random(width) < 0.5, 1, 3).astype(np.uint8)[None, :].repeat(height, axis=0)
    labels[rng.random(height) < 0.3] = 4
    labels[-50:, -70:] = MASK_NODATA
    return labels


def _under(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width, 256) bool: whether value v occurs in the part of `labels` under overview pixel (i, j)
    (the mask split into height x width near-equal cells)."""
    rows = np.floor(np.arange(height) * labels.shape[0] / height).astype(int)
    cols = np.floor(np.arange(width) * labels.shape[1] / width).astype(int)
    present = np.zeros((height, width, 256), bool)
    for value in np.unique(labels):
        cells = np.maximum.reduceat((labels == value).astype(np.uint8), rows, axis=0)
        present[:, :, value] = np.maximum.reduceat(cells, cols, axis=1).astype(bool)
    return present


def _scene_mask(side: int) -> np.ndarray:
    """A realistic class mask (synthetic buildings, roads, water, trees), 1024 px rendered once and tiled."""
    _, mask = render_scene(np.random.default_rng(3), 1024, 1024)
    tiles = [np.rot90(mask, k) for k in range(4)]
    rows = [np.hstack([tiles[(r + c) % 4] for c in range(side // 1024)]) for r in range(side // 1024)]
    return np.ascontiguousarray(np.vstack(rows))


def _blocks(labels: np.ndarray, block: int = BLOCK):
    height, width = labels.shape
    return ((window, labels[window.slices]) for window in grid_windows(width, height, block))


# ----------------------------------------------------------------------------------------------------------
# Tests


def test_mask_is_a_valid_cog_with_palette_class_names_and_nearest_overviews(tmp_path: pathlib.Path) -> None:
    ontology = synth_ontology()
    labels = _stripes(2100, 1300)
    path = tmp_path / "masks" / "scene.tif"
    write_geotiff_mask(
        fsspec.filesystem("file"),
        str(path),
        _georef(2100, 1300),
        _blocks(labels),
        ontology.palette(),
        class_names=ontology.class_names,
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["scene.tif"]  # no staging file is left
    assert cog_problems(path) == ([], [])
    with rasterio.open(path) as mask:
        assert mask.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert mask.compression.name == "deflate" and mask.profile["tiled"]
        assert mask.block_shapes == [(BLOCK, BLOCK)] and mask.nodata == MASK_NODATA
        np.testing.assert_array_equal(mask.read(1), labels)
        assert json.loads(mask.tags()["class_names"]) == ontology.class_names
        assert mask.descriptions == ("class",)
        palette = ontology.palette()
        colormap = mask.colormap(1)
        assert all(colormap[i][:3] == tuple(palette[3 * i : 3 * i + 3]) for i in range(256))
        assert mask.colorinterp[0] == rasterio.enums.ColorInterp.palette
        assert mask.overviews(1) == [2, 4, 8]  # 2100 / 8 = 263: one block holds the smallest
        assert mask.crs.to_epsg() == 32633
    for level in range(3):
        with rasterio.open(path, overview_level=level) as overview:
            pixels = overview.read(1)
            assert set(np.unique(pixels).tolist()) == {1, 3, 4, MASK_NODATA}  # never 2: nothing averaged
            # Nearest: each overview pixel is a value of a mask pixel under it.
            under = _under(labels, *pixels.shape)
            rows, cols = np.indices(pixels.shape)
            assert under[rows, cols, pixels].all()
            assert overview.block_shapes == [(BLOCK, BLOCK)] and overview.nodata == MASK_NODATA
            assert overview.colormap(1) == colormap


def test_a_mask_within_one_block_is_a_cog_without_overviews(tmp_path: pathlib.Path) -> None:
    labels = _stripes(300, 200)
    path = tmp_path / "small.tif"
    write_geotiff_mask(fsspec.filesystem("file"), str(path), _georef(300, 200), _blocks(labels), [0] * 768)
    assert cog_problems(path) == ([], [])
    with rasterio.open(path) as mask:
        assert mask.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and mask.overviews(1) == []
        assert "class_names" not in mask.tags()  # none given, none claimed
        np.testing.assert_array_equal(mask.read(1), labels)


def test_a_failed_mask_write_leaves_no_file(tmp_path: pathlib.Path) -> None:
    def failing():
        yield Window(0, 0, BLOCK, BLOCK), np.zeros((BLOCK, BLOCK), np.uint8)
        raise RuntimeError("the model crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_geotiff_mask(
            fsspec.filesystem("file"), str(tmp_path / "m.tif"), _georef(1024, 1024), failing(), [0] * 768
        )
    assert list(tmp_path.iterdir()) == []


def test_validator_flags_the_plain_geotiffs_textseg_wrote_before(tmp_path: pathlib.Path) -> None:
    """The validator is not vacuous: a tiled GeoTIFF as `write_geotiff_rgb` writes it (no overviews) gets
    GDAL's warning, and one given overviews afterwards, as `gdaladdo` would, has them after the full
    resolution data: not a COG."""
    path = tmp_path / "plain.tif"
    profile = rasters._geotiff_profile(_georef(2048, 2048), count=1, block_size=BLOCK)
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(_stripes(2048, 2048), 1)
    assert cog_problems(path) == ([], [NO_OVERVIEWS_WARNING])
    with rasterio.open(path, "r+") as dataset:
        dataset.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    errors, _ = cog_problems(path)
    assert "the full-resolution data precedes the smallest overview's" in errors
    assert any(error.startswith("an IFD at") for error in errors)
    with rasterio.open(path) as plain:
        assert "LAYOUT" not in plain.tags(ns="IMAGE_STRUCTURE")


def test_one_window_over_s3_fetches_that_window_not_the_file(
    tmp_path: pathlib.Path, s3_server, s3_bucket, monkeypatch
) -> None:
    side = 4096
    labels = _scene_mask(side)
    ontology = synth_ontology()
    fs, path = filesystem_for(f"s3://{s3_bucket}/masks/scene.tif", s3_server.storage_options)
    write_geotiff_mask(
        fs, path, _georef(side, side), _blocks(labels), ontology.palette(), class_names=ontology.class_names
    )
    size = fs.size(path)
    fs.get_file(path, str(tmp_path / "copy.tif"))
    assert cog_problems(tmp_path / "copy.tif") == ([], [])
    window = Window(1536, 2048, BLOCK, BLOCK)
    with rasterio.open(tmp_path / "copy.tif") as copy:
        header = _first_offset(_level(copy, tmp_path / "copy.tif", len(copy.overviews(1)) - 1))
        tile = int(copy.get_tag_item(f"BLOCK_SIZE_{window.x0 // BLOCK}_{window.y0 // BLOCK}", "TIFF", bidx=1))

    fetched: list[tuple[int, int]] = []
    fetch_range = s3fs.core.S3File._fetch_range

    def counting_fetch_range(self, start, end):
        fetched.append((start, end))
        return fetch_range(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting_fetch_range)
    with rasters._open_raster(fs, path) as mask:
        at_open = len(fetched)
        np.testing.assert_array_equal(mask.read(1, window=window.to_rasterio()), labels[window.slices])
    window_bytes = sum(end - start for start, end in fetched)
    print(f"one {BLOCK} px window of a {size} B mask COG: {len(fetched)} requests, {window_bytes} B")
    assert at_open == 1 and len(fetched) <= 3  # the header, then the tile
    # The IFDs, the tile, and fsspec's read-ahead past each of the two: an eighth of the file.
    assert window_bytes <= header + tile + 2 * rasters.GDAL_READ_AHEAD < size / 8

    fetched.clear()
    with rasters._open_raster(fs, path) as mask:  # a zoomed-out view: GDAL picks the 512 px overview
        overview = mask.read(1, out_shape=(BLOCK, BLOCK))
    overview_bytes = sum(end - start for start, end in fetched)
    print(f"the {BLOCK} px overview: {len(fetched)} requests, {overview_bytes} B")
    assert overview_bytes < size / 8 and len(fetched) <= 4
    assert set(np.unique(overview).tolist()) <= set(np.unique(labels).tolist())
