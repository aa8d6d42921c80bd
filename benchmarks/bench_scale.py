"""The job at scale on one machine: driver memory, time to first mask, dry runs over big manifests,
the skip check against a long history, and where a 3-node test cluster runs its tasks.

Each figure is measured by running `textseg label` as a subprocess (the driver is that process: its peak
RSS is its own VmHWM, Ray's worker processes are not counted), side by side in one invocation:

    python benchmarks/bench_scale.py folders --sizes 2000,20000,200000   # driver RSS, first mask, run
    python benchmarks/bench_scale.py manifest --rows 1000000             # --dry-run over a Parquet manifest
    python benchmarks/bench_scale.py history --images 20000 --runs 30    # skip check after 1 vs 30 runs
    python benchmarks/bench_scale.py cluster --images 600                # tasks per node, 3-node cluster

Images are 16 px PNGs and the model is the tiny random CLIPSeg of the tests, so the figures are about
the job's own overheads, not the model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The child: run one `textseg label`, then print its summary and this process's peak RSS as JSON.
CHILD = """
import json, sys
from textseg.api import run_job
from textseg.config import from_mapping
summary = run_job(from_mapping(json.loads(sys.argv[1])))
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RESULT " + json.dumps({"peak_rss_mb": peak_kb / 1024, "listed": summary.listed,
      "skipped": summary.skipped, "ok": summary.ok, "error": summary.error, "status": summary.status,
      "timings": summary.timings_s}))
"""


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(folder: pathlib.Path, count: int, per_folder: int = 1000) -> None:
    """`count` tiny PNGs in folders of `per_folder` (as nightly drops are usually laid out)."""
    data = tiny_png()
    for i in range(count):
        sub = folder / f"batch_{i // per_folder:05d}"
        if i % per_folder == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:07d}.png").write_bytes(data)


def run_label(options: dict, watch_masks: pathlib.Path | None = None) -> dict:
    """Run one job in a child process; with `watch_masks`, also time the first mask's arrival."""
    first_mask: list[float] = []
    started = time.perf_counter()
    done = threading.Event()

    def watch() -> None:
        assert watch_masks is not None
        while not done.is_set():
            if watch_masks.exists():
                for _dirpath, _dirs, files in os.walk(watch_masks):
                    if any(f.endswith(".png") for f in files):
                        first_mask.append(time.perf_counter() - started)
                        return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    if watch_masks is not None:
        watcher.start()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True, cwd=ROOT
    )
    done.set()
    wall = time.perf_counter() - started
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the job failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    result["wall_s"] = wall
    result["first_mask_s"] = first_mask[0] if first_mask else None
    return result


def tiny_model(directory: pathlib.Path) -> str:
    from tests.tiny_models import make_tiny_clipseg

    return str(make_tiny_clipseg(directory))


def bench_folders(sizes: list[int], work: pathlib.Path) -> None:
    model = tiny_model(work / "model")
    rows = []
    for size in sizes:
        source, dest = work / f"src_{size}", work / f"dest_{size}"
        write_folder(source, size)
        labeled = run_label(
            {"source": str(source), "dest": str(dest), "prompts": "a,b", "model": model},
            watch_masks=dest / "masks",
        )
        dry = run_label(
            {
                "source": str(source),
                "dest": str(work / f"dry_{size}"),
                "prompts": "a,b",
                "model": model,
                "dry_run": True,
            }
        )
        rows.append((size, labeled, dry))
    print(
        f"{'images':>8} {'driver peak RSS':>16} {'first mask':>11} {'run':>8} {'first/run':>10} "
        f"{'dry-run RSS':>12} {'dry-run':>8}  status"
    )
    for size, labeled, dry in rows:
        first = labeled["first_mask_s"]
        print(
            f"{size:>8} {labeled['peak_rss_mb']:>13.0f} MB {first or float('nan'):>9.1f} s "
            f"{labeled['wall_s']:>6.1f} s {(first or 0) / labeled['wall_s']:>10.2f} "
            f"{dry['peak_rss_mb']:>9.0f} MB {dry['wall_s']:>6.1f} s  {labeled['status']}"
        )
    base = rows[0][1]["peak_rss_mb"]
    for size, labeled, _ in rows[1:]:
        print(f"driver peak RSS, {size} vs {rows[0][0]} images: +{labeled['peak_rss_mb'] - base:.0f} MB")


def bench_manifest(rows: int, work: pathlib.Path) -> None:
    """A Parquet manifest in the shape of an S3 Inventory report (uri, size, etag); the objects need not
    exist for a dry run, which only lists and checks the state."""
    path = work / "inventory.parquet"
    uris = [f"/data/raw/part_{i // 1000:05d}/img_{i:08d}.jpg" for i in range(rows)]
    table = pa.table({"uri": uris, "size": [1234] * rows, "etag": [f"{i:032x}" for i in range(rows)]})
    pq.write_table(table, path, row_group_size=100_000)
    del table, uris
    model = tiny_model(work / "model")
    result = run_label(
        {"source": str(path), "dest": str(work / "dest"), "prompts": "a", "model": model, "dry_run": True}
    )
    print(
        f"--dry-run over a {rows:,}-row Parquet manifest: listed {result['listed']:,}, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['wall_s']:.1f} s wall"
    )


