"""`textseg label | train | eval | synth`: parse flags into a config and call the library. Nothing else.

Exit status of `label`: 0 when the run finished and the failed share is at most --max-error-rate, 1 when
more failed, 2 for a job-level problem (bad option, unknown model, unreachable SOURCE or DEST), with the
reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from textseg.config import JobConfig, parse_storage_options

EXIT_OK, EXIT_TOO_MANY_ERRORS, EXIT_JOB_ERROR = 0, 1, 2


def add_label_arguments(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """The options of `textseg label`, shared with `jobs/label.py` (there SOURCE/DEST may come from YAML)."""
    nargs = None if positional else "?"
    parser.add_argument(
        "source",
        nargs=nargs,
        metavar="SOURCE",
        help="folder, prefix, glob or manifest of images, or STAC JSON: ./imgs, s3://bucket/raw/, "
        "'s3://b/raw/**/*.jpg', list.txt, s3://b/stac/catalog.json",
    )
    parser.add_argument(
        "dest", nargs=nargs, metavar="DEST", help="folder or prefix the masks and metadata go under"
    )
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--prompts", help="comma-separated prompts, one class each: 'building,road,water'")
    classes.add_argument("--ontology", help="YAML file mapping class names to prompts, thresholds, colours")
    parser.add_argument(
        "--model",
        help="clipseg (default: CIDAS/clipseg-rd64-refined), demo, a Hugging Face "
        "id, or a local model directory",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="score a pixel needs to get a class (default 0.4; per-class in the ontology)",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)"
    )
    parser.add_argument("--batch-size", type=int, help="images per model call (default 64 on GPU, 8 on CPU)")
    parser.add_argument("--actors", type=int, help="model actors (default: one per GPU, or one CPU actor)")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    parser.add_argument("--limit", type=int, help="label at most the first N listed images")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="list and count what would be labeled; load no model, write nothing",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        help="split every image larger than this into windows of this many pixels (default: georeferenced "
        "rasters are labeled at their own resolution in windows of the model's input size, scaled by --gsd; "
        "photos are resized whole unless a side exceeds 4096 px)",
    )
    parser.add_argument(
        "--tile-overlap",
        type=int,
        help="overlap between windows (default 64), in the model's pixels for georeferenced rasters, "
        "in image pixels with --tile-size",
    )
    parser.add_argument(
        "--gsd",
        type=float,
        metavar="M",
        help="metres per pixel the model was trained at, for models whose config declares no gsd_m (the "
        "demo model declares 0.5); a georeferenced scene at another resolution is resampled to it",
    )
    parser.add_argument(
        "--vectors",
        action="store_true",
        default=None,
        help="also write polygons per class to DEST/vectors/run=<run_id>/ (GeoParquet, EPSG:4326) for "
        "georeferenced images (GeoTIFF, z/x/y tiles); pieces cut by tile or window borders are merged",
    )
    parser.add_argument(
        "--vector-simplify", type=float, help="polygon simplification tolerance in pixels (default 1)"
    )
    parser.add_argument(
        "--vector-min-area", type=float, help="drop polygons smaller than this, m^2 (default 0)"
    )
    parser.add_argument(
        "--stac-asset",
        metavar="KEY",
        help="with a STAC item, collection, catalog or saved search result as SOURCE: the asset of each "
        "item to label (default: 'visual', else the item's only image or 'data' asset, thumbnails and "
        "overviews aside; an item with none or several is an error row naming its assets)",
    )
    parser.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable (e.g. client_kwargs.endpoint_url=http://...)",
    )
    parser.add_argument(
        "--max-error-rate",
        type=float,
        help="exit non-zero when a larger share of images fails (default 0.01)",
    )


def label_config_from_args(args: argparse.Namespace) -> JobConfig:
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    values["storage_options"] = parse_storage_options(values.get("storage_options"))
    return JobConfig(**values)


def run_label(config: JobConfig) -> int:
    """Run a labeling job with Ray, print the closing summary, return the exit status."""
    from textseg.api import run_job

    summary = run_job(config)
    if config.dry_run:
        print(
            f"dry run: listed {summary.listed}, already done {summary.skipped}, "
            f"would label {summary.listed - summary.skipped} with model {summary.model_id}"
        )
        return EXIT_OK
    print(summary.line())
    if summary.status != "succeeded":
        print(f"textseg: {summary.status}", file=sys.stderr)
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


def build_parser(with_train_options: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    label = commands.add_parser(
        "label",
        help="label every image under SOURCE, writing masks + metadata to DEST",
        description="Label every image under SOURCE with a text-prompted segmentation "
        "model; write masks, Parquet metadata and a run summary under DEST.",
    )
    add_label_arguments(label)

    evaluate = commands.add_parser(
        "eval",
        help="per-class IoU, mIoU, Dice, pixel accuracy of PRED vs GT masks",
        description="Compare two folders of class masks matched by relpath.",
    )
    evaluate.add_argument("pred", metavar="PRED", help="folder of predicted masks (e.g. DEST/masks)")
    evaluate.add_argument("gt", metavar="GT", help="folder of ground-truth masks")
    evaluate.add_argument(
        "--classes",
        help="comma-separated class names in mask-index order, background excluded "
        "(default: ontology.yaml beside GT)",
    )
    evaluate.add_argument("--out", help="write the report as JSON to this path or URI")
    evaluate.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE")

    train = commands.add_parser(
        "train",
        help="train the fusion model on a labeled DEST or an images/ + masks/ folder",
        description="Train textseg's fusion model (text embedding x image features) on class masks.",
    )
    if with_train_options:  # the trainer imports torch: seconds that `textseg label` should not pay
        from textseg.training.trainer import add_train_arguments

        add_train_arguments(train)

    synth = commands.add_parser(
        "synth",
        help="write synthetic satellite-like tiles with ground-truth masks",
        description="Write DEST/images/, DEST/masks/ and DEST/ontology.yaml.",
    )
    synth.add_argument("dest", metavar="DEST", help="folder or prefix to write under")
    synth.add_argument("--n", type=int, default=100, help="number of tiles (default 100)")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed; tile i uses default_rng([seed, i])")
    synth.add_argument("--size", type=int, default=256, help="tile width and height in pixels (default 256)")
    layout = synth.add_mutually_exclusive_group()
    layout.add_argument(
        "--xyz",
        metavar="Z/X/Y",
        help="write an XYZ pyramid instead: --n x --n slippy-map tiles from tile Z/X/Y (images/z/x/y.png)",
    )
    layout.add_argument(
        "--geotiff",
        metavar="WIDTHxHEIGHT",
        help="write one georeferenced tiled GeoTIFF scene of this size instead (UTM 33N, 0.5 m pixels)",
    )
    synth.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    from textseg import storage
    from textseg.evaluation import evaluate_folders

    options = parse_storage_options(args.storage_options)
    class_names = ["background", *(c.strip() for c in args.classes.split(","))] if args.classes else None
    report = evaluate_folders(args.pred, args.gt, class_names, options)
    print(report.table())
    if args.out:
        fs, path = storage.filesystem_for(args.out, options)
        storage.write_bytes_atomic(fs, path, json.dumps(report.to_json(), indent=2).encode())
    return EXIT_OK


def run_train(args: argparse.Namespace) -> int:
    from textseg.training.trainer import train, train_config_from_args

    result = train(train_config_from_args(args))
    print(json.dumps({k: result[k] for k in ("best_epoch", "best_val_miou", "out") if k in result}, indent=2))
    return EXIT_OK


def run_synth(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options)
    if args.xyz:
        from textseg.training.geo_synth import write_xyz_pyramid

        z, x, y = _ints(args.xyz, "/", 3, "--xyz Z/X/Y")
        relpaths = write_xyz_pyramid(args.dest, z, x, y, args.n, args.n, args.seed, args.size, options)
        print(f"wrote {len(relpaths)} XYZ tiles ({args.n} x {args.n} from {args.xyz}) under {args.dest}")
    elif args.geotiff:
        from textseg.training.geo_synth import write_geotiff_scene

        width, height = _ints(args.geotiff, "x", 2, "--geotiff WIDTHxHEIGHT")
        write_geotiff_scene(args.dest, width, height, args.seed, storage_options=options)
        print(f"wrote a {width} x {height} georeferenced GeoTIFF scene under {args.dest}")
    else:
        from textseg.training.synth import write_synth_dataset

        relpaths = write_synth_dataset(args.dest, args.n, args.seed, args.size, options)
        print(f"wrote {len(relpaths)} synthetic tiles of {args.size} px under {args.dest}")
    from textseg.training.synth import SYNTH_GSD_M

    # The imagery is drawn at SYNTH_GSD_M whatever the georeference says (an XYZ tile's zoom sets its own).
    print(f"ground sample distance: {SYNTH_GSD_M} m/px (recorded in {args.dest}/dataset.json)")
    return EXIT_OK


def _ints(text: str, separator: str, count: int, what: str) -> list[int]:
    parts = text.lower().split(separator)
    if len(parts) != count or not all(p.isdigit() for p in parts):
        raise ValueError(f"{what}: got {text!r}")
    return [int(p) for p in parts]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_train_options="train" in argv[:1]).parse_args(argv)
    try:
        if args.command == "label":
            return run_label(label_config_from_args(args))
        if args.command == "eval":
            return run_eval(args)
        if args.command == "synth":
            return run_synth(args)
        if args.command == "train":
            return run_train(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"textseg: {err}", file=sys.stderr)
        return EXIT_JOB_ERROR
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
