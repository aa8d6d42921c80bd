"""`textseg label` end to end through Ray Data, over a local folder and over an S3 protocol server.

Masks are checked pixel by pixel against the reference: `CLIPSegForImageSegmentation.forward` on the
processor's inputs (the usual Hugging Face recipe), or `Sam3Model.forward` per (image, prompt), then the
mask formula.
"""

from __future__ import annotations

import io
import json
import pathlib
from collections.abc import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from tests.tiny_models import make_tiny_sam3, sam3_reference_outputs
from textseg.cli import main
from textseg.outputs.metadata import METADATA_SCHEMA

PROMPTS = ["a red square", "blue water", "green field"]
THRESHOLD = 0.5
RELPATHS = ["top.jpg", "nested/deeper/scan 01.png", "ünïcödé/straße.png", "gray.png", "alpha.png"]


def make_image(relpath: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(40, 120)), int(rng.integers(40, 120))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (220, 20, 20)
    image = Image.fromarray(pixels)
    if relpath.startswith("gray"):
        image = image.convert("L")
    if relpath.startswith("alpha"):
        image = image.convert("RGBA")
        image.putalpha(
            Image.fromarray(
                np.where(np.arange(width)[None, :] < 10, 0, 255).astype(np.uint8).repeat(height, 0)
            )
        )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if relpath.endswith(".jpg") else "PNG")
    return buffer.getvalue()


