"""`textseg label | errors | train | eval | synth | export | import-labelstudio | report | calibrate`: parse
flags into a config and call the library.

Exit status of `label`: 0 when the run finished and the failed share is at most --max-error-rate, 1 when
more failed, 2 for a job-level problem (bad option, unknown model, unreachable SOURCE, DEST or Ray cluster,
resources the cluster cannot provide), with the reason on stderr; 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import re
import sys
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from textseg.config import JobConfig, parse_storage_options

if TYPE_CHECKING:
    from textseg.plan.summary import RunSummary

EXIT_OK, EXIT_TOO_MANY_ERRORS, EXIT_JOB_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# Commands whose options and code live in their own module (`add_arguments(parser)`, `run(args) -> int`),
# imported only when the command runs: `textseg label` must not pay for their imports.
# name -> (module, help, description)
MODULE_COMMANDS: dict[str, tuple[str, str, str]] = {
    "export": (
        "textseg.datasets.export",
        "export a labeled DEST for trainers and annotation tools (COCO, YOLO, HF, CVAT, Label Studio)",
        "Export DEST's labeled images, masks and instances to OUT in a trainer's or annotation tool's "
        "format.",
    ),
    "import-labelstudio": (
        "textseg.datasets.labelstudio",
        "write masks corrected in Label Studio back in textseg's layout (for `textseg train`)",
        "Read a Label Studio JSON export of BrushLabels annotations and write DEST2/masks + metadata.",
    ),
    "report": (
        "textseg.datasets.report",
        "one self-contained HTML page reviewing a labeled DEST: statistics, errors, previews",
        "Write an HTML review of a run (or the whole DEST): class shares and scores, errors, previews.",
    ),
    "calibrate": (
        "textseg.datasets.calibrate",
        "choose per-class thresholds on a small hand-labeled set, maximizing IoU",
        "Pick each class's threshold against hand-labeled masks; write the ontology with them.",
    ),
}


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
    parser.add_argument(
        "--actors", type=int, help="model actors (default: one per GPU, or one CPU actor per core)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="CUDA only: torch.compile the model (max-autotune, CUDA graphs) for one batch shape, every "
        "call padded to --batch-size; measure it on your GPU first (default off; ignored on CPU)",
    )
    parser.add_argument(
        "--instances",
        action="store_true",
        default=None,
        help="also write one row per object to DEST/instances/<run_id>/part-*.parquet: class, score, box "
        "and its mask as COCO RLE (the connected regions of each class's mask)",
    )
    parser.add_argument(
        "--presence-gate",
        action="store_true",
        default=None,
        help="SAM 3 only: score each pixel by sigmoid(semantic map) x sigmoid(presence), so a prompt the "
        "model finds absent from an image labels nothing there (default off: the semantic map alone)",
    )
    parser.add_argument(
        "--ray-address",
        help="join this Ray cluster: HOST:PORT, ray://HOST:PORT, or auto (the cluster `ray start` started on "
        "this machine) (default: RAY_ADDRESS, else such a cluster, else a local Ray of the run's own)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        metavar="SECONDS",
        help="end the run when no model actor has got its GPU or CPUs after this long, e.g. GPU nodes "
        "the autoscaler never adds (default 600)",
    )
    parser.add_argument("--limit", type=int, help="label at most the first N listed images")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="list and count what would be labeled; load no model, write nothing",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=None,
        help="also show Ray's own log lines and Ray Data's block progress (default: textseg's progress only)",
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
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        default=None,
        help="also attempt known-bad images: those whose latest attempt failed for a reason that cannot "
        "pass while the file is unchanged (bytes that cannot be decoded), which re-runs otherwise skip",
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
        known_bad = f", known bad {summary.known_bad}" if summary.known_bad else ""
        print(
            f"dry run: listed {summary.listed}, already done {summary.skipped - summary.known_bad}"
            f"{known_bad}, would label {summary.listed - summary.skipped} with model {summary.model_id}"
        )
        if summary.collisions:
            more = "; ..." if summary.collisions > len(summary.collision_examples) else ""
            print(
                f"dry run: {summary.collisions} listed images would share their mask name with another "
                "image and become error rows (rename one of each group): "
                + "; ".join(summary.collision_examples)
                + more
            )
        if summary.problems > summary.collisions:
            print(f"dry run: {summary.problems - summary.collisions} more would become error rows unread")
        _warn_about(config, summary)
        return EXIT_OK
    print(summary.line())
    _warn_about(config, summary)
    if summary.error:
        from textseg.outputs.metadata import summary_path
        from textseg.storage import join_uri

        for category, count in summary.top_errors:
            print(f"  {count} x {summary.error_examples.get(category) or category}")
        print(
            f"failed images: `textseg errors {config.dest} --run {summary.run_id}`; "
            f"run summary: {join_uri(config.dest, summary_path(summary.run_id))}"
        )
    if summary.status != "succeeded":
        print(f"textseg: {summary.status}", file=sys.stderr)
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


def _warn_about(config: JobConfig, summary: RunSummary) -> None:
    """One sentence on stderr for each thing a run (or dry run) did that the user likely did not mean."""
    from textseg.source.refs import IMAGE_EXTENSIONS
    from textseg.storage import redact_uri

    if summary.listed == 0:
        tense = "there is" if config.dry_run else "there was"
        print(
            f"textseg: warning: SOURCE {redact_uri(config.source)!r} holds no images (files ending "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}), so {tense} nothing to label",
            file=sys.stderr,
        )
    if config.vectors and summary.without_georeference:
        print(
            f"textseg: warning: --vectors: {summary.without_georeference} labeled images had no "
            "georeference (a GeoTIFF with a CRS, or a z/x/y tile), so no polygons were made for them",
            file=sys.stderr,
        )


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a default and its help names none, also to
    an option without help; options whose default is None (JobConfig's apply later) say theirs in their
    help text."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _DEFAULT_NAMED.search(text) or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


_DEFAULT_NAMED = re.compile(r"\(default\b")


def _shows_default(action: argparse.Action) -> bool:
    default = action.default  # 0 is a default to show; None, False (a flag) and [] (repeatable) are not
    unset = default is None or default is False or default is argparse.SUPPRESS or default == []
    return bool(action.option_strings) and not unset


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its help shows defaults (DefaultsHelpFormatter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def package_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("textseg")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser(options_for: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; `options_for`: the commands whose options to add when they live in modules
    that take seconds to import (train's torch, MODULE_COMMANDS), None for every command."""
    parser = argparse.ArgumentParser(
        prog="textseg", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    # Every subcommand's help shows its defaults (`parser_class`: also for subcommands added later).
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_SubcommandParser,
    )
    label = commands.add_parser(
        "label",
        help="label every image under SOURCE, writing masks + metadata to DEST",
        description="Label every image under SOURCE with a text-prompted segmentation "
        "model; write masks, Parquet metadata and a run summary under DEST.",
    )
    add_label_arguments(label)

    errors = commands.add_parser(
        "errors",
        help="list the images a run failed on, with the reason (default: the latest run)",
        description="Print one line per error row of a run in DEST: relpath, a tab, the reason.",
    )
    errors.add_argument("dest", metavar="DEST", help="the DEST of `textseg label`")
    errors.add_argument("--run", dest="run_id", help="run id (default: the latest run under DEST/metadata)")
    errors.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE")

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
    if options_for is None or "train" in options_for:  # the trainer imports torch
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
    for name, (module, help_text, description) in MODULE_COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=description)
        if options_for is None or name in options_for:
            importlib.import_module(module).add_arguments(command)
    return parser


