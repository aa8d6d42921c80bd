"""SAM 3's fast path (textseg.models.sam3) against `Sam3Model.forward`, the usual recipe, per (image,
prompt) on a tiny random SAM 3 saved as transformers saves it."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from transformers import Sam3Model

from tests.tiny_models import SAM3_MEAN, SAM3_STD, SAM3_TINY_IMAGE_SIZE, make_tiny_sam3
from textseg.cli import main
from textseg.models import (
    check_transformers,
    load_model,
    read_input_spec,
    resolve_model,
    transformers_problem,
    with_presence_gate,
)
from textseg.models.input_spec import InputSpec
from textseg.models.sam3 import Sam3Backend, load_sam3

PROMPTS = ["building", "a road", "water"]
TOLERANCE = 1e-4  # fp32 on CPU


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_sam3(tmp_path_factory.mktemp("sam3"))


@pytest.fixture(scope="module")
def backend(sam3_dir: pathlib.Path) -> Sam3Backend:
    return load_sam3(str(sam3_dir))


def pixel_values(backend: Sam3Backend, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = (count, SAM3_TINY_IMAGE_SIZE, SAM3_TINY_IMAGE_SIZE, 3)
    return backend.normalize(torch.randint(0, 256, size, generator=generator, dtype=torch.uint8))


def reference(model: Sam3Model, backend: Sam3Backend, image: torch.Tensor, prompt: str):
    """The usual recipe for one (image, prompt): the whole model, tokens as Sam3Processor makes them."""
    tokens = backend.tokenize([prompt])
    with torch.inference_mode():
        return model(pixel_values=image[None], **tokens)


@pytest.mark.parametrize("prompt_count", [1, 3])
def test_score_equals_the_forward_of_every_image_and_prompt(backend: Sam3Backend, prompt_count: int) -> None:
    prompts = PROMPTS[:prompt_count]
    images = pixel_values(backend, 2)
    with torch.inference_mode():
        fast = backend.score(images, backend.embed_prompts(prompts))
    assert fast.shape == (2, prompt_count, SAM3_TINY_IMAGE_SIZE // 14 * 4, SAM3_TINY_IMAGE_SIZE // 14 * 4)
    for b, image in enumerate(images):
        for p, prompt in enumerate(prompts):
            expected = reference(backend.model, backend, image, prompt).semantic_seg[0, 0]
            assert (fast[b, p] - expected).abs().max().item() <= TOLERANCE, (b, p)
    assert fast.std().item() > 1e-3  # random weights still give maps that vary: the check means something


def test_the_presence_gate_scores_the_product_of_both_probabilities(sam3_dir: pathlib.Path) -> None:
    gated = load_sam3(str(sam3_dir), presence_gate=True)
    images = pixel_values(gated, 2, seed=1)
    with torch.inference_mode():
        fast = gated.score(images, gated.embed_prompts(PROMPTS))
    for b, image in enumerate(images):
        for p, prompt in enumerate(PROMPTS):
            out = reference(gated.model, gated, image, prompt)
            expected = torch.sigmoid(out.semantic_seg[0, 0]) * torch.sigmoid(out.presence_logits[0, 0])
            assert (torch.sigmoid(fast[b, p]) - expected).abs().max().item() <= TOLERANCE, (b, p)


def test_rows_split_into_passes_score_as_one_pass(backend: Sam3Backend) -> None:
    images = pixel_values(backend, 3, seed=2)
    embeddings = backend.embed_prompts(PROMPTS)
    with torch.inference_mode():
        whole = backend.score(images, embeddings)
        backend.rows_per_pass = 2  # 9 rows in 5 passes, one of them cut between two images
        try:
            split = backend.score(images, embeddings)
        finally:
            backend.rows_per_pass = 32
    assert (whole - split).abs().max().item() <= TOLERANCE


def test_the_registry_resolves_and_loads_a_saved_sam3_without_torchvision(sam3_dir: pathlib.Path) -> None:
    assert not (sam3_dir / "preprocessor_config.json").exists()  # as Sam3Processor.save_pretrained leaves it
    ref = resolve_model(str(sam3_dir))
    assert (ref.backend, ref.score_kind) == ("sam3", "sigmoid")
    expected = InputSpec(
        size=(SAM3_TINY_IMAGE_SIZE, SAM3_TINY_IMAGE_SIZE), resample=2, mean=SAM3_MEAN, std=SAM3_STD
    )
    assert read_input_spec(ref) == expected
    loaded = load_model(ref)
    assert isinstance(loaded, Sam3Backend) and loaded.input_spec == expected
    assert loaded.model_id == ref.model_id
    assert loaded.model.config._attn_implementation == "sdpa"


def test_score_rejects_embeddings_of_another_backend(backend: Sam3Backend) -> None:
    with pytest.raises(ValueError, match="embed_prompts"):
        backend.score(pixel_values(backend, 1), torch.zeros(3, 32))


def test_normalize_is_the_processors_rescale_and_standardization(backend: Sam3Backend) -> None:
    pixels = torch.randint(0, 256, (1, SAM3_TINY_IMAGE_SIZE, SAM3_TINY_IMAGE_SIZE, 3), dtype=torch.uint8)
    expected = (pixels.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert (backend.normalize(pixels) - expected).abs().max().item() < 1e-6
    assert F.mse_loss(backend.normalize(pixels), expected).item() < 1e-12


def test_presence_gate_reaches_the_backend_and_changes_the_model_id(sam3_dir: pathlib.Path) -> None:
    ref = with_presence_gate(resolve_model(str(sam3_dir)))
    assert ref.model_id == resolve_model(str(sam3_dir)).model_id + "+presence-gate"
    loaded = load_model(ref)
    assert isinstance(loaded, Sam3Backend) and loaded.presence_gate


def test_presence_gate_on_a_model_without_presence_scores_is_one_sentence(
    tiny_clipseg_dir: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    args = ["label", str(tmp_path / "images"), str(tmp_path / "dest"), "--prompts", "a,b"]
    assert main([*args, "--model", str(tiny_clipseg_dir), "--presence-gate", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"textseg: --presence-gate needs a SAM 3 model; model {str(tiny_clipseg_dir)!r} is clipseg"


def test_the_installed_transformers_is_inside_the_declared_range() -> None:
    check_transformers()  # raises ModelError outside it


@pytest.mark.parametrize(
    "installed, problem",
    [("5.24.0", False), ("5.17.0", False), ("5.16.2", True), ("6.0.0", True), ("6.1.0rc1", True)],
)
def test_a_transformers_outside_the_range_is_one_sentence_with_the_fix(installed: str, problem: bool) -> None:
    sentence = transformers_problem(installed, ">=5.17,<6")
    assert (sentence is not None) == problem
    if sentence:
        assert f"but {installed} is installed: pip install 'transformers>=5.17,<6'" in sentence
