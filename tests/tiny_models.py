"""Tiny random checkpoints for tests: same files and classes as the real ones, built offline in ~a second.

Regenerate by calling the functions; everything is seeded, so the weights are the same on every run.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)

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
    directory: pathlib.Path, *, use_complex_transposed_convolution: bool = True
) -> pathlib.Path:
    """Write a tiny random CLIPSeg checkpoint (model.safetensors, config, tokenizer, processor config) to
    `directory` and return it; it loads like the hub's CIDAS/clipseg-rd64-refined (the complex transposed
    convolution variant by default, as that is the model `--model clipseg` means)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    config = tiny_clipseg_config(
        tokenizer, use_complex_transposed_convolution=use_complex_transposed_convolution
    )
    torch.manual_seed(0)
    model = tiny_clipseg_model(config)
    model.save_pretrained(directory)
    # The hub's layout: tokenizer files + preprocessor_config.json, which `textseg.models` reads torch-free.
    processor = tiny_clipseg_processor(tokenizer)
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    return directory