def run_errors(args: argparse.Namespace) -> int:
    """`textseg errors DEST`: the failed images of a run, streamed from its metadata parts."""
    from textseg.outputs.metadata import iter_errors, latest_run

    options = parse_storage_options(args.storage_options)
    run = args.run_id or latest_run(args.dest, options)
    if run is None:
        print(f"textseg: {args.dest} holds no runs", file=sys.stderr)
        return EXIT_JOB_ERROR
    count = 0
    for relpath, reason in iter_errors(args.dest, run, options):
        print(f"{relpath}\t{reason}")
        count += 1
    print(f"{count} failed image(s) in run {run}", file=sys.stderr)
    return EXIT_OK


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


def interrupted_sentence(err: KeyboardInterrupt) -> str:
    """What Ctrl-C says: whether the run's summary was written, and how to finish the run."""
    from textseg.errors import RunInterrupted

    if isinstance(err, RunInterrupted):
        return (
            f"interrupted; the run's summary is written (run {err.run_id}); run the same command to finish it"
        )
    return "interrupted; run the same command to finish the run"


def _stop_ray(command: str) -> None:
    """Stop (or leave) Ray before a labeling run's last sentence: killing its actors makes Ray's own
    processes log to this output, and the sentence must be the last line a user reads. Other commands
    never start Ray, so they leave alone one that the calling process runs."""
    if command != "label":
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(options_for=argv[:1]).parse_args(argv)
    try:
        if args.command == "label":
            return run_label(label_config_from_args(args))
        if args.command == "errors":
            return run_errors(args)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "synth":
            return run_synth(args)
        if args.command == "train":
            return run_train(args)
        if args.command in MODULE_COMMANDS:
            return int(importlib.import_module(MODULE_COMMANDS[args.command][0]).run(args))
    except (ValueError, RuntimeError, OSError) as err:
        _stop_ray(args.command)
        print(f"textseg: {err}", file=sys.stderr)
        return EXIT_JOB_ERROR
    except KeyboardInterrupt as err:
        _stop_ray(args.command)
        print(f"textseg: {interrupted_sentence(err)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
