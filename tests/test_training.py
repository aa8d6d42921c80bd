"""Training: the loss falls, resuming equals training straight through, both DATA layouts read, no pickle.

Tiny everything: a 2-layer random BERT as the text model (from test_fusion), 32 px images of coloured
squares on noise, a 4-level encoder 8-16 channels wide; each test trains in about a second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.test_fusion import make_tiny_text_model
from textseg.ontology import from_mapping
from textseg.outputs.masks import encode_png_mask
from textseg.training.datasets import DatasetError, load_labeled_images
from textseg.training.trainer import (
    STATE_JSON,
    STATE_TENSORS,
    TrainConfig,
    _sample_prompts,
    add_train_arguments,
    parse_prompt_augmentation,
    train,
    train_config_from_args,
)

CLASSES = ("red", "blue")
TINY_MODEL = {
    "encoder_channels": (8, 8, 16, 16),
    "decoder_channels": (8, 8, 16, 16),
    "embed_dim": 16,
    "num_heads": 2,
}


def shapes_tile(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Grey noise with a red square (class 1) and a blue bar (class 2): learnable in a few steps."""
    image = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    y, x, side = *rng.integers(0, size // 2, 2), int(rng.integers(6, size // 2))
    image[y : y + side, x : x + side] = (200, 30, 30)
    mask[y : y + side, x : x + side] = 1
    column = int(rng.integers(0, size - 4))
    image[:, column : column + 4] = (30, 30, 200)
    mask[:, column : column + 4] = 2
    return image, mask


def write_folder_dataset(root: pathlib.Path, n: int = 12, seed: int = 0) -> pathlib.Path:
    ontology = from_mapping({"classes": {name: {"prompts": [name]} for name in CLASSES}}, 0.5)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = shapes_tile(np.random.default_rng([seed, i]))
        Image.fromarray(image).save(root / "images" / f"tile_{i:02d}.jpg", quality=98)
        (root / "masks" / f"tile_{i:02d}.png").write_bytes(encode_png_mask(mask, ontology.palette()))
    (root / "ontology.yaml").write_text(yaml.safe_dump(ontology.to_dict(), sort_keys=False))
    return root


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_folder_dataset(tmp_path_factory.mktemp("shapes"))


def tiny_train_config(
    data: pathlib.Path, out: pathlib.Path, text_model: pathlib.Path, **overrides
) -> TrainConfig:
    settings = {
        "data": str(data),
        "out": str(out),
        "text_model": str(text_model),
        "model_options": TINY_MODEL,
        "image_size": 32,
        "crop_size": 32,
        "batch_size": 4,
        "epochs": 3,
        "lr": 1e-2,
        "warmup_steps": 2,
        "val_fraction": 0.25,
        "device": "cpu",
        "progress": False,
        "prompt_augmentation": {"red": ("scarlet", "crimson"), "blue": ("azure",)},
    }
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(
    folder_dataset: pathlib.Path, text_model: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, pathlib.Path]:
    """One short training run shared by the tests that only read its result and files."""
    out = tmp_path_factory.mktemp("trained") / "model"
    return train(tiny_train_config(folder_dataset, out, text_model, epochs=5)), out


def test_training_loss_falls_and_best_model_is_saved(trained: tuple[dict, pathlib.Path]) -> None:
    result, out = trained
    losses = [entry["loss"] for entry in result["history"]]
    assert losses[-1] < 0.75 * losses[0], losses
    assert result["phrasings"] == [["red", "scarlet", "crimson"], ["blue", "azure"]]
    assert 1 <= result["best_epoch"] <= 5 and result["best_val_miou"] is not None
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        STATE_JSON,
        STATE_TENSORS,
    } <= files


def test_training_state_is_json_and_safetensors_only(trained: tuple[dict, pathlib.Path]) -> None:
    _, out = trained
    state = json.loads((out / STATE_JSON).read_text())
    assert state["epoch"] == 5 and state["optimizer"]["param_groups"]
    tensors = load_file(str(out / STATE_TENSORS))
    assert any(k.endswith(".exp_avg_sq") for k in tensors) and "rng.torch" in tensors


