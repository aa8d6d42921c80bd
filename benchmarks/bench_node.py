"""One node, every stage: images/s of the bare model path, each stage alone, the in-process runner, the whole
Ray plan and the whole `textseg label` CLI, side by side in one run (machines are noisy; ratios within
one run are what to compare). On a CPU node the hand-written process pool (`benchmarks/hand_pool.py`)
runs on the same files with the same model: the CLI's share of it is the figure to watch there.

    python benchmarks/bench_node.py                                      # CPU: 300 photos, tiny CLIPSeg
    python benchmarks/bench_node.py --images 6000 --width 1024 --height 768 --prompts 4 \\
        --model rd64 --device cuda --batch-size 128                       # a GPU node

Rows:
- read: the files' bytes from the local folder.
- decode: read + decode (JPEGs DCT-reduced) + resize to the model's input: the decode stage's work.
- model: `score` alone on batches already normalized on the device (no copies, no post-processing).
- post-process: one image's logits -> full-size labels and statistics on the device (`label_image`).
- model stage: the model actor's whole call on decoded batches (to the device, model, labels, back).
- encode+write: palette PNG and atomic write of each mask plus its metadata row. Random weights give
  speckled masks, far slower to compress than real ones: `--proxy-labels` (the default) writes
  region-shaped labels instead, blobs of a few classes like a real model's.
- in-process: `textseg.label(runner="local")`, every stage in this process.
- ray plan: `textseg.label(runner="ray")` in this process (Ray started once before, not counted), with
  its actors' start-up seconds and, on CUDA, the share of the run's samples where the GPU was busy.
- cli: `textseg label` as a user runs it, start-up and shutdown included; on CPU, beside the pool.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import textseg  # noqa: E402
from benchmarks.bench_clipseg import PROMPT_POOL  # noqa: E402
from benchmarks.bench_pipeline import save_model, write_images  # noqa: E402
from textseg import storage  # noqa: E402
from textseg.config import from_mapping  # noqa: E402
from textseg.labels.postprocess import label_image  # noqa: E402
from textseg.outputs.state import DoneIndex  # noqa: E402
from textseg.pipeline.batches import batch_len, concat, take, to_batch  # noqa: E402
from textseg.pipeline.decode import decode_stage  # noqa: E402
from textseg.pipeline.label import Labeler  # noqa: E402
from textseg.pipeline.write import write_stage  # noqa: E402
from textseg.plan.prepare import prepare  # noqa: E402
from textseg.plan.summary import RunSummary  # noqa: E402
from textseg.plan.work import list_work  # noqa: E402


def rate(count: int, run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(images/s of `run()` over `count` images, its result), synchronized on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - started), result


def region_labels(height: int, width: int, classes: int, seed: int) -> np.ndarray:
    """Blobs of a few classes at full size: a coarse random grid of class scores, smoothly upsampled and
    argmaxed, so the PNG encoder sees the long runs a real model's masks have."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, classes, max(2, height // 160), max(2, width // 160)), generator=generator)
    full = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return full[0].argmax(0).to(torch.uint8).numpy()