def bench_history(images: int, runs: int, work: pathlib.Path) -> None:
    """The skip check (a dry run: list + look up) after 1 and after `runs` earlier runs over the same
    images. Earlier runs are made the way runs end: their metadata written, then merged into the state."""
    from textseg.config import JobConfig
    from textseg.outputs.metadata import METADATA_SCHEMA, new_run_id, write_metadata_part
    from textseg.outputs.state import compact
    from textseg.plan.prepare import load_ontology
    from textseg.source.listing import list_images

    model = tiny_model(work / "model")
    source = work / "src"
    write_folder(source, images)
    refs = list(list_images(str(source)))
    from textseg.models import resolve_model

    config = JobConfig(source=str(source), dest=str(work / "dest"), prompts="a", model=model)
    model_id = resolve_model(model).model_id
    ontology_hash = load_ontology(config).stable_hash()
    timings = {}
    for count in range(1, runs + 1):
        run_id = new_run_id()
        now = pa.scalar(time.time() * 1000, pa.timestamp("ms", tz="UTC")).as_py()
        table = pa.table(
            {
                "source_uri": [r.uri for r in refs],
                "relpath": [r.relpath for r in refs],
                "mask_uri": [None] * len(refs),
                "status": ["ok"] * len(refs),
                "error": [None] * len(refs),
                "class_names": [["background", "a"]] * len(refs),
                "model_id": [model_id] * len(refs),
                "ontology_hash": [ontology_hash] * len(refs),
                # Every earlier run saw other bytes, except the newest, so history really holds `count`
                # generations of rows for each image.
                "source_fingerprint": [
                    r.fingerprint if count == runs or count == 1 else f"old{count}" for r in refs
                ],
                "run_id": [run_id] * len(refs),
                "labeled_at": [now] * len(refs),
            }
        )
        table = pa.Table.from_pylist(table.to_pylist(), schema=METADATA_SCHEMA)
        write_metadata_part(table, str(work / "dest" / "metadata" / run_id), {}, "part-000000")
        compact(str(work / "dest"), {}, [run_id])
        time.sleep(1.1)  # run ids are per second
        if count in (1, runs):
            result = run_label(
                {
                    "source": str(source),
                    "dest": str(work / "dest"),
                    "prompts": "a",
                    "model": model,
                    "dry_run": True,
                }
            )
            timings[count] = result
    for count, result in timings.items():
        print(
            f"skip check after {count:>2} earlier run(s): skipped {result['skipped']:,} of "
            f"{result['listed']:,} in {result['wall_s']:.2f} s wall (process start included)"
        )
    print(f"ratio after {runs} vs after 1: {timings[runs]['wall_s'] / timings[1]['wall_s']:.2f}")


def bench_cluster(images: int, work: pathlib.Path) -> None:
    """A 3-node `ray.cluster_utils.Cluster`: which node's workers ran which stage.

    Ray titles a worker process after the task it runs (`ray::MapBatches(decode_stage)`), and every worker
    is a child of its node's raylet; sampling the process table while the job runs shows where each
    stage's tasks ran (the Ray state API would need the dashboard, which a slim install lacks).
    """
    import collections

    import ray
    from ray.cluster_utils import Cluster

    import textseg
    from tests.reliability import procs

    model = tiny_model(work / "model")
    source = work / "src"
    write_folder(source, images, per_folder=50)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    seen: dict[int, set[str]] = collections.defaultdict(set)  # raylet pid -> stage titles seen
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            table = list(procs.processes())
            raylets = {p.pid for p in table if "/raylet" in p.cmdline.split(" ", 1)[0]}
            for proc in table:
                if proc.ppid in raylets and proc.cmdline.startswith("ray::"):
                    seen[proc.ppid].add(proc.cmdline.split(" ", 1)[0].removeprefix("ray::")[:40])
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = textseg.label(str(source), str(work / "dest"), prompts="a", model=model)
        print(summary.line(), summary.status)
    finally:
        done.set()
        sampler.join()
        ray.shutdown()
        cluster.shutdown()
    stages = ("ReadListing", "MapBatches(decode_stage)", "MapBatches(write_stage)", "Write")
    everywhere = 0
    for index, (raylet, titles) in enumerate(sorted(seen.items())):
        ran = [stage for stage in stages if any(t.startswith(stage) for t in titles)]
        everywhere += len(ran) == len(stages)
        print(f"node {index} (raylet pid {raylet}): {', '.join(ran) or 'none of the CPU stages'}")
    print(f"nodes that ran every CPU stage: {everywhere} of {len(seen)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    folders = sub.add_parser("folders")
    folders.add_argument("--sizes", default="2000,20000")
    manifest = sub.add_parser("manifest")
    manifest.add_argument("--rows", type=int, default=1_000_000)
    history = sub.add_parser("history")
    history.add_argument("--images", type=int, default=20_000)
    history.add_argument("--runs", type=int, default=30)
    cluster = sub.add_parser("cluster")
    cluster.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="textseg-scale-") as tmp:
        work = pathlib.Path(tmp)
        if args.what == "folders":
            bench_folders([int(s) for s in args.sizes.split(",")], work)
        elif args.what == "manifest":
            bench_manifest(args.rows, work)
        elif args.what == "history":
            bench_history(args.images, args.runs, work)
        else:
            bench_cluster(args.images, work)


if __name__ == "__main__":
    main()
