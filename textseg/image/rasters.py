"""Georeferencing: GeoTIFF CRS and transform, XYZ tile bounds, windowed scene reads and GeoTIFF mask writes.

Map-data users feed textseg two kinds of imagery, and both must come back as map data:

- slippy-map tiles named `.../z/x/y.png` (XYZ convention: Web Mercator, EPSG:3857, y counted from the
  top, as OpenStreetMap, Google and Mapbox number them; TMS's flipped y is not guessed). Their position is
  in the path: `xyz_tile` parses it and `xyz_georef` turns it into a `GeoRef`.
- large GeoTIFF scenes (10k-40k px a side, tiled, often BigTIFF) that carry their CRS and affine transform.
  `scene_size` reads the header only; `read_window_rgb` reads one window at a time; `write_geotiff_mask`
  writes the label mask back on the same grid, block by block, as a Cloud Optimized GeoTIFF (COG), so a
  GIS or a tile server reading it over HTTP or S3 fetches only the tiles (or the overview level) it shows.

Memory is bounded by a window or a block, never the scene. One GDAL fact drives the design: reads go
through GDAL's block cache, which keeps every decoded tile of an open dataset until the cache is full
(GDAL_CACHEMAX, 5% of RAM by default), so reading a 16k x 16k RGB scene window by window through one open
dataset grows the process by ~0.8 GB. `read_window_rgb` therefore opens the dataset per call (a header
parse, milliseconds) and its cached tiles go when it closes. Writes of whole aligned blocks bypass the
cache (measured: a 16k x 16k mask adds ~20 MB).

Storage: everything goes through fsspec, like every other byte textseg touches. A local file is handed to
GDAL by path (its native I/O); on object stores GDAL reads through rasterio's `opener` with the fsspec
filesystem, fetching only the byte ranges of the header and of the tiles a window needs (`_RangeReads`:
fsspec's own read-ahead would fetch up to 50 MB per open), with directory listing switched off
(GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR: no LIST request per open). GDAL's `.aux.xml` sidecars are neither
read nor written (GDAL_PAM_ENABLED=NO): a read must never write beside the source, and a GeoTIFF carries
its georeferencing inside. GDAL cannot write a tiled TIFF to an object store in one pass (it seeks back to
patch tile offsets), so writes go to a local temporary file first and are then moved into place:
`os.replace` on local disk, one upload on object stores (s3fs's multipart upload publishes the object only
when it completes), so no reader ever sees half a file. A COG cannot be written in one pass either (its
IFDs and smallest overview come before the full-resolution tiles, which arrive last): masks are written
block by block to a staging GeoTIFF, given overviews there, and copied by GDAL's COG driver, which streams
tile by tile, into the file that is then published.

rasterio, pyproj and friends are the optional `geo` extra (`pip install 'textseg[geo]'`): they are imported
inside the functions that need them, through `lazy_import`, whose error names that command.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from textseg.image.decoding import DECODED_FORMATS, ORIENTATION_TAG, QUARTER_TURNS
from textseg.image.windows import Window
from textseg.storage import call_with_retry, is_local, uri_for

if TYPE_CHECKING:
    import affine
    import rasterio.io

GEO_EXTRA_INSTALL = "pip install 'textseg[geo]'"

WEB_MERCATOR = "EPSG:3857"
WGS84 = "EPSG:4326"
# Half the extent of Web Mercator in metres: pi * the WGS84 semi-major axis (the sphere EPSG:3857 uses).
WEB_MERCATOR_HALF_EXTENT = math.pi * 6378137.0
MAX_XYZ_ZOOM = 30  # tiles at z=30 are ~4 cm; deeper numbers in a path are not a tile scheme

MASK_NODATA = 255  # 255 is no-data in every mask
# GeoTIFF tile sizes must be multiples of 16 (TIFF 6.0); 512 balances compression and partial reads.
DEFAULT_BLOCK_SIZE = 512
GEOTIFF_COMPRESS = "deflate"  # lossless and universally readable (GDAL, QGIS, ArcGIS, browsers' geotiff.js)
# Mask COGs: deflate too. Measured on synthetic scene masks with overviews (GDAL 3.10; 4096 px / 8192 px):
# deflate 1.17 / 4.93 MB, ZSTD 1.19 / 4.68 MB, LZW 1.27 / 5.35 MB, deflate level 9 1.04 / 4.31 MB (11x
# slower), LZMA 1.07 / 4.24 MB (20x slower). ZSTD saves 5% at best and older GDAL builds and browser
# readers lack it. No predictor: differences of class indices are noise to a compressor.
COG_OPTIONS = {"compress": "DEFLATE", "predictor": "NO", "bigtiff": "IF_SAFER"}
MASK_BAND_DESCRIPTION = "class"
STAGING_CACHE_BYTES = 32 * 2**20  # GDAL's block cache while a GeoTIFF is staged: `_bounded_block_cache`
MASK_CLASS_NAMES_TAG = "class_names"  # GDAL metadata item: JSON list, class_names[i] names mask value i
STATS_BANDS_MAX = 3
GDAL_READ_AHEAD = 64 * 2**10  # bytes fetched past each read GDAL makes on an object store: `_RangeReads`

# The `.../z/x/y.ext` convention: image extensions listing.py finds, case-insensitive.
_XYZ_NAME = re.compile(r"^(\d+)\.(png|jpe?g|webp|tiff?|bmp|gif)$", re.IGNORECASE)
_DIGITS = re.compile(r"^\d+$")
_TIFF_SUFFIXES = (".tif", ".tiff")


class GeoError(ValueError):
    """A raster that cannot be read or written as asked; the message says which file and why."""


class MissingGeoDependency(ImportError):
    """An optional `geo` package is not installed; the message names the install command."""


def lazy_import(name: str) -> ModuleType:
    """Import an optional module of the `geo` extra, or fail with the command that installs it.

    Modelled on torchgeo's `lazy_import`: the core package (labeling PNGs and JPEGs) must not pay for
    GDAL and PROJ, so map features import them here, at first use, and a missing one is a clear sentence.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        package = name.split(".")[0]
        raise MissingGeoDependency(
            f"'{package}' is not installed and is required for georeferenced input and map output; "
            f"install the geo extra: {GEO_EXTRA_INSTALL}"
        ) from err


