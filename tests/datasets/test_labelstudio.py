"""Label Studio round trip: `textseg export --format labelstudio` tasks, decoded with Label Studio's own brush
module, are DEST's masks; a reviewer's corrections (painted with Label Studio's own encoder) come back
through `textseg import-labelstudio` as the masks training reads."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import urllib.parse
import xml.etree.ElementTree as ElementTree
from typing import Any

import numpy as np
import pytest
import s3fs
from PIL import Image

from textseg.cli import main
from textseg.datasets import labelstudio
from textseg.datasets.formats import labelstudio as formats_labelstudio
from textseg.datasets.formats.labelstudio import BRUSH_NAME, CONFIG_FILE, IMAGE_NAME, NODATA_LABEL
from textseg.datasets.labeled_dest import iter_labeled, read_image, read_mask, run_ids, run_ontology
from textseg.datasets.labelstudio_rle import decode_rle, encode_rle
from textseg.ontology import NODATA, from_yaml_text
from textseg.outputs.metadata import iter_errors
from textseg.training.datasets import load_labeled_images

# Installed without its dependencies (they pin an older numpy through OpenCV): its package __init__ prints
# the first one it misses, and the brush module needs only numpy and Pillow.
with contextlib.redirect_stdout(io.StringIO()):
    brush = pytest.importorskip(
        "label_studio_sdk.converter.brush", reason="pip install --no-deps label-studio-sdk==2.1.2"
    )


def _alpha(result: dict[str, Any]) -> np.ndarray:
    """A brush result's region as Label Studio decodes it: the alpha plane of its RGBA image."""
    height, width = result["original_height"], result["original_width"]
    return np.reshape(brush.decode_rle(result["value"]["rle"]), (height, width, 4))[:, :, 3]


def _ls_result(template: dict[str, Any], region: np.ndarray, label: str, result_id: str) -> dict[str, Any]:
    """A brush result as Label Studio's editor saves it, its RLE from Label Studio's encoder."""
    value = {"format": "rle", "rle": brush.mask2rle(region.astype(np.uint8) * 255), "brushlabels": [label]}
    return {**template, "id": result_id, "origin": "manual", "value": value}


def _tasks(out: pathlib.Path) -> list[dict[str, Any]]:
    return [task for path in sorted(out.glob("tasks-*.json")) for task in json.loads(path.read_text())]


def _dest_masks(dest: pathlib.Path) -> dict[str, tuple[np.ndarray, list[str], str]]:
    """relpath -> (mask, its class names, source URI) of DEST's current labels."""
    return {
        image.relpath: (read_mask(image.row["mask_uri"], {}), image.class_names, image.row["source_uri"])
        for image in iter_labeled(str(dest), {})
    }


