"""Scores predicted class masks against ground-truth masks: per-class IoU and Dice, mIoU, pixel accuracy.

`textseg eval PRED GT` compares two folders (local or any fsspec URL) of single-channel 8-bit masks, PNG
or the GeoTIFF `textseg label` writes for georeferenced rasters (read with rasterio, the `geo` extra), in
the mask format: pixel value = class index, 0 background, 255 no-data. Masks are matched by relpath
without extension (its case and `.png`/`.tif` ignored, so `a.PNG` or `a.tif` in GT matches the `a.png`
textseg writes).

Classes are matched by name when both sides name theirs: a prediction's names are those its GeoTIFF
records, else those of its metadata row when PRED is a DEST's `masks/` folder (DEST/metadata/); GT's come
from `class_names` (`--classes`) or GT's ontology.yaml. A prediction whose classes are GT's in another
order is remapped to GT's values; one whose names differ from GT's is an error. A side that names no
classes is taken to use the other's order.

How pixels count:
- Every metric comes from one confusion matrix summed over all pixels of all images, never from a mean of
  per-image scores, so a large image weighs in proportion to its pixels and a class absent from one image
  does not give that image an undefined score.
- Pixels that are 255 (no-data) in GT are ignored everywhere.
- No prediction means background: a GT mask without a prediction counts as an all-background prediction
  (and is listed in `missing_predictions`), and 255 in a prediction counts as background. A model is
  therefore scored on every image it was asked to label, also the ones that failed.
- Predictions without a GT mask are not scored; `ignored_predictions` counts them.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image

from textseg.ontology import NODATA, OntologyError, from_yaml_text
from textseg.outputs.masks import MASK_SUFFIXES, decode_mask_with_names
from textseg.storage import filesystem_for, read_bytes, redact_uri, uri_for

ONTOLOGY_FILE = "ontology.yaml"
# Mask pairs fetched ahead of decoding, and the threads fetching them: object stores answer one request in
# tens of milliseconds, so a few concurrent requests keep the decoder busy.
READ_BATCH = 32
READ_THREADS = 8
# Pixels per bincount call; bounds the temporary index array to 32 MiB for any mask size.
BINCOUNT_PIXELS = 1 << 22
_VALUES = 256  # an 8-bit mask has 256 possible values; the accumulator has one row/column per value
log = logging.getLogger(__name__)


class EvalError(ValueError):
    """The folders cannot be compared; the message names the file or folder and what to change."""


@dataclass(frozen=True)
class EvalReport:
    """Scores over every evaluated pixel. Lists are indexed by mask value: index 0 is background."""

    class_names: list[str]
    iou: list[float | None]  # None: the class occurs in neither prediction nor GT (over scored pixels)
    dice: list[float | None]
    # Mean IoU over the foreground classes (1..K) that occur in the prediction or the GT; background is
    # left out because it dominates most images. None when no foreground class occurs at all.
    miou: float | None
    pixel_accuracy: float  # correct pixels / pixels that are not no-data (255) in GT
    images: int  # GT masks scored, including those without a prediction
    missing_predictions: list[str]  # GT relpaths without a prediction, scored as all background
    ignored_predictions: int  # predictions without a GT mask, not scored
    confusion: list[list[int]]  # pixel counts, confusion[gt_class][pred_class], (K+1) x (K+1)

    @property
    def miou_classes(self) -> list[str]:
        """The names of the classes `miou` averages over."""
        return [self.class_names[i] for i in range(1, len(self.class_names)) if self.iou[i] is not None]

    @property
    def gt_pixels(self) -> list[int]:
        """Per class, its scored pixels in GT (the support)."""
        return [sum(row) for row in self.confusion]

    @property
    def pred_pixels(self) -> list[int]:
        """Per class, its predicted pixels among the scored ones."""
        return [sum(column) for column in zip(*self.confusion, strict=True)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (no NaN: undefined scores are null), per class first, then the totals."""
        return {
            "classes": [
                {"index": i, "name": name, "iou": iou, "dice": dice, "gt_pixels": gt, "pred_pixels": pred}
                for i, (name, iou, dice, gt, pred) in enumerate(
                    zip(self.class_names, self.iou, self.dice, self.gt_pixels, self.pred_pixels, strict=True)
                )
            ],
            "miou": self.miou,
            "miou_classes": self.miou_classes,
            "pixel_accuracy": self.pixel_accuracy,
            "images": self.images,
            "missing_predictions": list(self.missing_predictions),
            "ignored_predictions": self.ignored_predictions,
            "confusion": [list(row) for row in self.confusion],
        }

    def table(self) -> str:
        """A plain-text table for a terminal: one row per class, then the totals."""
        width = max(len("class"), *(len(name) for name in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}  {'GT pixels':>12}"]
        for name, iou, dice, gt in zip(self.class_names, self.iou, self.dice, self.gt_pixels, strict=True):
            lines.append(f"{name:<{width}}  {_score(iou):>6}  {_score(dice):>6}  {gt:>12,}")
        lines.append(
            f"mIoU over the {len(self.miou_classes)} foreground classes present: {_score(self.miou)}"
        )
        lines.append(f"pixel accuracy: {_score(self.pixel_accuracy)}")
        summary = f"images: {self.images}"
        if self.missing_predictions:
            summary += f" ({len(self.missing_predictions)} without a prediction, scored as all background)"
        if self.ignored_predictions:
            summary += f"; {self.ignored_predictions} predictions without a ground truth, not scored"
        lines.append(summary)
        return "\n".join(lines)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate_folders(
    pred: str,
    gt: str,
    class_names: list[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Score the masks under `pred` against those under `gt` (folders or prefixes, local or fsspec URLs).

    class_names: every class with background first, so `class_names[i]` names mask value i (the same list
    as the metadata's `class_names` column). Without it, `ontology.yaml` in GT or in GT's parent folder
    names the classes, and failing that they are `class_<i>` up to the largest value found. A mask value
    outside the named classes is an error naming the file, as is a prediction whose size differs from GT.
    """
    pred_fs, pred_root = _filesystem(pred, storage_options)
    gt_fs, gt_root = _filesystem(gt, storage_options)
    pred, gt = redact_uri(pred), redact_uri(gt)  # from here on only used in messages
    gt_masks = _list_masks(gt_fs, gt_root, gt)
    pred_masks = _list_masks(pred_fs, pred_root, pred)
    if not gt_masks:
        raise EvalError(f"no PNG or GeoTIFF masks under the ground truth {gt}")
    if not pred_masks:
        raise EvalError(f"no PNG or GeoTIFF masks under the predictions {pred}")
    if not gt_masks.keys() & pred_masks.keys():
        raise EvalError(
            f"no prediction under {pred} has the relpath of a ground-truth mask under {gt} "
            f"(e.g. GT {next(iter(gt_masks.values()))[0]!r}, prediction "
            f"{next(iter(pred_masks.values()))[0]!r}): point PRED and GT at folders "
            "with the same layout, such as DEST/masks"
        )
    if class_names is None:
        class_names = class_names_from_ontology(gt_fs, gt_root, gt)
    if class_names is not None and not 1 <= len(class_names) <= NODATA:
        raise EvalError(f"class_names must hold background plus 0-254 classes, got {len(class_names)} names")
    labeled = _class_names_from_metadata(pred_fs, pred_root) if class_names is not None else {}
    matcher = _ClassMatcher(class_names, pred, gt)

    confusion = np.zeros((_VALUES, _VALUES), dtype=np.int64)
    missing: list[str] = []
    for key, relpath, gt_labels, pred_labels, pred_names in _read_pairs(gt_fs, gt_masks, pred_fs, pred_masks):
        if pred_labels is None:
            missing.append(relpath)
            pred_labels = np.zeros_like(gt_labels)
        else:
            names, origin = (pred_names, "its GeoTIFF") if pred_names else (labeled.get(key), "DEST/metadata")
            pred_labels = matcher.to_gt_values(pred_labels, names, origin, relpath)
        if pred_labels.shape != gt_labels.shape:
            raise EvalError(
                f"{relpath}: the prediction is {_size(pred_labels)} pixels but the ground truth is "
                f"{_size(gt_labels)}; both masks must have the image's exact width and height"
            )
        image_confusion = confusion_matrix(gt_labels, pred_labels)
        if class_names is not None:
            _check_values(image_confusion, len(class_names), relpath)
        confusion += image_confusion

    scored = confusion[:NODATA]  # GT no-data rows are never scored
    if scored.sum() == 0:
        raise EvalError(f"every ground-truth pixel under {gt} is no-data (255): there is nothing to score")
    if class_names is None:
        used = np.flatnonzero(scored.sum(axis=0)[:NODATA] + scored.sum(axis=1))
        class_names = ["background", *(f"class_{i}" for i in range(1, int(used.max(initial=0)) + 1))]
    return report_from_confusion(
        confusion[: len(class_names), : len(class_names)],
        class_names,
        images=len(gt_masks),
        missing_predictions=missing,
        ignored_predictions=len(pred_masks.keys() - gt_masks.keys()),
    )


def confusion_matrix(gt_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """(H, W) uint8 GT and prediction -> (256, 256) int64 pixel counts, [gt value, pred value].

    Prediction no-data (255) is counted as background (0); GT no-data stays in row 255 for the caller
    to drop. One bincount over `gt * 256 + pred` per block of rows: no per-class loops.
    """
    counts = np.zeros(_VALUES * _VALUES, dtype=np.int64)
    rows_per_block = max(1, BINCOUNT_PIXELS // max(1, gt_labels.shape[1]))
    for top in range(0, gt_labels.shape[0], rows_per_block):
        gt_block = gt_labels[top : top + rows_per_block].astype(np.intp)
        pred_block = pred_labels[top : top + rows_per_block].astype(np.intp)
        pred_block[pred_block == NODATA] = 0
        counts += np.bincount((gt_block * _VALUES + pred_block).ravel(), minlength=_VALUES * _VALUES)
    return counts.reshape(_VALUES, _VALUES)


def report_from_confusion(
    confusion: np.ndarray,
    class_names: list[str],
    images: int,
    missing_predictions: list[str],
    ignored_predictions: int = 0,
) -> EvalReport:
    """(K+1, K+1) pixel counts [gt class, pred class] over scored pixels -> the report.

    IoU_c = TP / (TP + FP + FN) and Dice_c = 2 TP / (2 TP + FP + FN); both are None when TP + FP + FN = 0.
    Public so that confusion matrices from several runs (the JSON's `confusion`) can be summed and rescored.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion is {confusion.shape}, expected one row and column per class name")
    if confusion.sum() == 0:
        raise EvalError("no pixel was scored: the confusion matrix is all zeros")
    true_positive = np.diag(confusion)
    gt_total = confusion.sum(axis=1)
    pred_total = confusion.sum(axis=0)
    union = gt_total + pred_total - true_positive
    iou = [float(tp / u) if u else None for tp, u in zip(true_positive, union, strict=True)]
    dice = [float(2 * tp / (u + tp)) if u else None for tp, u in zip(true_positive, union, strict=True)]
    foreground = [value for value in iou[1:] if value is not None]
    return EvalReport(
        class_names=list(class_names),
        iou=iou,
        dice=dice,
        miou=float(np.mean(foreground)) if foreground else None,
        pixel_accuracy=float(true_positive.sum() / confusion.sum()),
        images=images,
        missing_predictions=list(missing_predictions),
        ignored_predictions=ignored_predictions,
        confusion=confusion.tolist(),
    )


def _filesystem(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[AbstractFileSystem, str]:
    fs, root = filesystem_for(uri, storage_options)
    return fs, root.rstrip("/")


def _list_masks(fs: AbstractFileSystem, root: str, uri: str) -> dict[str, tuple[str, str]]:
    """Every .png, .tif and .tiff under `root`, keyed by relpath without its extension -> (relpath, path
    in fs)."""
    if not fs.isdir(root):
        raise EvalError(f"{uri} is not a folder (or prefix) of PNG or GeoTIFF masks")
    masks: dict[str, tuple[str, str]] = {}
    for path in sorted(fs.find(root)):
        relpath = path[len(root) :].lstrip("/")
        if not relpath.lower().endswith(MASK_SUFFIXES):
            continue
        key = posixpath.splitext(relpath)[0]
        if key in masks:
            raise EvalError(f"{uri} holds both {masks[key][0]!r} and {relpath!r}: which one is the mask?")
        masks[key] = (relpath, path)
    return masks


def class_names_from_ontology(fs: AbstractFileSystem, gt_root: str, gt: str) -> list[str] | None:
    """Class names from `ontology.yaml` in GT or, failing that, in GT's parent; None when neither has one."""
    for folder in (gt_root, posixpath.dirname(gt_root)):
        path = posixpath.join(folder, ONTOLOGY_FILE) if folder else ONTOLOGY_FILE
        try:
            text = read_bytes(fs, path).decode("utf-8")
        except FileNotFoundError:
            continue
        except OSError as err:  # e.g. access to GT but not to its parent folder
            raise EvalError(f"cannot read {uri_for(fs, path)}: {err}; or pass the class names") from err
        try:
            # The threshold is irrelevant here; only the class names and their order are used.
            return from_yaml_text(text, default_threshold=0.5).class_names
        except OntologyError as err:
            raise EvalError(f"{uri_for(fs, path)} (the classes of {gt}): {err}") from err
    return None


class _ClassMatcher:
    """Prediction values -> GT values by class name (module docstring); one lookup table per naming."""

    def __init__(self, gt_names: list[str] | None, pred: str, gt: str):
        self.gt_names, self.pred, self.gt = gt_names, pred, gt
        self.tables: dict[tuple[str, ...], np.ndarray | None] = {}

    def to_gt_values(
        self, labels: np.ndarray, names: list[str] | None, origin: str, relpath: str
    ) -> np.ndarray:
        if self.gt_names is None or not names or list(names) == self.gt_names:
            return labels
        key = tuple(names)
        if key not in self.tables:
            self.tables[key] = self._table(list(names), origin, relpath)
        table = self.tables[key]
        return labels if table is None else table[labels]

    def _table(self, names: list[str], origin: str, relpath: str) -> np.ndarray | None:
        assert self.gt_names is not None
        pred_classes, gt_classes = names[1:], self.gt_names[1:]
        if sorted(pred_classes) != sorted(gt_classes) or len(set(gt_classes)) != len(gt_classes):
            raise EvalError(
                f"the prediction {relpath} names its classes {pred_classes} ({origin} under {self.pred}) but "
                f"the ground truth names {gt_classes} (--classes or ontology.yaml of {self.gt}), and classes "
                "are matched by name: label with GT's ontology, or pass --classes with GT's names in its "
                "mask-value order"
            )
        log.info("prediction classes %s matched to GT's order %s by name", pred_classes, gt_classes)
        return value_table(names, self.gt_names)


def value_table(from_names: Sequence[str], to_names: Sequence[str]) -> np.ndarray:
    """A lookup table (256 uint8) taking mask values named by `from_names` to the values `to_names` gives
    the same classes (background first in both; 255 and unnamed values kept). The names must match."""
    table = np.arange(_VALUES, dtype=np.uint8)
    index = {name: i for i, name in enumerate(to_names)}
    for value, name in enumerate(from_names[1:], start=1):
        table[value] = index[name]
    return table


def _class_names_from_metadata(fs: AbstractFileSystem, pred_root: str) -> dict[str, list[str]]:
    """When PRED is a DEST's masks/ folder: mask key (relpath without extension) -> the class names of the
    image's newest `ok` metadata row under DEST/metadata/; {} for any other PRED."""
    if posixpath.basename(pred_root) != "masks":
        return {}
    metadata = posixpath.join(posixpath.dirname(pred_root), "metadata")
    try:
        parts = sorted(p for p in fs.find(metadata) if p.endswith(".parquet"))
    except OSError:
        return {}
    import pyarrow.parquet as pq

    newest: dict[str, tuple[str, list[str]]] = {}
    for path in parts:
        try:
            table = pq.read_table(
                io.BytesIO(read_bytes(fs, path)), columns=["relpath", "status", "class_names", "labeled_at"]
            )
        except (OSError, ValueError, KeyError) as err:  # not a metadata part (a foreign Parquet file)
            log.debug("skipping %s: %s", path, err)
            continue
        for row in table.to_pylist():
            if row["status"] != "ok" or not row["relpath"] or not row["class_names"]:
                continue
            key, labeled_at = posixpath.splitext(row["relpath"])[0], str(row["labeled_at"] or "")
            if key not in newest or labeled_at >= newest[key][0]:
                newest[key] = (labeled_at, list(row["class_names"]))
    return {key: names for key, (_, names) in newest.items()}


def _read_pairs(
    gt_fs: AbstractFileSystem,
    gt_masks: dict[str, tuple[str, str]],
    pred_fs: AbstractFileSystem,
    pred_masks: dict[str, tuple[str, str]],
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray | None, list[str] | None]]:
    """(key, GT relpath, GT labels, prediction labels or None when missing, the class names the
    prediction's file records or None), in GT order.

    Files are fetched with `cat_file` on a thread pool, one batch ahead of decoding: fsspec's batch `cat`
    would treat `[`, `*` and `?` in file names as glob patterns, and relpaths keep any file name.
    """
    keys = list(gt_masks)
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:

        def fetch(start: int) -> list[tuple[str, Future[bytes], Future[bytes] | None]]:
            return [
                (
                    key,
                    pool.submit(_read, gt_fs, gt_masks[key][1]),
                    pool.submit(_read, pred_fs, pred_masks[key][1]) if key in pred_masks else None,
                )
                for key in keys[start : start + READ_BATCH]
            ]

        pending = fetch(0)
        for start in range(READ_BATCH, len(keys) + READ_BATCH, READ_BATCH):
            batch, pending = pending, fetch(start)
            for key, gt_bytes, pred_bytes in batch:
                relpath = gt_masks[key][0]
                gt_labels, _ = _decode(gt_bytes.result(), f"ground truth {relpath}")
                if pred_bytes is None:
                    yield key, relpath, gt_labels, None, None
                else:
                    pred_labels, names = _decode(pred_bytes.result(), f"prediction {pred_masks[key][0]}")
                    yield key, relpath, gt_labels, pred_labels, names


def _read(fs: AbstractFileSystem, path: str) -> bytes:
    try:
        return read_bytes(fs, path)  # retries transient errors; raises StorageError when they persist
    except OSError as err:  # permanent: missing (deleted since listing), forbidden
        raise EvalError(f"cannot read {uri_for(fs, path)}: {err}") from err


def _decode(data: bytes, what: str) -> tuple[np.ndarray, list[str] | None]:
    kind = "GeoTIFF" if data[:2] in (b"II", b"MM") else "PNG"
    try:
        return decode_mask_with_names(data)
    except ImportError as err:  # a GeoTIFF without rasterio: the message names the install command
        raise EvalError(f"{what} is a GeoTIFF: {err}") from err
    except (OSError, ValueError) as err:  # Pillow raises OSError subclasses for bad bytes
        raise EvalError(f"{what} is not a single-channel 8-bit {kind} mask: {err}") from err
    except Image.DecompressionBombError as err:  # not an OSError; Pillow's pixel limit is global state
        raise EvalError(f"{what} is larger than Pillow's MAX_IMAGE_PIXELS limit: {err}") from err


def _check_values(image_confusion: np.ndarray, n_classes: int, relpath: str) -> None:
    """Mask values beyond the named classes mean the wrong ontology (or a corrupt mask): say which file."""
    outside = slice(n_classes, NODATA)
    for side, counts in (
        ("ground truth", image_confusion.sum(axis=1)),
        ("prediction", image_confusion.sum(axis=0)),
    ):
        values = np.flatnonzero(counts[outside]) + n_classes
        if values.size:
            raise EvalError(
                f"{relpath}: the {side} has mask values {values.tolist()} but only {n_classes} classes are "
                f"named (0..{n_classes - 1}, 255 no-data): pass the matching class names or ontology.yaml"
            )


def _size(labels: np.ndarray) -> str:
    return f"{labels.shape[1]}x{labels.shape[0]}"
