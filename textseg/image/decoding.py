"""Image file bytes -> the image as a viewer shows it (RGB, EXIF orientation applied), or the reason why not.

This is the only place textseg turns untrusted bytes into pixels, so it owns three promises: a bad
file becomes a per-image `error` row (never a crashed batch), every supported pixel layout becomes the RGB a
viewer would show, and a decompression bomb is refused before its pixels are decoded. It never imports torch
or transformers: CPU decode tasks must start fast.

What a decoded image is
-----------------------
- Formats: JPEG (and MPO, what many cameras write as .jpg), PNG (and APNG), TIFF, WebP, BMP and GIF, the
  extensions listing.py finds. Pillow's other readers are switched off per call (``formats=``): each is attack
  surface, and a ``.jpg`` that is really PostScript must not reach Ghostscript.
- Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF): the first frame, what a thumbnail shows.
- EXIF orientation 1..8 is applied with Pillow's own ``ImageOps.exif_transpose``, so width and height swap
  for orientations 5..8 and a pixel lands where a viewer draws it. A corrupt EXIF block that Pillow cannot
  read is an error row, not a silent guess.
- Modes: 1, L, P, RGB, CMYK, YCbCr and the alpha modes become RGB with Pillow's ``convert`` (CMYK and
  colour profiles are not colour-managed, exactly like Hugging Face image processors, so our pixels are the
  ones the models were trained on). Where a pixel's alpha is 0 (RGBA, LA, PA, RGBa, P or L or RGB with a
  PNG ``tRNS`` entry) ``nodata`` is True; masks write 255 there. The colour under a transparent or
  translucent pixel is kept as stored, not composited onto a background.
- More than 8 bits per sample:
    * 16-bit samples (PNG and TIFF ``I;16``/``I;16B``) become 8-bit by ``>> 8``: it is what Pillow itself
      does for 16-bit RGB/RGBA PNGs and TIFFs (it keeps the high byte), so every 16-bit image in textseg is
      reduced the same way, and it inverts the usual 8 -> 16 bit expansion (``v * 257 >> 8 == v``).
    * 32-bit integer (``I``) and float (``F``) images carry no white level, so we take the smallest
      conventional one that holds every finite value: 1.0 (float only; ``round(v * 255)``), 255 (as is),
      65535 (``>> 8``, 16-bit data stored wide, as Pillow opens signed 16-bit TIFFs), and otherwise stretch
      min..max linearly to 0..255 (how GIS viewers show elevation or raw sensor counts). NaN and inf have no
      value to show: they are ``nodata``. Pillow opens unsigned 32-bit TIFFs as signed ``I``, so values
      above 2**31 wrap; such files are rare enough that we accept it.

Decompression bombs
-------------------
``Image.open`` only parses the header, so ``decode_image`` compares the declared width x height with its
``max_pixels`` before a single pixel is decoded, and names both in the reason. Pillow's own guard is one
process-wide number, ``Image.MAX_IMAGE_PIXELS`` (warn above it, raise above twice it; default 89 Mpx), read
by ``Image.open`` and by the TIFF, GIF and WebP readers while they load. There is no per-call form, and
setting and restoring it around each call would race between threads. Left at its default it would refuse
the legitimate satellite scenes between 179 Mpx and our 1.6 Gpx default. So ``decode_image`` raises it,
under a lock and never lowering it or disabling it (``None`` stays ``None``), to at least ``max_pixels``:
the per-call limit is what decides, and Pillow's in-reader checks stay on at the same scale. A header
declaring more than twice the limit trips Pillow's check inside ``Image.open``, before we see the
dimensions; that reason names the declared pixel count instead of width x height. Between the limit and
twice it, Pillow also emits its DecompressionBombWarning; we leave it (warning filters are process-wide too).
``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set: a cut-off file must fail, not come back grey-filled.

Reasons
-------
``str(ImageDecodeError)`` lands in the metadata ``error`` column. ``_reason_for`` is the one place that
maps exceptions to reasons. Each reason starts with a fixed category; group on the text before ``:``.

- ``empty file``: zero bytes.
- ``not an image (unrecognized format)``: no reader recognises the bytes (text, an HTML error page, junk).
- ``unsupported image format``: HEIF/AVIF (an ``ftyp`` box), which textseg does not read.
- ``corrupt or truncated image header``: a known signature whose header Pillow cannot parse, or a 0-pixel
  width or height.
- ``truncated image data``: the data ends early (Pillow says "truncated", EOFError, a WebP shorter than its
  RIFF header says).
- ``image too large (possible decompression bomb)``: the declared size is above ``max_pixels`` (our check,
  or Pillow's at twice the limit).
- ``unsupported pixel mode``: a mode Pillow cannot convert to RGB.
- ``out of memory``: MemoryError while decoding.
- ``corrupt image data``: any other decoder error, with Pillow's message.

Every reason but ``out of memory`` is permanent (``ImageDecodeError.permanent``): the same bytes fail the
same way on every attempt, so an incremental run skips the file as known bad until it changes. (A bomb is
judged against ``max_pixels``: after raising the limit, ``--retry-errors`` tries such files again.)

The exceptions turned into reasons are the ones Pillow's own fuzzing test expects from hostile files
(OSError, SyntaxError, ValueError, NotImplementedError, MemoryError, the decompression-bomb pair) plus the
parse errors its open loop tolerates (EOFError, struct.error, IndexError). Anything else is a bug
and propagates. A reason never quotes the file's bytes: Pillow messages are shortened and their ``b'...'``
literals and object reprs removed.
"""

