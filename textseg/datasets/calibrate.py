"""`textseg calibrate PRED_DEST GT_MASKS --ontology O --out O2.yaml`: per-class thresholds chosen on a small
hand-labeled set, each maximizing its class's IoU, written back into the ontology.

Why one sweep per class is exact: labeling (`textseg.labels.postprocess`) first gives each pixel the class
that wins it (the best class of a sigmoid model; the best of background and the classes of a softmax one),
and only then demotes it to background when its score is below *that class's* threshold. The pixels
labeled k therefore depend on t_k alone, and so does class k's IoU (a GT pixel of class j that k wins is
missed by j whether it ends up k or background). Each class's threshold is chosen with the others at any
value, no coordinate ascent is needed, and the per-class optima together maximize the mIoU `textseg eval`
reports (the mean IoU over the foreground classes).

What is measured, image by image: the images of PRED_DEST that GT_MASKS holds a mask for (by relpath without
extension) are read from their `source_uri`, decoded, resized and scored as the run that labeled them did
(its model and decode settings from its run summary, `--model` overriding; O's prompts), then per pixel the
winning class and its score are counted and dropped: per class, how many pixels it wins at or above each
threshold of a fixed grid (`threshold_edges`), and how many of those GT calls that class. Memory is one
image's scores plus a few thousand counters per class, whatever the set's size, and every threshold on the
grid has its exact IoU. The candidates are 0.05..0.95 in steps of 0.05, the percentiles 1..99 of the
class's winning scores (snapped down to the grid), and O's threshold; the best IoU wins, a tie going to
the candidate nearest O's threshold. A class GT never shows keeps its threshold: there is nothing to
match it against.

Pixels count as `textseg eval` counts them: 255 in GT is ignored, and a pixel that is no data in the image
(255 in a mask) is background. Thresholds compare in float32 as labeling's do, so the printed "after" mIoU
is what `textseg label` with O2 and the same model gets on these images. Scenes labeled in windows (their
scores blended across windows) are not scored; they are counted and named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from textseg import storage
from textseg.config import JobConfig, parse_storage_options
from textseg.datasets.labeled_dest import LabeledImage, iter_labeled
from textseg.evaluation import class_names_from_ontology, value_table
from textseg.image.pieces import WindowPlan, open_source, resized
from textseg.labels.postprocess import ClassGrouping, class_scores, labels_from_scores
from textseg.models import (
    ModelRef,
    ScoreKind,
    load_model,
    read_input_spec,
    read_model_gsd,
    resolve_device,
    resolve_model,
    with_presence_gate,
)
from textseg.models.input_spec import InputSpec
from textseg.ontology import NODATA, Ontology, read_ontology
from textseg.outputs.masks import MASK_SUFFIXES, decode_mask
from textseg.outputs.metadata import summary_path

GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
PERCENTILES = tuple(i / 100 for i in range(1, 100))
BATCH_SIZE = 8  # images per model call: `textseg label`'s CPU default


def threshold_edges(current: Sequence[float]) -> list[float]:
    """The thresholds counted, ascending and distinct in float32 (what labeling compares scores with), as
    the short decimals an ontology file holds: 0.001 apart, 0.0001 below 0.01 and above 0.99 (where
    confident models put their scores), plus the `current` thresholds."""
    values = {i / 1000 for i in range(1001)} | {i / 10000 for i in range(100)}
    values |= {round(1 - i / 10000, 4) for i in range(100)} | set(current)
    edges: list[float] = []
    for value in sorted(values):
        if not edges or np.float32(value) != np.float32(edges[-1]):
            edges.append(value)
    return edges


def winning_classes(
    logits: torch.Tensor, size: tuple[int, int], grouping: ClassGrouping, score_kind: ScoreKind
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's logits -> (best (H, W) uint8: the class winning each pixel before any threshold, 0
    where a softmax model's background wins; score (H, W) float32: its score). Labeling's label at
    thresholds t is best where score >= t[best], else 0 (tests pin this against `label_image` too)."""
    scores = class_scores(logits, size, grouping, score_kind)
    unthresholded = dataclasses.replace(grouping, thresholds=(0.0,) * grouping.num_classes)
    best = labels_from_scores(scores, unthresholded, score_kind, None).labels
    score = scores.amax(dim=0) if score_kind == "softmax" else scores[1:].amax(dim=0)
    return best, score


