"""`textseg export DEST OUT --format FORMAT`: a labeled DEST as a trainer or annotation tool reads it.

One driver, one writer per format (`FORMATS`; each a module of `textseg.datasets.formats` with a class
that takes `ExportItem`s one at a time and finishes in `close`). The driver streams DEST's current
labeled images (`textseg.datasets.labeled_dest.iter_labeled`), gives each a stable split (`--split`), reads
its mask, takes its instances from DEST's instance rows or, when its run wrote none, from the connected
regions of each class of its mask, and hands the writer one image at a time: memory is one image (and what
a format must keep to write its index at the end, such as COCO's annotation list), whatever DEST's size.

Images are referenced by their source URI (`--images uri`, the default: nothing copied) or copied into OUT
(`--images copy`) under `images/<split>/<relpath>`, their bytes as they are in SOURCE. A format whose
readers find an image's labels from the image's own path (YOLO) needs the copies (`COPIES_REQUIRED`).

Mask values and instances are as DEST has them: `item.row["class_names"]` names mask value i, and a writer
matches classes to the export's ontology (the latest run's, or --run's) by name, since an older run may
have labeled with other classes.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from textseg import storage
from textseg.config import parse_storage_options
from textseg.datasets.labeled_dest import (
    LabeledImage,
    iter_labeled,
    parse_split,
    read_mask,
    run_ids,
    run_ontology,
    split_of,
)
from textseg.labels.instances import region_instances
from textseg.ontology import Ontology

# --format name -> "module:class" of its writer, imported when chosen.
FORMATS: dict[str, str] = {
    "coco": "textseg.datasets.formats.coco:CocoWriter",
    "yolo": "textseg.datasets.formats.yolo:YoloWriter",
    "hf": "textseg.datasets.formats.hf:HfWriter",
    "cvat": "textseg.datasets.formats.cvat:CvatWriter",
    "labelstudio": "textseg.datasets.formats.labelstudio:LabelStudioWriter",
}
IMAGE_MODES = ("uri", "copy")
# Formats that cannot refer to images elsewhere -> why, said when --images is not copy.
COPIES_REQUIRED: dict[str, str] = {
    "yolo": "YOLO trainers find an image's labels from the image's own path (.../images/... -> "
    ".../labels/...), so the images must be copied beside the labels: add --images copy",
}


@dataclass(frozen=True)
class ExportItem:
    """One labeled image as a writer receives it.

    image_uri: where the image is (its SOURCE URI, or its copy under OUT with --images copy);
    image_relpath: the copy's path relative to OUT (`images/<split>/<relpath>`), None when referenced;
    mask: (H, W) uint8 class indices, 0 background, 255 no data; instances: `INSTANCE_STRUCT` rows
    (COCO RLE at full size), DEST's own or, for a writer that `wants_mask_regions`, the mask's regions
    (`instances_from_mask` either way when DEST has none: then they are [] for other writers).
    """

    relpath: str
    split: str
    image_uri: str
    image_relpath: str | None
    width: int
    height: int
    mask: np.ndarray
    instances: list[dict[str, Any]]
    instances_from_mask: bool
    row: dict[str, Any]


class Writer(Protocol):
    """A format's writer: built once per export, `add` per image, `close` once; returns what it wrote.

    `wants_mask_regions`: whether an image without DEST instance rows should come with its mask's regions
    as instances (an object format); finding and encoding them is most of an export's time otherwise."""

    wants_mask_regions: bool

    def __init__(self, out: str, ontology: Ontology, storage_options: Mapping[str, Any]) -> None: ...

    def add(self, item: ExportItem) -> None: ...

    def close(self) -> dict[str, int]: ...


def writer_for(name: str, out: str, ontology: Ontology, storage_options: Mapping[str, Any]) -> Writer:
    if name not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {name!r}")
    module, _, cls = FORMATS[name].partition(":")
    writer: Writer = getattr(importlib.import_module(module), cls)(out, ontology, storage_options)
    return writer