from __future__ import annotations

import io
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# 40k x 40k = 1.6 Gpx: a full Sentinel-2 tile (10980^2) or a large orthomosaic is a legitimate input, while a
# bomb declaring 100k x 100k (30 GB as RGB) is still refused. An image at the limit needs ~4.8 GB as RGB.
DEFAULT_MAX_PIXELS: int = 40_000 * 40_000

# Pillow format ids tried, in this order (the common ones first: identification stops at the first match).
# No "MPO": Pillow's JPEG reader itself returns an MPO image for a camera's multi-picture JPEG.
DECODED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF")

# Exceptions that hostile or damaged bytes raise inside Pillow (see the module docstring).
_DECODE_FAILURES: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    NotImplementedError,
    MemoryError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # only raised when a warnings filter turns it into an error
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TRANSPARENCY_KEY_MODES = frozenset({"P", "L", "RGB"})  # modes where a PNG tRNS entry means alpha

_PILLOW_GUARD_LOCK = threading.Lock()

ORIENTATION_TAG = 0x0112  # EXIF orientation
QUARTER_TURNS = frozenset({5, 6, 7, 8})  # orientations that swap width and height


class ImageDecodeError(ValueError):
    """A per-image problem: ``str(err)`` is the reason written to the metadata ``error`` column.

    A ValueError because the bytes, not the program, are wrong; the caller turns it into an error row.
    ``permanent``: the same bytes fail again on every attempt (every reason above but ``out of memory``,
    which another worker may have enough of); it becomes the row's ``permanent`` column, and an
    incremental run skips such an image as known bad until its file changes (or ``--retry-errors``).
    """

    def __init__(self, reason: str, *, permanent: bool = True):
        super().__init__(reason)
        self.permanent = permanent

    def __reduce__(self) -> tuple[Any, ...]:  # keeps `permanent` through pickling (Ray, processes)
        return (_rebuild_decode_error, (str(self), self.permanent))


def _rebuild_decode_error(reason: str, permanent: bool) -> ImageDecodeError:
    return ImageDecodeError(reason, permanent=permanent)


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on an array has no single truth value
class DecodedImage:
    """An image as a viewer shows it, ready for windows and models.

    image: mode "RGB", EXIF orientation applied, pixels loaded (no file access left); full resolution
        unless `full_size` says otherwise.
    nodata: (H, W) bool of `image`, True where the pixel has no value to label (alpha == 0, or NaN in a
        float image); None when there is no such pixel, so the common case costs nothing.
    full_size: (width, height) of the image a viewer shows, when `image` was decoded smaller than that
        (a JPEG's DCT scaling, see `decode_image`); None when `image` is the full resolution.
    """

    image: Image.Image
    nodata: np.ndarray | None = None
    full_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.image.mode != "RGB":
            raise ValueError(f"DecodedImage.image must be mode RGB, got {self.image.mode}")
        expected = (self.image.height, self.image.width)
        if self.nodata is not None and (self.nodata.dtype != np.bool_ or self.nodata.shape != expected):
            raise ValueError(
                f"DecodedImage.nodata must be a bool array of shape {expected}, "
                f"got {self.nodata.dtype} {self.nodata.shape}"
            )

    @property
    def width(self) -> int:
        """The width a viewer shows (of the full image, even when `image` is reduced)."""
        return self.full_size[0] if self.full_size else self.image.width

    @property
    def height(self) -> int:
        return self.full_size[1] if self.full_size else self.image.height