# ----------------------------------------------------------------------------------------------------------
# The georeference of a raster


@dataclass(frozen=True)
class GeoRef:
    """Where a width x height raster lies on the Earth: its CRS and the affine map from pixels to the CRS.

    transform: (a, b, c, d, e, f) as rasterio's `Affine[:6]` (GDAL's geotransform reordered): the map
    coordinates of pixel corner (col, row) are x = a * col + b * row + c, y = d * col + e * row + f, so
    (c, f) is the top-left corner of the top-left pixel. crs: a string any GIS reads, "EPSG:32633" when the
    CRS has an EPSG code, else its WKT. A plain value (no rasterio objects), so it pickles into Ray tasks
    and metadata.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    def xy(self, col: float, row: float) -> tuple[float, float]:
        """Map coordinates of the pixel-grid point (col, row); (0.5, 0.5) is the centre of the first pixel."""
        a, b, c, d, e, f = self.transform
        return (a * col + b * row + c, d * col + e * row + f)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of the raster's outer pixel corners, in `crs` units."""
        corners = [self.xy(col, row) for col in (0, self.width) for row in (0, self.height)]
        xs, ys = [x for x, _ in corners], [y for _, y in corners]
        return (min(xs), min(ys), max(xs), max(ys))

    @property
    def bounds_wgs84(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in degrees of longitude and latitude (EPSG:4326, lon/lat order).

        The edges are densified (21 points each) before reprojection, so the box contains the whole raster
        even where the CRS bends straight edges into curves (UTM near the edge of its zone). Raises what
        `wgs84_transformer` raises where the raster has no lon/lat.
        """
        transformer = self.wgs84_transformer()
        return tuple(transformer.transform_bounds(*self.bounds, densify_pts=21))  # type: ignore[return-value]

    def wgs84_transformer(self) -> Any:
        """pyproj's transformer from `crs` to lon/lat (always_xy, cached per CRS), once the raster is known to
        lie where it works: each point of its bounds' edges (21 between corners) must get a finite lon/lat
        that maps back to within 1% of a pixel. Raises pyproj's ProjError when the CRS cannot be reprojected
        at all (a local engineering CRS), GeoError for a raster outside its CRS's domain (a UTM scene placed
        far from its zone: PROJ gives inf there, or, short of that, lon/lat that do not map back), which
        PROJ's own bounds would silently leave out or get wrong."""
        transformer = _wgs84_transformer(self.crs)
        west, south, east, north = self.bounds
        along, n = np.linspace(0.0, 1.0, 23), 23
        x_line, y_line = west + (east - west) * along, south + (north - south) * along
        xs = np.concatenate([x_line, x_line, np.full(n, west), np.full(n, east)])
        ys = np.concatenate([np.full(n, south), np.full(n, north), y_line, y_line])
        with np.errstate(invalid="ignore"):
            lon, lat = transformer.transform(xs, ys)
            x_back, y_back = transformer.transform(lon, lat, direction="INVERSE")
            error = np.hypot(np.asarray(x_back) - xs, np.asarray(y_back) - ys)
        a, b, _, d, e, _ = self.transform
        if not (error <= 0.01 * math.sqrt(abs(a * e - b * d))).all():  # NaN and inf fail too
            crs = self.crs if len(self.crs) < 40 else "its CRS"  # an EPSG code, not a WKT
            raise GeoError(
                f"the raster (bounds {self.bounds}) reaches outside the domain of {crs}: "
                "its edges have no longitude and latitude that map back to them"
            )
        return transformer

    def ground_sample_distance(self) -> float | None:
        """Metres on the ground per pixel at the raster's centre (the geometric mean of a pixel step along
        each axis, measured on the WGS84 ellipsoid, so web-mercator tiles and lon/lat grids get their true
        size), or None when the CRS cannot be placed on the Earth and its units are not metres."""
        pyproj = lazy_import("pyproj")
        col, row = self.width / 2, self.height / 2
        points = [self.xy(col, row), self.xy(col + 1, row), self.xy(col, row + 1)]
        try:
            transformer = pyproj.Transformer.from_crs(self.crs, WGS84, always_xy=True)
            (lon0, lat0), (lon1, lat1), (lon2, lat2) = (transformer.transform(x, y) for x, y in points)
            geod = pyproj.Geod(ellps="WGS84")
            across = geod.inv(lon0, lat0, lon1, lat1)[2]
            down = geod.inv(lon0, lat0, lon2, lat2)[2]
        except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError, ValueError):
            across = down = math.nan
        gsd = math.sqrt(across * down)
        if math.isfinite(gsd) and gsd > 0:
            return gsd
        try:
            units = {axis.unit_name for axis in pyproj.CRS.from_user_input(self.crs).axis_info}
        except pyproj.exceptions.CRSError:
            return None
        a, b, _, d, e, _ = self.transform
        size = math.sqrt(abs(a * e - b * d))
        return size if units == {"metre"} and size > 0 else None

    def window_georef(self, window: Window) -> GeoRef:
        """The georeference of a sub-window: same CRS and pixel size, origin moved to the window's corner."""
        a, b, _, d, e, _ = self.transform
        c, f = self.xy(window.x0, window.y0)
        return GeoRef(self.crs, (a, b, c, d, e, f), window.width, window.height)

    def affine(self) -> affine.Affine:
        """The transform as an `affine.Affine` (what rasterio's APIs take)."""
        return lazy_import("affine").Affine(*self.transform)


