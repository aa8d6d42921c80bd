"""Scores -> labels at full image size, on the model's device; per-class pixel fractions and mean scores.

This runs inside the model actor (on an H100: upsampling K score maps belongs on the GPU, and only uint8
labels plus a few per-class sums should travel to the CPU). It implements the mask semantics (README) once
for every backend:

- sigmoid backends: score_k(x) = max over class k's prompts of sigmoid(logit(x)), logits resized bilinear
  (align_corners=False) to the image's full size; label(x) = argmax_k score_k(x) if that maximum reaches
  threshold_k, else 0. The background "score" reported in statistics is 1 - max_k score_k.
- softmax backends (channel 0 = background): class logits are the max over the class's prompts' logits,
  then softmax over [background, classes]; label = argmax, demoted to 0 when its probability is below the
  class threshold.
- no-data pixels (fully transparent in the source) are 255 and count in no class.

Labels come straight from the logits (`label_image`): the argmax and threshold only need the winning
class's logit, so the full-size probability map of every class is never built (on one CPU core at
1600x1200 and K=2: ~30 ms an image against ~145 ms for scores then labels). The (1 + K) score maps are
built only where they are the output (`class_scores`: a window of a scene, blended with its neighbours
before `labels_from_scores` decides; a whole image's scores kept for --vectors). Both paths decide
labels with `_decide`, and every full-size pass is a single vectorized sweep (no boolean gathers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from textseg.models.base import ScoreKind

NODATA = 255


@dataclass(frozen=True)
class ClassGrouping:
    """Which prompt belongs to which class, and each class's threshold (classes are 1..K)."""

    prompt_class_index: tuple[int, ...]  # per prompt, its class index 1..K
    thresholds: tuple[float, ...]  # per class 1..K

    @property
    def num_classes(self) -> int:
        return len(self.thresholds)


@dataclass(frozen=True)
class LabelResult:
    labels: torch.Tensor  # (H, W) uint8 on the scoring device: class index, 0 background, 255 no-data
    class_pixel_count: list[int]  # background first; pixels labeled k (no-data pixels count nowhere)
    class_score_sum: list[float]  # background first; sum of class k's score over the pixels labeled k


def class_scores(
    logits: torch.Tensor, size: tuple[int, int], grouping: ClassGrouping, score_kind: ScoreKind
) -> torch.Tensor:
    """logits (P, h, w) for sigmoid or (1 + P, h, w) for softmax -> scores (1 + K, H, W) float32 in [0, 1].

    Row 0 is the background score, rows 1..K the classes'. Upsampling happens in float32 whatever the
    model's dtype, so bf16 models threshold the same maps as fp32 ones up to the model's own error.
    """
    background, per_class = _class_logits(logits, size, grouping, score_kind)
    if background is not None:
        return torch.softmax(torch.cat([background[None], per_class]), dim=0)
    class_prob = torch.sigmoid(per_class)
    return torch.cat([1.0 - class_prob.amax(dim=0, keepdim=True), class_prob])


def label_image(
    logits: torch.Tensor,
    size: tuple[int, int],
    grouping: ClassGrouping,
    score_kind: ScoreKind,
    nodata: torch.Tensor | None = None,
) -> LabelResult:
    """One image's model logits -> its full-size labels (the README's mask semantics). size is (H, W).

    Equal to `labels_from_scores(class_scores(...))` (up to float rounding of the reported scores)
    without building the (1 + K, H, W) probabilities.
    """
    background, per_class = _class_logits(logits, size, grouping, score_kind)
    if background is None:  # sigmoid: the best class's probability; background is its complement
        best_logit, best = _argmax(per_class, first=1)
        return _decide(torch.sigmoid(best_logit), best, None, grouping, nodata)
    # softmax over [background, classes], evaluated at the winner and at the background only
    stacked = torch.cat([background[None], per_class])
    best_logit, best = _argmax(stacked)
    denominator = torch.zeros_like(best_logit)
    for row in stacked:
        denominator += torch.exp(row - best_logit)
    probability = denominator.reciprocal_()
    return _decide(probability, best, torch.exp(background - best_logit) * probability, grouping, nodata)


