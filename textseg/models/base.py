"""The backend interface: every model textseg runs turns (images, prompts) into per-prompt score maps.

A backend is deliberately small. Batching, devices, dtypes, thresholds and resizing back to full image
size live once, outside the backends (in `textseg.labels.postprocess` and the model stage), so adding a
model means one file plus one registration in `textseg.models`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch

from textseg.models import ScoreKind
from textseg.models.input_spec import InputSpec


@dataclass(frozen=True)
class Queries:
    """A detector's objects for each (image, prompt) of a batch (SAM 3's queries): `scores` (B, P, Q) in
    [0, 1], `boxes` (B, P, Q, 4) x0, y0, x1, y1 as fractions of the input's width and height, `mask_logits`
    (B, P, Q, h, w) at the model's mask resolution."""

    scores: torch.Tensor
    boxes: torch.Tensor
    mask_logits: torch.Tensor


class SegmentationBackend(abc.ABC, torch.nn.Module):
    """A text-prompted segmentation model.

    Contract:
    - `embed_prompts` is called once per actor (or per prompt set), never per image.
    - `score(pixel_values, prompt_embeddings)` returns logits (B, P, h, w) for `score_kind == "sigmoid"`
      (one independent score map per prompt), or (B, 1 + P, h, w) for `score_kind == "softmax"`
      (channel 0 is background, scored against all prompts together). h, w is the model's own output
      size; the caller resizes to each image's full size.
    """

    model_id: str
    input_spec: InputSpec
    score_kind: ScoreKind

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the backend's device -> `pixel_values` (B, 3, H, W) in the weights' dtype."""
        spec = self.input_spec
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * spec.rescale_factor
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(next(self.parameters()).dtype)

    @abc.abstractmethod
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (P, D) embeddings on the backend's device."""

    @abc.abstractmethod
    def score(self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) normalized per `input_spec` -> logits, shapes per the class docstring."""

    def score_with_queries(
        self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, Queries | None]:
        """`score`, plus the model's own objects where it detects them (None for a semantic model, whose
        objects are the regions of its masks: `textseg.labels.instances`)."""
        return self.score(pixel_values, prompt_embeddings), None


def from_pretrained_options(device: torch.device | str, dtype: torch.dtype | None) -> dict[str, Any]:
    """How every transformers backend loads its weights: safetensors only and no remote code (a
    checkpoint is data, never something we execute), SDPA attention (2.2x faster than the eager kernel
    on an H100 for CLIPSeg), in `dtype` or the device's default."""
    return {
        "dtype": dtype or default_dtype(device),
        "attn_implementation": "sdpa",
        "use_safetensors": True,
        "trust_remote_code": False,
    }


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 weights on CUDA (about 20% faster than autocast on an H100); fp32 elsewhere for exactness."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
