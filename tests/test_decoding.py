"""decoding.py: hostile bytes become reasons, every pixel layout becomes the RGB a viewer shows.

Every file here is made in the test from seeded numpy data with Pillow (or, where Pillow cannot write the
case, a 10-line PNG writer below), so anyone can see and change what is being decoded.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from textseg.image.decoding import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    decode_image,
    resize_for_model,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _encode(image: Image.Image, format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand, for what Pillow will not write: 16-bit RGB, or a header with no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(rows)) if rows else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def _noise(seed: int, height: int = 32, width: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reason(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, **kwargs)
    return str(caught.value)


def _category(reason: str) -> str:
    return reason.split(":")[0]


# --- bad bytes ----------------------------------------------------------------------------------------------


def test_empty_file_is_reported_as_empty() -> None:
    assert _reason(b"") == "empty file"


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_file_cut_in_half_is_reported_as_truncated(format: str) -> None:
    data = _encode(_noise(seed=1), format)
    reason = _reason(data[: len(data) // 2])
    assert reason.startswith("truncated image data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # decoding never switches Pillow's lenient mode on


def test_html_saved_as_jpg_is_not_an_image() -> None:
    page = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"
    reason = _reason(page)
    assert reason.startswith("not an image (unrecognized format)")
    assert "text" in reason


@pytest.mark.parametrize("low", [0, 128])  # 128: no NUL byte, and not UTF-8 text either
def test_random_bytes_are_not_an_image(low: int) -> None:
    junk = np.random.default_rng(2).integers(low, 256, 4096, dtype=np.uint8).tobytes()
    assert _reason(junk) == "not an image (unrecognized format)"


def test_png_cut_inside_its_header_is_a_corrupt_header() -> None:
    data = _encode(_noise(seed=3), "PNG")
    assert _reason(data[:30]).startswith("corrupt or truncated image header: the file starts like a PNG")


def test_each_failure_has_its_own_reason() -> None:
    png = _encode(_noise(seed=4), "PNG")
    reasons = [
        _reason(b""),
        _reason(png[: len(png) // 2]),
        _reason(b"<html>oops</html>"),
        _reason(png[:30]),
        _reason(png, max_pixels=10),
    ]
    assert len({_category(reason) for reason in reasons}) == len(reasons), reasons


# Pillow warns while it reads a cut TIFF directory, then fails; the failure is what we check.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")
@pytest.mark.parametrize("format", ["JPEG", "PNG", "TIFF", "WEBP", "GIF", "BMP"])
def test_a_file_cut_anywhere_is_an_error_row_never_a_crash(format: str) -> None:
    data = _encode(_noise(seed=5), format)
    allowed = {"truncated image data", "corrupt or truncated image header", "corrupt image data"}
    for fraction in (0.01, 0.05, 0.2, 0.5, 0.8, 0.98):
        reason = _reason(data[: int(len(data) * fraction)])
        assert _category(reason) in allowed, (fraction, reason)


def test_reasons_never_quote_the_file_bytes() -> None:
    marker = b"SECRET-MARKER-7f3a"
    png = _encode(_noise(seed=6), "PNG", pnginfo=_png_text(marker))
    jpeg = _encode(_noise(seed=6), "JPEG", comment=marker)
    chunk_at = png.index(b"IDAT")
    hostile = [
        b"<html>" + marker * 20 + b"</html>",
        marker + np.random.default_rng(6).integers(0, 256, 512, dtype=np.uint8).tobytes(),
        png[: len(png) // 2],
        png[:chunk_at] + marker[:4] + png[chunk_at + 4 :],  # a chunk named with the marker's bytes
        png[: chunk_at + 12] + bytes(64) + png[chunk_at + 76 :],  # zeroed compressed pixels
        jpeg[: len(jpeg) // 2],
        jpeg[:2] + b"\xff\x01" + marker + jpeg[2:],
    ]
    for data in hostile:
        reason = _reason(data)
        assert marker.decode() not in reason and marker[:4].decode() not in reason, reason
        assert "b'" not in reason and " at 0x" not in reason, reason
        assert len(reason) < 300


def _png_text(text: bytes) -> object:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("comment", text.decode())
    return info


def test_running_out_of_memory_is_a_per_image_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_without_memory(self: ImageFile.ImageFile) -> None:
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_without_memory)  # a real one would need ~GBs
    reason = _reason(_encode(_noise(seed=10), "PNG"))
    assert reason.startswith("out of memory") and "48x32" in reason


# --- decompression bombs ------------------------------------------------------------------------------------


def test_small_limit_refuses_with_declared_size_and_limit() -> None:
    data = _encode(_noise(seed=7, height=200, width=300), "PNG")
    reason = _reason(data, max_pixels=50_000)
    assert reason.startswith("image too large (possible decompression bomb)")
    assert "300x200" in reason and "60,000" in reason and "50,000" in reason


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_header_over_the_limit_is_refused_before_any_pixel_is_decoded() -> None:
    # No IDAT at all: decoding would fail as truncated (or allocate 6 GB), so this reason proves the order.
    data = _png(width=50_000, height=40_000, bit_depth=8, color_type=2)
    reason = _reason(data)
    assert reason.startswith("image too large (possible decompression bomb)")
    assert "50000x40000" in reason and "2,000,000,000" in reason and f"{DEFAULT_MAX_PIXELS:,}" in reason


def test_header_far_over_the_limit_names_the_declared_pixels() -> None:
    data = _png(width=100_000, height=100_000, bit_depth=8, color_type=2)
    reason = _reason(data)
    assert reason.startswith("image too large (possible decompression bomb)")
    assert "10,000,000,000 pixels" in reason and f"{DEFAULT_MAX_PIXELS:,}" in reason


def test_the_per_call_limit_decides_even_above_pillows_own_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse anything over 200 px
    data = _encode(_noise(seed=8, height=40, width=30), "TIFF")
    assert decode_image(data, max_pixels=1_200).image.size == (30, 40)
    assert Image.MAX_IMAGE_PIXELS == 1_200


@pytest.mark.parametrize("preset", [None, 10**12])
def test_pillows_guard_is_never_lowered_or_enabled(
    monkeypatch: pytest.MonkeyPatch, preset: int | None
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", preset)
    decode_image(_encode(_noise(seed=9), "PNG"))
    assert Image.MAX_IMAGE_PIXELS == preset


def test_image_exactly_at_the_limit_decodes() -> None:
    data = _encode(Image.new("RGB", (3, 2), RED), "PNG")
    assert decode_image(data, max_pixels=6).image.size == (3, 2)
    assert _reason(data, max_pixels=5).startswith("image too large")


# --- modes and bit depths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["PNG", "JPEG", "TIFF", "WEBP", "GIF", "BMP"])
def test_one_pixel_images_decode(format: str) -> None:
    decoded = decode_image(_encode(Image.new("RGB", (1, 1), (250, 250, 250)), format))
    assert (decoded.width, decoded.height) == (1, 1)
    assert decoded.image.mode == "RGB" and decoded.nodata is None
    assert np.abs(_pixels(decoded)[0, 0].astype(int) - 250).max() <= 3


def _pixels(decoded: DecodedImage) -> np.ndarray:
    return np.asarray(decoded.image)


def test_grayscale_becomes_gray_rgb() -> None:
    gray = np.random.default_rng(10).integers(0, 256, (5, 7), dtype=np.uint8)
    decoded = decode_image(_encode(Image.fromarray(gray), "PNG"))
    assert np.array_equal(_pixels(decoded), np.repeat(gray[:, :, None], 3, axis=2))
    assert decoded.nodata is None


@pytest.mark.parametrize("format", ["PNG", "TIFF"])
def test_one_bit_images_become_black_and_white(format: str) -> None:
    bits = np.random.default_rng(11).integers(0, 2, (6, 9)).astype(bool)
    decoded = decode_image(_encode(Image.fromarray(bits), format))
    assert np.array_equal(_pixels(decoded)[:, :, 0], np.where(bits, 255, 0))


def test_rgba_transparent_pixels_are_nodata_and_keep_their_colour() -> None:
    rgba = np.random.default_rng(12).integers(1, 256, (4, 6, 4), dtype=np.uint8)
    rgba[1, 2, 3] = 0
    rgba[3, 5, 3] = 0
    decoded = decode_image(_encode(Image.fromarray(rgba), "PNG"))
    assert np.array_equal(_pixels(decoded), rgba[:, :, :3])
    assert decoded.nodata is not None and decoded.nodata.dtype == np.bool_
    assert np.array_equal(decoded.nodata, rgba[:, :, 3] == 0)


def test_opaque_rgba_has_no_nodata() -> None:
    decoded = decode_image(_encode(Image.new("RGBA", (3, 3), (1, 2, 3, 255)), "PNG"))
    assert decoded.nodata is None and decoded.image.getpixel((1, 1)) == (1, 2, 3)


def test_la_transparent_pixels_are_nodata() -> None:
    la = Image.new("LA", (4, 3), (90, 255))
    la.putpixel((2, 1), (90, 0))
    decoded = decode_image(_encode(la, "PNG"))
    assert decoded.image.getpixel((2, 1)) == (90, 90, 90)
    assert decoded.nodata is not None and decoded.nodata.sum() == 1 and decoded.nodata[1, 2]


def _palette_image() -> Image.Image:
    palette = Image.new("P", (3, 2))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2, 3, 1, 2])
    return palette


def test_palette_without_transparency_becomes_its_colours() -> None:
    decoded = decode_image(_encode(_palette_image(), "PNG"))
    assert decoded.image.getpixel((1, 0)) == RED and decoded.image.getpixel((0, 1)) == BLUE
    assert decoded.nodata is None


def test_palette_with_trns_marks_only_fully_transparent_entries() -> None:
    # tRNS per palette entry: 0 -> alpha 0, 1 -> alpha 128 (translucent, still labelled), others opaque.
    decoded = decode_image(_encode(_palette_image(), "PNG", transparency=bytes([0, 128])))
    assert decoded.nodata is not None
    assert np.array_equal(decoded.nodata, np.array([[True, False, False], [False, False, False]]))
    assert decoded.image.getpixel((1, 0)) == RED


def test_gif_transparent_index_is_nodata() -> None:
    decoded = decode_image(_encode(_palette_image(), "GIF", transparency=2))
    assert decoded.nodata is not None
    assert np.array_equal(decoded.nodata, np.array([[False, False, True], [False, False, True]]))


@pytest.mark.parametrize("mode, key", [("L", 7), ("RGB", (1, 2, 3))])
def test_png_colour_key_transparency_is_nodata(mode: str, key: int | tuple[int, ...]) -> None:
    image = Image.new(mode, (3, 1), key)
    image.putpixel((1, 0), 200 if mode == "L" else (200, 200, 200))
    decoded = decode_image(_encode(image, "PNG", transparency=key))
    assert decoded.nodata is not None and np.array_equal(decoded.nodata, np.array([[True, False, True]]))


def _sixteen_bit_values() -> np.ndarray:
    values = np.random.default_rng(13).integers(0, 65536, (4, 5), dtype=np.uint16)
    values[0, :4] = [0, 0x1234, 0xFFFF, 257 * 200]
    return values


def _expect_gray(decoded: DecodedImage, gray: np.ndarray) -> None:
    assert np.array_equal(_pixels(decoded), np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2))


def test_sixteen_bit_grayscale_png_keeps_the_high_byte() -> None:
    values = _sixteen_bit_values()
    decoded = decode_image(_encode(Image.fromarray(values), "PNG"))
    _expect_gray(decoded, values >> 8)
    assert list(_pixels(decoded)[0, :4, 0]) == [0, 0x12, 255, 200]


@pytest.mark.parametrize("byte_order", ["<u2", ">u2"])
def test_sixteen_bit_tiff_keeps_the_high_byte(byte_order: str) -> None:
    values = _sixteen_bit_values()
    mode = "I;16" if byte_order == "<u2" else "I;16B"
    image = Image.frombytes(mode, (5, 4), values.astype(byte_order).tobytes())
    decoded = decode_image(_encode(image, "TIFF"))
    _expect_gray(decoded, values >> 8)


def test_sixteen_bit_rgb_png_is_reduced_the_same_way_as_sixteen_bit_gray() -> None:
    rgb = np.random.default_rng(14).integers(0, 65536, (3, 4, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    decoded = decode_image(_png(width=4, height=3, bit_depth=16, color_type=2, rows=rows))
    assert np.array_equal(_pixels(decoded), (rgb >> 8).astype(np.uint8))


def test_sixteen_bit_png_colour_key_is_nodata() -> None:
    values = np.array([[7, 300, 7]], dtype=np.uint16)
    decoded = decode_image(_encode(Image.fromarray(values), "PNG", transparency=7))
    assert decoded.nodata is not None and np.array_equal(decoded.nodata, values == 7)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[0, 17, 255, 128]], [[0, 17, 255, 128]]),  # 8-bit data stored wide: as is
        ([[0, 0x1234, 65535, 256]], [[0, 0x12, 255, 1]]),  # 16-bit data stored wide: >> 8
        ([[-1000, 0, 1000, 3000]], [[0, 64, 128, 255]]),  # no white level: min..max stretch
    ],
)
def test_32_bit_integer_tiff_uses_the_smallest_white_level_that_fits(
    values: list[list[int]], expected: list[list[int]]
) -> None:
    image = Image.fromarray(np.array(values, dtype=np.int32))
    assert image.mode == "I"
    decoded = decode_image(_encode(image, "TIFF"))
    _expect_gray(decoded, np.array(expected))
    assert decoded.nodata is None


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[0.0, 0.5, 1.0, 0.2]], [[0, 128, 255, 51]]),  # the float convention: 1.0 is white
        ([[0.0, 100.4, 255.0, 3.0]], [[0, 100, 255, 3]]),
        ([[-10.0, 0.0, 30.0, 10.0]], [[0, 64, 255, 128]]),  # e.g. elevation: min..max stretch
    ],
)
def test_32_bit_float_tiff_uses_the_smallest_white_level_that_fits(
    values: list[list[float]], expected: list[list[int]]
) -> None:
    decoded = decode_image(_encode(Image.fromarray(np.array(values, dtype=np.float32)), "TIFF"))
    _expect_gray(decoded, np.array(expected))


def test_nan_in_a_float_tiff_is_nodata() -> None:
    values = np.array([[0.25, np.nan], [np.inf, 1.0]], dtype=np.float32)
    decoded = decode_image(_encode(Image.fromarray(values), "TIFF"))
    assert decoded.nodata is not None and np.array_equal(decoded.nodata, ~np.isfinite(values))
    assert decoded.image.getpixel((0, 0)) == (64, 64, 64) and decoded.image.getpixel((1, 1)) == (255,) * 3


def test_cmyk_jpeg_decodes_like_pillows_convert_and_not_inverted() -> None:
    blocks = np.zeros((16, 24, 3), dtype=np.uint8)
    blocks[:, :8] = (200, 30, 40)
    blocks[:, 8:16] = (20, 180, 60)
    blocks[:, 16:] = (240, 240, 240)
    data = _encode(Image.fromarray(blocks).convert("CMYK"), "JPEG", quality=95)
    decoded = decode_image(data)
    with Image.open(io.BytesIO(data)) as cmyk:
        assert cmyk.mode == "CMYK"
        expected = cmyk.convert("RGB")
    assert np.array_equal(_pixels(decoded), np.asarray(expected))
    assert np.abs(_pixels(decoded).astype(int) - blocks).mean() < 10


# --- what a viewer shows ------------------------------------------------------------------------------------

# Where the stored image's top-left and top-right corners are shown, per EXIF orientation (EXIF 2.32, 4.6.4).
_SHOWN_AT = {
    1: ("top-left", "top-right"),
    2: ("top-right", "top-left"),
    3: ("bottom-right", "bottom-left"),
    4: ("bottom-left", "bottom-right"),
    5: ("top-left", "bottom-left"),
    6: ("top-right", "bottom-right"),
    7: ("bottom-right", "top-right"),
    8: ("bottom-left", "top-left"),
}


def _corner_pixel(image: Image.Image, corner: str) -> tuple[int, ...]:
    vertical, horizontal = corner.split("-")
    x = 3 if horizontal == "left" else image.width - 4
    y = 3 if vertical == "top" else image.height - 4
    return tuple(int(channel) for channel in np.asarray(image)[y, x])


def _close(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 40 for a, b in zip(pixel, colour, strict=True))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_shows_the_image_as_a_viewer_does(orientation: int) -> None:
    stored = np.full((24, 40, 3), 128, dtype=np.uint8)  # 40 wide, 24 high
    stored[:8, :8] = RED  # stored top-left
    stored[:8, -8:] = BLUE  # stored top-right
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)

    decoded = decode_image(data)

    swapped = orientation >= 5
    assert (decoded.width, decoded.height) == ((24, 40) if swapped else (40, 24))
    red_at, blue_at = _SHOWN_AT[orientation]
    assert _close(_corner_pixel(decoded.image, red_at), RED)
    assert _close(_corner_pixel(decoded.image, blue_at), BLUE)
    with Image.open(io.BytesIO(data)) as opened:
        expected = ImageOps.exif_transpose(opened).convert("RGB")
    assert np.array_equal(_pixels(decoded), np.asarray(expected))


def test_tiff_orientation_tag_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(_encode(Image.new("RGB", (4, 2), RED), "TIFF", exif=exif))
    assert decoded.image.size == (2, 4)


@pytest.mark.parametrize("format, params", [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animated_images_give_their_first_frame(format: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, (0, 255, 0), BLUE)]
    data = _encode(frames[0], format, save_all=True, append_images=frames[1:], **params)
    with Image.open(io.BytesIO(data)) as opened:
        assert getattr(opened, "n_frames", 1) == 3
    decoded = decode_image(data)
    assert decoded.image.size == (8, 6) and decoded.image.getpixel((4, 3)) == RED


def test_decoded_image_is_fully_loaded() -> None:
    data = bytearray(_encode(_noise(seed=15), "PNG"))
    decoded = decode_image(bytes(data))
    data[:] = bytes(len(data))  # whatever happens to the caller's buffer later
    assert decoded.image.mode == "RGB" and decoded.image.tobytes() == _noise(seed=15).tobytes()


def test_decoded_image_rejects_what_it_does_not_promise() -> None:
    with pytest.raises(ValueError, match="mode RGB"):
        DecodedImage(image=Image.new("L", (2, 2)), nodata=None)
    with pytest.raises(ValueError, match="shape"):
        DecodedImage(image=Image.new("RGB", (3, 2)), nodata=np.zeros((3, 2), dtype=bool))


# --- resizing for a model -----------------------------------------------------------------------------------


def test_resize_for_model_takes_height_then_width() -> None:
    resized = resize_for_model(_noise(seed=16, height=20, width=30), (7, 11), Image.Resampling.BICUBIC)
    assert resized.shape == (7, 11, 3) and resized.dtype == np.uint8


def test_resize_for_model_equals_hugging_face_resize() -> None:
    transforms = pytest.importorskip("transformers.image_transforms")
    image = _noise(seed=17, height=37, width=53)
    for resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
        ours = resize_for_model(image, (24, 31), resample)
        theirs = transforms.resize(np.array(image), size=(24, 31), resample=resample)
        assert theirs.shape == ours.shape and np.array_equal(ours, theirs)


def test_resize_for_model_refuses_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        resize_for_model(Image.new("L", (4, 4)), (2, 2), Image.Resampling.BILINEAR)


def test_decoding_stays_light_to_import() -> None:
    code = "import sys, textseg.image.decoding; sys.exit(bool({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- decoding no larger than the caller needs ---------------------------------------------------------------


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: what DCT scaling sees in a photo (not pure noise, not flat)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_jpeg_decodes_dct_reduced_to_what_the_caller_needs_as_a_viewer_shows_it(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = _photo(640, 480)
    stored[:40, :40] = RED  # stored top-left
    data = _encode(Image.fromarray(stored), "JPEG", quality=90, exif=exif)
    asked: list[tuple[int, int]] = []

    def reduce_for(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return (60, 80) if orientation == 6 else (80, 60)

    reduced = decode_image(data, reduce_for=reduce_for)
    full = decode_image(data)
    viewer = (480, 640) if orientation == 6 else (640, 480)
    assert asked == [viewer] and (reduced.width, reduced.height) == viewer == full.image.size
    assert reduced.full_size == viewer and full.full_size is None
    # libjpeg's 1/8 scale: each side the smallest multiple of 1/8 at or above what was asked.
    assert reduced.image.size == (viewer[0] // 8, viewer[1] // 8)
    assert _close(_corner_pixel(reduced.image, _SHOWN_AT[orientation][0]), RED)
    # What the model sees: within a few levels of resizing the full decode. Measured on photo-like JPEGs
    # from 640x480 to 4000x3000 at 64-352 px inputs: mean |difference| 0.2-2.0 of 255, max 14; at the
    # hard edge of the red corner here, 24.
    size = (48, 64) if orientation == 1 else (64, 48)
    resample = Image.Resampling.BICUBIC
    gap = np.abs(
        resize_for_model(reduced.image, size, resample).astype(int)
        - resize_for_model(full.image, size, resample).astype(int)
    )
    assert gap.mean() <= 2.0 and gap.max() <= 32


def test_reduced_decoding_leaves_other_formats_small_jpegs_and_bombs_alone() -> None:
    png = _encode(Image.fromarray(_photo(64, 48)), "PNG")
    assert decode_image(png, reduce_for=lambda w, h: (8, 6)).full_size is None
    small = _encode(Image.fromarray(_photo(64, 48)), "JPEG")
    assert decode_image(small, reduce_for=lambda w, h: (40, 40)).image.size == (64, 48)
    assert decode_image(small, reduce_for=lambda w, h: None).image.size == (64, 48)

    def never(width: int, height: int) -> tuple[int, int]:
        raise AssertionError("asked about a bomb")

    with pytest.raises(ImageDecodeError) as caught:
        decode_image(small, max_pixels=1000, reduce_for=never)
    assert _category(str(caught.value)) == "image too large (possible decompression bomb)"