@pytest.fixture(scope="module")
def exported(labeled_dest: Any, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("labelstudio-export")
    args = ["export", str(labeled_dest.dest), str(out), "--format", "labelstudio", "--no-progress"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(formats_labelstudio, "TASKS_PER_FILE", 4)  # 10 tasks: 3 files
        assert main([*args, "--split", "train=0.7,val=0.3"]) == 0
    return out


def _masks_for_rle() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    square = np.zeros((330, 533), dtype=bool)
    square[100:130, 3:33] = True
    return [
        np.zeros((5, 7), dtype=bool),
        np.ones((5, 7), dtype=bool),
        np.ones((1, 1), dtype=bool),
        np.ones((200, 400), dtype=bool),  # 320 000 equal words: runs past the 16-bit length field
        square,
        rng.random((64, 64)) > 0.5,  # short runs of every length class
        np.indices((40, 40)).sum(axis=0) % 2 == 0,  # a checkerboard: every run one pixel
    ]


@pytest.mark.parametrize("mask", _masks_for_rle(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{m.sum()}")
def test_rle_is_label_studios_in_both_directions(mask: np.ndarray) -> None:
    ours = encode_rle(mask)
    assert ours == list(brush.mask2rle(mask.astype(np.uint8) * 255))
    alpha = np.reshape(brush.decode_rle(ours), (*mask.shape, 4))[:, :, 3]
    np.testing.assert_array_equal(alpha, mask.astype(np.uint8) * 255)
    np.testing.assert_array_equal(decode_rle(brush.mask2rle(mask.astype(np.uint8) * 255), *mask.shape), mask)


def test_rle_decodes_literal_runs_and_any_alpha_as_label_studio_does() -> None:
    """The browser's encoder writes literal runs too, and soft alpha values; alpha > 0 is the region.
    A 1 x 2 image: a literal run of pixel 0's four words (alpha 0), then pixel 1's as one repeated word."""
    bits = f"{8:032b}{7:05b}" + "".join(f"{w - 1:04b}" for w in (3, 4, 8, 16))
    bits += "0" + "00" + f"{3:03b}" + "".join(f"{v:08b}" for v in (10, 20, 30, 0))
    bits += "1" + "00" + f"{3:03b}" + f"{9:08b}"
    bits += "0" * (8 - len(bits) % 8)
    rle = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    np.testing.assert_array_equal(np.reshape(brush.decode_rle(rle), (1, 2, 4))[0, :, 3], [0, 9])
    np.testing.assert_array_equal(decode_rle(rle, 1, 2), [[False, True]])
    random = np.random.default_rng(1).integers(0, 3, size=(20, 30, 4)).astype(np.uint8)
    rle = brush.encode_rle(random.ravel())  # its lone words are literal runs of one
    np.testing.assert_array_equal(decode_rle(rle, 20, 30), random[:, :, 3] > 0)


def test_tasks_decode_with_label_studio_to_the_dest_masks(exported: pathlib.Path, labeled_dest: Any) -> None:
    ontology = from_yaml_text(labeled_dest.ontology.read_text(), 0.5)
    view = ElementTree.parse(exported / CONFIG_FILE).getroot()
    image_tag, brush_tag = view.find("Image"), view.find("BrushLabels")
    assert image_tag is not None and brush_tag is not None
    assert image_tag.get("value") == f"${IMAGE_NAME}" and brush_tag.get("toName") == image_tag.get("name")
    colors = {label.get("value"): label.get("background") for label in brush_tag.findall("Label")}
    assert colors == {
        **{n: s["color"] for n, s in ontology.to_dict()["classes"].items()},
        NODATA_LABEL: "#ffffff",
    }

    dest = _dest_masks(labeled_dest.dest)
    tasks = _tasks(exported)
    assert [len(json.loads(p.read_text())) for p in sorted(exported.glob("tasks-*.json"))] == [4, 4, 2]
    assert sorted(task["data"]["relpath"] for task in tasks) == sorted(dest)
    for task in tasks:
        mask, class_names, source_uri = dest[task["data"]["relpath"]]
        assert task["data"]["image"] == task["data"]["source_uri"] == source_uri
        assert (task["data"]["height"], task["data"]["width"]) == mask.shape
        assert task["data"]["split"] in ("train", "val")
        [prediction] = task["predictions"]
        painted = np.zeros_like(mask)
        for result in prediction["result"]:
            assert (result["type"], result["from_name"], result["to_name"]) == (
                "brushlabels",
                brush_tag.get("name"),
                image_tag.get("name"),
            )
            assert result["from_name"] == BRUSH_NAME and result["value"]["format"] == "rle"
            region = _alpha(result) > 0
            assert not painted[region].any(), "one result per class: regions never overlap"
            [label] = result["value"]["brushlabels"]
            painted[region] = NODATA if label == NODATA_LABEL else class_names.index(label)
        np.testing.assert_array_equal(painted, mask)


def _reviewed_export(tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """What Label Studio's JSON export holds after a review, and the masks the reviewers made, by relpath:
    task 0 repainted (a square of water over whatever was there, another marked no data), task 1 never
    opened, task 2 skipped, task 3 submitted twice (the later one counts), the rest accepted as predicted."""
    export, expected = [], {}
    for number, task in enumerate(sorted(tasks, key=lambda t: t["data"]["relpath"])):
        predicted = task["predictions"][0]["result"]
        height, width = task["data"]["height"], task["data"]["width"]
        classes = {result["value"]["brushlabels"][0]: _alpha(result) > 0 for result in predicted}
        annotation = {"id": 100 + number, "result": predicted, "was_cancelled": False, "completed_by": 1}
        annotation |= {"created_at": "2026-05-01T10:00:00Z", "updated_at": "2026-05-01T10:00:00Z"}
        annotations = [annotation]
        if number == 0:
            water, nodata = np.zeros((height, width), dtype=bool), np.zeros((height, width), dtype=bool)
            water[10:50, 20:60] = True
            nodata[60:80, 0:30] = True
            edited = {name: region & ~water & ~nodata for name, region in classes.items() if name != "water"}
            edited["water"] = classes.get("water", np.zeros_like(water)) | water
            edited[NODATA_LABEL] = nodata
            template = {k: v for k, v in predicted[0].items() if k not in ("id", "value", "score")}
            result = [_ls_result(template, r, name, f"edit{i}") for i, (name, r) in enumerate(edited.items())]
            annotations = [{**annotation, "result": result}]
        elif number == 1:
            annotations = []
        elif number == 2:
            annotations = [{**annotation, "was_cancelled": True, "result": []}]
        elif number == 3:
            cleared = {**annotation, "id": 1, "result": [], "updated_at": "2026-04-01T09:00:00Z"}
            annotations = [annotation, cleared]  # the cleared one is older: it does not count
        export.append({"id": number + 1, **task, "annotations": annotations, "total_annotations": 1})
        if annotations and not annotations[0]["was_cancelled"]:
            names = [result["value"]["brushlabels"][0] for result in annotations[0]["result"]]
            regions = [_alpha(result) > 0 for result in annotations[0]["result"]]
            expected[task["data"]["relpath"]] = (names, regions)
    return export, expected


def _label_map(names: list[str], regions: list[np.ndarray], class_names: list[str]) -> np.ndarray:
    labels = np.zeros(regions[0].shape, dtype=np.uint8)
    for name, region in zip(names, regions, strict=True):
        labels[region] = NODATA if name == NODATA_LABEL else class_names.index(name)
    return labels


def test_reviewed_corrections_import_as_the_masks_training_reads(
    exported: pathlib.Path, labeled_dest: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(labelstudio, "READ_CHARS", 97)  # the export is read in many small pieces
    export, reviewed = _reviewed_export(_tasks(exported))
    (tmp_path / "export.json").write_text(json.dumps(export))
    dest2 = tmp_path / "dest2"
    ontology = from_yaml_text(labeled_dest.ontology.read_text(), 0.5)
    args = ["import-labelstudio", str(tmp_path / "export.json"), str(dest2), "--no-progress"]
    assert main([*args, "--ontology", str(labeled_dest.ontology)]) == 0

    expected = {r: _label_map(*regions, ontology.class_names) for r, regions in reviewed.items()}
    assert len(expected) == len(export) - 2
    first = min(expected)
    assert (expected[first][10:50, 20:60] == ontology.class_names.index("water")).all()
    assert (expected[first][60:80, 0:30] == NODATA).all()
    dest = _dest_masks(labeled_dest.dest)
    for relpath, labels in expected.items():
        with Image.open(dest2 / "masks" / pathlib.Path(relpath).with_suffix(".png")) as png:
            assert (
                png.mode == "P"
                and png.getpalette()[: 3 * len(ontology.class_names)]
                == ontology.palette()[: 3 * len(ontology.class_names)]
            )
            np.testing.assert_array_equal(np.asarray(png), labels)
        if relpath != first:
            np.testing.assert_array_equal(labels, dest[relpath][0])  # accepted as predicted

    size = next(iter(expected.values())).shape
    training = load_labeled_images(str(dest2), size)
    assert training.relpaths == sorted(expected)
    assert list(training.class_names) == ontology.class_names[1:]
    for relpath, image, mask in zip(training.relpaths, training.images, training.masks, strict=True):
        np.testing.assert_array_equal(mask, expected[relpath])
        np.testing.assert_array_equal(image, read_image(dest[relpath][2], {}))

    [run] = run_ids(str(dest2), {})
    assert run_ontology(str(dest2), run, {}).to_dict() == ontology.to_dict()
    rows = {image.relpath: image.row for image in iter_labeled(str(dest2), {})}
    assert sorted(rows) == sorted(expected)
    for relpath, row in rows.items():
        assert row["model_id"] == labelstudio.MODEL_ID and row["source_uri"] == dest[relpath][2]
        valid = expected[relpath][expected[relpath] != NODATA]
        counts = np.bincount(valid, minlength=len(ontology.class_names))
        np.testing.assert_allclose(row["class_pixel_fraction"], counts / counts.sum(), rtol=1e-6)


def test_import_without_ontology_takes_the_exports_labels(
    exported: pathlib.Path, labeled_dest: Any, tmp_path: pathlib.Path
) -> None:
    tasks = _tasks(exported)
    export = [
        {"id": i + 1, **task, "annotations": [{"id": i + 1, "result": task["predictions"][0]["result"]}]}
        for i, task in enumerate(tasks)
    ]
    (tmp_path / "export.json").write_text(json.dumps(export, indent=2))
    dest2 = tmp_path / "dest2"
    assert main(["import-labelstudio", str(tmp_path / "export.json"), str(dest2), "--no-progress"]) == 0

    first_seen: dict[str, None] = {}
    for task in export:
        first_seen |= {r["value"]["brushlabels"][0]: None for r in task["annotations"][0]["result"]}
    names = ["background", *(n for n in first_seen if n != NODATA_LABEL)]
    dest = _dest_masks(labeled_dest.dest)
    imported = {image.relpath: image for image in iter_labeled(str(dest2), {})}
    assert sorted(imported) == sorted(dest)
    for relpath, image in imported.items():
        assert image.class_names == names
        mask, class_names, _ = dest[relpath]
        by_name = np.array([names.index(n) for n in class_names] + [0] * (256 - len(class_names)), np.uint8)
        by_name[NODATA] = NODATA
        np.testing.assert_array_equal(read_mask(image.row["mask_uri"], {}), by_name[mask])


def test_a_label_outside_the_ontology_is_an_error_row_and_the_rest_land(
    exported: pathlib.Path, labeled_dest: Any, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = sorted(_tasks(exported), key=lambda t: t["data"]["relpath"])
    export = []
    for i, task in enumerate(tasks):
        result = json.loads(json.dumps(task["predictions"][0]["result"]))
        if i == 0:
            result[0]["value"]["brushlabels"] = ["car"]
        export.append({"id": i + 1, **task, "annotations": [{"id": i + 1, "result": result}]})
    (tmp_path / "export.json").write_text(json.dumps(export))
    dest2 = tmp_path / "dest2"
    args = ["import-labelstudio", str(tmp_path / "export.json"), str(dest2), "--no-progress"]
    assert main([*args, "--ontology", str(labeled_dest.ontology)]) == 1
    assert "9 corrected masks, 1 failed" in capsys.readouterr().out

    [run] = run_ids(str(dest2), {})
    [(relpath, reason)] = list(iter_errors(str(dest2), run, {}))
    assert relpath == tasks[0]["data"]["relpath"] and "'car'" in reason
    assert not (dest2 / "masks" / pathlib.Path(relpath).with_suffix(".png")).exists()
    assert len(load_labeled_images(str(dest2), (32, 32)).relpaths) == len(tasks) - 1


@pytest.mark.parametrize("text", ['{"data": {}}', "[1, 2]", '[{"data": {}} {"data": {}}]', '[{"data": '])
def test_a_file_that_is_not_an_export_fails_with_one_sentence(
    text: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "export.json").write_text(text)
    args = ["import-labelstudio", str(tmp_path / "export.json"), str(tmp_path / "dest2"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("textseg: ") and "export.json is not" in err


def test_copied_images_are_served_by_label_studios_local_files(
    labeled_dest: Any, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "out"
    args = ["export", str(labeled_dest.dest), str(out), "--format", "labelstudio", "--images", "copy"]
    assert main([*args, "--no-progress"]) == 0
    for task in _tasks(out):
        prefix, _, relative = task["data"]["image"].partition("?d=")
        assert prefix == "/data/local-files/"
        copied = out / urllib.parse.unquote(relative)  # relative to LOCAL_FILES_DOCUMENT_ROOT=OUT
        assert copied.read_bytes() == pathlib.Path(task["data"]["source_uri"]).read_bytes()


def test_round_trip_through_a_bucket(labeled_dest: Any, s3_server: Any, s3_bucket: str) -> None:
    options = s3_server.storage_options
    flags = [
        f"--storage-option=key={options['key']}",
        f"--storage-option=secret={options['secret']}",
        f"--storage-option=client_kwargs.endpoint_url={s3_server.endpoint_url}",
        f"--storage-option=client_kwargs.region_name={options['client_kwargs']['region_name']}",
    ]
    out, dest2 = f"s3://{s3_bucket}/review", f"s3://{s3_bucket}/dest2"
    args = ["export", str(labeled_dest.dest), out, "--format", "labelstudio", "--images", "copy"]
    assert main([*args, "--no-progress", *flags]) == 0
    fs = s3fs.S3FileSystem(**options)
    tasks = [
        task for path in sorted(fs.glob(f"{out}/tasks-*.json")) for task in json.loads(fs.cat_file(path))
    ]
    assert all(task["data"]["image"].startswith(f"s3://{s3_bucket}/review/images/") for task in tasks)
    export = [
        {**task, "annotations": [{"id": 1, "result": task["predictions"][0]["result"]}]} for task in tasks
    ]
    fs.pipe_file(f"{s3_bucket}/export.json", json.dumps(export).encode())
    args = ["import-labelstudio", f"s3://{s3_bucket}/export.json", dest2, "--no-progress", *flags]
    assert main([*args, "--ontology", str(labeled_dest.ontology)]) == 0

    dest = _dest_masks(labeled_dest.dest)
    training = load_labeled_images(dest2, next(iter(dest.values()))[0].shape, storage_options=options)
    assert training.relpaths == sorted(dest)
    for relpath, mask in zip(training.relpaths, training.masks, strict=True):
        np.testing.assert_array_equal(mask, dest[relpath][0])
    rows = [image.row for image in iter_labeled(dest2, options)]
    assert rows and all(row["mask_uri"].startswith(f"{dest2}/masks/") for row in rows)
