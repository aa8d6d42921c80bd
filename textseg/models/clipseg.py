"""CLIPSeg as a textseg backend: the same logits as `CLIPSegForImageSegmentation.forward`, computed cheaper.

The usual recipe (`model(pixel_values=[image] * K, input_ids=prompts)`) runs the whole CLIP vision encoder
once per (image, prompt) pair and the text encoder once per image. The logits only depend on the image
through the encoder activations the decoder reads, and on the prompt through its text embedding, so here:
- prompts are embedded once (`embed_prompts`), by the caller, and reused for every batch;
- the vision encoder runs once per image and stops at the deepest layer the decoder reads;
- the decoder's `reduces` projections (hidden -> reduce_dim) run once per image, before the K-fold
  repeat; only FiLM conditioning, the small decoder transformer and the transposed convolution run per
  (image, prompt).
Every step calls the model's own submodules, so weights, dtypes and attention kernels are the model's.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPSegForImageSegmentation

from textseg.models.base import ScoreKind, SegmentationBackend, from_pretrained_options
from textseg.models.input_spec import InputSpec, from_processor_config


def input_spec_from_image_processor(image_processor: Any) -> InputSpec:
    """The checkpoint's own image processor -> InputSpec, through the same reader the driver uses on
    saved processor config (`from_processor_config`), so the decode tasks and the backend agree.

    `to_dict()` includes the processor class's defaults for keys the JSON file leaves out.
    """
    return from_processor_config(image_processor.to_dict())


class ClipSegBackend(SegmentationBackend):
    """A `CLIPSegForImageSegmentation` with a fast `score`: one independent sigmoid score map per prompt."""

    score_kind: ScoreKind = "sigmoid"

    def __init__(
        self, model: CLIPSegForImageSegmentation, tokenizer: Any, input_spec: InputSpec, model_id: str
    ) -> None:
        super().__init__()
        config = model.config
        if not 0 <= config.conditional_layer < len(config.extract_layers):
            raise ValueError(
                f"config.conditional_layer={config.conditional_layer} never conditions the decoder on the "
                f"prompt (it has {len(config.extract_layers)} layers); CLIPSeg text prompting needs "
                "0 <= conditional_layer < len(extract_layers)."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.input_spec = input_spec
        self.model_id = model_id
        # The decoder reads `hidden_states[i + 1]` for i in extract_layers: the output of encoder layer i.
        self._extract_layers = tuple(config.extract_layers)
        self._max_prompt_tokens: int = config.get_text_config().max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (P, projection_dim) text embeddings in the weights' dtype, on the backend's device.

        Same tokenization and text path as the usual recipe (without gradients, as there: the CLIP text
        encoder is frozen); a prompt's embedding does not depend on the others in the list (the text
        encoder is causal and pools at each prompt's end-of-text token).
        """
        if not prompts:
            raise ValueError("embed_prompts needs at least one prompt.")
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self._max_prompt_tokens,
            return_tensors="pt",
        ).to(self.device)
        return self.model.get_conditional_embeddings(
            batch_size=len(prompts), input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )

    def score(self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W), prompt_embeddings (P, D) -> logits (B, P, h, w).

        logits[b, p] equals `CLIPSegForImageSegmentation.forward(pixel_values=pixel_values[b:b+1],
        conditional_embeddings=prompt_embeddings[p:p+1]).logits`, to floating-point reassociation.
        As in `forward`, the frozen CLIP vision encoder runs without gradients and the decoder follows
        the caller's grad mode: inference callers wrap this in `torch.inference_mode()`.
        """
        self._check_inputs(pixel_values, prompt_embeddings)
        with torch.no_grad():
            activations = self._vision_activations(pixel_values)
        return self._decode(activations, prompt_embeddings, grid=self._grid(pixel_values))

    def _check_inputs(self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor) -> None:
        channels = self.model.config.vision_config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must be (batch, {channels}, height, width), got {tuple(pixel_values.shape)}; "
                "build them with `backend.normalize` from uint8 (batch, height, width, 3) pixels."
            )
        projection_dim = self.model.config.projection_dim
        if prompt_embeddings.ndim != 2 or prompt_embeddings.shape[0] == 0:
            raise ValueError(
                f"prompt_embeddings must be (prompts, {projection_dim}) with at least one prompt, got "
                f"{tuple(prompt_embeddings.shape)}."
            )
        if prompt_embeddings.shape[1] != projection_dim:
            raise ValueError(
                f"Make sure the prompt embeddings' feature dimension ({prompt_embeddings.shape[1]}) matches "
                f"config.projection_dim ({projection_dim}): compute them with this backend's embed_prompts."
            )

    def _grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = self.model.config.vision_config.patch_size
        return pixel_values.shape[2] // patch, pixel_values.shape[3] // patch

    def _vision_activations(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The encoder outputs the decoder reads, (B, 1 + tokens, hidden) each, in extract_layers order.

        Mirrors `CLIPSegVisionModel.forward` (embeddings with position-encoding interpolation, as the
        checkpoint runs at 352 px on 224 px position tables; pre-layernorm; encoder layers) but stops after
        layer max(extract_layers): the rest of the encoder and its post-layernorm feed only the pooled
        output, which segmentation does not use.
        """
        vision = self.model.clip.vision_model
        hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden = vision.pre_layrnorm(hidden)
        kept: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(vision.encoder.layers[: max(self._extract_layers) + 1]):
            hidden = layer(hidden, attention_mask=None)
            if index in self._extract_layers:
                kept[index] = hidden
        return [kept[index] for index in self._extract_layers]

    def _decode(
        self, activations: list[torch.Tensor], prompt_embeddings: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Mirrors `CLIPSegDecoder.forward`, with per-image work done before the per-prompt repeat.

        Until the FiLM step `output` is per image (B, T, R); after it, per (image, prompt) with row
        b * P + p (B * P, T, R). A per-image reduced activation joins the per-pair stream by broadcasting,
        which adds exactly the values the repeated tensor would.
        """
        decoder = self.model.decoder
        batch, prompts = activations[0].shape[0], prompt_embeddings.shape[0]
        embeddings = prompt_embeddings.to(decoder.film_mul.weight.dtype)
        film_mul = decoder.film_mul(embeddings)[None, :, None, :]  # (1, P, 1, R)
        film_add = decoder.film_add(embeddings)[None, :, None, :]
        output: torch.Tensor | None = None
        conditioned = False
        for index, (activation, layer, reduce) in enumerate(
            zip(activations[::-1], decoder.layers, decoder.reduces, strict=True)
        ):
            reduced = reduce(activation)  # once per image: (B, T, R)
            if output is None:
                output = reduced
            elif conditioned:
                output = (reduced[:, None] + output.unflatten(0, (batch, prompts))).flatten(0, 1)
            else:
                output = reduced + output
            if index == decoder.conditional_layer:
                output = (film_mul * output[:, None] + film_add).flatten(0, 1)
                conditioned = True
            output = layer(output, attention_mask=None)
        assert output is not None and conditioned  # guaranteed by the conditional_layer check in __init__
        # Drop the class token: (B * P, T, R) -> (B * P, R, grid_h, grid_w).
        output = output[:, 1:, :].transpose(1, 2)
        output = output.reshape(output.shape[0], output.shape[1], *grid)
        logits = decoder.transposed_convolution(output)  # (B * P, 1, h, w)
        return logits.reshape(batch, prompts, *logits.shape[-2:])


def load_clipseg(
    name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> ClipSegBackend:
    """Load a CLIPSeg checkpoint (a Hugging Face id such as "CIDAS/clipseg-rd64-refined", or a local
    `save_pretrained` directory holding the model, its tokenizer and its image processor config).

    Loaded as every backend is (`from_pretrained_options`: safetensors, no remote code, SDPA).
    """
    model = CLIPSegForImageSegmentation.from_pretrained(
        name_or_path, **from_pretrained_options(device, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    spec = input_spec_from_image_processor(image_processor)
    return ClipSegBackend(model, tokenizer, spec, model_id=name_or_path).to(device)


__all__ = ["ClipSegBackend", "input_spec_from_image_processor", "load_clipseg"]
