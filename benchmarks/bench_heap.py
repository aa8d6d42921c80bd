"""What keeping freed memory in a stage process buys (`textseg.pipeline.heap`): ms per image of the
post-processing (`label_image`: upsample to full size, winner, threshold, statistics) and of a CPU actor's
whole call (decode, model, labels, PNG, write), each in fresh processes with glibc's default and with
freed memory kept, alternated so that both see the same machine; medians side by side in one run.

    python benchmarks/bench_heap.py                    # 1600x1200, K=2, 3 rounds
    python benchmarks/bench_heap.py --width 4000 --height 3000 --prompts 8
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

CHILD = "--child"


def child(keep: bool, width: int, height: int, prompts: int, images: pathlib.Path, model: str) -> dict:
    """In this fresh process: ms per image of label_image and of the fused actor's call."""
    import pyarrow as pa
    import torch

    from benchmarks.bench_clipseg import PROMPT_POOL
    from textseg.config import from_mapping
    from textseg.labels.postprocess import ClassGrouping, label_image
    from textseg.outputs.state import DoneIndex
    from textseg.pipeline.batches import take, to_batch
    from textseg.pipeline.fused import DecodeLabelWrite
    from textseg.pipeline.heap import keep_freed_memory
    from textseg.plan.work import list_work

    if keep:
        assert keep_freed_memory(), "glibc's mallopt refused the settings"
    torch.set_num_threads(1)  # as in a CPU plan actor
    grouping = ClassGrouping(tuple(range(1, prompts + 1)), (0.5,) * prompts)
    logits = torch.randn(prompts, 64, 64)
    label_image(logits, (height, width), grouping, "sigmoid")
    started = time.perf_counter()
    for _ in range(20):
        label_image(logits, (height, width), grouping, "sigmoid")
    post_ms = (time.perf_counter() - started) / 20 * 1000

    from textseg.plan.prepare import prepare

    with tempfile.TemporaryDirectory() as dest:
        options = {"model": model, "prompts": ",".join(PROMPT_POOL[:prompts]), "device": "cpu"}
        plan = prepare(from_mapping({"source": str(images), "dest": dest, **options}))
        index = DoneIndex.load(dest, {})
        listed = pa.concat_tables(
            list(list_work(plan.shards, plan.work_settings(index, write_tallies=False)))
        )
        work = to_batch(listed.to_pydict())
        actor = DecodeLabelWrite(plan.model, plan.ontology, plan.stage_settings, "cpu", 8, torch_threads=1)
        actor(take(work, range(0, 8)))
        count = len(work["relpath"]) - 8
        started = time.perf_counter()
        actor(take(work, range(8, 8 + count)))
        call_ms = (time.perf_counter() - started) / count * 1000
    return {"post_ms": post_ms, "call_ms": call_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(
            args.keep, args.width, args.height, args.prompts, pathlib.Path(args.folder), args.model
        )
        print(json.dumps(result))
        return

    from benchmarks.bench_pipeline import save_model, write_images

    results: dict[str, list[dict]] = {"default": [], "kept": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_images(root / "images", args.images + 8, args.width, args.height)
        model = save_model(root / "model", tiny=True)
        base = [sys.executable, __file__, CHILD, "--folder", str(root / "images"), "--model", str(model)]
        base += ["--width", str(args.width), "--height", str(args.height), "--prompts", str(args.prompts)]
        for _ in range(args.rounds):
            for name, extra in (("default", []), ("kept", ["--keep"])):
                out = subprocess.run(base + extra, check=True, capture_output=True, text=True).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
    rounds = f"median of {args.rounds} fresh processes"
    print(f"{args.width}x{args.height}, K={args.prompts}, one torch thread, {rounds}")
    print(f"{'ms per image':34} {'glibc default':>14} {'freed kept':>11} {'ratio':>6}")
    for key, what in (("post_ms", "label_image"), ("call_ms", "CPU actor call (decode..write)")):
        default = statistics.median(r[key] for r in results["default"])
        kept = statistics.median(r[key] for r in results["kept"])
        print(f"{what:34} {default:14.1f} {kept:11.1f} {default / kept:6.2f}")


if __name__ == "__main__":
    main()