def labels_from_scores(
    scores: torch.Tensor, grouping: ClassGrouping, score_kind: ScoreKind, nodata: torch.Tensor | None
) -> LabelResult:
    """scores (1 + K, H, W) from `class_scores` (or blended from windows'); nodata (H, W) bool or None ->
    labels and statistics."""
    if score_kind == "softmax":
        best_score, best = _argmax(scores)
    else:
        best_score, best = _argmax(scores[1:], first=1)
    return _decide(best_score, best, scores[0], grouping, nodata)


def _class_logits(
    logits: torch.Tensor, size: tuple[int, int], grouping: ClassGrouping, score_kind: ScoreKind
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(background logits (H, W) for softmax else None, class logits (K, H, W)): upsampled in float32,
    each class the max over its prompts."""
    full = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    background, prompt_logits = (full[0], full[1:]) if score_kind == "softmax" else (None, full)
    if prompt_logits.shape[0] != len(grouping.prompt_class_index):
        raise ValueError(
            f"the model returned {prompt_logits.shape[0]} prompt maps for "
            f"{len(grouping.prompt_class_index)} prompts; check the backend's score_kind"
        )
    if grouping.prompt_class_index == tuple(range(1, grouping.num_classes + 1)):
        return background, prompt_logits  # one prompt per class, in order: nothing to merge
    per_class = torch.stack(
        [
            prompt_logits[[i for i, c in enumerate(grouping.prompt_class_index) if c == k]].amax(dim=0)
            for k in range(1, grouping.num_classes + 1)
        ]
    )
    return background, per_class


def _argmax(maps: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """maps (N, H, W) -> (max (H, W), index (H, W) uint8 counting from `first`), the first index on ties.

    One elementwise sweep per map, and uint8 arithmetic where a mask picks values: on CPU, torch.max
    over a short leading dimension is a strided reduction and masked_fill/where with a bool mask are
    scalar loops, each 5-100x slower than these vectorized passes (1600x1200 on one core: ~10 ms
    against 0.1-1.5 ms)."""
    best = maps[0].clone()
    index = torch.full(best.shape, first, dtype=torch.uint8, device=maps.device)
    for k in range(1, maps.shape[0]):
        wins = (maps[k] > best).view(torch.uint8)
        index.add_(torch.sub(first + k, index).mul_(wins))  # index := first + k where it wins (mod 256)
        torch.maximum(best, maps[k], out=best)
    return best, index


def _decide(
    best_score: torch.Tensor,
    best: torch.Tensor,
    background_score: torch.Tensor | None,
    grouping: ClassGrouping,
    nodata: torch.Tensor | None,
) -> LabelResult:
    """The winning class `best` (H, W) uint8 (0 = background) and its score -> labels demoted to 0 below
    the class's threshold, no-data set to 255, and the per-class statistics. The score counted for a
    background pixel is `background_score`; None means 1 - best_score (sigmoid), which needs no map: a
    class's sum of (1 - s) is its pixel count less its sum of s."""
    thresholds = grouping.thresholds
    if len(set(thresholds)) == 1:
        passes = best_score >= thresholds[0]
    else:
        table = torch.tensor((0.0, *thresholds), device=best_score.device)
        passes = best_score >= table.take(best.long())
    labels = best.mul_(passes.view(torch.uint8))
    counted = (
        best_score if background_score is None else torch.where(labels > 0, best_score, background_score)
    )
    if nodata is not None:  # labels <= K < 255: OR with 255 sets exactly the no-data pixels to 255
        labels.bitwise_or_(nodata.to(torch.uint8).mul_(NODATA))
    bins = grouping.num_classes + 1
    flat = labels.flatten()
    # 256 bins, then the first 1 + K: no-data (255) falls outside without a boolean gather.
    counts = torch.bincount(flat, minlength=NODATA + 1)[:bins].tolist()
    sums = torch.bincount(flat, weights=counted.flatten().double(), minlength=NODATA + 1)[:bins].tolist()
    if background_score is None:
        sums[0] = counts[0] - sums[0]
    return LabelResult(labels, counts, sums)
