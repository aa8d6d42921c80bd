"""Label Studio's brush RLE: how a BrushLabels region's pixels travel in its tasks and exports.

It is not COCO's RLE. Label Studio packs the region's RGBA image (H x W x 4 bytes, row-major) with
thi.ng's rle-pack, a bit stream: a 32-bit value count, the word size - 1 (5 bits), four run-length field
widths - 1 (4 bits each), then runs. A run starts with a flag bit (1: one word repeated, 0: that many
literal words), 2 bits choosing a length width, the length - 1 in that width, then the word(s). The
region is where alpha > 0, as Label Studio's own converters read it
(`label_studio_sdk.converter.brush.decode_from_annotation`, its COCO export's contours).

`encode_rle` writes what `label_studio_sdk.converter.brush.mask2rle(mask * 255)` writes, byte for byte
(words of 8 bits, widths 3, 4, 8, 16; set pixels are (255, 255, 255, 255)), from the mask's runs with
numpy instead of a Python string per bit, so a large tile costs milliseconds. `decode_rle` reads any
header and both kinds of run (the browser writes literal runs too) into the alpha plane only: memory is
one byte per pixel, not four.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHANNELS = 4  # RGBA
WORD_BITS = 8
LENGTH_BITS = (3, 4, 8, 16)  # the run-length widths Label Studio's encoder uses, shortest first
ALPHA = 3  # the channel that says whether a pixel belongs to the region
SET = 255  # every channel of a set pixel, as mask2rle writes it


def encode_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> Label Studio's `rle` (a list of byte values) of the region `mask` covers."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        raise ValueError("a brush region needs an image of at least one pixel")
    starts = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1]
    lengths = np.diff(np.r_[starts, flat.size]) * CHANNELS  # a pixel is four equal words
    values = np.where(flat[starts], SET, 0)
    # Runs longer than the widest length field are cut into pieces of its maximum, the last one shorter.
    longest = 1 << LENGTH_BITS[-1]
    pieces = (lengths + longest - 1) // longest
    values = np.repeat(values, pieces)
    last = np.cumsum(pieces) - 1
    split = np.full(int(pieces.sum()), longest, dtype=np.int64)
    split[last] = lengths - (pieces - 1) * longest
    # One field per run: flag 1 (a repeated word: no run is shorter than a pixel's four words), the width
    # choice, the length - 1 in that width, the word.
    choice = np.searchsorted(np.array([1 << bits for bits in LENGTH_BITS]), split)
    width = np.array(LENGTH_BITS, dtype=np.int64)[choice]
    codes = (((0b100 | choice) << width | (split - 1)) << WORD_BITS) | values
    header_values = [flat.size * CHANNELS, WORD_BITS - 1, *(bits - 1 for bits in LENGTH_BITS)]
    header_widths = [32, 5, *([4] * len(LENGTH_BITS))]
    return _pack(
        np.r_[np.array(header_values, dtype=np.int64), codes],
        np.r_[np.array(header_widths, dtype=np.int64), 3 + width + WORD_BITS],
    )


def _pack(values: np.ndarray, widths: np.ndarray) -> list[int]:
    """Fields (each `widths[i]` bits, most significant first) -> bytes, zero-padded by 1 to 8 bits as
    Label Studio's encoder pads (a whole zero byte when the bits already fill the last one)."""
    total = int(widths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(widths) - widths, widths)
    shifts = np.repeat(widths, widths) - 1 - offsets
    bits = (np.repeat(values, widths) >> shifts) & 1
    padded = np.r_[bits.astype(np.uint8), np.zeros(8 - total % 8, dtype=np.uint8)]
    return np.packbits(padded).tolist()


def decode_rle(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio's `rle` of a (height, width) image -> (H, W) bool, True where alpha > 0.

    Raises ValueError when it is not a list of bytes, not of that size, or ends early."""
    try:
        data = bytes(rle)
    except TypeError:
        raise ValueError("the brush RLE must be a list of byte values") from None
    reader = _BitReader(data)
    count = reader.read(32)
    if count != height * width * CHANNELS:
        raise ValueError(
            f"the brush RLE holds {count} values, not the {height} x {width} x {CHANNELS} of its image"
        )
    word = reader.read(5) + 1
    widths = [reader.read(4) + 1 for _ in range(4)]
    alpha = np.zeros(height * width, dtype=np.uint8)
    i = 0
    while i < count:
        repeated = reader.read(1)
        j = min(count, i + 1 + reader.read(widths[reader.read(2)]))
        if repeated:
            # Values i..j-1 are one word: the alpha values among them are those of pixels i//4..j//4-1.
            alpha[i // CHANNELS : j // CHANNELS] = reader.read(word) != 0
        else:
            for position in range(i, j):
                value = reader.read(word)
                if position % CHANNELS == ALPHA:
                    alpha[position // CHANNELS] = value != 0
        i = j
    return alpha.reshape(height, width).astype(bool)


class _BitReader:
    """Reads fields of up to 57 bits, most significant bit first, from a byte string."""

    def __init__(self, data: bytes):
        self.data = data
        self.position = 0

    def read(self, bits: int) -> int:
        start = self.position >> 3
        window = self.data[start : start + 8]
        shift = 8 * len(window) - (self.position & 7) - bits
        if shift < 0:
            raise ValueError("the brush RLE ends in the middle of a run")
        self.position += bits
        return (int.from_bytes(window, "big") >> shift) & ((1 << bits) - 1)
