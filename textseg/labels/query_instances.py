"""Instances from a detector's queries (SAM 3): each query a prompt's object, kept above its class's
threshold, as transformers' `Sam3ImageProcessor.post_process_instance_segmentation` keeps them: score
`sigmoid(pred_logits) * sigmoid(presence_logits)` > threshold, mask = the query's mask probabilities
resized (bilinear) to the full image > 0.5, its box scaled to full-image pixels (`detector_bbox`).
Overlapping objects are kept as that method keeps them, each with its own mask. `bbox` is the mask's own
box, as in COCO, so the mask always lies inside it; a kept query whose mask is empty is no object."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from textseg.labels.instances import encode_rle
from textseg.labels.postprocess import ClassGrouping
from textseg.models.base import Queries

MASK_THRESHOLD = 0.5  # post_process_instance_segmentation's default


def query_instances(
    queries: Queries,
    image: int,
    size: tuple[int, int],
    grouping: ClassGrouping,
    class_names: list[str],
    prompts: list[str],
) -> list[dict[str, Any]]:
    """Image `image` of a batch's queries -> its instance rows (textseg.outputs.instances), by prompt
    then query; `size` is the full image's (height, width)."""
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=queries.boxes.device)
    found: list[dict[str, Any]] = []
    for prompt, class_index in enumerate(grouping.prompt_class_index):
        scores = queries.scores[image, prompt].float()
        keep = scores > grouping.thresholds[class_index - 1]
        if not bool(keep.any()):
            continue
        probabilities = torch.sigmoid(queries.mask_logits[image, prompt][keep].float())
        masks = F.interpolate(probabilities[None], size=size, mode="bilinear", align_corners=False)[0]
        boxes = (queries.boxes[image, prompt][keep].float() * scale).cpu().tolist()
        binary = (masks > MASK_THRESHOLD).cpu().numpy()
        for score, box, mask in zip(scores[keep].cpu().tolist(), boxes, binary, strict=True):
            rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            if rows.size == 0:
                continue
            mask_size, counts = encode_rle(mask)
            found.append(
                {
                    "class": class_names[class_index],
                    "class_index": class_index,
                    "prompt": prompts[prompt],
                    "score": score,
                    "bbox": [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)],
                    "detector_bbox": box,
                    "mask_size": mask_size,
                    "mask_counts": counts,
                }
            )
    return found