# What a caller needs of an image of this (width, height) as a viewer shows it: at least this (width,
# height), or None for the full resolution.
ReduceFor = Callable[[int, int], "tuple[int, int] | None"]


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_for: ReduceFor | None = None
) -> DecodedImage:
    """Decode image file bytes into what a viewer shows; raise ImageDecodeError with the reason if impossible.

    max_pixels: refuse images whose header declares more pixels than this (checked before decoding).
    reduce_for: told the viewer's (width, height) from the header, returns the least (width, height) the
    caller will use (a model's input, when the image is resized whole) or None. A JPEG is then decoded
    with libjpeg's DCT scaling (Pillow's `draft`: 1/2, 1/4 or 1/8 of each side, never below that size),
    3-4x faster than a full decode followed by a resize; `full_size` keeps the viewer's size. Other
    formats decode in full. The module docstring lists the formats, the mode and bit-depth rules, and
    every reason.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if len(data) == 0:
        raise ImageDecodeError("empty file")
    _let_pillow_allow(max_pixels)
    declared_size: tuple[int, int] | None = None
    try:
        image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
        declared_size = image.size
        _check_declared_size(declared_size, max_pixels)
        full_size = _draft(image, reduce_for) if reduce_for is not None else None
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        rgb, nodata = _to_rgb(image)
    except ImageDecodeError:
        raise
    except _DECODE_FAILURES as exc:
        reason = _reason_for(exc, data, declared_size, max_pixels)
        raise ImageDecodeError(reason, permanent=not isinstance(exc, MemoryError)) from exc
    if full_size == rgb.size:
        full_size = None  # the image was too small to scale
    return DecodedImage(image=rgb, nodata=nodata, full_size=full_size)


def _draft(image: Image.Image, reduce_for: ReduceFor) -> tuple[int, int] | None:
    """Set up a JPEG's DCT-scaled decode for what `reduce_for` asks; the viewer's (width, height), or
    None when the image decodes in full. EXIF orientations 5..8 are quarter turns: the asked size turns
    with them before it meets the stored (unrotated) pixels."""
    if image.format not in ("JPEG", "MPO"):
        return None
    width, height = image.size
    quarter_turn = image.getexif().get(ORIENTATION_TAG, 1) in QUARTER_TURNS
    viewer = (height, width) if quarter_turn else (width, height)
    wanted = reduce_for(*viewer)
    if wanted is None:
        return None
    image.draft(None, (wanted[1], wanted[0]) if quarter_turn else wanted)
    return viewer


def resize_for_model(image: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize exactly as Hugging Face's slow image processors do, so our model inputs equal theirs.

    size: (height, width) of the result, the order of a processor's ``size`` dict. resample: a Pillow
    filter (``PIL.Image.Resampling.BICUBIC`` ...), the processor's ``resample``.
    Returns (height, width, 3) uint8. ``transformers.image_transforms.resize`` converts the image to PIL
    and calls ``image.resize((width, height), resample=resample, reducing_gap=None)`` then ``np.array``;
    this is that call without the round trip through numpy (lossless for uint8 RGB), so rescaling and
    normalising the result afterwards gives the processor's pixel values bit for bit.
    """
    if image.mode != "RGB":
        raise ValueError(f"resize_for_model expects an RGB image (decode_image's output), got {image.mode}")
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be a positive (height, width), got {size}")
    resized = image.resize((width, height), resample=resample, reducing_gap=None)
    return np.array(resized, dtype=np.uint8)


def _let_pillow_allow(max_pixels: int) -> None:
    """Raise Pillow's process-wide pixel guard to at least max_pixels, never lowering or disabling it.

    Why this exists and why it is safe across threads: module docstring, "Decompression bombs".
    """
    with _PILLOW_GUARD_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _check_declared_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(
            f"corrupt or truncated image header: it declares an empty {width}x{height} image"
        )
    if width * height > max_pixels:
        raise ImageDecodeError(
            "image too large (possible decompression bomb): the header declares "
            f"{width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} "
            "(max_pixels)"
        )