@functools.lru_cache(maxsize=16)
def _wgs84_transformer(crs: str) -> Any:
    """pyproj's transformer from `crs` to lon/lat; cached, as building one costs about a millisecond."""
    return lazy_import("pyproj").Transformer.from_crs(crs, WGS84, always_xy=True)


def read_georef(fs: fsspec.AbstractFileSystem, path: str) -> GeoRef | None:
    """The CRS and transform of a raster (GeoTIFF, or anything GDAL reads), or None when it has none.

    None: no CRS (a plain PNG or JPEG, a TIFF without geokeys), or a CRS without an affine transform
    (georeferenced by ground control points only, which would need warping first). Raises GeoError when
    GDAL cannot open the file.
    """
    with _open_raster(fs, path) as dataset:
        if dataset.crs is None or dataset.transform.is_identity:
            return None
        return GeoRef(
            crs=_crs_string(dataset.crs),
            transform=tuple(dataset.transform)[:6],  # type: ignore[arg-type]
            width=dataset.width,
            height=dataset.height,
        )


# ----------------------------------------------------------------------------------------------------------
# Slippy-map tiles


def xyz_tile(relpath: str) -> tuple[int, int, int] | None:
    """(z, x, y) from a relpath ending in `z/x/y.<image ext>`, or None when it does not follow the convention.

    The last three '/'-separated parts must be a zoom, a column and a row (decimal integers; the row with an
    image extension), with 0 <= z <= 30 and 0 <= x, y < 2**z. Anything else (`a/b/c.png`, a column out of
    range for its zoom, `y@2x.png`) is None: the image is then simply not georeferenced.
    """
    parts = relpath.split("/")
    if len(parts) < 3:
        return None
    z_text, x_text, name = parts[-3:]
    match = _XYZ_NAME.match(name)
    if match is None or not _DIGITS.match(z_text) or not _DIGITS.match(x_text):
        return None
    z, x, y = int(z_text), int(x_text), int(match.group(1))
    if z > MAX_XYZ_ZOOM or x >= 2**z or y >= 2**z:
        return None
    return (z, x, y)