def test_resume_continues_exactly_where_training_stopped(
    folder_dataset: pathlib.Path, text_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    straight = train(tiny_train_config(folder_dataset, tmp_path / "straight", text_model, epochs=2))
    train(tiny_train_config(folder_dataset, tmp_path / "resumed", text_model, epochs=1))
    resumed = train(
        tiny_train_config(folder_dataset, tmp_path / "resumed", text_model, epochs=2, resume=True)
    )
    assert [e["loss"] for e in resumed["history"]] == pytest.approx([e["loss"] for e in straight["history"]])
    a = load_file(str(tmp_path / "straight" / STATE_TENSORS))
    b = load_file(str(tmp_path / "resumed" / STATE_TENSORS))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)


def test_resume_without_a_saved_state_fails_with_a_reason(
    folder_dataset: pathlib.Path, text_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(FileNotFoundError, match="without --resume"):
        train(tiny_train_config(folder_dataset, tmp_path / "empty", text_model, resume=True))


def test_adversarial_training_saves_the_critic_and_its_optimizer(
    folder_dataset: pathlib.Path, text_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    result = train(
        tiny_train_config(folder_dataset, tmp_path / "adv", text_model, epochs=1, adversarial=True)
    )
    assert result["history"][0]["critic"] > 0
    tensors = load_file(str(tmp_path / "adv" / STATE_TENSORS))
    assert any(k.startswith("critic.") for k in tensors)
    assert any(k.startswith("critic_optimizer.") for k in tensors)
    # The shipped model carries the segmenter only.
    assert not any("critic" in k for k in load_file(str(tmp_path / "adv" / "model.safetensors")))


def test_folder_layout_maps_ontology_classes_and_resizes_to_input_size(folder_dataset: pathlib.Path) -> None:
    data = load_labeled_images(str(folder_dataset), (16, 16), classes=["blue"])
    assert data.class_names == ("blue",)
    assert len(data.images) == 12 and data.images[0].shape == (16, 16, 3) and data.masks[0].shape == (16, 16)
    assert set(np.unique(np.concatenate([m.ravel() for m in data.masks]))) == {0, 1}  # red -> background


def test_labeled_dest_layout_reads_the_newest_ok_row_and_maps_classes_by_name(tmp_path: pathlib.Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    (dest / "masks").mkdir(parents=True)
    image, mask = shapes_tile(np.random.default_rng(0))
    Image.fromarray(image).save(source / "a.png")
    # Run 1 labeled with classes [red, blue], run 2 with [blue, red]: mask values differ, names agree.
    swapped = np.choose(mask, [0, 2, 1]).astype(np.uint8)
    (dest / "masks" / "a.png").write_bytes(encode_png_mask(swapped, [0] * 768))
    rows = []
    for run, names, when in [
        ("r1", ["background", "red", "blue"], 1),
        ("r2", ["background", "blue", "red"], 2),
    ]:
        rows.append(
            {
                "source_uri": str(source / "a.png"),
                "relpath": "a.png",
                "mask_uri": str(dest / "masks" / "a.png"),
                "status": "ok",
                "class_names": names,
                "labeled_at": datetime.datetime(2024, 1, when, tzinfo=datetime.timezone.utc),
            }
        )
        (dest / "metadata" / run).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([rows[-1]]), dest / "metadata" / run / "part-0.parquet")
    failed = dict(rows[-1], status="error", relpath="b.png", source_uri=str(source / "b.png"))
    pq.write_table(pa.Table.from_pylist([failed]), dest / "metadata" / "r2" / "part-1.parquet")

    data = load_labeled_images(str(dest), (32, 32))
    assert data.class_names == ("blue", "red") and data.relpaths == ["a.png"]  # r2's order, b.png failed
    np.testing.assert_array_equal(data.masks[0], swapped)
    data = load_labeled_images(str(dest), (32, 32), classes=["red", "blue"])
    np.testing.assert_array_equal(data.masks[0], mask)


def test_data_without_a_known_layout_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DatasetError, match="images/ \\+ masks/"):
        load_labeled_images(str(tmp_path), (32, 32))


def test_prompt_augmentation_accepts_inline_lists_and_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "phrasings.yaml").write_text("road: [roads, highway]\nwater: river\n")
    parsed = parse_prompt_augmentation(["road=asphalt road, roads", str(tmp_path / "phrasings.yaml")])
    assert parsed == {"road": ("asphalt road", "roads", "highway"), "water": ("river",)}