class ThresholdCounts:
    """Per class 1..K over the scored pixels: pixels the class wins with a score in each interval between
    two edges, those of them GT calls the class, and GT's pixels of the class."""

    def __init__(self, edges: Sequence[float], num_classes: int, device: torch.device):
        self.edges = torch.tensor(list(edges), dtype=torch.float32, device=device)
        self.num_classes = num_classes
        bins = num_classes * (len(edges) + 1)
        self._won = torch.zeros(bins, dtype=torch.int64, device=device)
        self._hits = torch.zeros(bins, dtype=torch.int64, device=device)
        self._truth = torch.zeros(NODATA + 1, dtype=torch.int64, device=device)

    def add(
        self, best: torch.Tensor, score: torch.Tensor, truth: torch.Tensor, nodata: torch.Tensor | None
    ) -> None:
        """One image: `winning_classes`' best and score, GT (H, W) uint8, the image's no-data (H, W) bool."""
        scored = truth != NODATA
        self._truth += torch.bincount(truth[scored].long(), minlength=NODATA + 1)
        candidate = scored & (best > 0)
        if nodata is not None:
            candidate &= ~nodata
        won = best[candidate].long()
        # bin b: the score reaches exactly the first b edges (`>=`, in float32, as labeling compares)
        reached = torch.searchsorted(self.edges, score[candidate].contiguous(), right=True)
        flat = (won - 1) * (len(self.edges) + 1) + reached
        self._won += torch.bincount(flat, minlength=self._won.numel())
        self._hits += torch.bincount(flat[truth[candidate].long() == won], minlength=self._hits.numel())

    def at_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(won, hits, truth): won[k - 1, i] pixels class k labels at threshold edges[i], hits[k - 1, i]
        of them GT's class k too, truth[k - 1] GT's pixels of class k."""
        shape = (self.num_classes, len(self.edges) + 1)
        won, hits = (counts.reshape(shape).cpu().numpy() for counts in (self._won, self._hits))
        at_or_above = [np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:] for counts in (won, hits)]
        return at_or_above[0], at_or_above[1], self._truth[1 : self.num_classes + 1].cpu().numpy()

    def distribution(self) -> np.ndarray:
        """(K, E + 1) pixels each class wins per interval: bin b holds scores in [edges[b-1], edges[b])."""
        return self._won.reshape(self.num_classes, len(self.edges) + 1).cpu().numpy()


def iou(hits: int, won: int, truth: int) -> float | None:
    """TP / (TP + FP + FN) as `textseg eval` computes it; None when the class is in neither."""
    union = won + truth - hits
    return float(np.int64(hits) / np.int64(union)) if union else None


def mean_iou(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


@dataclass(frozen=True)
class ClassCalibration:
    name: str
    threshold_before: float
    threshold_after: float
    iou_before: float | None
    iou_after: float | None
    gt_pixels: int  # 0: GT never shows the class, and its threshold is kept


@dataclass(frozen=True)
class Calibration:
    """The result: per class, thresholds and IoUs before and after; the ontology with the new thresholds."""

    classes: list[ClassCalibration]
    ontology: Ontology
    images: int  # images scored
    windowed: list[str]  # relpaths of scenes labeled in windows, not scored
    unmatched: int  # GT masks without a labeled image in PRED_DEST

    @property
    def miou_before(self) -> float | None:
        return mean_iou([c.iou_before for c in self.classes])

    @property
    def miou_after(self) -> float | None:
        return mean_iou([c.iou_after for c in self.classes])

    def table(self) -> str:
        width = max(len("class"), *(len(c.name) for c in self.classes))
        lines = [f"{'class':<{width}}  {'threshold':>18}  {'IoU':>16}  {'GT pixels':>12}"]
        for c in self.classes:
            threshold = f"{c.threshold_before:g} -> {c.threshold_after:g}"
            change = f"{_score(c.iou_before)} -> {_score(c.iou_after)}"
            kept = "  (not in GT: kept)" if not c.gt_pixels else ""
            lines.append(f"{c.name:<{width}}  {threshold:>18}  {change:>16}  {c.gt_pixels:>12,}{kept}")
        present = sum(c.iou_after is not None for c in self.classes)
        lines.append(
            f"mIoU over the {present} foreground classes present: "
            f"{_score(self.miou_before)} -> {_score(self.miou_after)}"
        )
        lines.append(f"images: {self.images}")
        if self.unmatched:
            lines.append(f"GT masks without a labeled image in PRED_DEST, not scored: {self.unmatched}")
        if self.windowed:
            lines.append(
                f"scenes labeled in windows, not scored: {len(self.windowed)} (e.g. {self.windowed[0]})"
            )
        return "\n".join(lines)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class ScoringSetup:
    """What decides the pixels and scores a run's images got: its model and decode settings."""

    model: ModelRef
    input_spec: InputSpec
    window_plan: WindowPlan
    max_pixels: int
    default_threshold: float  # --threshold: the threshold of a class whose ontology entry has none