def _to_rgb(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """A loaded image of any supported mode -> (RGB image, nodata mask or None). Rules: module docstring."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, None
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray, nodata = _wide_to_uint8(image)
        return Image.fromarray(gray).convert("RGB"), nodata
    if mode in _ALPHA_MODES or (mode in _TRANSPARENCY_KEY_MODES and "transparency" in image.info):
        rgba = image.convert("RGBA")
        transparent = np.asarray(rgba.getchannel("A")) == 0
        return rgba.convert("RGB"), (transparent if transparent.any() else None)
    try:
        return image.convert("RGB"), None
    except ValueError as exc:  # Pillow: "conversion from X to RGB not supported"
        raise ImageDecodeError(f"unsupported pixel mode: {mode!r} cannot be converted to RGB") from exc


def _wide_to_uint8(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """A 16-bit, 32-bit integer or float image -> ((H, W) uint8, nodata or None). Rules: module docstring."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        nodata = _transparent_key(values, image.info.get("transparency"))
        return (values >> 8).astype(np.uint8), nodata
    finite = np.isfinite(values) if values.dtype.kind == "f" else np.ones(values.shape, dtype=bool)
    nodata = ~finite
    transparent = _transparent_key(values, image.info.get("transparency"))
    if transparent is not None:
        nodata |= transparent
    gray = np.zeros(values.shape, dtype=np.uint8)
    if finite.any():
        shown = values[finite].astype(np.float64)
        low, high = float(shown.min()), float(shown.max())
        if values.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
            gray[finite] = np.rint(shown * 255.0).astype(np.uint8)
        elif low >= 0 and high <= 255:
            gray[finite] = np.rint(shown).astype(np.uint8)
        elif low >= 0 and high <= 65535:
            gray[finite] = (np.floor(shown).astype(np.uint32) >> 8).astype(np.uint8)
        elif high > low:
            gray[finite] = np.rint((shown - low) * (255.0 / (high - low))).astype(np.uint8)
    return gray, (nodata if nodata.any() else None)


def _transparent_key(values: np.ndarray, key: object) -> np.ndarray | None:
    """Where a grayscale PNG's tRNS colour key marks pixels fully transparent."""
    if not isinstance(key, int):
        return None
    transparent = values == key
    return transparent if transparent.any() else None


# ---------------------------------------------------------------------------------------------------------
# The one place exceptions become reasons.

# Leading bytes of the formats we read: a file that starts like one but fails is damaged, not "not an image".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)
_PILLOW_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")
_BYTES_LITERAL = re.compile(r"""b(['"]).*?(?<!\\)\1""")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_DETAIL_CHARS = 160


def _reason_for(
    exc: BaseException, data: bytes, declared_size: tuple[int, int] | None, max_pixels: int
) -> str:
    """Map a decoding exception to the reason a user reads in the metadata (table: module docstring)."""
    signature = _sniff_format(data)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        match = _PILLOW_BOMB_PIXELS.search(str(exc))
        declared = f"{int(match.group(1)):,} pixels" if match else "more than twice that many pixels"
        return (
            f"image too large (possible decompression bomb): the file declares {declared}, more than the "
            f"limit of {max_pixels:,} (max_pixels)"
        )
    if isinstance(exc, MemoryError):
        what = f"a {declared_size[0]}x{declared_size[1]} image" if declared_size else "the image"
        return f"out of memory: decoding {what} needs more memory than this worker has"
    if isinstance(exc, Image.UnidentifiedImageError):
        return _unidentified_reason(data, signature)
    if _says_truncated(exc) or _riff_is_short(data):
        where = f"the {signature} file" if signature else "the file"
        return f"truncated image data: {where} ends before its pixel data is complete"
    if declared_size is None and signature is not None:
        return (
            f"corrupt or truncated image header: the file starts like a {signature} but its header "
            f"cannot be read ({_detail(exc)})"
        )
    return f"corrupt image data: {_detail(exc)}"


def _unidentified_reason(data: bytes, signature: str | None) -> str:
    if signature is not None:
        return (
            f"corrupt or truncated image header: the file starts like a {signature} but its header "
            "cannot be read"
        )
    if data[4:8] == b"ftyp":
        return "unsupported image format: HEIF/AVIF; textseg reads JPEG, PNG, TIFF, WebP, BMP and GIF"
    if _looks_like_text(data):
        return "not an image (unrecognized format): the file holds text, e.g. an HTML error page"
    return "not an image (unrecognized format)"


def _sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _riff_is_short(data: bytes) -> bool:
    """A WebP's RIFF header states the file length; fewer bytes than that means the file was cut."""
    if data[:4] != b"RIFF" or len(data) < 8:
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def _says_truncated(exc: BaseException) -> bool:
    return isinstance(exc, EOFError) or "truncated" in str(exc).lower()


def _looks_like_text(data: bytes) -> bool:
    head = data[:512].lstrip(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    if b"\x00" in head:
        return False
    text = head.decode("utf-8", errors="replace")  # U+FFFD marks bytes that are not UTF-8
    printable = sum(char != "\ufffd" and (char.isprintable() or char in "\t\r\n") for char in text)
    return printable >= 0.95 * len(text)


def _detail(exc: BaseException) -> str:
    """Pillow's message, short and without file bytes or object reprs (it may quote chunk names or data)."""
    message = _BYTES_LITERAL.sub("<bytes>", str(exc))
    message = _OBJECT_REPR.sub("<file>", message)
    message = "".join(char if char.isprintable() else " " for char in message)
    message = " ".join(message.split())
    if len(message) > _DETAIL_CHARS:
        message = message[: _DETAIL_CHARS - 3] + "..."
    return message or type(exc).__name__
