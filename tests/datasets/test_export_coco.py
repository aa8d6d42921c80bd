"""`textseg export --format coco`: read back with pycocotools, the annotations are DEST's objects pixel for
pixel, cover its masks, carry COCO's boxes and areas, and score 1.0 AP against themselves in COCOeval (so
they count as ground truth: iscrowd 0)."""

from __future__ import annotations

import contextlib
import io
import pathlib

import numpy as np
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from textseg.datasets.export import export
from textseg.datasets.formats.coco import annotation_path
from textseg.datasets.labeled_dest import iter_labeled, read_mask


def load(path: pathlib.Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its loading times
        return COCO(str(path))


def test_coco_annotations_are_dest_instances(labeled_dest, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "coco"
    counts = export(str(labeled_dest.dest), str(out), "coco", split="train=0.5,val=0.5", seed=2)
    labeled = {item.relpath: item for item in iter_labeled(str(labeled_dest.dest), {}, instances=True)}
    by_uri = {str(item.row["source_uri"]): item for item in labeled.values()}
    seen = 0
    for split in ("train", "val"):
        coco = load(out / annotation_path(split))
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        assert names == {i: n for i, n in enumerate(next(iter(labeled.values())).class_names) if i > 0}
        for image in coco.loadImgs(coco.getImgIds()):
            item = by_uri[image["file_name"]]  # --images uri: the SOURCE URI
            assert (image["width"], image["height"]) == (item.row["width"], item.row["height"])
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert len(annotations) == len(item.instances)
            mask = read_mask(str(item.row["mask_uri"]), {})
            for annotation, instance in zip(annotations, item.instances, strict=True):
                pixels = coco.annToMask(annotation).astype(bool)
                truth = coco_mask.decode({"size": instance["mask_size"], "counts": instance["mask_counts"]})
                assert np.array_equal(pixels, truth > 0)
                assert np.all(mask[pixels] == annotation["category_id"])
                assert names[annotation["category_id"]] == instance["class"]
                assert annotation["area"] == np.count_nonzero(pixels)
                rows, cols = np.nonzero(pixels)
                x, y = cols.min(), rows.min()
                assert annotation["bbox"] == [x, y, cols.max() + 1 - x, rows.max() + 1 - y]
                assert annotation["iscrowd"] == 0
                assert annotation["score"] == np.float32(instance["score"])
            seen += 1
    assert seen == len(labeled) == counts["images"]
    assert (
        counts["coco annotations"] == counts["instances"] == sum(len(i.instances) for i in labeled.values())
    )


def test_coco_regions_of_a_plain_dest_cover_its_masks(labeled_dest_plain, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "coco"
    export(str(labeled_dest_plain.dest), str(out), "coco", images="copy")
    coco = load(out / annotation_path("train"))
    mask_uris = {
        item.relpath: item.row["mask_uri"] for item in iter_labeled(str(labeled_dest_plain.dest), {})
    }
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == len(mask_uris)
    for image in images:
        mask = read_mask(mask_uris[image["file_name"].removeprefix("images/train/")], {})
        painted = np.zeros_like(mask)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            pixels = coco.annToMask(annotation).astype(bool)
            assert not np.any(painted[pixels])  # regions do not overlap
            painted[pixels] = annotation["category_id"]
            assert "score" not in annotation  # regions found in a mask have no model score
        assert np.array_equal(painted, np.where(mask == 255, 0, mask))


def test_coco_ground_truth_scores_full_ap_against_itself(labeled_dest, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "coco"
    export(str(labeled_dest.dest), str(out), "coco")
    truth = load(out / annotation_path("train"))
    detections = [
        {k: a[k] for k in ("image_id", "category_id", "segmentation", "score")}
        for a in truth.loadAnns(truth.getAnnIds())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth, truth.loadRes(detections), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == 1.0  # AP at IoU 0.50:0.95: every object matched, none ignored as crowd
