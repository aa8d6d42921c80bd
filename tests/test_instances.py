"""Instances (`--instances`): one row per connected region of a class, its mask as COCO RLE that
pycocotools decodes to a mask inside its box; rows land once per labeled image, beside its metadata."""

from __future__ import annotations

import pathlib

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from tests.tiny_models import make_tiny_sam3, sam3_reference_outputs
from textseg.cli import main
from textseg.image.windows import grid_windows
from textseg.labels.instances import encode_rle, encode_rle_crop, region_instances
from textseg.labels.scene_instances import SceneRegions
from textseg.outputs.instances import INSTANCE_SCHEMA, remove_orphan_instance_parts
from textseg.outputs.masks import decode_png_mask

CLASSES = ["background", "building", "road"]


def decode(row: dict) -> np.ndarray:
    return coco_mask.decode({"size": row["mask_size"], "counts": row["mask_counts"].encode()}).astype(bool)


def test_regions_are_8_connected_per_class_with_their_boxes_and_mean_scores() -> None:
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[0:2, 0:2] = 1  # one building
    labels[2, 2] = 1  # touches it at a corner: the same region
    labels[4:6, 5:8] = 1  # a second building
    labels[0:6, 4] = 2  # a road between them
    labels[5, 0] = 255  # no data is nobody's
    scores = np.zeros((3, 6, 8), dtype=np.uint8)
    scores[1] = 204  # 0.8
    scores[2] = 102  # 0.4
    found = region_instances(labels, CLASSES, scores)
    assert [(r["class"], r["class_index"], r["bbox"]) for r in found] == [
        ("building", 1, [0.0, 0.0, 3.0, 3.0]),
        ("building", 1, [5.0, 4.0, 8.0, 6.0]),
        ("road", 2, [4.0, 0.0, 5.0, 6.0]),
    ]
    assert [r["score"] for r in found] == pytest.approx([0.8, 0.8, 0.4])
    union = np.zeros_like(labels)
    for row in found:
        mask = decode(row)
        assert row["mask_size"] == [6, 8] and (labels[mask] == row["class_index"]).all()
        union[mask] = row["class_index"]
    assert np.array_equal(union, np.where(labels == 255, 0, labels))


