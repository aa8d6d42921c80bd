"""The README's distillation recipe, end to end on synthetic tiles: a teacher labels a sample, a person
reviews it (the report) and hand-labels a few images (here: their ground truth), calibration fixes the
teacher's thresholds, the teacher labels the sample again, a small fusion student trains on those labels,
and the student labels the whole bucket. The student's mIoU is printed beside the teacher's.

The teacher is the demo model with deliberately poor thresholds (the quality model, SAM 3 or CLIPSeg, needs
a download); the student is a fusion model a quarter of the demo's width, trained for a few epochs.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
import yaml

from textseg.cli import main
from textseg.evaluation import evaluate_folders
from textseg.training.synth import write_synth_dataset

BUCKET_TILES = 64
SAMPLE_TILES = 32
HAND_LABELED = 6
# A quarter of the demo model's width (textseg.models.fusion.FusionConfig's defaults).
STUDENT = ["encoder_channels=[8, 12, 24, 40, 64]", "decoder_channels=[8, 12, 24, 32, 48]", "embed_dim=32"]


def _miou(dest: pathlib.Path, truth: pathlib.Path) -> float:
    report = evaluate_folders(str(dest / "masks"), str(truth))
    assert report.miou is not None
    return report.miou


@pytest.mark.slow  # three minutes on two cores
def test_a_student_trained_on_calibrated_teacher_labels_labels_the_bucket(
    tmp_path: pathlib.Path, ray_session, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = tmp_path / "bucket"
    write_synth_dataset(str(bucket), BUCKET_TILES, seed=77)
    ontology = yaml.safe_load((bucket / "ontology.yaml").read_text())
    for name in ("building", "road"):
        ontology["classes"][name]["threshold"] = 0.995  # a teacher whose thresholds were guessed badly
    # Sorted keys: the teacher's classes come in another order than the hand labels' ontology.yaml, whose
    # names calibrate matches them by.
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(ontology, sort_keys=True))
    sample, hand = tmp_path / "sample", tmp_path / "hand-labeled"
    sample.mkdir()
    hand.mkdir()
    for i, image in enumerate(sorted((bucket / "images").iterdir())[:SAMPLE_TILES]):
        shutil.copy(image, sample / image.name)
        if i < HAND_LABELED:
            shutil.copy(bucket / "masks" / image.name, hand / image.name)
    shutil.copy(bucket / "ontology.yaml", hand / "ontology.yaml")
    common = ["--model", "demo", "--device", "cpu"]

    def at(name: str) -> str:
        return str(tmp_path / name)

    assert main(["label", str(sample), at("teacher-1"), "--ontology", at("teacher.yaml"), *common]) == 0
    assert main(["report", at("teacher-1"), "--out", at("review.html"), "--no-progress"]) == 0
    assert "<img" in (tmp_path / "review.html").read_text()
    calibrate = ["calibrate", at("teacher-1"), str(hand), "--ontology", at("teacher.yaml")]
    capsys.readouterr()
    assert main([*calibrate, "--out", at("calibrated.yaml"), "--device", "cpu", "--no-progress"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("mIoU over")]
    before, after = (float(v) for v in line.rsplit(":", 1)[1].split("->"))
    assert after > before + 0.1 and after > 0.7, line  # on the six hand-labeled tiles
    assert main(["label", str(sample), at("teacher-2"), "--ontology", at("calibrated.yaml"), *common]) == 0
    student_options = [arg for option in STUDENT for arg in ("--model-option", option)]
    assert main(["train", at("teacher-2"), "--out", at("student"), "--epochs", "30", "--batch-size", "4",
                 "--image-size", "128", "--crop-size", "96", *student_options, "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip

    for name, model, onto in (
        ("teacher-bucket", "demo", tmp_path / "teacher.yaml"),
        ("calibrated-bucket", "demo", tmp_path / "calibrated.yaml"),
        ("student-bucket", str(tmp_path / "student"), bucket / "ontology.yaml"),
    ):
        args = ["label", str(bucket / "images"), str(tmp_path / name), "--ontology", str(onto)]
        assert main([*args, "--model", model, "--device", "cpu"]) == 0
    teacher = _miou(tmp_path / "teacher-bucket", bucket / "masks")
    calibrated = _miou(tmp_path / "calibrated-bucket", bucket / "masks")
    student = _miou(tmp_path / "student-bucket", bucket / "masks")
    print(f"bucket mIoU: teacher {teacher:.3f}, calibrated teacher {calibrated:.3f}, student {student:.3f}")
    assert calibrated > teacher + 0.05  # calibration on six hand-labeled tiles repaired the thresholds
    assert student > 0.3  # it learned the classes from the teacher's labels (untrained: 0)