def export(
    dest: str,
    out: str,
    format_name: str,
    storage_options: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    split: str = "train=1",
    seed: int = 0,
    images: str = "uri",
    progress: bool = False,
) -> dict[str, int]:
    """Export DEST's current labeled images (of run `run_id` only, if given) to OUT as `format_name`.
    Returns counts: images, instances, and per split, plus what the writer reports."""
    options = dict(storage_options or {})
    if images not in IMAGE_MODES:
        raise ValueError(f"--images must be one of {', '.join(IMAGE_MODES)}; got {images!r}")
    if images != "copy" and format_name in COPIES_REQUIRED:
        raise ValueError(COPIES_REQUIRED[format_name])
    fractions = parse_split(split)
    runs = run_ids(dest, options)
    if not runs:
        raise ValueError(f"{storage.redact_uri(dest)} holds no runs")
    if run_id is not None and run_id not in runs:
        raise ValueError(f"{storage.redact_uri(dest)} has no run {run_id!r}; its runs: {', '.join(runs)}")
    writer = writer_for(format_name, out, run_ontology(dest, run_id or runs[-1], options), options)
    counts: dict[str, int] = {"images": 0, "instances": 0}
    bar = tqdm(desc=f"export {format_name}", unit=" images", disable=not progress)
    for labeled in iter_labeled(dest, options, run_id, instances=True):
        split_name = split_of(labeled.relpath, fractions, seed)
        item = _item(labeled, split_name, out, images, writer.wants_mask_regions, options)
        writer.add(item)
        counts["images"] += 1
        counts["instances"] += len(item.instances)
        counts[f"split {item.split}"] = counts.get(f"split {item.split}", 0) + 1
        bar.update()
    bar.close()
    return counts | writer.close()


def _item(
    labeled: LabeledImage, split: str, out: str, images: str, regions: bool, options: Mapping[str, Any]
) -> ExportItem:
    row = labeled.row
    mask = read_mask(str(row["mask_uri"]), options)
    instances = labeled.instances
    from_mask = instances is None
    if instances is None:
        instances = region_instances(mask, labeled.class_names) if regions else []
    image_uri, image_relpath = str(row["source_uri"]), None
    if images == "copy":
        image_relpath = f"images/{split}/{labeled.relpath}"
        image_uri = _copy(image_uri, storage.join_uri(out, image_relpath), options)
    return ExportItem(
        relpath=labeled.relpath,
        split=split,
        image_uri=image_uri,
        image_relpath=image_relpath,
        width=int(row["width"]),
        height=int(row["height"]),
        mask=mask,
        instances=instances,
        instances_from_mask=from_mask,
        row=row,
    )


def _copy(source_uri: str, target_uri: str, options: Mapping[str, Any]) -> str:
    """Copy an image's bytes as they are (no re-encoding); returns the copy's URI."""
    source_fs, source_path = storage.filesystem_for(source_uri, options)
    target_fs, target_path = storage.filesystem_for(target_uri, options)
    storage.write_bytes_atomic(target_fs, target_path, storage.read_bytes(source_fs, source_path))
    return target_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", metavar="DEST", help="a DEST written by `textseg label` (folder or URI)")
    parser.add_argument("out", metavar="OUT", help="folder or URI to write the export under")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="what to write")
    parser.add_argument("--run", dest="run_id", help="only the images this run labeled (default: all ok)")
    parser.add_argument(
        "--split",
        default="train=1",
        help="named fractions, e.g. train=0.8,val=0.1,test=0.1; an image keeps its split on a grown DEST",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument(
        "--images",
        choices=IMAGE_MODES,
        default="uri",
        help="reference images by their SOURCE URI, or copy them into OUT/images/<split>/",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    counts = export(
        args.dest,
        args.out,
        args.format,
        parse_storage_options(args.storage_options),
        args.run_id,
        args.split,
        args.seed,
        args.images,
        progress=not args.no_progress,
    )
    print(", ".join(f"{key}: {value}" for key, value in counts.items()))
    return 0
