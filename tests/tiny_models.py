"""Tiny random checkpoints for tests: same files and classes as the real ones, built offline in ~a second.

Regenerate by calling the functions; everything is seeded, so the weights are the same on every run.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    Sam3Config,
    Sam3Model,
    ViTImageProcessor,
)

from textseg.models.fusion import FusionBackend, FusionConfig

TINY_IMAGE_SIZE = 64  # 4 x 4 patches of 16 px: the smallest grid where the decoder's reshapes mean something
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # CIDAS/clipseg-rd64-refined's preprocessor config
IMAGENET_STD = (0.229, 0.224, 0.225)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A real `CLIPTokenizer` (byte-level BPE, CLIP's pre-tokenizer and special tokens) with no merges.

    The vocabulary is the 256 byte symbols, each also with CLIP's end-of-word suffix, plus
    <|startoftext|> (id 512) and <|endoftext|> (id 513, also padding), so any text tokenizes one symbol
    per byte without the 49k-entry vocabulary file from the hub.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [symbol + "</w>" for symbol in alphabet] + [BOS, EOS]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=[], bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def tiny_clipseg_config(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPSegConfig:
    """A CLIPSeg config shaped like rd64-refined (patch 16, complex transposed conv), but 32 wide.

    The vision encoder has 3 layers and the decoder reads layers 0 and 1, so the fast path's "stop at
    the deepest layer read" skips a real layer, and the decoder has two layers to add reductions across.
    """
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 16,
    }
    settings: dict[str, Any] = {
        "text_config": text_config,
        "vision_config": vision_config,
        "projection_dim": 32,
        "reduce_dim": 16,
        "extract_layers": [0, 1],
        "conditional_layer": 0,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 32,
        "use_complex_transposed_convolution": True,
    }
    settings.update(overrides)
    return CLIPSegConfig(**settings)


def tiny_clipseg_model(config: CLIPSegConfig) -> CLIPSegForImageSegmentation:
    """A random CLIPSeg whose logits are of order one, as a trained model's are, not in the hundreds.

    Transformers' generic init draws the decoder's FiLM, `reduces` and transposed-convolution weights
    with std = initializer_factor = 1.0, which makes random logits reach ~1e2-1e3 and an absolute
    tolerance meaningless; PyTorch's own fan-in init for those layers keeps them realistic.
    """
    model = CLIPSegForImageSegmentation(config).eval()
    decoder = model.decoder
    for module in [
        decoder.film_mul,
        decoder.film_add,
        *decoder.reduces,
        *decoder.transposed_convolution.modules(),
    ]:
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
    return model


def tiny_clipseg_processor(tokenizer: CLIPTokenizer) -> CLIPSegProcessor:
    """CLIPSeg's processor as the hub ships it: ViT resize to {height, width}, bilinear, ImageNet stats."""
    image_processor = ViTImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        resample=2,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_tiny_clipseg(
    directory: pathlib.Path, *, use_complex_transposed_convolution: bool = True, whole_processor: bool = False
) -> pathlib.Path:
    """Write a tiny random CLIPSeg checkpoint (model.safetensors, config, tokenizer, processor config) to
    `directory` and return it; it loads like the hub's CIDAS/clipseg-rd64-refined (the complex transposed
    convolution variant by default, as that is the model `--model clipseg` means).

    `whole_processor`: save as a user of transformers 5 does, `processor.save_pretrained(directory)`,
    which writes one `processor_config.json` and no `preprocessor_config.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    config = tiny_clipseg_config(
        tokenizer, use_complex_transposed_convolution=use_complex_transposed_convolution
    )
    torch.manual_seed(0)
    model = tiny_clipseg_model(config)
    model.save_pretrained(directory)
    processor = tiny_clipseg_processor(tokenizer)
    if whole_processor:
        processor.save_pretrained(directory)
        return directory
    # The hub's layout: tokenizer files + preprocessor_config.json, which `textseg.models` reads torch-free.
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    return directory


SAM3_TINY_IMAGE_SIZE = 112  # 8 x 8 patches of 14 px; the FPN levels are then 32, 16 and 8 px square
SAM3_MEAN = SAM3_STD = (0.5, 0.5, 0.5)  # Sam3ImageProcessor's defaults (IMAGENET_STANDARD_*)


def tiny_sam3_config(tokenizer: CLIPTokenizer, **overrides: Any) -> Sam3Config:
    """A SAM 3 config with the published model's structure (windowed + global ViT layers with RoPE, a
    4-level FPN of which the detector reads 3, DETR encoder and decoder with a presence token, mask
    decoder) at 32 wide, one or two layers each, 10 queries."""
    grid = SAM3_TINY_IMAGE_SIZE // 14
    settings: dict[str, Any] = {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": SAM3_TINY_IMAGE_SIZE,
                "patch_size": 14,
                "window_size": 4,
                "global_attn_indexes": [1],
                "pretrain_image_size": 56,
            },
            "fpn_hidden_size": 32,
            "backbone_feature_sizes": [[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
        },
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "geometry_encoder_config": {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2},
        "detr_encoder_config": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 2},
        "detr_decoder_config": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_attention_heads": 2,
            "num_queries": 10,
        },
        "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 2},
    }
    for name in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config"):
        settings[name]["intermediate_size"] = 64
    settings.update(overrides)
    return Sam3Config(**settings)


def sam3_processor_config() -> dict[str, Any]:
    """`processor_config.json` as `Sam3Processor.save_pretrained` writes it (its image processor entry
    holds Sam3ImageProcessor's settings); written by hand because that class needs torchvision."""
    return {
        "image_processor": {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(SAM3_MEAN),
            "image_processor_type": "Sam3ImageProcessor",
            "image_std": list(SAM3_STD),
            "mask_size": {"height": SAM3_TINY_IMAGE_SIZE // 14 * 4, "width": SAM3_TINY_IMAGE_SIZE // 14 * 4},
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": SAM3_TINY_IMAGE_SIZE, "width": SAM3_TINY_IMAGE_SIZE},
        },
        "point_pad_value": -10,
        "processor_class": "Sam3Processor",
        "target_size": SAM3_TINY_IMAGE_SIZE,
    }


def make_tiny_sam3(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write a tiny random SAM 3 checkpoint (model.safetensors, config with model_type sam3, tokenizer,
    processor_config.json) to `directory`, laid out as `save_pretrained` of the model and its processor."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    model = Sam3Model(tiny_sam3_config(tokenizer)).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps(sam3_processor_config(), indent=2))
    return directory


LETTERS = "abcdefghijklmnopqrstuvwxyz"  # the tiny BERT tokenizer spells prompts letter by letter


def make_tiny_text_model(directory: pathlib.Path) -> pathlib.Path:
    """A tiny random BERT + a letter-level WordPiece tokenizer saved like a hub checkpoint (safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *("##" + c for c in LETTERS)]
    tokenizer = BertTokenizer(vocab={s: i for i, s in enumerate(symbols)})
    config = BertConfig(
        vocab_size=len(symbols),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_fusion_config(text_model: pathlib.Path, **overrides: object) -> FusionConfig:
    """A fusion model 32 px wide with 8-16 channels, on the tiny BERT at `text_model`."""
    settings: dict = {
        "text_model": str(text_model),
        "image_size": (32, 32),
        "encoder_channels": (8, 8, 16, 16),
        "decoder_channels": (8, 8, 16, 16),
        "embed_dim": 16,
        "num_heads": 2,
    }
    settings.update(overrides)
    return FusionConfig(**settings)


def make_tiny_fusion(directory: pathlib.Path) -> pathlib.Path:
    """Write a tiny random fusion model (its tiny BERT beside it, in `directory`/text) to `directory`."""
    text_model = make_tiny_text_model(directory / "text")
    torch.manual_seed(0)
    FusionBackend(tiny_fusion_config(text_model)).eval().save_pretrained(directory)
    return directory


def sam3_reference_outputs(model_dir: pathlib.Path, image: Image.Image, prompts: list[str]) -> list[Any]:
    """`Sam3Model.forward` of a saved SAM 3, one call per prompt (the model card's recipe), on pixels made
    as Sam3ImageProcessor makes them (bilinear resize, rescale, 0.5 mean and std; written out here as that
    class needs torchvision) and tokens as Sam3Processor makes them."""
    model = Sam3Model.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    side = model.config.vision_config.backbone_config.image_size
    resized = np.array(image.resize((side, side), Image.Resampling.BILINEAR))
    pixel_values = (torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    outputs = []
    for prompt in prompts:
        tokens = tokenizer([prompt], padding="max_length", max_length=32, return_tensors="pt")
        with torch.no_grad():
            outputs.append(
                model(
                    pixel_values=pixel_values,
                    input_ids=tokens.input_ids,
                    attention_mask=tokens.attention_mask,
                )
            )
    return outputs
