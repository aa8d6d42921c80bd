"""SAM 3 as a textseg backend: `Sam3Model`'s semantic maps for every (image, prompt), computed cheaper.

The usual recipe (`model(pixel_values=image, input_ids=prompt)` per pair) runs the ViT image encoder,
by far the costliest part, and the CLIP text encoder once per (image, prompt). Only the DETR encoder,
decoder and mask decoder read both, so here:
- prompts are tokenized as `Sam3Processor` does (padded to the text encoder's 32 positions) and
  embedded once (`embed_prompts`), by the caller, and reused for every batch;
- the vision encoder runs once per image (`get_vision_features`);
- the prompt-dependent rest runs once for all (image, prompt) rows of a batch: each image's features
  repeated K times, the K prompts' features tiled B times, through `Sam3Model.forward` itself with the
  precomputed `vision_embeds` and `text_embeds`, so weights, masks and kernels are the model's.

Scores are the logits of `semantic_seg` (sigmoid-scored, one map per prompt); with `presence_gate`, the
logit of `sigmoid(semantic_seg) * sigmoid(presence_logits)`: a prompt the model finds absent from the
image scores low everywhere. Preprocessing comes from the checkpoint's saved processor settings, read
by the torch-free registry: `Sam3ImageProcessor` itself needs torchvision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Sam3Model
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from textseg.models import image_processor_config
from textseg.models.base import Queries, ScoreKind, SegmentationBackend, from_pretrained_options
from textseg.models.input_spec import InputSpec, from_processor_config

# (image, prompt) rows per pass through the prompt-dependent part: its pixel decoder holds
# 288 x 288 x 256 activations per row (~85 MB in fp32), so K = 32 prompts of 8 images go in 8 passes.
ROWS_PER_PASS = 32


class Sam3Backend(SegmentationBackend):
    """A `Sam3Model` with a fast `score`: one independent sigmoid score map per prompt."""

    score_kind: ScoreKind = "sigmoid"

    def __init__(
        self,
        model: Sam3Model,
        tokenizer: Any,
        input_spec: InputSpec,
        model_id: str,
        presence_gate: bool = False,
        rows_per_pass: int = ROWS_PER_PASS,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.input_spec = input_spec
        self.model_id = model_id
        self.presence_gate = presence_gate
        self.rows_per_pass = rows_per_pass
        self._prompt_tokens: int = model.config.get_text_config().max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` (P, 32), as `Sam3Processor(text=...)` makes them."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self._prompt_tokens,
            return_tensors="pt",
        )
        return {name: tokens[name].to(self.device) for name in ("input_ids", "attention_mask")}

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (P, 32, D + 1): each token's projected text feature (`get_text_features`), with the
        prompt's attention mask (1 for a token, 0 for padding) as the last channel, so one tensor carries
        all `score` needs. A prompt's rows do not depend on the others (the CLIP text encoder is causal)."""
        if not prompts:
            raise ValueError("embed_prompts needs at least one prompt.")
        tokens = self.tokenize(prompts)
        features = self.model.get_text_features(**tokens).pooler_output
        mask = tokens["attention_mask"].to(features.dtype)[..., None]
        return torch.cat([features, mask], dim=-1)

    def score(self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W), prompt_embeddings from `embed_prompts` (P, 32, D + 1) -> logits
        (B, P, h, w) at the mask decoder's resolution (288 x 288 for the published model).

        Without `presence_gate`, logits[b, p] equals `Sam3Model.forward(pixel_values=pixel_values[b:b+1],
        input_ids=..., attention_mask=...).semantic_seg[0, 0]` for prompt p, to floating-point
        reassociation."""
        return self.score_with_queries(pixel_values, prompt_embeddings, queries=False)[0]

    def score_with_queries(
        self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor, queries: bool = True
    ) -> tuple[torch.Tensor, Queries | None]:
        """`score`, plus SAM 3's queries: each one's score `sigmoid(pred_logits) * sigmoid(presence_logits)`,
        its box and its mask logits, as `Sam3ImageProcessor.post_process_instance_segmentation` reads
        them."""
        hidden = self.model.config.detr_encoder_config.hidden_size
        if prompt_embeddings.ndim != 3 or prompt_embeddings.shape[-1] != hidden + 1:
            raise ValueError(
                f"prompt_embeddings must be (prompts, tokens, {hidden + 1}) from this backend's "
                f"embed_prompts, got {tuple(prompt_embeddings.shape)}"
            )
        with torch.no_grad():
            vision = self.model.get_vision_features(pixel_values=pixel_values)
        batch, prompts = pixel_values.shape[0], prompt_embeddings.shape[0]
        rows = torch.arange(batch * prompts, device=pixel_values.device)
        passes = [
            self._score_rows(vision, prompt_embeddings, chunk) for chunk in rows.split(self.rows_per_pass)
        ]
        logits = torch.cat([logits for logits, _ in passes])
        logits = logits.reshape(batch, prompts, *logits.shape[-2:])
        if not queries:
            return logits, None
        masks = torch.cat([found.mask_logits for _, found in passes])
        return logits, Queries(
            scores=torch.cat([found.scores for _, found in passes]).reshape(batch, prompts, -1),
            boxes=torch.cat([found.boxes for _, found in passes]).reshape(batch, prompts, -1, 4),
            mask_logits=masks.reshape(batch, prompts, *masks.shape[1:]),
        )

    def _score_rows(
        self, vision: Sam3VisionEncoderOutput, prompt_embeddings: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, Queries]:
        """Rows b * P + p of the (image, prompt) grid -> their logits (len(rows), h, w) and their queries
        (scores (rows, Q), boxes (rows, Q, 4), mask logits (rows, Q, h, w))."""
        prompts = prompt_embeddings.shape[0]
        images, prompt_index = rows // prompts, rows % prompts
        features = prompt_embeddings[prompt_index]
        repeated = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(level[images] for level in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(level[images] for level in vision.fpn_position_encoding),
        )
        out = self.model(
            vision_embeds=repeated,
            text_embeds=BaseModelOutputWithPooling(pooler_output=features[..., :-1]),
            attention_mask=features[..., -1] > 0.5,
        )
        logits = out.semantic_seg[:, 0]
        found = Queries(
            scores=torch.sigmoid(out.pred_logits) * torch.sigmoid(out.presence_logits),
            boxes=out.pred_boxes,
            mask_logits=out.pred_masks,
        )
        if not self.presence_gate:
            return logits, found
        # logit(sigmoid(s) * sigmoid(q)), in log space: stable where either probability is near 0 or 1.
        log_p = F.logsigmoid(logits.float()) + F.logsigmoid(out.presence_logits.float())[:, :, None]
        log_p = log_p.clamp(max=-1e-7)
        return (log_p - torch.log(-torch.expm1(log_p))).to(logits.dtype), found


def load_sam3(
    name_or_path: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    presence_gate: bool = False,
) -> Sam3Backend:
    """Load a SAM 3 checkpoint (a Hugging Face id such as "facebook/sam3", or a local `save_pretrained`
    directory with its tokenizer and processor config). Safetensors only and no remote code."""
    model = Sam3Model.from_pretrained(name_or_path, **from_pretrained_options(device, dtype))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    spec = from_processor_config(image_processor_config(name_or_path))
    backend = Sam3Backend(model, tokenizer, spec, model_id=name_or_path, presence_gate=presence_gate)
    return backend.to(device)


__all__ = ["ROWS_PER_PASS", "Sam3Backend", "load_sam3"]