def clipseg_scores(model_dir: pathlib.Path, image: Image.Image) -> torch.Tensor:
    """(K, h, w) logits of the usual HF recipe: the processor's inputs, K copies of the image."""
    processor = CLIPSegProcessor.from_pretrained(model_dir)
    model = CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()
    inputs = processor(text=PROMPTS, images=[image] * len(PROMPTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits.reshape(len(PROMPTS), *inputs["pixel_values"].shape[-2:])


def sam3_scores(model_dir: pathlib.Path, image: Image.Image) -> torch.Tensor:
    """(K, h, w) `semantic_seg` logits of `Sam3Model.forward`, one forward per prompt."""
    return torch.stack([out.semantic_seg[0, 0] for out in sam3_reference_outputs(model_dir, image, PROMPTS)])


def reference_labels(
    model_dir: pathlib.Path, data: bytes, scores_of: Callable[[pathlib.Path, Image.Image], torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """The formula's labels from the reference logits; also a mask of pixels too close to call (ties or
    scores within 1e-4 of the threshold), where float rounding may legitimately flip a label."""
    rgba = Image.open(io.BytesIO(data))
    image = rgba.convert("RGB")
    logits = scores_of(model_dir, image)
    full = F.interpolate(
        logits[None], size=(image.height, image.width), mode="bilinear", align_corners=False
    )[0]
    scores = torch.sigmoid(full)
    top2 = scores.topk(2, dim=0).values
    best_score, best = scores.max(0)
    labels = torch.where(best_score >= THRESHOLD, best + 1, 0).numpy().astype(np.uint8)
    if rgba.mode == "RGBA":
        labels[np.asarray(rgba)[..., 3] == 0] = 255
    unsure = ((top2[0] - top2[1]) < 1e-4) | ((best_score - THRESHOLD).abs() < 1e-4)
    return labels, unsure.numpy()


def label_args(source: str, dest: str, model_dir: pathlib.Path, *extra: str) -> list[str]:
    return [
        "label",
        source,
        dest,
        "--model",
        str(model_dir),
        "--prompts",
        ",".join(PROMPTS),
        "--threshold",
        str(THRESHOLD),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        *extra,
    ]


def check_dest(
    fs: fsspec.AbstractFileSystem,
    dest: str,
    sources: dict[str, bytes],
    model_dir: pathlib.Path,
    scores_of: Callable[[pathlib.Path, Image.Image], torch.Tensor] = clipseg_scores,
) -> dict:
    """Every image has a correct mask and exactly one `ok` metadata row; returns the run summary."""
    (summary_path,) = fs.glob(f"{dest}/runs/*.json")
    summary = json.loads(fs.cat_file(summary_path))
    assert (summary["listed"], summary["skipped"], summary["ok"], summary["error"]) == (
        len(sources),
        0,
        len(sources),
        0,
    )
    parts = fs.glob(f"{dest}/metadata/{summary['run_id']}/part-*.parquet")
    table = pa.concat_tables([pq.read_table(path, filesystem=fs) for path in parts])
    assert table.schema.equals(METADATA_SCHEMA, check_metadata=False)
    rows = {row["relpath"]: row for row in table.to_pylist()}
    assert sorted(rows) == sorted(sources) and table.num_rows == len(sources)
    for relpath, data in sources.items():
        row = rows[relpath]
        assert row["status"] == "ok" and row["error"] is None
        stem = relpath.rsplit(".", 1)[0]
        assert row["mask_uri"].endswith(f"masks/{stem}.png")
        with Image.open(io.BytesIO(fs.cat_file(f"{dest}/masks/{stem}.png"))) as mask:
            assert mask.mode == "P" and mask.size == Image.open(io.BytesIO(data)).size
            assert (row["width"], row["height"]) == mask.size
            assert mask.getpalette()[3:6] == [0xE4, 0x1A, 0x1C]  # class 1's default colour
            labels = np.asarray(mask)
        expected, unsure = reference_labels(model_dir, data, scores_of)
        assert np.array_equal(labels[~unsure], expected[~unsure]), relpath
        assert row["class_names"] == ["background", *PROMPTS]
        assert sum(row["class_pixel_fraction"]) == pytest.approx(1.0, abs=1e-5)
    return summary


@pytest.fixture(scope="module")
def sources() -> dict[str, bytes]:
    return {relpath: make_image(relpath, seed) for seed, relpath in enumerate(RELPATHS)}


def write_tree(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)


def test_label_local_folder_writes_spec_layout_with_reference_masks(
    tmp_path, sources, tiny_clipseg_dir, ray_session
):
    write_tree(tmp_path / "imgs", {**sources, "notes.txt": b"not an image"})
    dest = tmp_path / "out"
    assert main(label_args(str(tmp_path / "imgs"), str(dest), tiny_clipseg_dir)) == 0
    check_dest(fsspec.filesystem("file"), str(dest), sources, tiny_clipseg_dir)

    # A second run over the same SOURCE and DEST skips everything: nothing to do, nothing relabeled.
    assert main(label_args(str(tmp_path / "imgs"), str(dest), tiny_clipseg_dir)) == 0
    summaries = [json.loads(p.read_text()) for p in sorted((dest / "runs").glob("*.json"))]
    assert [(s["listed"], s["skipped"], s["ok"]) for s in summaries] == [(5, 0, 5), (5, 5, 0)]


def s3_options(s3_server) -> list[str]:
    return [
        f"--storage-option=client_kwargs.endpoint_url={s3_server.endpoint_url}",
        f"--storage-option=key={s3_server.storage_options['key']}",
        f"--storage-option=secret={s3_server.storage_options['secret']}",
    ]


def test_label_s3_bucket_to_bucket(s3_server, s3_bucket, sources, tiny_clipseg_dir, ray_session):
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    for relpath, data in sources.items():
        fs.pipe_file(f"{s3_bucket}/raw/{relpath}", data)
    args = label_args(
        f"s3://{s3_bucket}/raw/", f"s3://{s3_bucket}/labels", tiny_clipseg_dir, *s3_options(s3_server)
    )
    assert main(args) == 0
    summary = check_dest(fs, f"{s3_bucket}/labels", sources, tiny_clipseg_dir)
    assert s3_server.storage_options["secret"] not in json.dumps(summary)


def test_a_sam3_checkpoint_labels_a_bucket_like_its_reference_forward(
    s3_server, s3_bucket, sources, tmp_path, ray_session
):
    """A SAM 3 saved as transformers saves it (processor_config.json, no preprocessor_config.json)."""
    model_dir = make_tiny_sam3(tmp_path / "sam3")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    for relpath, data in sources.items():
        fs.pipe_file(f"{s3_bucket}/sam3-raw/{relpath}", data)
    dest = f"s3://{s3_bucket}/sam3-labels"
    assert main(label_args(f"s3://{s3_bucket}/sam3-raw/", dest, model_dir, *s3_options(s3_server))) == 0
    summary = check_dest(fs, f"{s3_bucket}/sam3-labels", sources, model_dir, sam3_scores)
    assert summary["model_id"].startswith("sam3@")


def test_dry_run_counts_without_loading_a_model_or_writing(tmp_path, sources, tiny_clipseg_dir, capsys):
    write_tree(tmp_path / "imgs", sources)
    assert main(label_args(str(tmp_path / "imgs"), str(tmp_path / "out"), tiny_clipseg_dir, "--dry-run")) == 0
    assert "listed 5, already done 0, would label 5" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_bad_images_become_error_rows_and_the_exit_status_follows_max_error_rate(
    tmp_path, sources, tiny_clipseg_dir, ray_session
):
    write_tree(
        tmp_path / "imgs", {"good.png": sources["gray.png"], "empty.jpg": b"", "html.png": b"<html></html>"}
    )
    dest = tmp_path / "out"
    assert main(label_args(str(tmp_path / "imgs"), str(dest), tiny_clipseg_dir)) == 1
    table = pq.read_table(next((dest / "metadata").glob("*/")))
    rows = {r["relpath"]: r for r in table.to_pylist()}
    assert rows["good.png"]["status"] == "ok"
    assert rows["empty.jpg"]["status"] == "error" and rows["empty.jpg"]["error"]
    assert rows["html.png"]["status"] == "error" and rows["html.png"]["error"]
    assert main(label_args(str(tmp_path / "imgs"), str(dest), tiny_clipseg_dir, "--max-error-rate", "1")) == 0
