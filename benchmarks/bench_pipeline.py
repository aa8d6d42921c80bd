"""The whole `textseg label` path, end to end: in-process runner vs the Ray Data plan, side by side.

Writes N photo-like JPEGs to a temporary folder, saves a random-weight CLIPSeg with the real
clipseg-rd64-refined shapes (or the tiny test model with --tiny), then labels the folder with each runner
into a fresh DEST and prints images/s (listing, decode, model, post-process, PNG encode and writes all
included; the Ray figure also includes actor start-up, as a user would see it).

    python benchmarks/bench_pipeline.py --images 64 --prompts 4            # CPU, small
    python benchmarks/bench_pipeline.py --images 6000 --device cuda --batch-size 128   # a GPU node
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import textseg  # noqa: E402
from benchmarks.bench_clipseg import PROMPT_POOL, decoded_photo, rd64_refined  # noqa: E402
from tests.tiny_models import make_tiny_clipseg  # noqa: E402


def write_images(folder: pathlib.Path, count: int, width: int, height: int) -> None:
    folder.mkdir(parents=True)
    photo = np.asarray(decoded_photo(width, height))
    for i in range(count):
        # Shift the photo per image so no two files are byte-identical (no cache can help).
        Image.fromarray(np.roll(photo, i * 7, axis=1)).save(folder / f"img_{i:05d}.jpg", quality=90)


def save_model(directory: pathlib.Path, tiny: bool) -> pathlib.Path:
    if tiny:
        return make_tiny_clipseg(directory)
    model, processor = rd64_refined(torch.device("cpu"))
    model.save_pretrained(directory)
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of rd64's shapes")
    parser.add_argument("--runners", default="local,ray", help="comma-separated: local, ray")
    args = parser.parse_args()
    prompts = ",".join(PROMPT_POOL[: args.prompts])
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_images(root / "images", args.images, args.width, args.height)
        model_dir = save_model(root / "model", args.tiny)
        rates = {}
        for runner in args.runners.split(","):
            started = time.perf_counter()
            summary = textseg.label(
                str(root / "images"),
                str(root / f"out-{runner}"),
                runner=runner,
                model=str(model_dir),
                prompts=prompts,
                device=args.device,
                batch_size=args.batch_size,
            )
            elapsed = time.perf_counter() - started
            assert summary.ok == args.images, summary.to_json()
            rates[runner] = args.images / elapsed
    model = "tiny CLIPSeg" if args.tiny else "clipseg-rd64-refined shapes (random weights)"
    print(
        f"{args.images} JPEGs of {args.width}x{args.height}, K={args.prompts}, {model}, device {args.device}"
    )
    print(f"{'runner':8} {'images/s':>10}")
    for runner, rate in rates.items():
        print(f"{runner:8} {rate:10.2f}")
    if len(rates) == 2:
        print(f"ray/local ratio: {rates['ray'] / rates['local']:.2f}")


if __name__ == "__main__":
    main()
