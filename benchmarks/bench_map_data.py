"""Map data at the model's own resolution: a GeoTIFF mosaic of held-out synthetic tiles, labeled by the
demo model at native resolution and, side by side in the same run, shrunk whole to the model's input (what
`--tile-size` larger than the scene does, and what textseg did by default for scenes up to 4096 px).

    python benchmarks/bench_map_data.py --tiles 16 --gsd 0.5,1.0      # a 4096 px mosaic at 0.5 m/px, ...

Prints, per GSD: mIoU of the tiles labeled one by one (the reference), of the scene at native resolution
and of the scene resized whole; building-polygon IoU against the truth in map coordinates; seconds and the
labeling process's peak RSS (the in-process runner, so model, decoding and blending are all counted).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
import textseg
options = json.loads(sys.argv[1])
started = time.perf_counter()
summary = textseg.label(options.pop("source"), options.pop("dest"), runner="local", **options)
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_kb / 1024,
      "error": summary.error}))
"""


def run(options: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the job failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def mosaic(parts: list[np.ndarray], side: int) -> np.ndarray:
    rows = [np.concatenate(parts[r * side : (r + 1) * side], axis=1) for r in range(side)]
    return np.concatenate(rows, axis=0)


def miou(truth: np.ndarray, pred: np.ndarray, classes: list[str]) -> float:
    from textseg.evaluation import confusion_matrix, report_from_confusion

    confusion = confusion_matrix(truth, pred)[: len(classes), : len(classes)]
    return report_from_confusion(confusion, classes, 1, []).miou or 0.0


def polygon_iou(vectors: pathlib.Path, truth: np.ndarray, georef, building: int) -> float:
    import geopandas
    import shapely
    from rasterio.features import shapes

    frame = geopandas.read_parquet(vectors).to_crs(georef.crs)
    predicted = shapely.union_all(frame[frame["class"] == "building"].geometry.values)
    mask = (truth == building).astype(np.uint8)
    expected = shapely.union_all(
        [shapely.geometry.shape(g) for g, v in shapes(mask, mask=mask > 0, transform=georef.affine()) if v]
    )
    return predicted.intersection(expected).area / predicted.union(expected).area


def main() -> None:
    import rasterio

    from textseg import storage
    from textseg.image.rasters import GeoRef, write_geotiff_rgb
    from textseg.image.windows import Window
    from textseg.outputs.masks import decode_png_mask
    from textseg.training.evaluation import render_tiles
    from textseg.training.synth import SYNTH_CLASSES, SYNTH_GSD_M, write_dataset_files

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16, help="tiles per side of the mosaic (256 px each)")
    parser.add_argument("--gsd", default="0.5,1.0", help="scene GSDs in m/px (multiples of 0.5)")
    parser.add_argument("--seed", type=int, default=20_001, help="held-out tile seed")
    args = parser.parse_args()
    classes = ["background", *SYNTH_CLASSES]
    images, masks = render_tiles(args.tiles**2, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        work = pathlib.Path(folder)
        fs, _ = storage.filesystem_for(str(work))
        write_dataset_files(fs, str(work))
        ontology = str(work / "ontology.yaml")
        print(
            f"{args.tiles}x{args.tiles} held-out tiles of seed {args.seed}, demo model ({SYNTH_GSD_M} m/px)"
        )
        print(
            f"{'GSD':>5} {'scene px':>9} {'tiles 1 by 1':>13} {'native':>7} {'whole':>7} "
            f"{'bldg poly IoU':>14} {'native s':>9} {'peak RSS':>9}"
        )
        for gsd in [float(g) for g in args.gsd.split(",")]:
            factor = round(gsd / SYNTH_GSD_M)
            tiles = [np.asarray(Image.fromarray(i).reduce(factor)) if factor > 1 else i for i in images]
            truths = [m[::factor, ::factor] for m in masks]
            tile_dir = work / f"tiles_{gsd}"
            tile_dir.mkdir()
            for i, tile in enumerate(tiles):
                Image.fromarray(tile).save(tile_dir / f"t{i:04d}.png")
            run({"source": str(tile_dir), "dest": str(work / f"tiles_out_{gsd}"), "model": "demo",
                 "ontology": ontology})  # fmt: skip
            predicted = [
                decode_png_mask((work / f"tiles_out_{gsd}" / "masks" / f"t{i:04d}.png").read_bytes())
                for i in range(len(tiles))
            ]
            by_tile = miou(mosaic(truths, args.tiles), mosaic(predicted, args.tiles), classes)
            scene, truth = mosaic(tiles, args.tiles), mosaic(truths, args.tiles)
            georef = GeoRef("EPSG:32633", (gsd, 0.0, 500_000.0, 0.0, -gsd, 6_000_000.0), *scene.shape[1::-1])
            scene_dir = work / f"scene_{gsd}"
            scene_dir.mkdir()
            write_geotiff_rgb(
                fs, str(scene_dir / "scene.tif"), georef, [(Window(0, 0, *scene.shape[1::-1]), scene)]
            )
            scores = {}
            for mode, extra in (
                ("native", {"vectors": True}),
                ("whole", {"tile_size": 2 * max(scene.shape)}),
            ):
                dest = work / f"{mode}_{gsd}"
                common = {"model": "demo", "ontology": ontology}
                result = run({"source": str(scene_dir), "dest": str(dest), **common, **extra})
                with rasterio.open(dest / "masks" / "scene.tif") as dataset:
                    scores[mode] = miou(truth, dataset.read(1), classes)
                if mode == "native":
                    native = result
                    poly = polygon_iou(dest / "vectors", truth, georef, classes.index("building"))
            print(
                f"{gsd:>5} {scene.shape[0]:>9} {by_tile:>13.3f} {scores['native']:>7.3f} "
                f"{scores['whole']:>7.3f} {poly:>14.3f} {native['seconds']:>9.1f} "
                f"{native['peak_rss_mb']:>6.0f} MB"
            )


if __name__ == "__main__":
    main()
