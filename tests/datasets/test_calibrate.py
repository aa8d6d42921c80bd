"""`textseg calibrate`: thresholds chosen against hand-labeled masks recover the mIoU that wrong thresholds
lost, and a re-run of `textseg label` with the written ontology gets exactly the printed "after" mIoU.

The DEST is labeled by the demo model (a softmax backend) with deliberately wrong thresholds: 0.999 for
building and road (most of their pixels demoted to background), 0.0 for water. Both ways labeling turns
logits into labels are checked: whole images straight from the logits (`label_image`, a plain run) and
through the score maps (`labels_from_scores`, a run with --instances, as the `labeled_dest` fixture is).
"""

from __future__ import annotations

import pathlib
import re
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.datasets.conftest import LabeledFixture
from textseg.api import label
from textseg.cli import main
from textseg.datasets.calibrate import ThresholdCounts, calibrate, iou, threshold_edges, winning_classes
from textseg.evaluation import EvalReport, confusion_matrix, evaluate_folders, report_from_confusion
from textseg.labels.postprocess import ClassGrouping, class_scores, label_image, labels_from_scores
from textseg.ontology import from_yaml_text

WRONG = {"building": 0.999, "road": 0.999, "water": 0.0}  # tree keeps the fixture's 0.5


@dataclass(frozen=True)
class WronglyLabeled:
    ontology: pathlib.Path
    dest: pathlib.Path


@pytest.fixture(scope="module")
def wrongly_labeled(labeled_dest: LabeledFixture, tmp_path_factory: pytest.TempPathFactory) -> WronglyLabeled:
    root = tmp_path_factory.mktemp("wrong-thresholds")
    ontology = yaml.safe_load(labeled_dest.ontology.read_text())
    for name, threshold in WRONG.items():
        ontology["classes"][name]["threshold"] = threshold
    path = root / "wrong.yaml"
    path.write_text(yaml.safe_dump(ontology, sort_keys=False))
    summary = label(
        str(labeled_dest.source),
        str(root / "dest"),
        runner="local",
        model="demo",
        ontology=str(path),
        device="cpu",
    )
    assert summary.ok == 10, summary
    return WronglyLabeled(path, root / "dest")


def relabeled_report(
    labeled_dest: LabeledFixture, ontology: pathlib.Path, dest: pathlib.Path, instances: bool
) -> EvalReport:
    """`textseg label` of the fixture's images with `ontology` into `dest`, scored against its GT."""
    summary = label(
        str(labeled_dest.source),
        str(dest),
        runner="local",
        model="demo",
        ontology=str(ontology),
        device="cpu",
        instances=instances,
    )
    assert summary.ok == 10, summary
    return evaluate_folders(str(dest / "masks"), str(labeled_dest.truth))