def run_setup(dest: str, run_id: str, storage_options: Mapping[str, Any], model: str | None) -> ScoringSetup:
    """Run `run_id`'s scoring setup, from its summary's `config` (its JobConfig); `model` overrides."""
    fs, root = storage.filesystem_for(dest, storage_options)
    try:
        summary = json.loads(storage.read_bytes(fs, storage.join_uri(root, summary_path(run_id))))
    except FileNotFoundError:
        raise ValueError(f"run {run_id!r} of {storage.redact_uri(dest)} has no run summary") from None
    config = summary.get("config") or {}
    ref = resolve_model(model or config.get("model", JobConfig.model))
    if config.get("presence_gate"):
        ref = with_presence_gate(ref)
    spec = read_input_spec(ref)
    gsd = config.get("gsd")
    window_plan = WindowPlan(
        config.get("tile_size"),
        int(config.get("tile_overlap", JobConfig.tile_overlap)),
        spec.size,
        gsd if gsd is not None else read_model_gsd(ref),
    )
    max_pixels = int(config.get("max_image_pixels", JobConfig.max_image_pixels))
    threshold = float(config.get("threshold", JobConfig.threshold))
    return ScoringSetup(ref, spec, window_plan, max_pixels, threshold)


def ground_truth(
    gt_masks: str, storage_options: Mapping[str, Any]
) -> tuple[Any, dict[str, str], list[str] | None]:
    """GT_MASKS' masks: (its filesystem, {relpath without extension: path}, the class names of an
    ontology.yaml in it or its parent, as `textseg eval` reads them, or None)."""
    fs, root = storage.filesystem_for(gt_masks, storage_options)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ValueError(f"GT_MASKS {storage.redact_uri(gt_masks)} is not a folder of masks")
    masks = {
        posixpath.splitext(path[len(root) :].lstrip("/"))[0]: path
        for path in sorted(fs.find(root))
        if path.lower().endswith(MASK_SUFFIXES)
    }
    if not masks:
        raise ValueError(f"GT_MASKS {storage.redact_uri(gt_masks)} holds no PNG or GeoTIFF mask")
    return fs, masks, class_names_from_ontology(fs, root, gt_masks)


@dataclass(frozen=True)
class _Item:
    pixels: np.ndarray  # (h, w, 3) uint8 at the model's input
    size: tuple[int, int]  # (H, W) of the image
    nodata: np.ndarray | None  # (H, W) bool
    truth: np.ndarray  # (H, W) uint8


class _Scorer:
    """The run's model with O's prompts embedded once; logits for a batch of model-size images."""

    def __init__(self, model: ModelRef, ontology: Ontology, device: str):
        self.device = torch.device(device)
        self.backend = load_model(model, str(self.device)).eval()
        self.grouping = ClassGrouping(tuple(ontology.prompt_class_index), tuple(ontology.thresholds))
        with torch.inference_mode():
            self.prompt_embeddings = self.backend.embed_prompts(ontology.prompts)

    def count(self, items: Sequence[_Item], counts: ThresholdCounts) -> None:
        with torch.inference_mode():
            pixels = torch.from_numpy(np.stack([item.pixels for item in items])).to(self.device)
            logits = self.backend.score(self.backend.normalize(pixels), self.prompt_embeddings)
            for item, image_logits in zip(items, logits, strict=True):
                best, score = winning_classes(image_logits, item.size, self.grouping, self.backend.score_kind)
                truth = torch.from_numpy(item.truth).to(self.device)
                nodata = None if item.nodata is None else torch.from_numpy(item.nodata).to(self.device)
                counts.add(best, score, truth, nodata)


