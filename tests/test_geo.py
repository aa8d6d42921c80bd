"""Georeferencing: GeoTIFF CRS/transform round trips, windowed reads, XYZ bounds, GeoTIFF masks, memory."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import fsspec
import numpy as np
import pytest
from PIL import Image

rasterio = pytest.importorskip("rasterio")
pyproj = pytest.importorskip("pyproj")

from affine import Affine  # noqa: E402
from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402

from textseg.image.rasters import (  # noqa: E402
    WEB_MERCATOR_HALF_EXTENT,
    GeoRef,
    MissingGeoDependency,
    lazy_import,
    read_georef,
    read_window_rgb,
    scene_size,
    scene_value_range,
    write_geotiff_mask,
    xyz_georef,
    xyz_tile,
)
from textseg.image.windows import Window, grid_windows, tile_windows  # noqa: E402
from textseg.ontology import from_prompts  # noqa: E402
from textseg.storage import filesystem_for  # noqa: E402

UTM_33N = "EPSG:32633"
ORIGIN = (500000.0, 6000000.0)
PIXEL = 0.5


def _write_tiff(path: pathlib.Path, samples: np.ndarray, crs: str | None = UTM_33N, **options) -> None:
    """samples: (bands, H, W) of any dtype -> a tiled, compressed GeoTIFF with a real CRS and transform."""
    bands, height, width = samples.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": bands,
        "dtype": samples.dtype.name,
        "tiled": True,
        "blockxsize": 64,
        "blockysize": 64,
        "compress": "deflate",
    }
    if crs is not None:
        profile |= {"crs": crs, "transform": Affine(PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])}
    colorinterp = options.pop("colorinterp", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # crs=None: a plain TIFF on purpose
        with rasterio.open(path, "w", **(profile | options)) as dataset:
            dataset.write(samples)
            if colorinterp is not None:
                dataset.colorinterp = colorinterp


def _local(path: pathlib.Path) -> tuple[fsspec.AbstractFileSystem, str]:
    return filesystem_for(str(path))


# ----------------------------------------------------------------------------------------------------------
# GeoRef and read_georef


def test_read_georef_round_trips_crs_and_transform(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "scene.tif"
    _write_tiff(path, np.zeros((3, 200, 300), np.uint8))
    georef = read_georef(*_local(path))
    assert georef == GeoRef(UTM_33N, (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1]), 300, 200)
    assert georef.bounds == (500000.0, 6000000.0 - 100.0, 500000.0 + 150.0, 6000000.0)
    west, south, east, north = georef.bounds_wgs84
    assert 14.9 < west < east < 15.1 and 54.1 < south < north < 54.2  # UTM 33N, 15 E central meridian


def test_read_georef_keeps_wkt_for_a_crs_without_epsg_code(tmp_path: pathlib.Path) -> None:
    custom = (
        "+proj=aea +lat_1=29.5 +lat_2=45.5 +lat_0=37.5 +lon_0=-97.123 +x_0=0 +y_0=0 +datum=WGS84 +units=m"
    )
    path = tmp_path / "custom.tif"
    _write_tiff(path, np.zeros((1, 32, 32), np.uint8), crs=custom)
    georef = read_georef(*_local(path))
    assert not georef.crs.startswith("EPSG:")
    assert pyproj.CRS.from_user_input(georef.crs).equals(
        pyproj.CRS.from_proj4(custom), ignore_axis_order=True
    )


def test_read_georef_is_none_for_images_without_georeferencing(tmp_path: pathlib.Path) -> None:
    png = tmp_path / "plain.png"
    Image.new("RGB", (40, 30), "red").save(png)
    tif = tmp_path / "plain.tif"
    _write_tiff(tif, np.zeros((1, 30, 40), np.uint8), crs=None)
    assert read_georef(*_local(png)) is None
    assert read_georef(*_local(tif)) is None


def test_window_georef_moves_the_origin_and_keeps_the_pixel_size() -> None:
    georef = GeoRef(UTM_33N, (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1]), 1000, 800)
    window = Window(300, 200, 256, 128)
    sub = georef.window_georef(window)
    assert (sub.width, sub.height) == (256, 128)
    assert sub.xy(0, 0) == georef.xy(300, 200) and sub.xy(256, 128) == georef.xy(556, 328)
    assert sub.transform[0] == PIXEL and sub.transform[4] == -PIXEL


# ----------------------------------------------------------------------------------------------------------
# XYZ tiles


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        ("15/17602/10746.png", (15, 17602, 10746)),
        ("tiles/esri/0/0/0.JPG", (0, 0, 0)),
        ("3/7/0.webp", (3, 7, 0)),
        ("a/b/c.png", None),
        ("3/8/0.png", None),  # x out of range for z=3
        ("3/0/8.png", None),
        ("1/0/0.txt", None),
        ("1/0/0@2x.png", None),
        ("0/0.png", None),
        ("-1/0/0.png", None),
    ],
)
def test_xyz_tile_parses_the_z_x_y_convention(relpath: str, expected: tuple[int, int, int] | None) -> None:
    assert xyz_tile(relpath) == expected


def test_xyz_bounds_of_known_tiles() -> None:
    world = xyz_georef(0, 0, 0, 256, 256)
    assert world.crs == "EPSG:3857"
    assert world.bounds == pytest.approx((-20037508.34, -20037508.34, 20037508.34, 20037508.34), abs=0.01)
    half = WEB_MERCATOR_HALF_EXTENT
    assert xyz_georef(1, 0, 0, 256, 256).bounds == pytest.approx((-half, 0, 0, half), abs=1e-6)  # north-west
    assert xyz_georef(1, 1, 0, 256, 256).bounds == pytest.approx((0, 0, half, half), abs=1e-6)  # north-east
    assert xyz_georef(1, 0, 1, 256, 256).bounds == pytest.approx((-half, -half, 0, 0), abs=1e-6)  # south-west
    assert xyz_georef(1, 1, 1, 512, 512).bounds == pytest.approx((0, -half, half, 0), abs=1e-6)  # south-east
    # z=15, Berlin: computed by hand with 40-digit decimals, s = 2 * pi * 6378137 / 2**15.
    tile = xyz_georef(15, 17602, 10746, 256, 256)
    expected = (1489604.8072215148, 6894008.4550966164, 1490827.7996740776, 6895231.4475491792)
    assert tile.bounds == pytest.approx(expected, abs=1e-6)
    assert tile.transform[0] == pytest.approx(1222.9924525628200 / 256)
    west, _, _, north = tile.bounds_wgs84  # the slippy-map formulas: lon = x / 2**z * 360 - 180, ...
    assert west == pytest.approx(17602 / 2**15 * 360 - 180, abs=1e-9)
    assert north == pytest.approx(
        math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 10746 / 2**15)))), abs=1e-9
    )


def test_xyz_georef_refuses_tiles_that_do_not_exist() -> None:
    with pytest.raises(ValueError, match="no XYZ tile"):
        xyz_georef(2, 4, 0, 256, 256)


# ----------------------------------------------------------------------------------------------------------
# Reading scenes


def test_scene_size_reads_headers_only(tmp_path: pathlib.Path) -> None:
    tif = tmp_path / "scene.tif"
    _write_tiff(tif, np.zeros((3, 70, 90), np.uint8))
    jpeg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a viewer shows it 30 wide, 50 tall
    Image.new("RGB", (50, 30)).save(jpeg, exif=exif.tobytes())
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"<html>not found</html>")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 10)
    assert scene_size(*_local(tif)) == (90, 70)
    assert scene_size(*_local(jpeg)) == (30, 50)
    assert scene_size(*_local(junk)) is None
    assert scene_size(*_local(broken)) is None


def _rgb_scene(width: int = 300, height: int = 200) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (3, height, width), dtype=np.uint8)


WINDOWS = [Window(0, 0, 300, 200), Window(10, 20, 64, 48), Window(236, 136, 64, 64), Window(63, 63, 2, 2)]


@pytest.mark.parametrize("window", WINDOWS)
def test_window_reads_equal_the_same_region_of_a_full_read(tmp_path: pathlib.Path, window: Window) -> None:
    samples = _rgb_scene()
    path = tmp_path / "rgb.tif"
    _write_tiff(path, samples)
    rgb, nodata = read_window_rgb(*_local(path), window)
    assert rgb.shape == (window.height, window.width, 3) and rgb.dtype == np.uint8 and nodata is None
    np.testing.assert_array_equal(rgb, np.moveaxis(samples, 0, -1)[window.slices])


def test_window_read_of_a_uint16_gray_scene_keeps_the_high_byte(tmp_path: pathlib.Path) -> None:
    samples = (np.arange(200 * 300, dtype=np.uint32).reshape(1, 200, 300) * 3 % 65536).astype(np.uint16)
    path = tmp_path / "gray16.tif"
    _write_tiff(path, samples)
    window = Window(100, 50, 80, 60)
    rgb, _ = read_window_rgb(*_local(path), window)
    expected = (samples[0][window.slices] >> 8).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_float_scene_is_scaled_by_the_scenes_range_so_windows_agree(tmp_path: pathlib.Path) -> None:
    yy, xx = np.mgrid[0:200, 0:300]
    samples = (xx * 10.0 + yy - 1000.0).astype(np.float32)[None]  # -1000 .. 2189: stretched min..max
    samples[0, :5, :5] = -9999.0  # the nodata value
    samples[0, 100, 100] = np.nan
    path = tmp_path / "float.tif"
    _write_tiff(path, samples, nodata=-9999.0)
    fs, local_path = _local(path)
    value_range = scene_value_range(fs, local_path)
    assert value_range is not None and -1000.0 <= value_range[0] < value_range[1] <= 2189.0
    full, full_nodata = read_window_rgb(fs, local_path, Window(0, 0, 300, 200), value_range)
    assert full_nodata is not None and full_nodata[:5, :5].all() and full_nodata[100, 100]
    assert full_nodata.sum() == 26
    for window in tile_windows(300, 200, 96, 16):
        part, part_nodata = read_window_rgb(fs, local_path, window, value_range)
        np.testing.assert_array_equal(part, full[window.slices])
        # Without a precomputed range the scene's range is computed per call: the same pixels.
        np.testing.assert_array_equal(read_window_rgb(fs, local_path, window)[0], part)
    assert os.listdir(tmp_path) == ["float.tif"]  # statistics left no .aux.xml beside the scene
    low, high = value_range
    stretched = np.clip(np.rint((samples[0].astype(np.float64) - low) * (255.0 / (high - low))), 0, 255)
    valid = ~full_nodata
    np.testing.assert_array_equal(full[..., 0][valid], stretched[valid].astype(np.uint8))


def test_alpha_and_band_order_come_from_the_colour_interpretation(tmp_path: pathlib.Path) -> None:
    samples = _rgb_scene(128, 128)
    alpha = np.full((1, 128, 128), 255, np.uint8)
    alpha[0, :10] = 0
    rgba = tmp_path / "rgba.tif"
    _write_tiff(rgba, np.concatenate([samples, alpha]), photometric="RGB", alpha="YES")
    rgb, nodata = read_window_rgb(*_local(rgba), Window(0, 0, 128, 128))
    np.testing.assert_array_equal(rgb, np.moveaxis(samples, 0, -1))
    assert nodata is not None and nodata[:10].all() and not nodata[10:].any()
    bgrn = tmp_path / "bgrn.tif"
    interp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    _write_tiff(bgrn, np.concatenate([samples[::-1], alpha * 0 + 9]), colorinterp=interp)
    rgb, _ = read_window_rgb(*_local(bgrn), Window(0, 0, 128, 128))
    np.testing.assert_array_equal(rgb, np.moveaxis(samples, 0, -1))


def test_window_outside_the_scene_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "rgb.tif"
    _write_tiff(path, _rgb_scene())
    with pytest.raises(ValueError, match="outside"):
        read_window_rgb(*_local(path), Window(250, 0, 64, 64))


def test_reads_and_writes_through_an_object_store(tmp_path: pathlib.Path, s3_server, s3_bucket) -> None:
    """GDAL reads ranges of an S3 object through fsspec; the mask is uploaded whole, never half."""
    samples = _rgb_scene()
    local = tmp_path / "rgb.tif"
    _write_tiff(local, samples)
    fs, path = filesystem_for(f"s3://{s3_bucket}/scenes/rgb.tif", s3_server.storage_options)
    fs.put_file(str(local), path)
    georef = read_georef(fs, path)
    assert georef is not None and georef.crs == UTM_33N and scene_size(fs, path) == (300, 200)
    window = Window(64, 64, 100, 50)
    rgb, _ = read_window_rgb(fs, path, window)
    np.testing.assert_array_equal(rgb, np.moveaxis(samples, 0, -1)[window.slices])
    labels = (samples[0] % 3).astype(np.uint8)
    mask_path = f"{s3_bucket}/masks/rgb.tif"
    blocks = ((block, labels[block.slices]) for block in grid_windows(300, 200, 128))
    write_geotiff_mask(fs, mask_path, georef, blocks, from_prompts("a,b", 0.5).palette(), block_size=128)
    with rasterio.open(io.BytesIO(fs.cat_file(mask_path))) as mask:
        np.testing.assert_array_equal(mask.read(1), labels)
        assert mask.crs.to_epsg() == 32633


# ----------------------------------------------------------------------------------------------------------
# Writing masks


def test_geotiff_mask_is_tiled_compressed_georeferenced_and_coloured(tmp_path: pathlib.Path) -> None:
    georef = GeoRef(UTM_33N, (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1]), 1100, 700)
    labels = np.zeros((700, 1100), np.uint8)
    labels[100:300, 200:500] = 1
    labels[400:650, 600:1000] = 2
    labels[0:10, 0:10] = 255
    ontology = from_prompts("building,road", 0.5)
    path = tmp_path / "out" / "mask.tif"
    fs, target = _local(path)
    blocks = [block for block in grid_windows(1100, 700, 512) if block != Window(512, 512, 512, 188)]
    write_geotiff_mask(fs, target, georef, ((b, labels[b.slices]) for b in blocks), ontology.palette())
    assert os.listdir(path.parent) == ["mask.tif"]  # no temporary file left behind
    with rasterio.open(path) as mask:
        assert (mask.width, mask.height, mask.count, mask.dtypes[0]) == (1100, 700, 1, "uint8")
        assert mask.crs.to_epsg() == 32633 and tuple(mask.transform)[:6] == georef.transform
        assert mask.profile["tiled"] and mask.block_shapes == [(512, 512)]
        assert mask.compression.name == "deflate" and mask.nodata == 255
        colormap = mask.colormap(1)
        assert colormap[1] == (*ontology.classes[0].color, 255) and colormap[2] == (
            *ontology.classes[1].color,
            255,
        )
        assert mask.colorinterp[0] == ColorInterp.palette
        values = mask.read(1)
    unwritten = Window(512, 512, 512, 188)
    expected = labels.copy()
    expected[unwritten.slices] = 255  # no block covered it: no-data
    np.testing.assert_array_equal(values, expected)
    assert path.stat().st_size < labels.nbytes // 20


def test_geotiff_mask_refuses_a_block_of_the_wrong_shape(tmp_path: pathlib.Path) -> None:
    georef = GeoRef(UTM_33N, (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1]), 64, 64)
    fs, target = _local(tmp_path / "mask.tif")
    with pytest.raises(ValueError, match="must be uint8"):
        write_geotiff_mask(
            fs, target, georef, [(Window(0, 0, 64, 64), np.zeros((32, 64), np.uint8))], [0] * 768
        )
    assert not (tmp_path / "mask.tif").exists() and os.listdir(tmp_path) == []


def test_missing_optional_package_names_the_install_command() -> None:
    with pytest.raises(MissingGeoDependency, match=r"pip install 'textseg\[geo\]'"):
        lazy_import("textseg_no_such_geo_package")


# ----------------------------------------------------------------------------------------------------------
# A 16k x 16k scene with bounded memory

_BIG_SCENE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from textseg.image.rasters import GeoRef, read_window_rgb, write_geotiff_mask, write_geotiff_rgb
    from textseg.storage import filesystem_for
    from textseg.image.windows import Window, grid_windows, tile_windows

    def status_mb(key):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB

    size, block, tile, folder = 16384, 1024, 2048, sys.argv[1]
    georef = GeoRef("EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 6000000.0), size, size)
    fs, image_path = filesystem_for(folder + "/scene.tif")
    _, mask_path = filesystem_for(folder + "/mask.tif")
    # Warm up GDAL (drivers, PROJ database) on a tiny raster so the baseline includes it.
    small = GeoRef(georef.crs, georef.transform, 32, 32)
    warm_block = [(Window(0, 0, 32, 32), np.zeros((32, 32, 3), np.uint8))]
    write_geotiff_rgb(fs, folder + "/warm.tif", small, warm_block, 16)
    read_window_rgb(fs, folder + "/warm.tif", Window(0, 0, 32, 32))
    # ru_maxrss would carry the parent's (pytest's) peak across exec; VmHWM is this process's own peak,
    # and writing 5 to clear_refs resets it to the current RSS, so the peak below is the work's alone.
    baseline = status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # then VmHWM also holds the warm-up's peak: still an upper bound

    def image_blocks():
        for w in grid_windows(size, size, block):
            pixels = np.empty((w.height, w.width, 3), np.uint8)
            pixels[..., 0], pixels[..., 1], pixels[..., 2] = w.x0 // block, w.y0 // block, 7
            yield w, pixels

    started = time.perf_counter()
    write_geotiff_rgb(fs, image_path, georef, image_blocks(), block_size=block)
    written = time.perf_counter()
    checked = 0
    for w in tile_windows(size, size, tile, 128):
        rgb, nodata = read_window_rgb(fs, image_path, w)
        assert rgb.shape == (tile, tile, 3) and nodata is None
        assert tuple(rgb[0, 0]) == (w.x0 // block, w.y0 // block, 7), (w, rgb[0, 0])
        checked += 1
    read = time.perf_counter()
    labels = (
        (w, np.full(w.shape, (w.x0 + w.y0) // block % 3, np.uint8)) for w in grid_windows(size, size, 512)
    )
    write_geotiff_mask(fs, mask_path, georef, labels, [0] * 768, block_size=512)
    done = time.perf_counter()
    print(json.dumps({
        "windows": checked, "peak_growth_mb": status_mb("VmHWM") - baseline, "baseline_mb": baseline,
        "write_image_s": written - started, "read_s": read - written, "write_mask_s": done - read,
    }))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status")
def test_a_16k_scene_is_read_and_written_window_by_window_in_bounded_memory(tmp_path: pathlib.Path) -> None:
    """16384 x 16384 RGB (805 MB raw): create, read in 81 windows, write its mask, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _BIG_SCENE_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"16k x 16k scene: {report}")
    assert report["windows"] == 81
    with rasterio.open(tmp_path / "scene.tif") as scene, rasterio.open(tmp_path / "mask.tif") as mask:
        assert scene.width == scene.height == mask.width == mask.height == 16384
        assert scene.block_shapes[0] == (1024, 1024) and mask.block_shapes == [(512, 512)]
    assert report["peak_growth_mb"] < 300  # the scene is 805 MB raw; the labels 256 MB