def test_calibration_recovers_the_miou_and_a_rerun_with_its_ontology_gets_exactly_it(
    labeled_dest: LabeledFixture, wrongly_labeled: WronglyLabeled, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "calibrated.yaml"
    result = calibrate(
        str(wrongly_labeled.dest),
        str(labeled_dest.truth),
        str(wrongly_labeled.ontology),
        str(out),
        device="cpu",
    )

    stored = evaluate_folders(str(wrongly_labeled.dest / "masks"), str(labeled_dest.truth))
    default = evaluate_folders(str(labeled_dest.dest / "masks"), str(labeled_dest.truth))  # thresholds 0.5
    assert result.images == 10 and not result.windowed and not result.unmatched
    assert result.miou_before == pytest.approx(stored.miou, abs=1e-12)  # "before" is what the run wrote
    assert result.miou_before < default.miou - 0.25
    assert result.miou_after >= default.miou - 0.01, (result.table(), default.table())
    by_name = {c.name: c for c in result.classes}
    assert by_name["building"].threshold_after < 0.99 and by_name["road"].threshold_after < 0.99
    for c in result.classes:
        assert c.iou_after >= c.iou_before

    written = from_yaml_text(out.read_text(), default_threshold=0.4)
    given = from_yaml_text(wrongly_labeled.ontology.read_text(), default_threshold=0.4)
    assert [(c.name, c.prompts, c.color) for c in written.classes] == [
        (c.name, c.prompts, c.color) for c in given.classes
    ]
    assert written.thresholds == [c.threshold_after for c in result.classes]

    rerun = relabeled_report(labeled_dest, out, tmp_path / "rerun", instances=False)
    assert rerun.miou == pytest.approx(result.miou_after, abs=1e-12)
    assert rerun.iou[1:] == pytest.approx([c.iou_after for c in result.classes], abs=1e-12)


def test_cli_prints_the_table_and_a_rerun_with_scores_kept_gets_the_printed_miou(
    labeled_dest: LabeledFixture,
    wrongly_labeled: WronglyLabeled,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    truth = tmp_path / "truth"
    shutil.copytree(labeled_dest.truth, truth)
    shutil.copy(truth / "tile_00000.png", truth / "not_labeled.png")  # a GT mask DEST has no image for
    out = tmp_path / "o2.yaml"

    code = main(
        ["calibrate", str(labeled_dest.dest), str(truth), "--ontology", str(wrongly_labeled.ontology),
         "--out", str(out), "--device", "cpu", "--batch-size", "3", "--no-progress"]
    )  # fmt: skip

    printed = capsys.readouterr().out
    assert code == 0, printed
    before, after = re.search(r"mIoU over the 4 foreground classes present: (\S+) -> (\S+)", printed).groups()
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()[:1] != ["class"]}
    assert rows["building"][1:4] == ["0.999", "->", f"{from_yaml_text(out.read_text(), 0.4).thresholds[0]:g}"]
    assert "GT masks without a labeled image in PRED_DEST, not scored: 1" in printed
    stored = evaluate_folders(str(wrongly_labeled.dest / "masks"), str(labeled_dest.truth))
    assert before == f"{stored.miou:.4f}"  # re-scored at O's thresholds: the masks a run with O wrote
    rerun = relabeled_report(labeled_dest, out, tmp_path / "rerun", instances=True)
    assert after == f"{rerun.miou:.4f}"


@pytest.mark.parametrize("score_kind", ["sigmoid", "softmax"])
def test_winning_classes_decide_exactly_as_labeling_at_any_thresholds(score_kind: str) -> None:
    generator = torch.Generator().manual_seed(3)
    prompt_class = (1, 1, 2, 3, 4, 4)  # two classes with two prompts each
    channels = len(prompt_class) + (score_kind == "softmax")
    size = (97, 131)  # not a multiple of the logits' size: bilinear weights everywhere
    for trial in range(8):
        logits = torch.randn(channels, 23, 29, generator=generator) * 4
        thresholds = tuple(float(t) for t in torch.rand(4, generator=generator))
        if trial % 3 == 0:
            thresholds = (0.7,) * 4  # one threshold for all: labeling compares with a Python float
        grouping = ClassGrouping(prompt_class, thresholds)
        best, score = winning_classes(logits, size, grouping, score_kind)
        table = torch.tensor((0.0, *thresholds))  # float32, as labeling holds thresholds
        mine = best * (score >= table[best.long()])
        whole_image = label_image(logits, size, grouping, score_kind).labels
        with_scores = labels_from_scores(
            class_scores(logits, size, grouping, score_kind), grouping, score_kind, None
        )
        assert torch.equal(mine, whole_image) and torch.equal(mine, with_scores.labels)


def test_threshold_counts_give_eval_iou_at_every_edge() -> None:
    rng = np.random.default_rng(5)
    edges = threshold_edges([0.7, 0.33])
    counts = ThresholdCounts(edges, 3, torch.device("cpu"))
    images = []
    for _ in range(3):
        best = rng.integers(0, 4, (40, 50)).astype(np.uint8)
        score = rng.random((40, 50)).astype(np.float32)
        score[:2] = np.float32(0.7)  # exactly on an edge: `>=` keeps it
        truth = rng.integers(0, 4, (40, 50)).astype(np.uint8)
        truth[5:9] = 255  # ignored in GT
        nodata = np.zeros((40, 50), dtype=bool)
        nodata[:, :3] = True  # no data in the image: background in the mask
        images.append((best, score, truth, nodata))
        counts.add(*(torch.from_numpy(a) for a in (best, score, truth, nodata)))
    won, hits, truth_pixels = counts.at_edges()
    for value in (0.0, 0.05, 0.33, 0.5, 0.7, 0.9995, 1.0):
        i = edges.index(value)
        confusion = np.zeros((256, 256), dtype=np.int64)
        for best, score, truth, nodata in images:
            labels = np.where(score >= np.float32(value), best, 0).astype(np.uint8)
            labels[nodata] = 255
            confusion += confusion_matrix(truth, labels)
        report = report_from_confusion(
            confusion[:4, :4], ["background", "a", "b", "c"], images=3, missing_predictions=[]
        )
        assert [iou(hits[k, i], won[k, i], truth_pixels[k]) for k in range(3)] == report.iou[1:], value


def test_a_ground_truth_mask_of_the_wrong_size_is_refused_naming_it(
    labeled_dest: LabeledFixture, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = tmp_path / "truth"
    truth.mkdir()
    shutil.copy(labeled_dest.truth / "tile_00001.png", truth / "tile_00001.png")
    Image.open(labeled_dest.truth / "tile_00000.png").crop((0, 0, 100, 80)).save(truth / "tile_00000.png")
    code = main(
        ["calibrate", str(labeled_dest.dest), str(truth), "--ontology", str(labeled_dest.ontology),
         "--out", str(tmp_path / "o2.yaml"), "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert code == 2
    assert "tile_00000.png: the ground truth is 100x80 pixels but the image" in capsys.readouterr().err
    assert not (tmp_path / "o2.yaml").exists()