def test_the_cropped_encoding_equals_pycocotools_on_the_full_mask() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        height, width = rng.integers(1, 40, size=2)
        crop = rng.random((rng.integers(1, height + 1), rng.integers(1, width + 1))) > 0.5
        crop.flat[0] = True  # a region has at least one pixel
        top, left = rng.integers(0, height - crop.shape[0] + 1), rng.integers(0, width - crop.shape[1] + 1)
        full = np.zeros((height, width), dtype=bool)
        full[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        assert encode_rle_crop(crop, top, left, height, width) == encode_rle(full)[1]


def _scene_label_map(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Large blobs (they cross many block borders), thin diagonal lines (they cross borders only at
    corners), speckle and no-data pixels, of three classes."""
    labels = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(6):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(5, 30)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 4)
    for offset in range(-width, height, 23):
        on_line = (yy - xx == offset) | (yy + xx == offset + width)
        labels[on_line] = 2
    speckle = rng.random((height, width)) < 0.03
    labels[speckle] = rng.integers(1, 4, size=int(speckle.sum()))
    labels[rng.random((height, width)) < 0.01] = 255
    return labels


@pytest.mark.parametrize("block", [1, 7, 16, 33, 200])
def test_scene_instances_fed_block_by_block_equal_the_regions_of_the_whole_map(block: int) -> None:
    rng = np.random.default_rng(block)
    height, width = 61, 90
    labels = _scene_label_map(rng, height, width)
    scores = rng.integers(0, 256, size=(4, height, width), dtype=np.uint8)
    names = ["background", "building", "road", "water"]
    regions = SceneRegions(width, height, names)
    for window in grid_windows(width, height, block):
        regions.add(window, labels[window.slices], scores[(slice(None), *window.slices)])
    found = regions.instances()
    expected = region_instances(labels, names, scores)
    assert len(found) == len(expected) > 50
    for got, want in zip(found, expected, strict=True):
        assert {k: v for k, v in got.items() if k != "score"} == {
            k: v for k, v in want.items() if k != "score"
        }
        assert got["score"] == pytest.approx(want["score"], rel=1e-12)
        assert np.array_equal(decode(got), decode(want))


def test_scene_instances_refuse_blocks_out_of_order() -> None:
    regions = SceneRegions(20, 20, ["background", "a"])
    blocks = grid_windows(20, 20, 10)
    labels, scores = np.ones((10, 10), dtype=np.uint8), np.zeros((2, 10, 10), dtype=np.uint8)
    regions.add(blocks[0], labels, scores)
    with pytest.raises(ValueError, match="row-major"):
        regions.add(blocks[3], labels, scores)


def test_instance_parts_without_their_metadata_part_are_removed(tmp_path: pathlib.Path) -> None:
    for folder, names in (("metadata/r1", ["part-000000"]), ("instances/r1", ["part-000000", "part-000001"])):
        (tmp_path / folder).mkdir(parents=True)
        for name in names:
            pq.write_table(INSTANCE_SCHEMA.empty_table(), tmp_path / folder / f"{name}.parquet")
    assert remove_orphan_instance_parts(str(tmp_path), "r1", {"part-000000.parquet"}, {}) == 1
    assert sorted(p.name for p in (tmp_path / "instances/r1").iterdir()) == ["part-000000.parquet"]


def test_label_with_instances_writes_one_row_per_region_beside_the_metadata_once(
    s3_server, s3_bucket, tiny_clipseg_dir: pathlib.Path, ray_session
) -> None:
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    rng = np.random.default_rng(11)
    for i in range(6):
        pixels = rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)
        pixels[: 20 + i, :30] = (220, 30, 30)
        buffer = fsspec.open(f"s3://{s3_bucket}/inst-raw/img{i}.png", "wb", **s3_server.storage_options)
        with buffer as handle:
            Image.fromarray(pixels).save(handle, format="PNG")
    dest = f"s3://{s3_bucket}/inst-labels"
    args = [
        "label",
        f"s3://{s3_bucket}/inst-raw/",
        dest,
        "--model",
        str(tiny_clipseg_dir),
        "--prompts",
        "red,blue",
        "--threshold",
        "0.5",
        "--device",
        "cpu",
        "--instances",
        f"--storage-option=client_kwargs.endpoint_url={s3_server.endpoint_url}",
        f"--storage-option=key={s3_server.storage_options['key']}",
        f"--storage-option=secret={s3_server.storage_options['secret']}",
    ]
    assert main(args) == 0
    assert main(args) == 0  # the re-run skips every image: no instance row twice
    root = f"{s3_bucket}/inst-labels"
    (run_dir,) = fs.ls(f"{root}/instances")  # only the first run labeled anything
    run_id = run_dir.rsplit("/", 1)[1]
    metadata_names = {p.rsplit("/", 1)[1] for p in fs.glob(f"{root}/metadata/{run_id}/part-*.parquet")}
    instance_paths = fs.glob(f"{run_dir}/part-*.parquet")
    assert {p.rsplit("/", 1)[1] for p in instance_paths} <= metadata_names  # each beside its metadata
    rows = [row for path in instance_paths for row in pq.read_table(path, filesystem=fs).to_pylist()]
    metadata = [
        row
        for name in metadata_names
        for row in pq.read_table(f"{root}/metadata/{run_id}/{name}", filesystem=fs).to_pylist()
    ]
    assert len(metadata) == 6 and {row["status"] for row in metadata} == {"ok"}
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["relpath"], []).append(row)
    assert rows, "the red squares were labeled: some instance is expected"
    for entry in metadata:
        mine = by_image.get(entry["relpath"], [])
        assert [row["instance"] for row in mine] == list(range(len(mine)))  # once each
        labels = decode_png_mask(fs.cat_file(entry["mask_uri"].removeprefix("s3://")))
        union = np.zeros_like(labels)
        for row in mine:
            mask = decode(row)
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = row["bbox"]
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            assert (labels[mask] == row["class_index"]).all() and 0 <= row["score"] <= 1
            assert row["class"] == ["background", "red", "blue"][row["class_index"]]
            assert row["run_id"] == run_id
            union[mask] = row["class_index"]
        assert np.array_equal(union, np.where(labels == 255, 0, labels)), entry["relpath"]


def test_a_windowed_scene_has_its_regions_as_instances_joined_across_window_borders(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, ray_session
) -> None:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    pixels[40:260, 60:380] = (220, 30, 30)  # one large block across several windows
    (tmp_path / "raw").mkdir()
    Image.fromarray(pixels).save(tmp_path / "raw" / "scene.png")
    dest = tmp_path / "labels"
    args = ["label", str(tmp_path / "raw"), str(dest), "--model", str(tiny_clipseg_dir), "--prompts",
            "red,blue", "--threshold", "0", "--device", "cpu", "--instances",
            "--tile-size", "128", "--tile-overlap", "16"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 0  # nothing to do the second time: no instance row twice
    (row,) = pq.read_table(dest / "metadata").to_pylist()
    assert row["status"] == "ok" and row["tiling"].startswith("windows of 128 px"), row
    labels = decode_png_mask((dest / "masks" / "scene.png").read_bytes())
    rows = pq.read_table(dest / "instances").to_pylist()
    expected = region_instances(labels, ["background", "red", "blue"])
    assert [r["instance"] for r in rows] == list(range(len(expected)))
    assert len(rows) == len(expected) and any(r["bbox"][2] - r["bbox"][0] > 128 for r in rows)
    for got, want in zip(rows, expected, strict=True):
        assert got["relpath"] == "scene.png" and 0 <= got["score"] <= 1
        for key in ("class", "class_index", "bbox", "mask_size", "mask_counts"):
            assert got[key] == want[key], key


def sam3_reference_instances(
    model_dir: pathlib.Path, image: Image.Image, prompts: list[str], threshold: float
):
    """transformers' recipe per prompt: `Sam3Model.forward`, then what
    `post_process_instance_segmentation` does (written out: its image processor needs torchvision):
    score = sigmoid(pred_logits) * sigmoid(presence), kept above the threshold, mask probabilities resized
    bilinearly to the image, > 0.5, boxes scaled to pixels. -> [(prompt, score, box, mask probabilities)]"""
    found = []
    for prompt, out in zip(prompts, sam3_reference_outputs(model_dir, image, prompts), strict=True):
        scores = torch.sigmoid(out.pred_logits[0]) * torch.sigmoid(out.presence_logits[0])
        keep = scores > threshold
        probabilities = torch.nn.functional.interpolate(
            torch.sigmoid(out.pred_masks[0][keep])[None], size=(image.height, image.width), mode="bilinear"
        )[0]
        boxes = out.pred_boxes[0][keep] * torch.tensor([image.width, image.height] * 2)
        kept = zip(scores[keep].tolist(), boxes.tolist(), probabilities, strict=True)
        found += [(prompt, score, box, mask) for score, box, mask in kept]
    return found


def test_sam3_instances_are_its_queries_as_transformers_post_processes_them(
    tmp_path: pathlib.Path, ray_session
) -> None:
    model_dir = make_tiny_sam3(tmp_path / "sam3")
    source = tmp_path / "images"
    source.mkdir()
    rng = np.random.default_rng(4)
    images = {
        f"img{i}.png": Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 90, 3), dtype=np.uint8))
        for i in range(3)
    }
    for name, image in images.items():
        image.save(source / name)
    prompts, threshold = ["car", "tree"], 0.2  # low: the random queries' scores sit around 0.25
    dest = tmp_path / "dest"
    args = ["label", str(source), str(dest), "--model", str(model_dir), "--prompts", ",".join(prompts)]
    assert main([*args, "--threshold", str(threshold), "--device", "cpu", "--instances"]) == 0
    rows = pq.read_table(dest / "instances").to_pylist()
    assert rows, "some query scored above the threshold"
    for name, image in images.items():
        mine = [row for row in rows if row["relpath"] == name]
        expected = [
            e for e in sam3_reference_instances(model_dir, image, prompts, threshold) if (e[3] > 0.5).any()
        ]
        assert [row["prompt"] for row in mine] == [e[0] for e in expected], name
        for row, (prompt, score, box, probabilities) in zip(mine, expected, strict=True):
            assert row["class"] == prompt and row["score"] == pytest.approx(score, abs=1e-4)
            assert row["detector_bbox"] == pytest.approx(box, abs=1e-2)
            mask = decode(row)
            unsure = (probabilities - 0.5).abs() < 1e-4
            assert np.array_equal(mask[~unsure.numpy()], (probabilities > 0.5).numpy()[~unsure.numpy()])
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = row["bbox"]  # the mask's own box: the mask lies inside it
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
