"""Instances of a labeled image: its objects, each with a class, score, box and COCO RLE mask.

An object is a connected region of one class in the image's label map (8-connected, as a person
outlining it would draw it), scored by the mean of its class's score over the region. The rows' layout
in DEST is `textseg.outputs.instances`.

RLE is pycocotools' (column-major, compressed `counts`), so `pycocotools.mask.decode({"size": ...,
"counts": ...})` gives the mask back and COCO exports take the rows as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as coco_mask
from scipy import ndimage

from textseg.image.windows import SCORE_LEVELS

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # a pixel touches its 8 neighbours


def encode_rle(mask: np.ndarray) -> tuple[list[int], str]:
    """(H, W) bool -> COCO's (size, compressed counts)."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return [int(v) for v in rle["size"]], rle["counts"].decode("ascii")


def encode_rle_crop(crop: np.ndarray, top: int, left: int, height: int, width: int) -> str:
    """COCO's compressed counts of an (height, width) mask that is `crop` (bool) at (top, left) and
    empty elsewhere, in time proportional to the crop: an image's thousands of small regions must not
    cost a full-image pass each."""
    columns, rows = np.nonzero(crop.T)  # column-major order, as COCO's RLE runs
    where = (columns + left).astype(np.int64) * height + rows + top
    breaks = np.nonzero(np.diff(where) != 1)[0]
    return encode_rle_runs(
        where[np.r_[0, breaks + 1]], where[np.r_[breaks, where.size - 1]] + 1, height, width
    )


def encode_rle_runs(starts: np.ndarray, ends: np.ndarray, height: int, width: int) -> str:
    """COCO's compressed counts of an (height, width) mask given as its runs of set pixels in
    column-major order (positions x * height + y; `starts` ascending, `ends` exclusive, runs apart)."""
    gaps = starts - np.r_[0, ends[:-1]]
    counts = np.column_stack([gaps, ends - starts]).ravel().tolist() + [height * width - int(ends[-1])]
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return str(rle["counts"].decode("ascii"))


def region_instances(
    labels: np.ndarray, class_names: list[str], scores: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """The connected regions of each class of an (H, W) label map (0 background, 255 no data), in class
    then reading order. `scores`: the image's (1 + K, H, W) uint8 class scores; a region's score is its
    class's mean over it (1.0 without scores)."""
    height, width = labels.shape
    found: list[dict[str, Any]] = []
    for index in np.unique(labels):
        if index == 0 or index >= len(class_names):
            continue
        regions, _ = ndimage.label(labels == index, structure=EIGHT_CONNECTED)
        for number, box in enumerate(ndimage.find_objects(regions), start=1):
            if box is None:
                continue
            crop = regions[box] == number
            rows, cols = box
            score = 1.0 if scores is None else float(scores[index][box][crop].mean()) / SCORE_LEVELS
            counts = encode_rle_crop(crop, rows.start, cols.start, height, width)
            bbox = (cols.start, rows.start, cols.stop, rows.stop)
            found.append(instance_row(class_names, int(index), score, bbox, (height, width), counts))
    return found


def instance_row(
    class_names: list[str],
    index: int,
    score: float,
    bbox: tuple[int, int, int, int],
    size: tuple[int, int],
    counts: str,
) -> dict[str, Any]:
    """One region's instance row (`textseg.outputs.instances.INSTANCE_STRUCT`): bbox x0, y0, x1, y1 (end
    exclusive), size (height, width), counts COCO's compressed RLE."""
    return {
        "class": class_names[index],
        "class_index": index,
        "prompt": None,
        "score": score,
        "bbox": [float(v) for v in bbox],
        "detector_bbox": None,
        "mask_size": list(size),
        "mask_counts": counts,
    }