def calibrate(
    pred_dest: str,
    gt_masks: str,
    ontology: str,
    out: str | None = None,
    *,
    model: str | None = None,
    device: str = "auto",
    run_id: str | None = None,
    batch_size: int = BATCH_SIZE,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Calibration:
    """Choose O's thresholds on GT_MASKS (module docstring); with `out`, write O2 there (YAML)."""
    options = dict(storage_options or {})
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    gt_fs, masks, gt_names = ground_truth(gt_masks, options)
    matched = _matched_images(pred_dest, options, run_id, masks)
    first = next(matched, None)
    if first is None:
        raise ValueError(
            f"no image labeled in {storage.redact_uri(pred_dest)} has a mask in "
            f"{storage.redact_uri(gt_masks)} (e.g. GT {next(iter(masks))!r}): GT_MASKS must hold "
            "<relpath without extension>.png per image"
        )
    setup = run_setup(pred_dest, first.run_id, options, model)
    classes = read_ontology(ontology, options, setup.default_threshold)
    gt_table = _gt_to_ontology(gt_names, classes, gt_masks)
    edges = threshold_edges(classes.thresholds)
    device = resolve_device(device)
    counts = ThresholdCounts(edges, len(classes.classes), torch.device(device))
    windowed: list[str] = []
    matched_masks: set[str] = set()
    items = _items(_chain(first, matched), setup, pred_dest, gt_fs, masks, gt_table, classes, model, options)
    scorer: _Scorer | None = None
    scored = 0
    bar = tqdm(desc="calibrate", unit=" images", disable=not progress)
    for batch in _batched(items, batch_size, windowed, matched_masks):
        # Loaded once a first batch is read: a GT mask that does not fit fails before the model loads.
        scorer = scorer or _Scorer(setup.model, classes, device)
        scorer.count(batch, counts)
        scored += len(batch)
        bar.update(len(batch))
    bar.close()
    if not scored:
        raise ValueError(f"none of the {len(windowed)} hand-labeled images is a whole image: {windowed[:3]}")
    calibration = _choose(counts, classes, edges, scored, windowed, len(masks) - len(matched_masks))
    if out is not None:
        text = yaml.safe_dump(calibration.ontology.to_dict(), sort_keys=False)
        fs, path = storage.filesystem_for(out, options)
        storage.write_bytes_atomic(fs, path, text.encode("utf-8"))
    return calibration


def _matched_images(
    dest: str, options: Mapping[str, Any], run_id: str | None, masks: Mapping[str, str]
) -> Iterator[LabeledImage]:
    for labeled in iter_labeled(dest, options, run_id):
        if posixpath.splitext(labeled.relpath)[0] in masks:
            yield labeled


def _chain(first: LabeledImage, rest: Iterator[LabeledImage]) -> Iterator[LabeledImage]:
    yield first
    yield from rest


def _items(
    images: Iterator[LabeledImage],
    setup: ScoringSetup,
    dest: str,
    gt_fs: Any,
    masks: Mapping[str, str],
    gt_table: np.ndarray | None,
    ontology: Ontology,
    model: str | None,
    options: Mapping[str, Any],
) -> Iterator[tuple[LabeledImage, _Item | None]]:
    """Each image with what `_read_item` reads of it, checking that every image's run scored as `setup`."""
    setups: dict[str, ScoringSetup] = {}
    for labeled in images:
        if labeled.run_id not in setups:
            setups[labeled.run_id] = run_setup(dest, labeled.run_id, options, model)
        if setups[labeled.run_id] != setup:
            raise ValueError(
                f"the hand-labeled images of {storage.redact_uri(dest)} were labeled by runs with "
                f"different models or decode settings (e.g. run {labeled.run_id}): pass --run to calibrate "
                "on one run's images"
            )
        yield labeled, _read_item(labeled, gt_fs, masks, gt_table, setup, len(ontology.classes), options)


def _batched(
    items: Iterator[tuple[LabeledImage, _Item | None]], size: int, windowed: list[str], matched: set[str]
) -> Iterator[list[_Item]]:
    """Whole images `size` at a time; adds the relpaths of scenes labeled in windows to `windowed`, and
    every image's mask key (relpath without extension) to `matched`."""
    batch: list[_Item] = []
    for labeled, item in items:
        matched.add(posixpath.splitext(labeled.relpath)[0])
        if item is None:
            windowed.append(labeled.relpath)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_item(
    labeled: LabeledImage,
    gt_fs: Any,
    masks: Mapping[str, str],
    gt_table: np.ndarray | None,
    setup: ScoringSetup,
    num_classes: int,
    options: Mapping[str, Any],
) -> _Item | None:
    """An image as the run's decode stage read it, with its GT; None for a scene labeled in windows."""
    source_uri = str(labeled.row["source_uri"])
    fs, path = storage.filesystem_for(source_uri, options)
    source, pieces = open_source(fs, path, labeled.relpath, setup.window_plan, setup.max_pixels)
    if source.windows is not None:
        return None
    piece = resized(next(pieces), setup.input_spec)
    gt_path = masks[posixpath.splitext(labeled.relpath)[0]]
    truth = decode_mask(storage.read_bytes(gt_fs, gt_path))
    if gt_table is not None:
        truth = gt_table[truth]
    where = storage.redact_uri(storage.uri_for(gt_fs, gt_path))
    if truth.shape != (source.height, source.width):
        raise ValueError(
            f"{where}: the ground truth is {truth.shape[1]}x{truth.shape[0]} pixels but the image "
            f"{labeled.relpath} is {source.width}x{source.height}; a mask must have its image's size"
        )
    values = np.unique(truth)
    outside = values[(values > num_classes) & (values != NODATA)]
    if outside.size:
        raise ValueError(
            f"{where} has mask values {outside.tolist()} but the ontology has "
            f"{num_classes} classes (0 background, 1..{num_classes} in its order, 255 ignored)"
        )
    return _Item(piece.pixels, (source.height, source.width), piece.nodata, truth)


def _gt_to_ontology(gt_names: list[str] | None, ontology: Ontology, gt_masks: str) -> np.ndarray | None:
    """GT values -> O's when an ontology.yaml beside GT_MASKS names its classes in another order (as
    `textseg eval` matches classes by name); None when GT names none or the same order."""
    if gt_names is None or gt_names == ontology.class_names:
        return None
    if sorted(gt_names[1:]) != sorted(ontology.class_names[1:]):
        raise ValueError(
            f"the ontology.yaml of GT_MASKS {storage.redact_uri(gt_masks)} names the classes "
            f"{gt_names[1:]} but --ontology names {ontology.class_names[1:]}; classes are matched by name"
        )
    return value_table(gt_names, ontology.class_names)


def _choose(
    counts: ThresholdCounts,
    ontology: Ontology,
    edges: Sequence[float],
    images: int,
    windowed: list[str],
    unmatched: int,
) -> Calibration:
    """Each class's threshold (`_best_edge`), its IoU before and after, and the calibrated ontology."""
    won, hits, truth = counts.at_edges()
    distribution = counts.distribution()
    as_float32 = np.asarray(edges, dtype=np.float32)
    grid = {int(np.searchsorted(as_float32, np.float32(value))) for value in GRID}
    results, updated = [], []
    for k, cls in enumerate(ontology.classes):
        current = int(np.searchsorted(as_float32, np.float32(cls.threshold)))
        ious = [iou(h, w, truth[k]) for h, w in zip(hits[k], won[k], strict=True)]
        chosen = _best_edge(ious, distribution[k], edges, grid, current) if truth[k] else current
        threshold = cls.threshold if chosen == current else edges[chosen]
        results.append(
            ClassCalibration(cls.name, cls.threshold, threshold, ious[current], ious[chosen], int(truth[k]))
        )
        updated.append(dataclasses.replace(cls, threshold=threshold))
    return Calibration(results, Ontology(tuple(updated)), images, windowed, unmatched)


def _best_edge(
    ious: Sequence[float | None],
    distribution: np.ndarray,
    edges: Sequence[float],
    grid: set[int],
    current: int,
) -> int:
    """The edge index of the best IoU among the candidates: the grid, the percentiles of the class's
    winning scores (`distribution`, per interval) snapped down to an edge, and the current threshold; a
    tie goes to the candidate nearest the current threshold."""
    cumulative = np.cumsum(distribution)
    last = len(edges) - 1
    percentiles = {min(int(np.searchsorted(cumulative, q * cumulative[-1])), last) for q in PERCENTILES}

    def rank(i: int) -> tuple[float, float]:
        value = ious[i]
        return (-1.0 if value is None else value, -abs(edges[i] - edges[current]))

    return max(sorted(grid | percentiles | {current}), key=rank)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred_dest", metavar="PRED_DEST", help="a DEST written by `textseg label`")
    parser.add_argument(
        "gt_masks",
        metavar="GT_MASKS",
        help="hand-labeled masks by relpath (<relpath without extension>.png, values in O's class order)",
    )
    parser.add_argument("--ontology", required=True, metavar="O", help="the ontology YAML to calibrate")
    parser.add_argument("--out", required=True, metavar="O2", help="where to write O with the new thresholds")
    parser.add_argument("--model", help="score with this model instead of the one the run used")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--run", dest="run_id", help="only the images this run labeled (default: all ok)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per model call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    calibration = calibrate(
        args.pred_dest,
        args.gt_masks,
        args.ontology,
        args.out,
        model=args.model,
        device=args.device,
        run_id=args.run_id,
        batch_size=args.batch_size,
        storage_options=parse_storage_options(args.storage_options),
        progress=not args.no_progress,
    )
    print(calibration.table())
    print(f"wrote {storage.redact_uri(args.out)}")
    return 0
