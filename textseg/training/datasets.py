"""Training data: labeled images from a folder or bucket, held in memory at the model's input scale.

Two layouts are read, local or on any fsspec storage:
- a DEST written by `textseg label`: `DEST/metadata/<run_id>/*.parquet` rows (`source_uri`, `relpath`,
  `mask_uri`, `status`, `class_names`) pointing at the source images and `DEST/masks/...png`;
- an `images/` + `masks/` folder (what `textseg synth` writes): masks matched to images by relpath without
  extension, the classes from `ontology.yaml` beside them or from `classes`.

Why everything is resized to the model's input size on load: at inference the caller resizes each whole
image to `input_spec.size` before the model sees it, so training crops taken from images at that size
show objects at exactly the scale the model will meet (scale augmentation then jitters around it).

Images are read through labeling's one decode path (`textseg.image.decoding.decode_image`, then
`resize_for_model`), so a whole image gives training exactly the pixels `textseg label` gives the model: the
same format allowlist and decompression-bomb limit, EXIF orientation, 16-bit and alpha rules, and a JPEG's
DCT-scaled decode. A pixel labeling calls no data (fully transparent, NaN) has no colour to learn from:
its mask value becomes 255, which the losses and validation ignore, whatever the mask file says there. An
image that cannot be decoded stops loading with a DatasetError naming it and the reason: training on
fewer images than DATA holds, without the user knowing which, would change the model silently.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from textseg import storage
from textseg.image.decoding import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_for_model
from textseg.ontology import NODATA, from_yaml_text
from textseg.outputs.masks import decode_mask
from textseg.source.refs import IMAGE_EXTENSIONS

ONTOLOGY_FILE = "ontology.yaml"
DATASET_FILE = "dataset.json"  # optional facts about DATA that no image holds (`gsd_m`)
READ_THREADS = 8  # object stores answer in tens of ms; a few requests in flight keep decoding busy


def read_dataset_gsd(data: str, storage_options: Mapping[str, Any] | None = None) -> float | None:
    """`gsd_m` from DATA/dataset.json (what `textseg synth` writes: metres per pixel of its images), or
    None when DATA has no such file."""
    fs, root = _filesystem(data, storage_options)
    path = f"{root.rstrip('/')}/{DATASET_FILE}"
    if not fs.isfile(path):
        return None
    value = json.loads(fs.cat_file(path)).get("gsd_m")
    return float(value) if isinstance(value, int | float) and value > 0 else None


class DatasetError(ValueError):
    """DATA cannot be used for training; the message says what is missing and what layout is expected."""


@dataclass(frozen=True)
class LabeledImages:
    """Images and masks in memory, all at one size.

    images: N arrays (H, W, 3) uint8 RGB; masks: N arrays (H, W) uint8 with 0 background, 1..C the
    classes in `class_names` order and 255 ignored (no-data). `class_prompts[c]` are the prompts DATA
    itself gives class c + 1 (its name first, then an ontology's prompts).
    """

    class_names: tuple[str, ...]
    class_prompts: tuple[tuple[str, ...], ...]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    relpaths: list[str]


def _filesystem(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    return storage.filesystem_for(uri, storage_options)


def load_labeled_images(
    uri: str,
    size: tuple[int, int],
    *,
    classes: Sequence[str] | None = None,
    resample: int = 2,
    storage_options: Mapping[str, Any] | None = None,
) -> LabeledImages:
    """DATA (either layout, see the module docstring) -> `LabeledImages` resized to `size` (height, width).

    `classes` fixes the class list and its order; mask classes outside it become background (a model asked
    for buildings and roads should call water background). Images resize with Pillow filter `resample`,
    as the caller does at inference; masks with nearest neighbour.
    """
    fs, root = _filesystem(uri, storage_options)
    root = root.rstrip("/")
    if fs.isdir(f"{root}/metadata"):
        pairs, names, prompts = _labeled_dest_pairs(fs, root, classes, storage_options)
    elif fs.isdir(f"{root}/images") and fs.isdir(f"{root}/masks"):
        pairs, names, prompts = _folder_pairs(fs, root, classes)
    else:
        raise DatasetError(
            f"{uri!r} has neither metadata/ (a DEST written by `textseg label`) nor images/ + masks/ "
            "(e.g. written by `textseg synth`): point DATA at one of those layouts"
        )
    if not pairs:
        raise DatasetError(f"{uri!r} holds no labeled image: no mask matched an image")

    def read(pair: _Pair) -> tuple[np.ndarray, np.ndarray]:
        return _read_pair(pair, size, resample, storage_options)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        loaded = list(pool.map(read, pairs))
    return LabeledImages(
        class_names=tuple(names),
        class_prompts=tuple(prompts),
        images=[image for image, _ in loaded],
        masks=[mask for _, mask in loaded],
        relpaths=[pair.relpath for pair in pairs],
    )


@dataclass(frozen=True)
class _Pair:
    relpath: str
    image_uri: str
    mask_uri: str
    lut: np.ndarray  # (256,) uint8: this mask's values -> the training class indices


def _lut(mask_class_names: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Mask value -> training class index, by class name; unknown names -> background, 255 stays 255."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[NODATA] = NODATA
    index = {name: i for i, name in enumerate(names, start=1)}
    for value, name in enumerate(mask_class_names):
        if value and value != NODATA:
            lut[value] = index.get(name, 0)
    return lut


def _folder_pairs(
    fs: fsspec.AbstractFileSystem, root: str, classes: Sequence[str] | None
) -> tuple[list[_Pair], list[str], list[tuple[str, ...]]]:
    ontology_path = f"{root}/{ONTOLOGY_FILE}"
    if fs.isfile(ontology_path):
        ontology = from_yaml_text(fs.cat_file(ontology_path).decode(), default_threshold=0.5)
        file_names = [c.name for c in ontology.classes]
        file_prompts = {c.name: _unique((c.name, *c.prompts)) for c in ontology.classes}
    elif classes:
        file_names, file_prompts = list(classes), {}
    else:
        raise DatasetError(
            f"{root}/images + masks/ has no {ONTOLOGY_FILE}: pass --classes in mask-value order (1, 2, ...)"
        )
    names = list(classes) if classes else file_names
    prompts = [file_prompts.get(name, (name,)) for name in names]
    lut = _lut(["background", *file_names], names)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def uri(path: str) -> str:
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    images = {}
    for path in fs.find(f"{root}/images"):
        if posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            images[posixpath.splitext(posixpath.relpath(path, f"{root}/images"))[0]] = path
    pairs = []
    for path in sorted(fs.find(f"{root}/masks")):
        if not path.lower().endswith(".png"):
            continue
        key = posixpath.splitext(posixpath.relpath(path, f"{root}/masks"))[0]
        if key in images:
            pairs.append(
                _Pair(posixpath.relpath(images[key], f"{root}/images"), uri(images[key]), uri(path), lut)
            )
    return pairs, names, prompts


def _labeled_dest_pairs(
    fs: fsspec.AbstractFileSystem,
    root: str,
    classes: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
) -> tuple[list[_Pair], list[str], list[tuple[str, ...]]]:
    """The newest `ok` row per relpath across all runs' metadata -> pairs; classes by name across runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(fs.find(f"{root}/metadata")):
        if not path.endswith(".parquet"):
            continue
        table = pq.read_table(pa.BufferReader(fs.cat_file(path)))
        missing = {"source_uri", "relpath", "mask_uri", "status", "class_names"} - set(table.column_names)
        if missing:
            raise DatasetError(f"{path} lacks the metadata columns {sorted(missing)}")
        for row in table.to_pylist():
            if row["status"] != "ok":
                continue
            previous = rows.get(row["relpath"])
            if previous is None or str(row.get("labeled_at") or "") >= str(previous.get("labeled_at") or ""):
                rows[row["relpath"]] = row
    names = list(classes) if classes else []
    if not classes:
        for row in rows.values():
            for name in row["class_names"][1:]:
                if name not in names:
                    names.append(name)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    pairs = []
    for relpath, row in sorted(rows.items()):
        mask_uri = row["mask_uri"]
        if "://" not in mask_uri and not mask_uri.startswith("/"):
            # Written relative to the labeling run's working directory (a relative DEST, before DEST was
            # made absolute): the mask is DEST/masks/<relpath's stem><the mask's suffix>, wherever DEST is.
            mask_uri = f"{root}/masks/{posixpath.splitext(relpath)[0]}{posixpath.splitext(mask_uri)[1]}"
            if protocol not in ("file", "local"):
                mask_uri = f"{protocol}://{mask_uri}"
        pairs.append(_Pair(relpath, row["source_uri"], mask_uri, _lut(row["class_names"], names)))
    return pairs, names, [(name,) for name in names]


def _read_pair(
    pair: _Pair, size: tuple[int, int], resample: int, storage_options: Mapping[str, Any] | None
) -> tuple[np.ndarray, np.ndarray]:
    """One pair -> (image (H, W, 3) uint8, mask (H, W) uint8) at `size` (height, width); the image as
    `textseg label` decodes and resizes a whole image (module docstring), no-data pixels 255 in the mask."""
    image_fs, image_path = _filesystem(pair.image_uri, storage_options)
    mask_fs, mask_path = _filesystem(pair.mask_uri, storage_options)
    height, width = size
    try:
        # The image is only ever used at `size`: a JPEG decodes no larger than that, as in labeling.
        decoded = decode_image(
            storage.read_bytes(image_fs, image_path),
            max_pixels=DEFAULT_MAX_PIXELS,
            reduce_for=lambda _width, _height: (width, height),
        )
    except ImageDecodeError as err:
        raise DatasetError(
            f"{pair.relpath}: {err} ({storage.redact_uri(pair.image_uri)}); fix or remove the image, or its "
            "mask, to train on the rest"
        ) from None
    mask = decode_mask(storage.read_bytes(mask_fs, mask_path))  # a PNG, or a georeferenced image's GeoTIFF
    if mask.shape != (decoded.height, decoded.width):
        raise DatasetError(
            f"{pair.relpath}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{decoded.width}x{decoded.height}; a mask must have its image's size"
        )
    classes = pair.lut[mask]
    if decoded.nodata is not None:  # full resolution here: only JPEGs decode reduced, and they have no alpha
        classes[decoded.nodata] = NODATA
    pixels = resize_for_model(decoded.image, size, resample)
    mask_image = Image.fromarray(classes).resize((width, height), resample=Image.Resampling.NEAREST)
    return pixels, np.array(mask_image, dtype=np.uint8)


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split of range(count): (train, val), val at least 1 when fraction > 0.

    Seeded on its own (not from the training RNG), so resuming or changing epochs never moves an image
    between the two sides.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng([seed, 1]).permutation(count)
    n_val = 0 if val_fraction == 0 else max(1, round(count * val_fraction))
    if count - n_val < 1:
        raise DatasetError(f"{count} labeled images leave none for training at --val-fraction {val_fraction}")
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())
