"""The yardstick for a CPU node: a hand-written `multiprocessing.Pool` that labels a folder of JPEGs.

It does the work `textseg label` does for a photo, with nothing of textseg's plan around it: each
process reads a file, decodes it with Pillow's DCT scaling (`draft`) and resizes it to the model's input
as the model's processor does, runs the model on batches of images, upsamples the score maps to full
size, thresholds them, and writes a level-1 palette PNG. The model is the same checkpoint, loaded with
the same loader, and runs one torch thread per process (every core busy, none oversubscribed).
`benchmarks/bench_node.py` runs it beside the whole CLI on the same files.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from textseg.models.clipseg import load_clipseg

THRESHOLD = 0.4
BATCH = 8

_model: Any = None
_prompts: Any = None


def _start(model_dir: str, prompts: Sequence[str]) -> None:
    global _model, _prompts
    torch.set_num_threads(1)
    _model = load_clipseg(model_dir, "cpu")
    with torch.inference_mode():
        _prompts = _model.embed_prompts(list(prompts))


def _decode(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Model-size pixels and the (height, width) a viewer shows."""
    height, width = _model.input_spec.size
    with Image.open(path) as image:
        full_width, full_height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: a quarter turn
            full_width, full_height = full_height, full_width
        image.draft("RGB", (width, height))
        image = ImageOps.exif_transpose(image).convert("RGB")
        pixels = np.asarray(image.resize((width, height), resample=_model.input_spec.resample))
        return pixels, (full_height, full_width)


def _label(job: tuple[Sequence[str], str]) -> int:
    paths, out_dir = job
    decoded = [_decode(path) for path in paths]
    pixels = torch.from_numpy(np.stack([pixels for pixels, _ in decoded]))
    palette = [0, 0, 0] + [255, 0, 0, 0, 255, 0, 0, 0, 255] * 85  # 256 colours: background black
    with torch.inference_mode():
        logits = _model.score(_model.normalize(pixels), _prompts)
        for path, (_, size), image_logits in zip(paths, decoded, logits, strict=True):
            full = torch.nn.functional.interpolate(
                image_logits[None].float(), size=size, mode="bilinear", align_corners=False
            )[0].sigmoid()
            best, index = full.max(dim=0)
            labels = torch.where(best >= THRESHOLD, index + 1, 0).to(torch.uint8).numpy()
            mask = Image.frombytes("P", (size[1], size[0]), labels.tobytes())
            mask.putpalette(palette)
            mask.save(os.path.join(out_dir, pathlib.Path(path).stem + ".png"), compress_level=1)
    return len(paths)


def label_folder(source: pathlib.Path, out: pathlib.Path, model_dir: str, prompts: Sequence[str]) -> int:
    """Label every .jpg under `source` into `out` with one process per core; returns images labeled."""
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(str(p) for p in source.rglob("*.jpg"))
    jobs = [(paths[i : i + BATCH], str(out)) for i in range(0, len(paths), BATCH)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(os.cpu_count() or 1, initializer=_start, initargs=(model_dir, list(prompts))) as pool:
        return sum(pool.imap_unordered(_label, jobs))
