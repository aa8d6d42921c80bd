"""The export driver: stable splits on a grown DEST, --run, --images copy, an S3 DEST exported to local disk
and to S3, and the `textseg export` command itself."""

from __future__ import annotations

import json
import pathlib
import shutil

import datasets
import numpy as np
import pytest
import yaml
from pycocotools import mask as coco_mask

from textseg import cli
from textseg.api import label
from textseg.datasets.export import export
from textseg.datasets.formats.coco import annotation_path
from textseg.datasets.formats.yolo import label_path
from textseg.datasets.labeled_dest import iter_labeled, parse_split, read_mask, run_ids, split_of
from textseg.storage import filesystem_for
from textseg.training.synth import write_synth_dataset

SPLIT, SEED = "train=0.5,val=0.5", 3


def _add_tiles(synth: pathlib.Path, source: pathlib.Path, count: int, seed: int, prefix: str) -> None:
    """Synthetic tiles into SOURCE under new names (the synth writer numbers every set from 0)."""
    write_synth_dataset(str(synth), count, seed=seed)
    source.mkdir(exist_ok=True)
    for image in sorted((synth / "images").iterdir()):
        shutil.copyfile(image, source / f"{prefix}{image.name}")


def _label(source: pathlib.Path | str, dest: str, ontology: pathlib.Path, **options) -> None:
    summary = label(
        str(source), dest, runner="local", model="demo", ontology=str(ontology), device="cpu", **options
    )
    assert summary.error == 0 and summary.ok > 0, summary


def _coco_splits(out: pathlib.Path) -> dict[str, str]:
    """file_name -> split, from an export's COCO files."""
    splits = {}
    for path in sorted((out / "annotations").glob("instances_*.json")):
        split = path.stem.removeprefix("instances_")
        splits.update({image["file_name"]: split for image in json.loads(path.read_text())["images"]})
    return splits


@pytest.fixture(scope="module")
def grown_dest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A DEST labeled twice: 6 tiles, exported, then 5 more tiles labeled by a second run."""
    root = tmp_path_factory.mktemp("grown")
    source, dest = root / "source", str(root / "dest")
    _add_tiles(root / "synth-a", source, 6, seed=7, prefix="a_")
    ontology = root / "synth-a" / "ontology.yaml"
    _label(source, dest, ontology)
    before = root / "before"
    assert (
        cli.main(["export", dest, str(before), "--format", "coco", "--split", SPLIT, "--seed", str(SEED)])
        == 0
    )
    _add_tiles(root / "synth-b", source, 5, seed=8, prefix="b_")
    _label(source, dest, ontology)
    return {"source": source, "dest": dest, "before": _coco_splits(before)}


def test_an_image_keeps_its_split_when_dest_grows(grown_dest, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "after"
    export(grown_dest["dest"], str(out), "coco", split=SPLIT, seed=SEED)
    before, after = grown_dest["before"], _coco_splits(out)
    assert len(before) == 6 and len(after) == 11
    assert {uri: after[uri] for uri in before} == before
    assert set(after.values()) == {"train", "val"}
    fractions = parse_split(SPLIT)
    assert all(split_of(pathlib.Path(uri).name, fractions, SEED) == split for uri, split in after.items())


def test_run_exports_only_that_runs_images(grown_dest, tmp_path: pathlib.Path) -> None:
    first, second = run_ids(grown_dest["dest"], {})
    for run, prefix, count in ((first, "a_", 6), (second, "b_", 5)):
        out = tmp_path / run
        counts = export(grown_dest["dest"], str(out), "coco", run_id=run)
        names = [pathlib.Path(uri).name for uri in _coco_splits(out)]
        assert counts["images"] == len(names) == count
        assert all(name.startswith(prefix) for name in names)


def test_images_copy_keeps_the_source_bytes(labeled_dest_plain, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "copy"
    export(str(labeled_dest_plain.dest), str(out), "coco", split=SPLIT, images="copy")
    sources = {
        item.relpath: item.row["source_uri"] for item in iter_labeled(str(labeled_dest_plain.dest), {})
    }
    copied = _coco_splits(out)
    assert len(copied) == len(sources)
    for file_name, split in copied.items():
        relpath = file_name.removeprefix(f"images/{split}/")
        assert file_name == f"images/{split}/{relpath}"
        assert (out / file_name).read_bytes() == pathlib.Path(sources[relpath]).read_bytes()


def test_export_command_reports_progress_and_refuses_an_unknown_run(
    labeled_dest_plain, tmp_path, capsys
) -> None:
    dest, out = str(labeled_dest_plain.dest), str(tmp_path / "coco")
    assert cli.main(["export", dest, out, "--format", "coco"]) == 0
    captured = capsys.readouterr()
    assert "export coco" in captured.err and "images: 10" in captured.out
    assert cli.main(["export", dest, out, "--format", "coco", "--run", "no-such-run", "--no-progress"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err


def test_s3_dest_exports_to_local_disk_and_to_s3(s3_server, s3_bucket, tmp_path: pathlib.Path) -> None:
    options = s3_server.storage_options
    write_synth_dataset(str(tmp_path / "synth"), 3, seed=11)
    dest = f"s3://{s3_bucket}/dest"
    ontology = tmp_path / "synth" / "ontology.yaml"
    _label(tmp_path / "synth" / "images", dest, ontology, storage_options=options, instances=True)
    labeled = {item.relpath: item for item in iter_labeled(dest, options, instances=True)}
    masks = {relpath: read_mask(str(item.row["mask_uri"]), options) for relpath, item in labeled.items()}
    assert len(masks) == 3 and all(str(i.row["mask_uri"]).startswith("s3://") for i in labeled.values())

    local = tmp_path / "coco"
    export(dest, str(local), "coco", options)
    coco = json.loads((local / annotation_path("train")).read_text())
    painted = {relpath: np.zeros_like(mask) for relpath, mask in masks.items()}
    relpath_of = {image["id"]: pathlib.Path(image["file_name"]).name for image in coco["images"]}
    for annotation in coco["annotations"]:
        pixels = coco_mask.decode(annotation["segmentation"]) > 0
        painted[relpath_of[annotation["image_id"]]][pixels] = annotation["category_id"]
    assert all(np.array_equal(painted[r], np.where(masks[r] == 255, 0, masks[r])) for r in masks)

    remote = f"s3://{s3_bucket}/exports/yolo"
    counts = export(dest, remote, "yolo", options, images="copy")
    fs, root = filesystem_for(remote, options)
    data = yaml.safe_load(fs.cat_file(f"{root}/data.yaml"))
    assert "path" not in data and data["train"] == "images/train"
    for relpath, item in labeled.items():
        image = f"images/train/{relpath}"
        assert fs.cat_file(f"{root}/{image}") == pathlib.Path(item.row["source_uri"]).read_bytes()
        assert len(fs.cat_file(f"{root}/{label_path(image)}").decode().splitlines()) == len(item.instances)
    assert counts["yolo objects"] == sum(len(item.instances) for item in labeled.values())

    remote = f"s3://{s3_bucket}/exports/hf"
    export(dest, remote, "hf", options)
    loaded = datasets.load_from_disk(remote, storage_options=options)
    assert {row["relpath"]: np.array(row["label"]).tolist() for row in loaded["train"]} == {
        relpath: mask.tolist() for relpath, mask in masks.items()
    }
