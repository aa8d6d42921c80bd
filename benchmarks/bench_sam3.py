"""Images/s of the usual transformers SAM 3 recipe vs textseg's backend, side by side in one run.

Model: `Sam3Config()`'s defaults, the published facebook/sam3 detector's architecture (ViT-L/14 image
encoder with windowed and global RoPE attention, 4-level FPN, 24-layer CLIP text encoder, 6-layer DETR
encoder and decoder, 200 queries, mask decoder), with random weights, which cost what trained ones do.
The tokenizer is the offline byte-level CLIP tokenizer from tests/tiny_models.py (no hub here).
`--input` reads at another square size (the ViT's position tables are tiled to it); 1008 is the
model's own, and on a CPU a smaller one keeps the usual recipe's K = 32 within minutes.

- usual: per (image, prompt), `model(pixel_values=..., input_ids=..., attention_mask=...)`, as the
  model card does for each text prompt: the image and text encoders run K times per image.
- textseg: `Sam3Backend.score` on a batch of images, prompt embeddings computed once before timing.
Both start from the decoded image (Pillow resize to the input size, the processor's 0.5 mean and std;
`Sam3ImageProcessor` itself needs torchvision) and end with the same post-process: `semantic_seg`
upsampled (bilinear, align_corners=False) to full size + sigmoid.

Run: python benchmarks/bench_sam3.py [--images 2] [--prompt-counts 1,4,32] [--input 1008] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # textseg, tests.tiny_models and the CLIPSeg benchmark's helpers

from transformers import Sam3Config, Sam3Model  # noqa: E402

from benchmarks.bench_clipseg import PROMPT_POOL, compare, decoded_photo, textseg_path, upsample_scores  # noqa: E402
from tests.tiny_models import tiny_clip_tokenizer  # noqa: E402
from textseg.models.base import default_dtype  # noqa: E402
from textseg.models.input_spec import InputSpec  # noqa: E402
from textseg.models.sam3 import Sam3Backend  # noqa: E402

PROMPTS = PROMPT_POOL * 4  # 32 prompts


def published_architecture(side: int, device: torch.device, dtype: torch.dtype) -> Sam3Model:
    """Random-weight SAM 3 with the published sizes, reading `side` px square images."""
    tokenizer = tiny_clip_tokenizer()
    grid = side // 14
    config = Sam3Config(
        vision_config={
            "backbone_config": {"model_type": "sam3_vit_model", "image_size": side},
            "backbone_feature_sizes": [[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
        },
        text_config={
            "model_type": "clip_text_model",
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    config._attn_implementation = "sdpa"  # what from_pretrained picks, for both paths
    torch.manual_seed(0)
    return Sam3Model(config).eval().to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2, help="timed images per K")
    parser.add_argument("--prompt-counts", default="1,4,32", help="comma-separated K values (at most 32)")
    parser.add_argument("--batch-size", type=int, default=2, help="textseg images per score call")
    parser.add_argument("--input", type=int, default=1008, help="model input side in px (multiple of 14)")
    parser.add_argument("--image-size", default="1600x1200", help="decoded image WIDTHxHEIGHT")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = default_dtype(device)
    width, height = (int(side) for side in args.image_size.split("x"))
    batch_size = min(args.batch_size, args.images)
    model = published_architecture(args.input, device, dtype)
    spec = InputSpec(size=(args.input, args.input), resample=2, mean=(0.5,) * 3, std=(0.5,) * 3)
    backend = Sam3Backend(model, tiny_clip_tokenizer(), spec, model_id="sam3-random")
    images = [decoded_photo(width, height)] * args.images

    def usual(image: Image.Image, prompts: list[str]) -> torch.Tensor:
        resized = np.asarray(image.resize((args.input, args.input), resample=2))
        pixel_values = backend.normalize(torch.from_numpy(resized.copy())[None].to(device))
        maps = []
        for prompt in prompts:  # the model card's recipe: one forward per text prompt
            tokens = backend.tokenize([prompt])
            maps.append(model(pixel_values=pixel_values, **tokens).semantic_seg[:, 0])
        return upsample_scores(torch.stack(maps, dim=1), (image.height, image.width))

    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"SAM 3 published architecture ({parameters:.0f} M parameters), random weights | {device}, "
        f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} torch threads | input "
        f"{args.input} px | {args.images} images of {width}x{height} per K | textseg: {batch_size} "
        "images a call"
    )
    print("| K | usual img/s | textseg img/s | textseg/usual | textseg/usual by CPU time | max score gap |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for count in (int(k) for k in args.prompt_counts.split(",")):
            prompts = PROMPTS[:count]
            embeddings = backend.embed_prompts(prompts)
            result = compare(
                lambda image, p=prompts: usual(image, p),
                lambda batch, e=embeddings: textseg_path(backend, batch, e),
                images,
                batch_size,
                device,
            )
            usual_rate, fast = result.usual, result.textseg
            print(
                f"| {count} | {usual_rate.wall:.3f} | {fast.wall:.3f} | {fast.wall / usual_rate.wall:.2f} "
                f"| {fast.cpu / usual_rate.cpu:.2f} | {result.max_score_gap:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
