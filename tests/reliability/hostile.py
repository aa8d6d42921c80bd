"""Hostile input for `textseg label`, made here from seeded data with Pillow (or by hand where Pillow will
not write the case), with what each file must become.

An `Expect` says either the reason category of the error row (the text before ':' in the `error` column),
or the size a viewer shows and optionally a `twin`: a plain 8-bit RGB PNG of the very pixels a viewer shows,
labeled in the same run, whose mask this file's mask must equal pixel for pixel (with `nodata` pixels 255).
That checks "labeled correctly" for 16-bit, CMYK, palette, EXIF-rotated and animated files without
re-implementing the decoder in the test.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.reliability.dataset import encode

# ImageOps.exif_transpose's operation per orientation, and the one that undoes it.
_EXIF_INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # the viewer rotates 270 (clockwise 90), so store it rotated 90
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class Expect:
    reason: str | None = None  # error row with this reason category; None: an ok row
    size: tuple[int, int] | None = None  # (width, height) as a viewer shows it
    twin: str | None = None  # relpath of the plain PNG whose mask this one must equal
    nodata: np.ndarray | None = None  # (H, W) bool: pixels that must be 255 in the mask


def _noise(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 3] = (220, 20, 20)
    return Image.fromarray(pixels)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB and which has no pixel data: a decompression bomb's
    calling card (a real bomb compresses gigapixels of zeros into kilobytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def hostile_files() -> dict[str, tuple[bytes, Expect]]:
    """relpath -> (file bytes, what it must become). Every name is valid on local disk and on S3."""
    files: dict[str, tuple[bytes, Expect]] = {}

    def twin(name: str, image: Image.Image) -> str:
        relpath = f"twins/{name}.png"
        files[relpath] = (encode(image.convert("RGB"), "PNG"), Expect(size=image.size))
        return relpath

    base = _noise(1, 24, 14)
    jpeg = encode(base, "JPEG", quality=90)
    files["broken/truncated.jpg"] = (jpeg[: len(jpeg) // 2], Expect("truncated image data"))
    files["broken/empty.png"] = (b"", Expect("empty file"))
    files["broken/error page.jpg"] = (
        b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n",
        Expect("not an image (unrecognized format)"),
    )
    files["broken/notes.png"] = (
        b"these are my notes, not a picture\n" * 8,
        Expect("not an image (unrecognized format)"),
    )
    files["bombs/10 gigapixels.png"] = (
        _png_header_only(100_000, 100_000),
        Expect("image too large (possible decompression bomb)"),
    )
    files["bombs/2 gigapixels.png"] = (
        _png_header_only(45_000, 45_000),
        Expect("image too large (possible decompression bomb)"),
    )
    files["tiny/one pixel.png"] = (encode(_noise(2, 1, 1), "PNG"), Expect(size=(1, 1)))
    files["tiny/one pixel (jpeg).jpg"] = (encode(_noise(3, 1, 1), "JPEG"), Expect(size=(1, 1)))

    # 16-bit samples: the decoder keeps the high byte, so v * 257 must label like the 8-bit v.
    gray = np.asarray(_noise(4, 20, 16).convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray(gray * 257)  # mode I;16
    eight = twin("sixteen-bit as eight", Image.fromarray(gray.astype(np.uint8)))
    files["modes/sixteen bit.png"] = (encode(sixteen, "PNG"), Expect(size=(20, 16), twin=eight))
    files["modes/sixteen bit (tiff).tif"] = (encode(sixteen, "TIFF"), Expect(size=(20, 16), twin=eight))

    # CMYK JPEG: labeled as the RGB a viewer shows (Pillow's conversion, no colour management).
    cmyk = encode(_noise(5, 22, 18).convert("CMYK"), "JPEG", quality=95)
    files["modes/cmyk.jpg"] = (cmyk, Expect(size=(22, 18), twin=twin("cmyk", Image.open(io.BytesIO(cmyk)))))

    # Palette with a transparent entry: those pixels are no-data (255), the rest as the RGB under them.
    palette = _noise(6, 18, 12).quantize(colors=8)
    palette.info["transparency"] = 0
    transparent = np.asarray(palette) == 0
    data = encode(palette, "PNG", transparency=0)
    files["modes/palette transparent.png"] = (
        data,
        Expect(size=(18, 12), nodata=transparent, twin=twin("palette", palette.convert("RGB"))),
    )

    # EXIF orientation 1..8: stored so that a viewer shows `upright`; 5..8 are stored with W and H swapped.
    upright = _noise(7, 24, 14)
    upright_twin = twin("upright", upright)
    for orientation, inverse in _EXIF_INVERSE.items():
        stored = upright if inverse is None else upright.transpose(inverse)
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"exif/orientation {orientation}.png"] = (
            encode(stored, "PNG", exif=exif.tobytes()),
            Expect(size=(24, 14), twin=upright_twin),
        )
    stored = upright.transpose(_EXIF_INVERSE[6])  # type: ignore[arg-type]
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif/camera rotated.jpg"] = (encode(stored, "JPEG", exif=exif.tobytes()), Expect(size=(24, 14)))

    # Animated: the first frame, as a thumbnail shows it.
    frames = [_noise(8, 16, 12), _noise(9, 16, 12)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated/two frames.gif"] = (
        gif,
        Expect(size=(16, 12), twin=twin("gif frame", Image.open(io.BytesIO(gif)))),
    )
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    files["animated/two frames (webp).webp"] = (
        webp,
        Expect(size=(16, 12), twin=twin("webp frame", frames[0])),
    )

    # Names: spaces, unicode, a 255-byte file name (the longest most filesystems allow).
    files["names/with spaces/a b  c.png"] = (encode(_noise(10, 12, 12), "PNG"), Expect(size=(12, 12)))
    files["names/ünïcödé/日本語 ファイル.png"] = (encode(_noise(11, 12, 12), "PNG"), Expect(size=(12, 12)))
    files["names/" + "n" * 251 + ".png"] = (encode(_noise(12, 12, 12), "PNG"), Expect(size=(12, 12)))
    return files
