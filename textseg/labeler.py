"""The model stage: decoded model-size pixels -> full-resolution uint8 labels, on the model's device.

One `Labeler` lives in each model actor (or in the in-process runner). It loads the weights and embeds
the ontology's prompts once, then for each batch runs the backend once per image (however many prompts)
and turns the scores into labels with `textseg.postprocess` before anything leaves the device.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from textseg.models import ModelRef, load_model, resolve_device
from textseg.ontology import Ontology
from textseg.postprocess import ClassGrouping, label_image
from textseg.stages import Batch, unpack_nodata


class Labeler:
    """Callable on batches: Ray Data's actor pool constructs it once per actor and calls it per batch."""

    def __init__(self, model: ModelRef, ontology: Ontology, device: str = "auto", batch_size: int = 8):
        self.device = torch.device(resolve_device(device))
        self.batch_size = batch_size
        self.backend = load_model(model, str(self.device)).eval()
        self.grouping = ClassGrouping(tuple(ontology.prompt_class_index), tuple(ontology.thresholds))
        with torch.inference_mode():
            self.prompt_embeddings = self.backend.embed_prompts(ontology.prompts)

    def __call__(self, batch: Batch) -> Batch:
        """Adds `labels` (raw (H, W) uint8 bytes per row), `class_pixel_fraction` and `class_mean_score`
        ((B, 1 + K) float32, background first); drops the model-size `pixels`."""
        count = len(batch["relpath"])
        bins = self.grouping.num_classes + 1
        labels = np.full(count, b"", dtype=object)
        fractions = np.full((count, bins), np.nan, dtype=np.float32)
        mean_scores = np.full((count, bins), np.nan, dtype=np.float32)
        elapsed = batch["elapsed_ms"].astype(np.float64)
        todo = [i for i in range(count) if not batch["error"][i]]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            started = time.perf_counter()
            with torch.inference_mode():
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][chunk])).to(self.device)
                logits = self.backend.score(self.backend.normalize(pixels), self.prompt_embeddings)
                for j, i in enumerate(chunk):
                    height, width = int(batch["height"][i]), int(batch["width"][i])
                    nodata = unpack_nodata(batch["nodata"][i], height, width)
                    result = label_image(
                        logits[j],
                        (height, width),
                        self.grouping,
                        self.backend.score_kind,
                        None if nodata is None else torch.from_numpy(nodata).to(self.device),
                    )
                    labels[i] = result.labels.cpu().numpy().tobytes()
                    fractions[i] = result.class_pixel_fraction
                    mean_scores[i] = result.class_mean_score
            per_image_ms = (time.perf_counter() - started) * 1000 / len(chunk)
            elapsed[chunk] += per_image_ms
        out = {k: v for k, v in batch.items() if k not in ("pixels", "nodata")}
        out.update(
            labels=labels, class_pixel_fraction=fractions, class_mean_score=mean_scores, elapsed_ms=elapsed
        )
        return out
