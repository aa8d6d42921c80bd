"""The fusion segmentation model: a language model's sentence embedding fused with image features.

Why this shape:
- The text side is any Hugging Face encoder language model, mean-pooled and L2-normalized exactly as
  sentence-transformers does, frozen by default. A prompt is embedded once (and cached), so scoring a
  batch never runs the language model, and a prompt never seen in training still lands near its
  synonyms in the language model's space - which is what lets "house" work when only "buildings",
  "rooftops" ... were trained.
- The image side is a small convolutional encoder trained from scratch (it trains on two CPU cores), or
  any `transformers` backbone (`AutoBackbone`) for users with pretrained weights.
- Fusion: pixel features cross-attend to the token set [learned background token, one token per prompt]
  at the two coarsest scales, a decoder with skip connections goes back to the full input resolution,
  and each pixel's logit for token t is the dot product of the pixel's embedding with t's unit-norm class
  embedding (unit norm, so no prompt wins by the length of its vector; the pixel side keeps its length,
  which acts as confidence). The token set has no order and any length, so one image pass scores a
  variable number of prompts, and channel 0 (background) is a learned embedding rather than "nothing
  scored high".

A saved model is a directory like `transformers`' own: `config.json` (`"model_type": "textseg_fusion"`,
the text model by name, input size, normalization, architecture sizes), `model.safetensors` with the
trainable weights only (a frozen text model is not copied but loaded again from its name; never pickled),
and `preprocessor_config.json`, the input size in Hugging Face's format for the torch-free model registry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from textseg.models.base import ScoreKind, SegmentationBackend
from textseg.models.input_spec import InputSpec
from textseg.models.text_models import DEFAULT_TEXT_MODEL, resolve_text_model

MODEL_TYPE = "textseg_fusion"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROCESSOR_CONFIG_NAME = "preprocessor_config.json"  # input size + normalization, read without torch
TEXT_ENCODER_PREFIX = "text_encoder."


def _is_hub_id(name: str) -> bool:
    return not os.path.isabs(name) and not name.startswith(".") and not os.path.isdir(name)


@dataclass(frozen=True)
class FusionConfig:
    """Everything needed to rebuild a fusion model's architecture; serialized as `config.json`."""

    # Small (22M parameters, 384-d), fast on CPU, good sentence similarity: synonyms land close together.
    text_model: str = DEFAULT_TEXT_MODEL
    # Frozen keeps the synonym geometry the language model learned (unseen prompts generalize) and makes
    # prompt embeddings cacheable; unfreezing saves the text weights into model.safetensors too.
    freeze_text_model: bool = True
    # Longest prompt in tokens; prompts are short phrases, so 16 wastes nothing.
    max_prompt_tokens: int = 16
    # (height, width) the model reads; the caller resizes images to it and upsamples the logits back.
    image_size: tuple[int, int] = (128, 128)
    resample: int = 2  # Pillow filter the caller resizes with (2 = bilinear).
    # ImageNet statistics: right for pretrained backbones and harmless for the from-scratch encoder.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # None: the from-scratch CNN. Otherwise a hub id or local directory of an `AutoBackbone` whose
    # pretrained weights initialize the image encoder.
    backbone: str | None = None
    # The backbone's own config, written when the model is created, so loading never needs the hub.
    backbone_config: dict[str, Any] | None = None
    # From-scratch encoder widths: a full-resolution stem, then one stage per stride 2, 4, 8, 16.
    encoder_channels: tuple[int, ...] = (16, 24, 48, 80, 128)
    # Decoder widths from the finest (stride 1) to the coarsest skip; narrow at full resolution for speed.
    decoder_channels: tuple[int, ...] = (16, 24, 48, 64, 96)
    embed_dim: int = 64  # width of the pixel/class embeddings whose dot products are the logits
    num_heads: int = 4
    fusion_levels: int = 2  # cross-attention at this many of the coarsest feature maps
    # Metres per pixel of the training images (from the dataset's dataset.json), or None: georeferenced
    # scenes are windowed so the model sees this scale (`textseg.image.pieces`).
    gsd_m: float | None = None
    model_type: str = field(default=MODEL_TYPE, init=False)

    def __post_init__(self) -> None:
        for key in ("image_size", "mean", "std", "encoder_channels", "decoder_channels"):
            object.__setattr__(self, key, tuple(getattr(self, key)))  # JSON gives lists; keep it hashable
        uses_cnn = self.backbone is None and self.backbone_config is None
        if uses_cnn and len(self.decoder_channels) != len(self.encoder_channels):
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} entries and encoder_channels "
                f"{len(self.encoder_channels)}: give one decoder width per encoder level"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of num_heads {self.num_heads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, mapping: dict[str, Any]) -> FusionConfig:
        """The inverse of `to_dict`; refuses other model types and unknown keys with a sentence saying so."""
        values = dict(mapping)
        model_type = values.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config model_type is {model_type!r}, not {MODEL_TYPE!r}: not a fusion model")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"unknown fusion config keys {sorted(unknown)}; this textseg knows {sorted(known)}"
            )
        return cls(**values)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: the batches that fit on a CPU are small, and eval == train statistics."""
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class _ConvLayer(nn.Sequential):
    """One 3x3 conv + norm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(out_channels),
            nn.ReLU(inplace=True),
        )


