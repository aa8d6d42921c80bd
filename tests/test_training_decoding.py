"""`textseg train` reads images through labeling's decode path, and its storage options as labeling does.

The training loader must hand the model exactly the pixels `textseg label` does for a whole image
(`open_source` + `resized`, the decode stage's own functions): an EXIF-rotated JPEG (decoded DCT-reduced),
a 16-bit PNG and an RGBA PNG whose transparent pixels become 255 (ignored) in the training mask. A
decompression bomb and a file that is no image stop loading with the file's name and labeling's reason.
`--storage-option client_kwargs.endpoint_url=...` reaches a real S3 server (moto over loopback).
"""

from __future__ import annotations

import io
import json
import pathlib
import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.s3_server import S3Server
from tests.test_training import TINY_MODEL, write_folder_dataset
from tests.tiny_models import make_tiny_text_model
from textseg.cli import main
from textseg.image.decoding import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from textseg.image.pieces import WindowPlan, open_source, resized
from textseg.models import load_model, resolve_model
from textseg.models.input_spec import InputSpec
from textseg.ontology import NODATA, from_mapping
from textseg.outputs.masks import encode_png_mask
from textseg.storage import filesystem_for
from textseg.training.datasets import DatasetError, load_labeled_images

# The model input the loader resizes to: not a divisor of any image side, bicubic as CLIPSeg's processor.
SPEC = InputSpec(size=(20, 28), resample=3)
ONTOLOGY = from_mapping({"classes": {"red": {}, "blue": {}}}, 0.5)
ORIENTATION = 0x0112


def labeling_pixels(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray | None]:
    """What `textseg label`'s decode stage gives the model for this whole image, and its no-data mask."""
    fs, local = filesystem_for(str(path), {})
    plan = WindowPlan(tile_size=None, overlap=64, model_size=SPEC.size)
    source, pieces = open_source(fs, local, path.name, plan, DEFAULT_MAX_PIXELS)
    assert source.windows is None
    piece = resized(next(pieces), SPEC)
    return piece.pixels, piece.nodata


def gradient(height: int, width: int) -> np.ndarray:
    """An RGB image whose every pixel differs from its neighbours, so a rotation or shift shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)


def mask_for(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2, : width // 3] = 1
    mask[height // 2 :, width // 2 :] = 2
    return mask


def write_dataset(root: pathlib.Path, images: dict[str, bytes], masks: dict[str, np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    for stem, mask in masks.items():
        (root / "masks" / f"{stem}.png").write_bytes(encode_png_mask(mask, ONTOLOGY.palette()))
    (root / "ontology.yaml").write_text(yaml.safe_dump(ONTOLOGY.to_dict(), sort_keys=False))


def exif_rotated_jpeg() -> bytes:
    """A 48x30 JPEG stored sideways with EXIF orientation 6: a viewer shows it 30 wide and 48 high."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    Image.fromarray(gradient(30, 48)).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    y, x = np.mgrid[0:26, 0:34]
    buffer = io.BytesIO()
    Image.fromarray((x * 1900 + y * 97).astype(np.uint16)).save(buffer, "PNG")  # low bytes vary too
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I;16")
    return buffer.getvalue()