def test_cli_flags_build_the_train_config() -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["data/", "--out", "m/", "--epochs", "3", "--adversarial", "--classes", "tree,road",
         "--crop-size", "0", "--prompt-augmentation", "tree=trees,woodland", "--model-option", "embed_dim=32",
         "--negative-prompt", "car", "--negative-prompt", "snow"]
    )  # fmt: skip
    config = train_config_from_args(args)
    assert config.epochs == 3 and config.adversarial and config.crop_size is None
    assert config.prompt_augmentation == {"tree": ("trees", "woodland")}
    assert config.model_options == {"embed_dim": 32} and config.classes == ("tree", "road")
    assert config.negative_prompts == ("car", "snow")


def test_demo_recipe_never_trains_on_the_held_out_synonyms() -> None:
    from textseg.training.demo import DEMO_NEGATIVES, DEMO_PHRASINGS, held_out_words_in
    from textseg.training.synth import SYNTH_CLASSES

    assert held_out_words_in(DEMO_PHRASINGS, DEMO_NEGATIVES) == []
    assert tuple(DEMO_PHRASINGS) == SYNTH_CLASSES
    assert held_out_words_in({"building": ["warehouse"]}) == ["warehouse"]
    assert held_out_words_in({}, ["cloudy sky"]) == ["cloudy sky"]  # the unrelated concepts are held out too


def test_negative_prompts_are_asked_beside_the_classes_and_no_pixel_of_the_target_is_theirs() -> None:
    rng = np.random.default_rng(0)
    phrases = [torch.randn(3, 8), torch.randn(2, 8)]
    negatives = torch.randn(5, 8)
    masks = torch.from_numpy(rng.integers(0, 3, (2, 16, 16), dtype=np.uint8))
    seen = set()
    for _ in range(20):
        asked, embeddings, target = _sample_prompts(phrases, masks, 0.0, rng, negatives, 1.0)
        extra = embeddings[len(asked) :]
        assert asked == [1, 2] and 1 <= len(extra) <= 2
        for row in extra:
            (match,) = [i for i, negative in enumerate(negatives) if torch.equal(row, negative)]
            seen.add(match)
        assert int(target.max()) <= len(asked)  # channels past the asked classes are never a target
    assert len(seen) > 2  # drawn from all of them
    asked, embeddings, _ = _sample_prompts(phrases, masks, 0.0, rng, negatives, 0.0)
    assert embeddings.shape[0] == len(asked)


def test_a_negative_prompt_that_is_also_a_class_phrasing_is_refused(
    folder_dataset: pathlib.Path, text_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(ValueError, match="phrasings of DATA's classes"):
        train(tiny_train_config(folder_dataset, tmp_path / "m", text_model, negative_prompts=("Scarlet",)))


def test_training_with_negative_prompts_records_them_in_its_state(
    folder_dataset: pathlib.Path, text_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "neg"
    result = train(tiny_train_config(folder_dataset, out, text_model, epochs=1, negative_prompts=("green",)))
    assert result["epochs_run"] == 1
    assert json.loads((out / STATE_JSON).read_text())["train_config"]["negative_prompts"] == ["green"]


def test_unrelated_claims_are_the_pixels_a_concept_takes_in_a_class_slot(
    trained: tuple[dict, pathlib.Path], folder_dataset: pathlib.Path
) -> None:
    from textseg.models.fusion import load_fusion
    from textseg.training.evaluation import predict_labels, unrelated_claims

    _, out = trained
    backend = load_fusion(str(out))
    images = [
        np.asarray(Image.open(p).convert("RGB")) for p in sorted((folder_dataset / "images").iterdir())[:6]
    ]
    claims = unrelated_claims(backend, images, [["red"], ["blue"]], ["violet"])
    pixels = sum(image.shape[0] * image.shape[1] for image in images)
    in_red = predict_labels(backend, images, [["violet"], ["blue"]])
    in_blue = predict_labels(backend, images, [["red"], ["violet"]])
    assert claims == {
        "violet": {
            "red": sum(int((labels == 1).sum()) for labels in in_red) / pixels,
            "blue": sum(int((labels == 2).sum()) for labels in in_blue) / pixels,
        }
    }