def xyz_georef(z: int, x: int, y: int, width: int, height: int) -> GeoRef:
    """The Web Mercator (EPSG:3857) georeference of slippy-map tile z/x/y rendered at width x height pixels.

    The world at zoom z is a 2**z x 2**z grid over [-H, H] x [-H, H] metres, H = pi * 6378137
    (= 20037508.342789244), x growing east from the antimeridian and y growing south from the top
    (~85.0511 N). Tile (x, y) spans [-H + x * s, -H + (x + 1) * s] in x and [H - (y + 1) * s, H - y * s]
    in y, s = 2 * H / 2**z. Pure arithmetic: no optional package is needed.
    """
    if not 0 <= z <= MAX_XYZ_ZOOM or not (0 <= x < 2**z and 0 <= y < 2**z):
        raise ValueError(
            f"no XYZ tile {z}/{x}/{y}: x and y must be in [0, 2**z) for 0 <= z <= {MAX_XYZ_ZOOM}"
        )
    if width < 1 or height < 1:
        raise ValueError(f"a tile needs a positive width and height, got {width} x {height}")
    span = 2.0 * WEB_MERCATOR_HALF_EXTENT / 2**z
    west = -WEB_MERCATOR_HALF_EXTENT + x * span
    north = WEB_MERCATOR_HALF_EXTENT - y * span
    return GeoRef(WEB_MERCATOR, (span / width, 0.0, west, 0.0, -span / height, north), width, height)


# ----------------------------------------------------------------------------------------------------------
# Reading scenes