class GpuBusy:
    """The share of samples (every 50 ms) where the GPU ran a kernel, from NVML through torch."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.busy = device, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuBusy:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.busy += torch.cuda.utilization(self.device) > 0
            except Exception:  # noqa: BLE001 - no NVML here: no busy share
                return
            self.samples += 1

    def share(self) -> str:
        return f"{self.busy / self.samples:.0%}" if self.samples else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--model", choices=["tiny", "rd64"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--random-labels", action="store_true", help="encode the model's own speckled labels")
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out: pool, cli, ray, local")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    prompts = ",".join(PROMPT_POOL[: args.prompts])
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        images = root / "images"
        write_images(images, args.images, args.width, args.height)
        model_dir = save_model(root / "model", args.model == "tiny")
        options = {"model": str(model_dir), "prompts": prompts, "device": device.type}
        if args.batch_size:
            options["batch_size"] = args.batch_size
        plan = prepare(from_mapping({"source": str(images), "dest": str(root / "stages"), **options}))
        settings = plan.stage_settings
        batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
        index = DoneIndex.load(str(root / "stages"), {})
        listed = pa.concat_tables(list_work(plan.shards, plan.work_settings(index, write_tallies=False)))
        work = to_batch(listed.to_pydict())
        count = batch_len(work)
        fs, _ = storage.filesystem_for(str(images), {})

        read_rate, _ = rate(count, lambda: [storage.read_bytes(fs, u) for u in work["source_uri"]], device)
        rows.append(("read", read_rate, "bytes from the local folder"))
        decode_rate, decoded = rate(count, lambda: decode_stage(work, settings), device)
        rows.append(("decode", decode_rate, "read + DCT-reduced decode + resize, one core"))

        labeler = Labeler(plan.model, plan.ontology, device.type, batch_size)
        backend = labeler.backend
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(decoded["pixels"][:batch_size])).to(device)
            normalized = backend.normalize(pixels)
            backend.score(normalized, labeler.prompt_embeddings)  # warm
            rounds = max(1, count // len(pixels))
            model_rate, logits = rate(
                rounds * len(pixels),
                lambda: [backend.score(normalized, labeler.prompt_embeddings) for _ in range(rounds)][-1],
                device,
            )
            rows.append(("model", model_rate, f"score() on {len(pixels)}-image batches on {device.type}"))
            size = (args.height, args.width)
            post_rate, _ = rate(
                len(logits),
                lambda: [label_image(image, size, labeler.grouping, backend.score_kind) for image in logits],
                device,
            )
            rows.append(("post-process", post_rate, f"upsample to {args.width}x{args.height} + labels"))
        chunks = [take(decoded, range(s, min(s + batch_size, count))) for s in range(0, count, batch_size)]
        stage_rate, labeled = rate(count, lambda: concat([labeler(chunk) for chunk in chunks]), device)
        rows.append(("model stage", stage_rate, "the actor's call: copies, model, labels, back"))
        if not args.random_labels:
            labeled["labels"] = np.array(
                [region_labels(args.height, args.width, args.prompts + 1, i).tobytes() for i in range(count)],
                dtype=object,
            )
        write_rate, _ = rate(count, lambda: write_stage(labeled, settings), device)
        what = "model's own labels" if args.random_labels else "region-shaped proxy labels"
        rows.append(("encode+write", write_rate, f"level-1 palette PNG + atomic write, {what}"))

        def run(runner: str) -> tuple[float, RunSummary]:
            summary: RunSummary | None = None

            def go() -> None:
                nonlocal summary
                summary = textseg.label(str(images), str(root / f"out-{runner}"), runner=runner, **options)

            images_per_s, _ = rate(count, go, device)
            assert summary is not None and summary.ok == count, summary
            return images_per_s, summary

        if "local" not in skip:
            local_rate, _ = run("local")
            rows.append(("in-process", local_rate, "textseg.label(runner='local'), model load included"))
        if "ray" not in skip:
            import ray

            ray.init(include_dashboard=False, logging_level="ERROR")  # started once, as on a cluster
            with GpuBusy(device) as busy:
                ray_rate, summary = run("ray")
            startup = summary.startup_s
            rows.append(
                (
                    "ray plan",
                    ray_rate,
                    f"GPU busy {busy.share()}; model ready after {startup.get('first_model_ready', 0):.1f} s "
                    f"(actor start-up {startup.get('model_startup', 0):.1f} s), first mask after "
                    f"{startup.get('first_mask', 0):.1f} s",
                )
            )
            ray.shutdown()
        if "cli" not in skip:
            command = [sys.executable, "-m", "textseg.cli", "label", str(images), str(root / "out-cli")]
            command += [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
            cli_rate, _ = rate(
                count, lambda: subprocess.run(command, check=True, capture_output=True), device
            )
            rows.append(("cli", cli_rate, "`textseg label`, process start to exit"))
        if device.type == "cpu" and "pool" not in skip:
            from benchmarks.hand_pool import label_folder

            pool_rate, labeled_count = rate(
                count, lambda: label_folder(images, root / "pool", str(model_dir), prompts.split(",")), device
            )
            assert labeled_count == count
            rows.append(("hand pool", pool_rate, "multiprocessing.Pool, one process per core"))
    print(
        f"{count} JPEGs of {args.width}x{args.height}, K={args.prompts}, model {args.model} "
        f"(random weights), {device.type}, batch {batch_size}, {torch.get_num_threads()} torch threads here"
    )
    print(f"{'path':14} {'images/s':>10}  notes")
    for name, images_per_s, notes in rows:
        print(f"{name:14} {images_per_s:10.1f}  {notes}")
    rates = {name: value for name, value, _ in rows}
    if "cli" in rates and "hand pool" in rates:
        print(f"cli / hand pool: {rates['cli'] / rates['hand pool']:.2f}")


if __name__ == "__main__":
    main()
