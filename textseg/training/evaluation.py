"""How good a segmentation backend is on labeled images, scored the way `textseg label` would label them.

`predict_labels` runs the caller's path exactly: Pillow resize to `input_spec.size`, `normalize`, prompt
embeddings computed once, `score`, then `textseg.labels.postprocess.label_image` (upsample to full size, max
over a class's prompts, softmax over [background, classes], argmax, per-class threshold). So the mIoU
measured here is the mIoU a user gets, not a training-resolution proxy. Counting uses
`textseg.evaluation` (one confusion matrix over all pixels; mIoU over the foreground classes present).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from textseg.evaluation import confusion_matrix, report_from_confusion
from textseg.labels.postprocess import ClassGrouping, label_image
from textseg.models.base import SegmentationBackend

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
# The synonyms the demo model never saw in training, by synthetic class (building, road, water, tree).
UNSEEN_SYNONYMS: tuple[str, ...] = ("house", "street", "lake", "forest")
# Concepts that no synthetic tile shows and no training run of the demo model asks for: what a prompt for
# something absent does (`unrelated_claims`). "airplane" and "cloud" were the first two a user tried.
UNRELATED_CONCEPTS: tuple[str, ...] = (
    "airplane", "cloud", "cat", "motorcycle", "wind turbine", "chair", "banana", "violin", "beach",
    "skyscraper window", "football", "snowman",
)  # fmt: skip


def render_tiles(n: int, seed: int, size: int = 256) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n synthetic tiles exactly as `write_synth_dataset(dest, n, seed, size)` writes them (without disk):
    images (size, size, 3) uint8 and masks (size, size) uint8 in 0..4."""
    from textseg.training.synth import render_tile

    tiles = [render_tile(np.random.default_rng([seed, i]), size) for i in range(n)]
    return [image for image, _ in tiles], [mask for _, mask in tiles]


@torch.no_grad()
def predict_labels(
    backend: SegmentationBackend,
    images: Sequence[np.ndarray],
    class_prompts: Sequence[Sequence[str]],
    thresholds: Sequence[float] | None = None,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """images (H, W, 3) uint8 -> labels (H, W) uint8 at each image's full size (0 background, k = class k).

    `class_prompts[k - 1]` are class k's prompts (synonyms); `thresholds` default to 0 (plain argmax).
    """
    prompts = [p for group in class_prompts for p in group]
    grouping = ClassGrouping(
        prompt_class_index=tuple(k for k, group in enumerate(class_prompts, start=1) for _ in group),
        thresholds=tuple(thresholds) if thresholds is not None else (0.0,) * len(class_prompts),
    )
    device = next(backend.parameters()).device
    embeddings = backend.embed_prompts(prompts)
    height, width = backend.input_spec.size
    labels = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        resized = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((width, height), resample=backend.input_spec.resample))
                for im in chunk
            ]
        )
        pixels = torch.from_numpy(resized).to(device)
        logits = backend.score(backend.normalize(pixels), embeddings)
        for image, image_logits in zip(chunk, logits, strict=True):
            result = label_image(image_logits, image.shape[:2], grouping, backend.score_kind)
            labels.append(result.labels.cpu().numpy())
    return labels


def miou_report(
    predictions: Sequence[np.ndarray], masks: Sequence[np.ndarray], class_names: Sequence[str]
) -> dict[str, Any]:
    """Predicted and true (H, W) uint8 labels -> {"miou", "iou": {class: IoU or None}, "pixel_accuracy"}.

    `class_names` excludes background; mIoU averages the foreground classes present in GT or prediction.
    """
    classes = len(class_names) + 1
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for predicted, mask in zip(predictions, masks, strict=True):
        confusion += confusion_matrix(mask, predicted)[:classes, :classes]
    report = report_from_confusion(confusion, ["background", *class_names], len(masks), [])
    return {
        "miou": report.miou,
        "iou": dict(zip(class_names, report.iou[1:], strict=True)),
        "pixel_accuracy": report.pixel_accuracy,
    }


def evaluate_backend(
    backend: SegmentationBackend,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    class_prompts: Sequence[Sequence[str]],
    class_names: Sequence[str] | None = None,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """`predict_labels` then `miou_report`; classes are named by their first prompt unless named."""
    names = list(class_names) if class_names is not None else [group[0] for group in class_prompts]
    predictions = predict_labels(backend, images, class_prompts, thresholds)
    return miou_report(predictions, masks, names)


def unrelated_claims(
    backend: SegmentationBackend,
    images: Sequence[np.ndarray],
    class_prompts: Sequence[Sequence[str]],
    concepts: Sequence[str],
    thresholds: Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """What a prompt for an absent concept takes: for each concept and each class k, the ontology with
    class k's prompts replaced by the concept labels `images`; the concept's claim is the share of all
    pixels labeled k. Returns {concept: {class's first prompt: share, ...}}; 0 everywhere is a model
    that abstains."""
    claims: dict[str, dict[str, float]] = {}
    pixels = sum(image.shape[0] * image.shape[1] for image in images)
    for concept in concepts:
        claims[concept] = {}
        for k, group in enumerate(class_prompts, start=1):
            prompts = [[concept] if j == k else list(g) for j, g in enumerate(class_prompts, start=1)]
            labels = predict_labels(backend, images, prompts, thresholds)
            claims[concept][group[0]] = sum(int((lab == k).sum()) for lab in labels) / pixels
    return claims
