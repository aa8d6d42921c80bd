"""`textseg eval`: scores of tiny hand-made masks, checked against confusion counts done by hand."""

from __future__ import annotations

import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fsspec.core import url_to_fs
from PIL import Image

from textseg import evaluation
from textseg.evaluation import EvalError, confusion_matrix, evaluate_folders
from textseg.outputs.masks import encode_png_mask

ND = 255  # no-data
ONTOLOGY = "classes:\n  building: {prompts: [building]}\n  road: {prompts: [road, street]}\n"


def write_mask(folder: Path, relpath: str, rows: list[list[int]], mode: str = "P") -> None:
    """Write a class mask as textseg does (palette PNG), or as a grayscale 'L' PNG."""
    path = folder / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.array(rows, dtype=np.uint8)
    if mode == "P":
        path.write_bytes(encode_png_mask(labels, [0] * 768))
    else:
        Image.fromarray(labels, mode="L").save(path)


def approx(value: Fraction) -> object:
    return pytest.approx(float(value), abs=1e-12)


@pytest.fixture()
def three_images(tmp_path: Path) -> tuple[Path, Path]:
    """GT and predictions for background, building (1), road (2); c.png has no prediction.

    Scored (gt, pred) pixel pairs, GT no-data and prediction no-data (-> background) applied:
      a.png: (0,0) (0,1) (1,1) (1,1) / (0,0) (2,2) (1,0) [gt 255: ignored]
      b.png: (2,2) (2,0 from pred 255) / (0,0) (0,2)
      c.png: (1,0) (0,0)  (missing prediction: all background)
    Confusion [gt][pred]:   pred 0  1  2   | GT total
                   gt 0:         4  1  1   | 6
                   gt 1:         2  2  0   | 4
                   gt 2:         1  0  2   | 3
                   pred total:   7  3  3   | 13 scored pixels, 8 correct
    """
    gt = tmp_path / "dataset" / "masks"
    pred = tmp_path / "run" / "masks"
    write_mask(gt, "a.png", [[0, 0, 1, 1], [0, 2, 1, ND]])
    write_mask(pred, "a.png", [[0, 1, 1, 1], [0, 2, 0, 2]], mode="L")
    write_mask(gt, "b.png", [[2, 2], [0, 0]], mode="L")
    write_mask(pred, "b.png", [[2, ND], [0, 2]])
    write_mask(gt, "c.png", [[1, 0]])
    (tmp_path / "dataset" / "ontology.yaml").write_text(ONTOLOGY)
    return pred, gt


def test_scores_match_confusion_counted_by_hand(three_images: tuple[Path, Path]) -> None:
    pred, gt = three_images
    report = evaluate_folders(str(pred), str(gt))

    assert report.class_names == ["background", "building", "road"]  # from ../ontology.yaml
    assert report.confusion == [[4, 1, 1], [2, 2, 0], [1, 0, 2]]
    # IoU = TP / (GT + pred - TP)
    assert report.iou == [approx(Fraction(4, 6 + 7 - 4)), approx(Fraction(2, 5)), approx(Fraction(2, 4))]
    # Dice = 2 TP / (GT + pred)
    assert report.dice == [approx(Fraction(8, 13)), approx(Fraction(4, 7)), approx(Fraction(4, 6))]
    assert report.miou == approx((Fraction(2, 5) + Fraction(1, 2)) / 2)  # foreground only: 9/20
    assert report.miou_classes == ["building", "road"]
    assert report.pixel_accuracy == approx(Fraction(8, 13))
    assert report.images == 3


def test_missing_prediction_is_scored_as_background_and_listed(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "x/seen.png", [[1, 1]])
    write_mask(tmp_path / "pred", "x/seen.png", [[1, 1]])
    write_mask(tmp_path / "gt", "x/unseen.png", [[1, 0]])

    report = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), ["background", "building"])

    assert report.missing_predictions == ["x/unseen.png"]
    assert report.confusion == [[1, 0], [1, 2]]  # the unseen building pixel is a miss, not skipped
    assert report.iou == [approx(Fraction(1, 2)), approx(Fraction(2, 3))]
    assert report.pixel_accuracy == approx(Fraction(3, 4))


def test_nodata_pixels_in_gt_are_ignored_whatever_the_prediction(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "t.png", [[ND, ND, ND], [ND, 2, ND]])
    write_mask(tmp_path / "pred", "t.png", [[1, 2, 0], [1, 2, 1]])

    report = evaluate_folders(
        str(tmp_path / "pred"), str(tmp_path / "gt"), ["background", "building", "road"]
    )

    assert report.confusion == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert report.pixel_accuracy == 1.0
    assert report.iou == [None, None, 1.0]


def test_class_absent_from_pred_and_gt_is_none_and_left_out_of_miou(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "t.png", [[0, 1, 1, 1]])
    write_mask(tmp_path / "pred", "t.png", [[0, 0, 1, 1]])

    report = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), ["background", "a", "b"])

    assert report.iou == [approx(Fraction(1, 2)), approx(Fraction(2, 3)), None]
    assert report.dice[2] is None
    assert report.miou == approx(Fraction(2, 3))  # class b is absent: the mean is over class a alone
    assert report.miou_classes == ["a"]


def test_no_foreground_anywhere_gives_no_miou(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "t.png", [[0, 0]])
    write_mask(tmp_path / "pred", "t.png", [[0, 0]])

    report = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), ["background", "a"])

    assert report.miou is None
    assert report.pixel_accuracy == 1.0