def scene_size(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding pixels; None when no header can be read.

    TIFFs (by extension) are sized by GDAL, which reads BigTIFF and every TIFF layout; other images by
    Pillow's lazy open, with EXIF orientations 5-8 swapping width and height as `decoding.decode_image`
    does (the size a viewer shows). None (not recognised, damaged header) means: not a scene to cut into
    windows; decode the file the ordinary way, which gives the reason if it is bad. Storage errors (not
    found, access denied) propagate for non-TIFF files; GDAL reports every failure to open a TIFF alike,
    so those are None too, and decoding names the reason.
    """
    if path.lower().endswith(_TIFF_SUFFIXES):
        rasterio = lazy_import("rasterio")
        try:
            with _open_raster(fs, path) as dataset:
                return (dataset.width, dataset.height)
        except (GeoError, rasterio.errors.RasterioError):
            return None
    with fs.open(path, "rb") as stream:
        try:
            with Image.open(stream, formats=DECODED_FORMATS) as image:
                width, height = image.size
                orientation = image.getexif().get(ORIENTATION_TAG)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None
    return (height, width) if orientation in QUARTER_TURNS else (width, height)


def read_window_rgb(
    fs: fsspec.AbstractFileSystem,
    path: str,
    window: Window,
    value_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One window of a raster: ((h, w, 3) uint8 RGB, (h, w) bool no-data mask or None when all valid).

    Only the tiles under the window are read (and fetched, on object stores), and the dataset is opened and
    closed per call so GDAL's block cache cannot pile up a scene's worth of tiles (module docstring).

    Bands: 1 band -> gray to RGB (a palette band through its colour table); 2 bands -> gray plus alpha;
    >= 3 bands -> the bands GDAL labels red, green and blue, else the first three (a 4-band RGBA or
    RGB-NIR scene gives its RGB).
    Sample types, the rules of `textseg.image.decoding` so that a scene and the same pixels as a small image
    decode alike: uint8 as is; uint16 `>> 8` (keeps the high byte, as Pillow does for 16-bit images);
    other integer and float types take the smallest conventional white level that holds the scene's
    values: 1.0 (float only, `round(v * 255)`), 255, 65535 (`>> 8`), else a linear stretch of the
    scene's min..max to 0..255. That level must be the scene's, not the window's, or windows would be
    scaled differently and show seams: pass `value_range` (from `scene_value_range`, once per scene);
    when it is None and the type needs it, it is computed here, which costs a sample of the scene's
    tiles per call.
    No-data (True): the dataset mask (internal mask, alpha band, or the nodata value in every band) and
    non-finite samples.
    """
    with _open_raster(fs, path) as dataset:
        whole = Window(0, 0, dataset.width, dataset.height)
        if not whole.contains(window):
            raise ValueError(
                f"{window} is outside '{uri_for(fs, path)}' ({dataset.width} x {dataset.height})"
            )
        indexes = _rgb_band_indexes(dataset)
        samples = dataset.read(indexes, window=window.to_rasterio())  # (bands, h, w), the window only
        nodata = _dataset_nodata(dataset, window)
        dtype = np.dtype(dataset.dtypes[indexes[0] - 1])
        if dtype != np.uint8 and dtype != np.uint16 and value_range is None:
            value_range = _value_range(dataset, indexes)
        colormap = _palette_lut(dataset) if len(indexes) == 1 else None
    if samples.dtype.kind == "f":
        finite = np.isfinite(samples).all(axis=0)
        if not finite.all():
            nodata = ~finite if nodata is None else nodata | ~finite
    gray_or_rgb = _to_uint8(samples, value_range)
    if colormap is not None:
        rgb = colormap[gray_or_rgb[0]]
    elif gray_or_rgb.shape[0] == 1:
        rgb = np.repeat(gray_or_rgb[0][:, :, None], 3, axis=2)
    else:
        rgb = np.ascontiguousarray(np.moveaxis(gray_or_rgb, 0, -1))
    return rgb, (nodata if nodata is not None and nodata.any() else None)


def scene_value_range(fs: fsspec.AbstractFileSystem, path: str) -> tuple[float, float] | None:
    """(min, max) of the scene's valid samples in the bands `read_window_rgb` shows; None if it has none.

    Approximate, from GDAL's statistics over overviews or a sample of tiles (about the square root of
    their number), so it costs a small fraction of a full read and memory stays bounded; only scenes of
    types without a fixed white level (int16, 32-bit, float) need it. Statistics are not written back
    beside the file (no `.aux.xml` appears, see `_open_raster`).
    """
    with _open_raster(fs, path) as dataset:
        return _value_range(dataset, _rgb_band_indexes(dataset))


# ----------------------------------------------------------------------------------------------------------
# Writing GeoTIFFs


def write_geotiff_mask(
    fs: fsspec.AbstractFileSystem,
    path: str,
    georef: GeoRef,
    blocks: Iterable[tuple[Window, np.ndarray]],
    palette: list[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    class_names: Sequence[str] | None = None,
) -> None:
    """Write a label mask as a single-band uint8 Cloud Optimized GeoTIFF on the scene's grid, block by block.

    blocks: (window, labels) pairs, labels (window.height, window.width) uint8 class indices, consumed one
    at a time, so memory holds one block (a 16k x 16k mask is 256 MB raw; a generator of blocks keeps it
    at a block's size). Windows aligned to the `block_size` grid (`windows.grid_windows`) bypass GDAL's
    cache entirely; pixels no block covers read as 255 (no-data).
    The file: georef's size, CRS and transform; tiled block_size x block_size (a multiple of 16); deflate
    (sizes measured: `COG_OPTIONS`); nodata 255; the ontology's colour table (`palette`, 768 ints as
    `Ontology.palette()`), so GIS viewers draw classes in their colours; BigTIFF when it could exceed 4 GB.
    A COG (GDAL's layout: IFDs first, then the smallest overview's tiles, full resolution last), so a
    reader over HTTP or S3 fetches the header and the tiles of its window, and a zoomed-out map view reads
    an overview instead of the whole mask. Overviews halve the size until one block holds the mask and are
    sampled nearest, never averaged: an overview pixel is a class some mask pixel has. class_names
    (`Ontology.class_names`, background first) are written into the file, so a GIS shows which value is
    which class: GDAL metadata item `class_names`, a JSON list whose item i names value i, and band
    description "class". (GDAL's per-value category names would need an `.aux.xml` sidecar: GeoTIFF
    keeps them only there.) Staged in local temporary files, then moved into place (module docstring):
    readers never see half a mask.
    """
    colormap = _colormap(palette)
    profile = _geotiff_profile(georef, count=1, block_size=block_size) | {"nodata": MASK_NODATA}
    tags = {}
    if class_names is not None:
        if len(class_names) > MASK_NODATA:
            raise ValueError(f"a uint8 mask holds at most {MASK_NODATA} classes, got {len(class_names)}")
        tags[MASK_CLASS_NAMES_TAG] = json.dumps(list(class_names), ensure_ascii=False)

    def write(dataset: rasterio.io.DatasetWriter) -> None:
        dataset.write_colormap(1, colormap)
        dataset.update_tags(**tags)
        dataset.set_band_description(1, MASK_BAND_DESCRIPTION)
        for window, labels in blocks:
            _check_block(window, labels, georef, (window.height, window.width), np.uint8)
            dataset.write(labels, 1, window=window.to_rasterio())

    _write_geotiff(fs, path, profile, write, cog_resampling="nearest")


def write_geotiff_rgb(
    fs: fsspec.AbstractFileSystem,
    path: str,
    georef: GeoRef,
    blocks: Iterable[tuple[Window, np.ndarray]],
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """Write an RGB image as a tiled, deflate-compressed 3-band uint8 GeoTIFF, block by block.

    blocks: (window, image) pairs, image (window.height, window.width, 3) uint8 (decoding's layout). For
    synthetic scenes and test fixtures (`textseg.training.geo_synth`); same storage and memory rules as
    `write_geotiff_mask`.
    """
    profile = _geotiff_profile(georef, count=3, block_size=block_size) | {"photometric": "RGB"}

    def write(dataset: rasterio.io.DatasetWriter) -> None:
        for window, image in blocks:
            _check_block(window, image, georef, (window.height, window.width, 3), np.uint8)
            dataset.write(np.moveaxis(image, -1, 0), window=window.to_rasterio())

    _write_geotiff(fs, path, profile, write)


# ----------------------------------------------------------------------------------------------------------
# Internals


@contextlib.contextmanager
def _open_raster(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[rasterio.io.DatasetReader]:
    """Open `path` on `fs` with GDAL (local: by path; elsewhere: through the fsspec filesystem)."""
    rasterio = lazy_import("rasterio")
    # No .aux.xml sidecars (module docstring): GDAL would write one beside the file after statistics.
    options: dict[str, Any] = {"GDAL_PAM_ENABLED": "NO"}
    source: dict[str, Any] = {}
    if not is_local(fs):
        options["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"
        source["opener"] = _RangeReads(fs)
    with rasterio.Env(**options), warnings.catch_warnings():
        # Plain images have no geotransform; that is an answer (None), not something to warn about.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            dataset = rasterio.open(path, **source)
        except rasterio.errors.RasterioIOError as err:
            raise GeoError(f"cannot read '{uri_for(fs, path)}' as a raster: {err}") from err
        with dataset:
            yield dataset


class _RangeReads:
    """An fsspec filesystem as GDAL's opener, its files fetching what GDAL reads plus `GDAL_READ_AHEAD`.

    fsspec files read ahead a whole block from each read that misses (s3fs: 50 MB), so every open of a
    mask or a scene fetched its first 50 MB, whole files below that. Measured on moto S3, one 512 x 512
    window of a 16k x 16k mask COG (6.8 MB) fetched the whole file; now 2 requests, 136 KB. A 2048 x 2048
    window of a 21 MB RGB scene: 11 requests, 0.9 MB. 64 KB holds GDAL's small header reads in one
    request (16 KB, GDAL's own /vsicurl chunk, made 2-3x the requests). Everything else is `fs`'s.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        return self._fs.open(path, mode, block_size=GDAL_READ_AHEAD, cache_type="readahead", **kwargs)


def _crs_string(crs: Any) -> str:
    """'EPSG:<code>' when the CRS has an EPSG code (what users and GIS expect to see), else its WKT."""
    code = crs.to_epsg()
    return f"EPSG:{code}" if code is not None else crs.to_wkt()


def _rgb_band_indexes(dataset: rasterio.io.DatasetReader) -> list[int]:
    """1-based band indexes to show: [gray] or [red, green, blue] (rules: `read_window_rgb`)."""
    rasterio = lazy_import("rasterio")
    if dataset.count < 3:
        return [1]
    interp = list(dataset.colorinterp)
    wanted = (
        rasterio.enums.ColorInterp.red,
        rasterio.enums.ColorInterp.green,
        rasterio.enums.ColorInterp.blue,
    )
    if all(colour in interp for colour in wanted):
        return [interp.index(colour) + 1 for colour in wanted]
    return [1, 2, 3]


def _dataset_nodata(dataset: rasterio.io.DatasetReader, window: Window) -> np.ndarray | None:
    """(h, w) bool, True where the dataset mask says no data; None without reading when all is valid."""
    rasterio = lazy_import("rasterio")
    all_valid = rasterio.enums.MaskFlags.all_valid
    if all(flags == [all_valid] for flags in dataset.mask_flag_enums):
        return None
    return dataset.dataset_mask(window=window.to_rasterio()) == 0


def _palette_lut(dataset: rasterio.io.DatasetReader) -> np.ndarray | None:
    """(256, 3) uint8 colour lookup for a paletted uint8 band, or None for an ordinary gray band."""
    rasterio = lazy_import("rasterio")
    if dataset.colorinterp[0] != rasterio.enums.ColorInterp.palette or dataset.dtypes[0] != "uint8":
        return None
    lut = np.zeros((256, 3), dtype=np.uint8)
    for index, colour in dataset.colormap(1).items():
        if 0 <= index < 256:
            lut[index] = colour[:3]
    return lut


def _value_range(dataset: rasterio.io.DatasetReader, indexes: list[int]) -> tuple[float, float] | None:
    rasterio = lazy_import("rasterio")
    try:
        statistics = dataset.stats(indexes=indexes[:STATS_BANDS_MAX], approx=True)
    except rasterio.errors.RasterioError:  # GDAL refuses statistics of a band with no valid sample
        return None
    lows = [s.min for s in statistics if math.isfinite(s.min)]
    highs = [s.max for s in statistics if math.isfinite(s.max)]
    return (min(lows), max(highs)) if lows and highs else None


def _to_uint8(samples: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """(bands, h, w) samples of any type -> uint8 by the rules of `read_window_rgb` (decoding's rules)."""
    if samples.dtype == np.uint8:
        return samples
    if samples.dtype == np.uint16:
        return (samples >> 8).astype(np.uint8)
    values = np.nan_to_num(samples.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if value_range is None:  # no valid sample anywhere: nothing to show
        return np.zeros(samples.shape, dtype=np.uint8)
    low, high = value_range
    if samples.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        scaled = np.rint(values * 255.0)
    elif low >= 0 and high <= 255:
        scaled = np.rint(values)
    elif low >= 0 and high <= 65535:
        scaled = np.floor(np.clip(values, 0, 65535)) / 256.0
    elif high > low:
        scaled = np.rint((values - low) * (255.0 / (high - low)))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.floor(scaled), 0, 255).astype(np.uint8)


def _colormap(palette: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """Pillow's flat palette (768 ints: r, g, b per index) -> GDAL's colour table {index: (r, g, b, 255)}."""
    if len(palette) % 3 or not 3 <= len(palette) <= 768:
        raise ValueError(
            f"a palette is a flat list of up to 256 (r, g, b) triples, got {len(palette)} values"
        )
    return {
        i: (palette[3 * i], palette[3 * i + 1], palette[3 * i + 2], 255) for i in range(len(palette) // 3)
    }


def _geotiff_profile(georef: GeoRef, count: int, block_size: int) -> dict[str, Any]:
    if block_size < 16 or block_size % 16:
        raise ValueError(
            f"GeoTIFF tiles must be a positive multiple of 16 pixels, got block_size {block_size}"
        )
    return {
        "driver": "GTiff",
        "width": georef.width,
        "height": georef.height,
        "count": count,
        "dtype": "uint8",
        "crs": georef.crs,
        "transform": georef.affine(),
        "tiled": True,
        "blockxsize": block_size,
        "blockysize": block_size,
        "compress": GEOTIFF_COMPRESS,
        "bigtiff": "IF_SAFER",  # classic TIFF tops out at 4 GB; a 40k x 40k RGB scene is 4.8 GB raw
    }


def _check_block(
    window: Window, block: np.ndarray, georef: GeoRef, shape: tuple[int, ...], dtype: type[np.generic]
) -> None:
    if not Window(0, 0, georef.width, georef.height).contains(window):
        raise ValueError(f"{window} is outside the {georef.width} x {georef.height} raster")
    if block.shape != shape or block.dtype != dtype:
        raise ValueError(
            f"the block for {window} must be {np.dtype(dtype)} {shape}, got {block.dtype} {block.shape}"
        )


def _write_geotiff(
    fs: fsspec.AbstractFileSystem,
    path: str,
    profile: dict[str, Any],
    write: Callable[[rasterio.io.DatasetWriter], None],
    cog_resampling: str | None = None,
) -> None:
    """Create a GeoTIFF with `profile`, let `write` fill it, and publish it at `path` atomically.

    cog_resampling: None for a plain tiled GeoTIFF; else a COG whose overviews are resampled so (a
    `rasterio.enums.Resampling` name), see `_stage_geotiff`.
    """
    if is_local(fs):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        # Same folder, so the final rename is atomic; hidden names no listing of images picks up.
        stem = os.path.join(folder, f".textseg-{uuid.uuid4().hex}")
        try:
            temporary = _stage_geotiff(stem, profile, write, cog_resampling)
            with open(temporary, "rb+") as stream:
                os.fsync(stream.fileno())  # else a crash right after the rename can leave an empty file
            os.replace(temporary, path)
        finally:
            for leftover in (f"{stem}.tif", f"{stem}.cog.tif"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        return
    with tempfile.TemporaryDirectory(prefix="textseg-geotiff-") as folder:
        temporary = _stage_geotiff(os.path.join(folder, "raster"), profile, write, cog_resampling)
        call_with_retry(lambda: fs.put_file(temporary, path), f"write '{uri_for(fs, path)}'")


def _stage_geotiff(
    stem: str,
    profile: dict[str, Any],
    write: Callable[[rasterio.io.DatasetWriter], None],
    cog_resampling: str | None,
) -> str:
    """Write the GeoTIFF `stem`.tif locally; for a COG, then `stem`.cog.tif. Returns the file to publish.

    A COG is two passes, each streaming tile by tile: `write` fills a tiled GeoTIFF block by block, its
    overviews are built inside it (`_overview_factors`), and GDAL's COG driver copies it, overviews,
    colour table and metadata included, into the COG layout. The staging file goes as soon as the copy
    is done, so the disk holds two compressed masks at most.
    """
    rasterio = lazy_import("rasterio")
    staging = f"{stem}.tif"
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), _bounded_block_cache(rasterio):
        with rasterio.open(staging, "w", **profile) as dataset:
            write(dataset)
            if cog_resampling is None:
                return staging
            factors = _overview_factors(dataset.width, dataset.height, profile["blockxsize"])
            if factors:
                dataset.build_overviews(factors, lazy_import("rasterio.enums").Resampling[cog_resampling])
        cog = f"{stem}.cog.tif"
        lazy_import("rasterio.shutil").copy(
            staging,
            cog,
            driver="COG",
            blocksize=profile["blockxsize"],
            overviews="FORCE_USE_EXISTING",  # ours, resampled as asked; GDAL's default would be cubic
            **COG_OPTIONS,
        )
    os.unlink(staging)
    return cog


@contextlib.contextmanager
def _bounded_block_cache(rasterio: ModuleType) -> Iterator[None]:
    """Cap GDAL's block cache at `STAGING_CACHE_BYTES` (or less, if it is lower) while a GeoTIFF is staged.

    Building overviews reads the whole mask through the cache, which keeps every decoded tile until it is
    full (module docstring): a 16k x 16k mask grew the process by 350 MB, a 40k one would by 1.6 GB
    (capped at 5% of RAM). Capped, the 40k mask's staging peaked at +60 MB and took no longer (each tile
    is read once, in order). The cache size is process-wide (GDALSetCacheMax, which rasterio maps the
    GDAL_CACHEMAX option to), so it is set back explicitly, even inside a caller's `rasterio.Env`.
    """
    previous = rasterio.env.get_gdal_config("GDAL_CACHEMAX")
    rasterio.env.set_gdal_config("GDAL_CACHEMAX", min(int(previous), STAGING_CACHE_BYTES))
    try:
        yield
    finally:
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", int(previous))


def _overview_factors(width: int, height: int, block_size: int) -> list[int]:
    """Decimation factors 2, 4, 8 ... until one block holds the level (GDAL's COG default); [] if it does."""
    factors: list[int] = []
    factor = 1
    while math.ceil(width / factor) > block_size or math.ceil(height / factor) > block_size:
        factor *= 2
        factors.append(factor)
    return factors