class _ConvBlock(nn.Sequential):
    """Two 3x3 conv + norm + ReLU; the first conv carries the stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            _norm(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(out_channels),
            nn.ReLU(inplace=True),
        )


class ConvEncoder(nn.Module):
    """(B, 3, H, W) -> features at strides 1, 2, 4, ...: one per entry of `channels`."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.channels = list(channels)
        self.stages = nn.ModuleList()
        previous = 3
        for i, width in enumerate(channels):
            self.stages.append(_ConvBlock(previous, width, stride=1 if i == 0 else 2))
            previous = width

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class BackboneEncoder(nn.Module):
    """An `AutoBackbone` plus a light full-resolution stem, so the decoder has a stride-1 skip too.

    Backbones start at stride 4 (or 2); without the stem the masks' edges would be bilinear guesses.
    """

    def __init__(self, backbone: nn.Module, stem_channels: int) -> None:
        super().__init__()
        self.stem = _ConvBlock(3, stem_channels)
        self.backbone = backbone
        self.channels = [stem_channels, *list(backbone.channels)]  # type: ignore[arg-type]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return [self.stem(pixel_values), *self.backbone(pixel_values).feature_maps]


class PromptCrossAttention(nn.Module):
    """Pixel features (queries) attend to the prompt tokens; the answer is added back (residual).

    This is where the image learns *which* classes were asked for: with only "road" in the token set, a
    building pixel has nothing to agree with and its embedding moves toward background.
    """

    def __init__(self, channels: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.to_query = nn.Conv2d(channels, dim, 1)
        self.query_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.to_features = nn.Conv2d(dim, channels, 1)
        self.norm = _norm(channels)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w), tokens (B, T, dim) -> (B, C, h, w)."""
        batch, _, height, width = features.shape
        query = self.query_norm(self.to_query(features).flatten(2).transpose(1, 2))
        attended, _ = self.attention(query, tokens, tokens, need_weights=False)
        attended = attended.transpose(1, 2).reshape(batch, -1, height, width)
        return F.relu(self.norm(features + self.to_features(attended)))


class SkipDecoder(nn.Module):
    """Coarsest features -> full input resolution, merging each finer encoder level (U-Net style)."""

    def __init__(self, encoder_channels: list[int], decoder_channels: list[int]) -> None:
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(
                f"{len(decoder_channels)} decoder widths for {len(encoder_channels)} encoder levels: "
                "give one decoder width per encoder level"
            )
        self.top = nn.Conv2d(encoder_channels[-1], decoder_channels[-1], 1)
        # The full-resolution level gets one conv, not two: it only sharpens edges, and it is where a
        # conv costs most (a quarter of the whole model's time with two).
        self.blocks = nn.ModuleList(
            _ConvBlock(decoder_channels[i + 1] + encoder_channels[i], decoder_channels[i])
            if i > 0
            else _ConvLayer(decoder_channels[1] + encoder_channels[0], decoder_channels[0])
            for i in range(len(encoder_channels) - 1)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features finest first -> (B, decoder_channels[0], H1, W1) at the finest level's size."""
        x = self.top(features[-1])
        for i in range(len(features) - 2, -1, -1):
            skip = features[i]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.blocks[i](torch.cat([x, skip], dim=1))
        return x


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden (P, T, D), mask (P, T) -> (P, D) mean over real tokens, as sentence-transformers pools."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class FusionBackend(SegmentationBackend):
    """Text-prompted segmentation by attention between pixels and prompt embeddings (softmax scores).

    `embed_prompts(prompts)` -> (P, D_text) unit-norm sentence embeddings (cached per prompt while the
    text model is frozen: they cannot change). `score(pixel_values, prompt_embeddings)` -> logits
    (B, 1 + P, H, W) at the input resolution, channel 0 background.
    """

    score_kind: ScoreKind = "softmax"

    def __init__(self, config: FusionConfig, model_id: str | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        text_path = resolve_text_model(config.text_model)
        self.tokenizer = AutoTokenizer.from_pretrained(text_path, trust_remote_code=False)
        self.text_encoder = AutoModel.from_pretrained(
            text_path, trust_remote_code=False, use_safetensors=True
        )
        self.text_encoder.requires_grad_(not config.freeze_text_model)
        if config.freeze_text_model:
            self.text_encoder.eval()
        text_dim = int(self.text_encoder.config.hidden_size)

        self.image_encoder: nn.Module
        if config.backbone is None and config.backbone_config is None:
            self.image_encoder = ConvEncoder(config.encoder_channels)
        else:
            backbone, backbone_config = _build_backbone(config)
            config = dataclasses.replace(config, backbone_config=backbone_config)
            self.image_encoder = BackboneEncoder(backbone, stem_channels=config.encoder_channels[0])
        encoder_channels = list(self.image_encoder.channels)
        decoder_channels = _decoder_widths(config.decoder_channels, len(encoder_channels))
        dim = config.embed_dim

        self.config = config
        self.model_id = model_id or "textseg-fusion"
        self.input_spec = InputSpec(
            size=config.image_size, resample=config.resample, mean=config.mean, std=config.std
        )
        self.text_projection = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))
        self.background_token = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.fusion_level_indices = list(range(len(encoder_channels)))[-config.fusion_levels :]
        self.fusions = nn.ModuleList(
            PromptCrossAttention(encoder_channels[i], dim, config.num_heads)
            for i in self.fusion_level_indices
        )
        self.decoder = SkipDecoder(encoder_channels, decoder_channels)
        self.pixel_head = nn.Conv2d(decoder_channels[0], dim, 1)
        self.class_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # -- text --------------------------------------------------------------------------------------

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """prompts (P strings) -> (P, D_text) L2-normalized mean-pooled embeddings on the model's device.

        Frozen text model: each distinct prompt runs the language model once per backend lifetime (the
        cache is keyed by the exact string). Trainable text model in training mode: always recomputed,
        with gradients.
        """
        if not prompts:
            raise ValueError("embed_prompts needs at least one prompt")
        device = self.background_token.device
        trainable = not self.config.freeze_text_model and self.training
        if trainable:
            return self._encode_text(list(prompts))
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        if missing:
            with torch.no_grad():
                for prompt, embedding in zip(missing, self._encode_text(missing), strict=True):
                    self._prompt_cache[prompt] = embedding.detach()
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(device)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        """One prompt per language-model call: padding changes the numerics slightly, and a prompt's
        embedding must not depend on which other prompts were asked with it (prompts are few)."""
        device = self.background_token.device
        pooled = []
        for prompt in prompts:
            tokens = self.tokenizer(
                [prompt], truncation=True, max_length=self.config.max_prompt_tokens, return_tensors="pt"
            ).to(device)
            hidden = self.text_encoder(**tokens).last_hidden_state
            pooled.append(_mean_pool(hidden, tokens["attention_mask"]))
        return F.normalize(torch.cat(pooled).float(), dim=-1)

    def train(self, mode: bool = True) -> FusionBackend:
        """Keep a frozen text model in eval mode (no dropout) whatever mode the rest is put in."""
        super().train(mode)
        if self.config.freeze_text_model:
            self.text_encoder.eval()
        else:
            self._prompt_cache.clear()
        return self

    # -- image x text -------------------------------------------------------------------------------

    def class_tokens(self, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """prompt_embeddings (P, D_text) -> tokens (1 + P, dim): background first, then one per prompt."""
        projected = self.text_projection(prompt_embeddings.to(self.background_token.dtype))
        return torch.cat([self.background_token, projected], dim=0)

    def score(self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) normalized per `input_spec`, prompt_embeddings (P, D_text)
        -> logits (B, 1 + P, H, W); channel 0 is background, channel 1 + p is prompt p."""
        if prompt_embeddings.ndim != 2 or prompt_embeddings.shape[1] != self.text_projection[0].in_features:
            raise ValueError(
                f"prompt_embeddings must be (P, {self.text_projection[0].in_features}) from this model's "
                f"embed_prompts, got {tuple(prompt_embeddings.shape)}"
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[0]
        tokens = self.class_tokens(prompt_embeddings)
        batch_tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        features = self.image_encoder(pixel_values)
        for level, fusion in zip(self.fusion_level_indices, self.fusions, strict=True):
            features[level] = fusion(features[level], batch_tokens)
        decoded = self.decoder(features)
        if decoded.shape[-2:] != pixel_values.shape[-2:]:
            decoded = F.interpolate(
                decoded, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False
            )
        # logits[k] = <pixel_head(decoded), class_k>; pixel_head is linear, so fold class_k into it and run
        # one (1 + P)-output 1x1 conv on the narrow full-resolution features instead of materializing a
        # (B, dim, H, W) embedding: the same numbers at a fraction of the memory traffic.
        classes = F.normalize(self.class_head(tokens), dim=-1)  # (1 + P, dim)
        head = self.pixel_head.weight.flatten(1)  # (dim, C0)
        weight = (classes @ head)[:, :, None, None].to(decoded.dtype)
        bias = classes @ self.pixel_head.bias  # type: ignore[operator]  # Conv2d(bias=True) has one
        return F.conv2d(decoded, weight, bias.to(decoded.dtype))

    def forward(self, pixel_values: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        return self.score(pixel_values, prompt_embeddings)

    # -- persistence --------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a saved model carries: everything but a frozen text model (loaded by name)."""
        state = self.state_dict()
        if self.config.freeze_text_model:
            state = {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def to_files(self) -> dict[str, bytes]:
        """The model directory as file name -> bytes, so a trainer can write it to any storage."""
        config = self.config.to_dict()
        text_model = self.config.text_model
        if not _is_hub_id(text_model):
            text_model = os.path.abspath(text_model)  # a relative path would break once the dir moves
        config["text_model"] = text_model
        return {
            CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
            PROCESSOR_CONFIG_NAME: (json.dumps(self.processor_config(), indent=2) + "\n").encode(),
            WEIGHTS_NAME: save(
                self.trainable_state_dict(), metadata={"format": "pt", "model_type": MODEL_TYPE}
            ),
        }

    def processor_config(self) -> dict[str, Any]:
        """`input_spec` as a Hugging Face image-processor config, which the model registry reads (without
        torch) to tell the decode tasks what size to resize to."""
        spec = self.input_spec
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": spec.size[0], "width": spec.size[1]},
            "resample": spec.resample,
            "do_rescale": True,
            "rescale_factor": spec.rescale_factor,
            "do_normalize": True,
            "image_mean": list(spec.mean),
            "image_std": list(spec.std),
        }

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write `config.json`, `preprocessor_config.json` and `model.safetensors` into `directory`."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        for name, payload in self.to_files().items():
            partial = target / f".{name}.partial"
            partial.write_bytes(payload)
            partial.replace(target / name)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load saved weights; every trainable weight must be present and no unknown one may be."""
        result = self.load_state_dict(state, strict=False)
        missing = list(result.missing_keys)
        if self.config.freeze_text_model:
            missing = [k for k in missing if not k.startswith(TEXT_ENCODER_PREFIX)]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the weights do not match the config: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}; was model.safetensors written with this config.json?"
            )
        self._prompt_cache.clear()


def _decoder_widths(widths: tuple[int, ...], levels: int) -> list[int]:
    """Decoder widths per encoder level: as configured, or the configured list stretched to `levels`."""
    if len(widths) == levels:
        return list(widths)
    return [widths[min(i, len(widths) - 1)] for i in range(levels)]


def _build_backbone(config: FusionConfig) -> tuple[nn.Module, dict[str, Any]]:
    """An `AutoBackbone` from the saved config (no hub access) or, first time, from pretrained weights."""
    from transformers import AutoBackbone, AutoConfig

    if config.backbone_config is not None:
        values = dict(config.backbone_config)
        backbone_config = AutoConfig.for_model(values.pop("model_type"), **values)
        backbone = AutoBackbone.from_config(backbone_config)
    else:
        assert config.backbone is not None
        backbone = AutoBackbone.from_pretrained(
            config.backbone, trust_remote_code=False, use_safetensors=True
        )
    return backbone, backbone.config.to_dict()


def load_fusion(path: str, device: str | torch.device = "cpu", model_id: str | None = None) -> FusionBackend:
    """A directory written by `save_pretrained` -> the model in eval mode on `device`.

    `model_id` defaults to `path` as given (it goes into every metadata row, so keep it stable).
    """
    directory = Path(path)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path!r} has no {CONFIG_NAME}: not a model directory written by save_pretrained"
        )
    config = FusionConfig.from_dict(json.loads(config_path.read_text()))
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{path!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    backend = FusionBackend(config, model_id=model_id or path)
    backend.load_trainable_state_dict(load_file(str(weights_path)))
    return backend.to(device).eval()