def test_class_names_default_to_class_i_up_to_the_largest_value(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "t.png", [[0, 3]])
    write_mask(tmp_path / "pred", "t.png", [[0, 1]])

    report = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))

    assert report.class_names == ["background", "class_1", "class_2", "class_3"]
    assert report.iou == [1.0, 0.0, None, 0.0]


def test_ontology_in_the_gt_folder_itself_names_the_classes(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "ontology.yaml").write_text(ONTOLOGY)
    write_mask(tmp_path / "gt", "t.png", [[0, 2]])
    write_mask(tmp_path / "pred", "t.png", [[0, 2]])

    report = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))

    assert report.class_names == ["background", "building", "road"]


def test_relpaths_match_across_folders_ignoring_png_extension_case_and_glob_characters(
    tmp_path: Path,
) -> None:
    write_mask(tmp_path / "gt", "tiles/z 1/[a]*?.PNG", [[1]])
    write_mask(tmp_path / "pred", "tiles/z 1/[a]*?.png", [[1]])
    write_mask(tmp_path / "pred", "tiles/extra.png", [[1]])

    report = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), ["background", "a"])

    assert report.missing_predictions == []
    assert report.iou[1] == 1.0
    assert report.ignored_predictions == 1


def test_size_mismatch_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "dir/t.png", [[0, 1, 1]])
    write_mask(tmp_path / "pred", "dir/t.png", [[0, 1]])

    with pytest.raises(
        EvalError, match=r"dir/t\.png: the prediction is 2x1 pixels but the ground truth is 3x1"
    ):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))


def test_mask_value_outside_the_named_classes_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "t.png", [[0, 1]])
    write_mask(tmp_path / "pred", "t.png", [[0, 7]])

    with pytest.raises(EvalError, match=r"t\.png: the prediction has mask values \[7\]"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), ["background", "a"])


def test_folders_with_no_relpath_in_common_are_an_error_showing_both(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "a.png", [[0]])
    write_mask(tmp_path / "dest", "masks/a.png", [[0]])

    with pytest.raises(EvalError, match=r"GT 'a\.png', prediction 'masks/a\.png'"):
        evaluate_folders(str(tmp_path / "dest"), str(tmp_path / "gt"))


def test_a_non_png_mask_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write_mask(tmp_path / "gt", "t.png", [[0]])
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "t.png").write_bytes(b"not a png")

    with pytest.raises(EvalError, match=r"prediction t\.png is not a single-channel 8-bit PNG mask"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"))


def test_report_is_strict_json_and_a_table_with_every_class(
    three_images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, gt = three_images
    report = evaluate_folders(str(pred), str(gt))

    out = tmp_path / "eval.json"
    out.write_text(json.dumps(report.to_json(), allow_nan=False, indent=2))
    written = json.loads(out.read_text())
    assert [c["name"] for c in written["classes"]] == ["background", "building", "road"]
    assert written["classes"][1] == {
        "index": 1,
        "name": "building",
        "iou": approx(Fraction(2, 5)),
        "dice": approx(Fraction(4, 7)),
        "gt_pixels": 4,
        "pred_pixels": 3,
    }
    assert written["miou"] == approx(Fraction(9, 20))
    assert written["missing_predictions"] == ["c.png"]
    assert written["confusion"] == report.confusion

    print(report.table())
    printed = capsys.readouterr().out
    assert "building" in printed and "0.4000" in printed and "0.5714" in printed
    assert "mIoU over the 2 foreground classes present: 0.4500" in printed
    assert "pixel accuracy: 0.6154" in printed
    assert "1 without a prediction" in printed


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict[str, Any]]:
    """A moto S3 server on loopback and the storage options that reach it."""
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        "key": "testing",
        "secret": "testing",
        # Not us-east-1: s3fs would send it as a LocationConstraint when creating a bucket, which S3 refuses.
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-west-2"},
    }
    server.stop()


def test_reads_gt_and_predictions_from_s3_with_the_ontology_beside_gt(
    three_images: tuple[Path, Path], s3_options: dict[str, Any]
) -> None:
    pred, gt = three_images
    s3, _ = url_to_fs("s3://eval", **s3_options)
    s3.mkdir("eval")
    s3.put(str(gt.parent), "eval/dataset", recursive=True)
    s3.put(str(pred), "eval/run/masks", recursive=True)

    report = evaluate_folders("s3://eval/run/masks/", "s3://eval/dataset/masks", storage_options=s3_options)

    assert report.class_names == ["background", "building", "road"]
    assert report.confusion == [[4, 1, 1], [2, 2, 0], [1, 0, 2]]
    assert report.missing_predictions == ["c.png"]


def test_confusion_counts_are_the_same_when_split_into_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    gt = rng.choice(np.array([0, 1, 2, ND], dtype=np.uint8), size=(7, 5))
    pred = rng.choice(np.array([0, 1, 2, ND], dtype=np.uint8), size=(7, 5))
    whole = confusion_matrix(gt, pred)

    monkeypatch.setattr(evaluation, "BINCOUNT_PIXELS", 10)  # 2 rows per block, the last block has 1 row
    assert np.array_equal(confusion_matrix(gt, pred), whole)
    assert whole.sum() == gt.size
    assert whole[:, ND].sum() == 0  # prediction no-data counted as background
