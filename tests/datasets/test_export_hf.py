"""`textseg export --format hf`: `datasets.load_from_disk` reads a DatasetDict whose label pixels are DEST's
masks and whose images are the pixels textseg labeled; id2label.json names the values; without `datasets`
the command fails with the pip command."""

from __future__ import annotations

import json
import pathlib
import sys

import datasets
import numpy as np

from textseg import cli
from textseg.datasets.export import ExportItem, export
from textseg.datasets.formats.hf import DATASETS_INSTALL, HfWriter
from textseg.datasets.labeled_dest import iter_labeled, read_image, read_mask, run_ids, run_ontology
from textseg.ontology import NODATA


def test_hf_dataset_holds_dest_masks_and_images(labeled_dest_plain, tmp_path: pathlib.Path) -> None:
    dest, out = str(labeled_dest_plain.dest), tmp_path / "hf"
    counts = export(dest, str(out), "hf", split="train=0.7,validation=0.3", seed=4)
    loaded = datasets.load_from_disk(str(out))
    assert isinstance(loaded, datasets.DatasetDict) and set(loaded) == {"train", "validation"}
    assert isinstance(loaded["train"].features["label"], datasets.Image)
    ontology = run_ontology(dest, run_ids(dest, {})[-1], {})
    assert json.loads((out / "id2label.json").read_text()) == dict(
        (str(i), name) for i, name in enumerate(ontology.class_names)
    )
    labeled = {item.relpath: item.row for item in iter_labeled(dest, {})}
    seen = []
    for split in loaded.values():
        for row in split:
            source = labeled[row["relpath"]]
            assert np.array_equal(np.array(row["label"]), read_mask(str(source["mask_uri"]), {}))
            image = np.array(row["image"].convert("RGB"))
            assert np.array_equal(image, read_image(str(source["source_uri"]), {}))
            seen.append(row["relpath"])
    assert sorted(seen) == sorted(labeled) and counts["hf rows"] == len(labeled)


def test_hf_labels_classes_the_ontology_lacks_as_no_data(labeled_dest_plain, tmp_path: pathlib.Path) -> None:
    dest = str(labeled_dest_plain.dest)
    ontology = run_ontology(dest, run_ids(dest, {})[-1], {})
    item = next(iter_labeled(dest, {}))
    older_names = ["background", "lava", *ontology.class_names[1:]]  # an older run's classes
    mask = np.array([[0, 1, 2, NODATA], [3, 4, 5, 5]], dtype=np.uint8)
    writer = HfWriter(str(tmp_path / "hf"), ontology, {})
    export_item = ExportItem(
        relpath="a.png", split="train", image_uri=str(item.row["source_uri"]), image_relpath=None,
        width=4, height=2, mask=mask, instances=[], instances_from_mask=True,
        row={**item.row, "class_names": older_names},
    )  # fmt: skip
    writer.add(export_item)
    writer.close()
    label = np.array(datasets.load_from_disk(str(tmp_path / "hf"))["train"][0]["label"])
    assert label.tolist() == [[0, NODATA, 1, NODATA], [2, 3, 4, 4]]


def test_hf_without_datasets_names_the_install(labeled_dest_plain, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    out = tmp_path / "hf"
    code = cli.main(["export", str(labeled_dest_plain.dest), str(out), "--format", "hf", "--no-progress"])
    assert code == 2
    assert DATASETS_INSTALL in capsys.readouterr().err
    assert not out.exists()