def rgba_png() -> tuple[bytes, np.ndarray]:
    """A 24x32 RGBA PNG with a fully transparent block (its colour kept as stored) and a translucent one."""
    rgba = np.dstack([gradient(24, 32), np.full((24, 32), 255, dtype=np.uint8)])
    rgba[4:14, 6:20, 3] = 0
    rgba[16:20, 2:8, 3] = 128
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue(), rgba[..., 3] == 0


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header declaring width x height (3.6 Gpx, over the 1.6 Gpx limit) with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_training_sees_exactly_the_pixels_labeling_gives_the_model(tmp_path: pathlib.Path) -> None:
    rgba, transparent = rgba_png()
    images = {"rotated.jpg": exif_rotated_jpeg(), "deep.png": sixteen_bit_png(), "alpha.png": rgba}
    masks = {"rotated": mask_for(48, 30), "deep": mask_for(26, 34), "alpha": mask_for(24, 32)}
    write_dataset(tmp_path / "data", images, masks)

    data = load_labeled_images(str(tmp_path / "data"), SPEC.size, resample=SPEC.resample)

    assert sorted(data.relpaths) == ["alpha.png", "deep.png", "rotated.jpg"]
    loaded = dict(zip(data.relpaths, zip(data.images, data.masks, strict=True), strict=True))
    for relpath, (image, mask) in loaded.items():
        pixels, nodata = labeling_pixels(tmp_path / "data" / "images" / relpath)
        np.testing.assert_array_equal(image, pixels, err_msg=relpath)
        expected = mask_for(*masks[relpath.split(".")[0]].shape)
        if nodata is not None:
            expected[nodata] = NODATA
        shown = Image.fromarray(expected).resize(SPEC.size[::-1], Image.Resampling.NEAREST)
        np.testing.assert_array_equal(mask, np.asarray(shown), err_msg=relpath)

    # The rotation is applied (a stored-orientation decode would differ), and the 16-bit and RGBA images
    # are decode_image's RGB at full resolution, resized.
    stored = Image.open(io.BytesIO(images["rotated.jpg"])).convert("RGB").resize(SPEC.size[::-1], 3)
    assert not np.array_equal(loaded["rotated.jpg"][0], np.asarray(stored))
    for relpath in ("deep.png", "alpha.png"):
        decoded = decode_image(images[relpath]).image.resize(
            SPEC.size[::-1], SPEC.resample, reducing_gap=None
        )
        np.testing.assert_array_equal(loaded[relpath][0], np.asarray(decoded), err_msg=relpath)
    # Transparent pixels are ignored by the loss: 255 in the mask though the mask file says 1 or 0 there.
    assert not (masks["alpha"][transparent] == NODATA).any()
    assert (loaded["alpha.png"][1] == NODATA).sum() > 0


def test_a_decompression_bomb_stops_loading_with_the_file_and_labelings_reason(
    tmp_path: pathlib.Path,
) -> None:
    good = io.BytesIO()
    Image.fromarray(gradient(24, 32)).save(good, "PNG")
    write_dataset(
        tmp_path / "data",
        {"good.png": good.getvalue(), "bomb.png": bomb_png()},
        {"good": mask_for(24, 32), "bomb": mask_for(24, 32)},
    )
    with pytest.raises(ImageDecodeError) as labeling:
        decode_image(bomb_png(), max_pixels=DEFAULT_MAX_PIXELS)
    assert str(labeling.value).startswith("image too large (possible decompression bomb)")

    with pytest.raises(DatasetError) as training:
        load_labeled_images(str(tmp_path / "data"), SPEC.size)
    assert str(training.value).startswith(f"bomb.png: {labeling.value}")


def test_a_file_that_is_no_image_stops_loading_with_its_name(tmp_path: pathlib.Path) -> None:
    write_dataset(tmp_path / "data", {"page.png": b"<html>Access denied</html>"}, {"page": mask_for(4, 4)})
    with pytest.raises(DatasetError, match=r"^page\.png: not an image \(unrecognized format\)"):
        load_labeled_images(str(tmp_path / "data"), SPEC.size)


def test_train_reads_s3_with_dotted_storage_options_as_label_does(
    tmp_path: pathlib.Path, s3_server: S3Server, s3_bucket: str
) -> None:
    local = write_folder_dataset(tmp_path / "shapes", n=8)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3_server.put_object(s3_bucket, f"data/{path.relative_to(local).as_posix()}", path.read_bytes())
    text_model = make_tiny_text_model(tmp_path / "tiny_bert")
    out = tmp_path / "model"
    options = s3_server.storage_options
    model_options = [f"{key}={json.dumps(value)}" for key, value in TINY_MODEL.items()]

    code = main(
        ["train", f"s3://{s3_bucket}/data", "--out", str(out), "--epochs", "1", "--batch-size", "4",
         "--image-size", "32", "--crop-size", "32", "--val-fraction", "0.25", "--device", "cpu",
         "--text-model", str(text_model), "--no-progress",
         "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint_url}",
         "--storage-option", f"client_kwargs.region_name={options['client_kwargs']['region_name']}",
         "--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}",
         *(arg for option in model_options for arg in ("--model-option", option))]
    )  # fmt: skip

    assert code == 0
    state = json.loads((out / "training_state.json").read_text())
    assert state["train_config"]["storage_options"] == ["client_kwargs", "key", "secret"]  # names only
    assert options["secret"] not in (out / "training_state.json").read_text()
    backend = load_model(resolve_model(str(out)), "cpu")
    assert backend.input_spec.size == (32, 32)
