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
    full = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if score_kind == "softmax":
        background, prompt_logits = full[:1], full[1:]
    else:
        background, prompt_logits = None, full
    if prompt_logits.shape[0] != len(grouping.prompt_class_index):
        raise ValueError(
            f"the model returned {prompt_logits.shape[0]} prompt maps for "
            f"{len(grouping.prompt_class_index)} prompts; check the backend's score_kind"
        )
    per_class = torch.stack(
        [
            prompt_logits[[i for i, c in enumerate(grouping.prompt_class_index) if c == k]].amax(dim=0)
            for k in range(1, grouping.num_classes + 1)
        ]
    )
    if background is not None:
        return torch.softmax(torch.cat([background, per_class]), dim=0)
    class_prob = torch.sigmoid(per_class)
    return torch.cat([1.0 - class_prob.amax(dim=0, keepdim=True), class_prob])


def labels_from_scores(
    scores: torch.Tensor, grouping: ClassGrouping, score_kind: ScoreKind, nodata: torch.Tensor | None
) -> LabelResult:
    """scores (1 + K, H, W) from `class_scores`; nodata (H, W) bool or None -> labels and statistics."""
    thresholds = torch.tensor((0.0, *grouping.thresholds), device=scores.device)
    if score_kind == "softmax":
        best_score, best = scores.max(dim=0)
    else:
        best_score, best = scores[1:].max(dim=0)
        best = best + 1
    labels = torch.where(best_score >= thresholds[best], best, torch.zeros_like(best))
    chosen_score = scores.gather(0, labels[None])[0]
    if nodata is not None:
        labels = labels.masked_fill(nodata, NODATA)
    flat = labels.flatten().long()
    bins = grouping.num_classes + 1
    valid = flat != NODATA
    counts = torch.bincount(flat[valid], minlength=bins)
    score_sums = torch.bincount(flat[valid], weights=chosen_score.flatten()[valid].double(), minlength=bins)
    return LabelResult(labels.to(torch.uint8), counts.tolist(), score_sums.tolist())


def label_image(
    logits: torch.Tensor,
    size: tuple[int, int],
    grouping: ClassGrouping,
    score_kind: ScoreKind,
    nodata: torch.Tensor | None = None,
) -> LabelResult:
    """One image's model logits -> its full-size labels (the README's mask semantics). size is (H, W)."""
    return labels_from_scores(class_scores(logits, size, grouping, score_kind), grouping, score_kind, nodata)
