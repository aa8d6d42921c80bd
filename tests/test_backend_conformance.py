"""One conformance suite for every registered backend (textseg.models), in the spirit of transformers'
ModelTester: each backend's tiny checkpoint, saved as its real one is, goes through the same checks.

Adding a backend to the registry without a tiny checkpoint here fails `test_every_registered_backend_is_
covered`, so no backend escapes the suite.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.test_clipseg import usual_recipe_logits
from tests.test_sam3 import reference as sam3_forward
from tests.tiny_models import make_tiny_clipseg, make_tiny_fusion, make_tiny_sam3
from textseg.models import _BACKENDS, load_model, resolve_model
from textseg.models.base import SegmentationBackend
from textseg.models.clipseg import ClipSegBackend
from textseg.models.fusion import FusionBackend
from textseg.models.sam3 import Sam3Backend

TYPES: dict[str, type[SegmentationBackend]] = {
    "clipseg": ClipSegBackend,
    "textseg_fusion": FusionBackend,
    "sam3": Sam3Backend,
}

# model_type -> writes a tiny checkpoint of that backend into a directory and returns it.
TINY_CHECKPOINTS: dict[str, Callable[[pathlib.Path], pathlib.Path]] = {
    "clipseg": make_tiny_clipseg,
    "textseg_fusion": make_tiny_fusion,
    "sam3": make_tiny_sam3,
}
PROMPTS = ["building", "a road", "water"]
TOLERANCE = 1e-4  # fp32 on CPU


def clipseg_reference(backend: Any, pixel_values: torch.Tensor, prompt: str) -> torch.Tensor:
    return usual_recipe_logits(backend.model, backend.tokenizer, pixel_values, [prompt])[0]


def sam3_reference(backend: Any, pixel_values: torch.Tensor, prompt: str) -> torch.Tensor:
    return sam3_forward(backend.model, backend, pixel_values, prompt).semantic_seg[0, 0]


# model_type -> the model's own forward for one (image, prompt): what the fast path must reproduce. The
# fusion model has none apart from its `score` (its forward is `score`).
REFERENCE_FORWARDS: dict[str, Callable[[Any, torch.Tensor, str], torch.Tensor]] = {
    "clipseg": clipseg_reference,
    "sam3": sam3_reference,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(TINY_CHECKPOINTS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return TINY_CHECKPOINTS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def backend(checkpoint: pathlib.Path) -> SegmentationBackend:
    return load_model(resolve_model(str(checkpoint))).eval()


def images(backend: SegmentationBackend, count: int, seed: int = 0) -> torch.Tensor:
    height, width = backend.input_spec.size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, height, width, 3), generator=generator, dtype=torch.uint8)
    return pixels.to(next(backend.parameters()).device)


def scores(backend: SegmentationBackend, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        return backend.score(backend.normalize(pixels), backend.embed_prompts(prompts))


def prompt_channels(backend: SegmentationBackend, logits: torch.Tensor) -> torch.Tensor:
    """The per-prompt channels: all of a sigmoid backend's, a softmax backend's after its background."""
    return logits if backend.score_kind == "sigmoid" else logits[:, 1:]


def test_every_registered_backend_is_covered() -> None:
    assert sorted(TINY_CHECKPOINTS) == sorted(TYPES) == sorted(_BACKENDS)


def test_scores_are_one_map_per_prompt_plus_background_for_softmax(backend: SegmentationBackend) -> None:
    for count in (1, 3):
        logits = scores(backend, images(backend, 2), PROMPTS[:count])
        extra = 0 if backend.score_kind == "sigmoid" else 1
        assert logits.ndim == 4 and logits.shape[:2] == (2, count + extra)
        assert logits.dtype == next(backend.parameters()).dtype
        assert torch.isfinite(logits).all()


def test_an_images_scores_do_not_depend_on_the_other_images_in_its_batch(
    backend: SegmentationBackend,
) -> None:
    batch = images(backend, 3, seed=1)
    together = scores(backend, batch, PROMPTS)
    for index in range(3):
        alone = scores(backend, batch[index : index + 1], PROMPTS)
        assert (alone[0] - together[index]).abs().max().item() <= TOLERANCE, index


def test_a_prompts_scores_do_not_depend_on_the_other_prompts(backend: SegmentationBackend) -> None:
    """Sigmoid backends score each prompt alone; a softmax backend scores prompts against each other,
    so for it the promise is that reordering the prompts reorders the channels and changes nothing else."""
    pixels = images(backend, 2, seed=2)
    all_three = prompt_channels(backend, scores(backend, pixels, PROMPTS))
    if backend.score_kind == "sigmoid":
        for index, prompt in enumerate(PROMPTS):
            alone = scores(backend, pixels, [prompt])[:, 0]
            assert (alone - all_three[:, index]).abs().max().item() <= TOLERANCE, prompt
    order = [2, 0, 1]
    reordered = prompt_channels(backend, scores(backend, pixels, [PROMPTS[i] for i in order]))
    assert (reordered - all_three[:, order]).abs().max().item() <= TOLERANCE


def test_loading_the_saved_directory_twice_gives_identical_weights_and_scores(
    backend: SegmentationBackend, checkpoint: pathlib.Path
) -> None:
    again = load_model(resolve_model(str(checkpoint))).eval()
    assert again.state_dict().keys() == backend.state_dict().keys()
    for name, tensor in backend.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    pixels = images(backend, 2, seed=3)
    assert torch.equal(scores(again, pixels, PROMPTS), scores(backend, pixels, PROMPTS))
    assert again.model_id == backend.model_id == resolve_model(str(checkpoint)).model_id


def test_scores_equal_the_reference_forward_of_each_image_and_prompt(backend: SegmentationBackend) -> None:
    reference = REFERENCE_FORWARDS.get(resolve_model_type(backend))
    if reference is None:
        pytest.skip("this backend's forward is its score")
    pixel_values = backend.normalize(images(backend, 2, seed=6))
    with torch.inference_mode():
        fast = backend.score(pixel_values, backend.embed_prompts(PROMPTS))
        for b, image in enumerate(pixel_values):
            for p, prompt in enumerate(PROMPTS):
                expected = reference(backend, image, prompt)
                assert (fast[b, p] - expected).abs().max().item() <= TOLERANCE, (b, prompt)


def resolve_model_type(backend: SegmentationBackend) -> str:
    (model_type,) = [name for name, kind in TYPES.items() if isinstance(backend, kind)]
    return model_type


def test_bf16_weights_label_like_fp32(backend: SegmentationBackend, checkpoint: pathlib.Path) -> None:
    """The CUDA default dtype, run here on the CPU: inputs follow the weights' dtype, and the labels at
    the default threshold mostly agree (random weights sit near the decision boundary more than real)."""
    half = load_model(resolve_model(str(checkpoint))).eval().to(torch.bfloat16)
    pixels = images(backend, 2, seed=4)
    assert half.normalize(pixels).dtype == torch.bfloat16
    low, full = scores(half, pixels, PROMPTS), scores(backend, pixels, PROMPTS)
    assert low.dtype == torch.bfloat16 and low.shape == full.shape
    if backend.score_kind == "sigmoid":
        agree = ((torch.sigmoid(low.float()) >= 0.4) == (torch.sigmoid(full) >= 0.4)).float().mean()
    else:
        agree = (low.float().argmax(1) == full.argmax(1)).float().mean()
    assert agree.item() >= 0.9, agree.item()


def test_normalize_gives_the_weights_dtype_and_channel_first_layout(backend: SegmentationBackend) -> None:
    pixels = images(backend, 2, seed=5)
    values = backend.normalize(pixels)
    assert values.shape == (2, 3, *backend.input_spec.size)
    assert values.dtype == next(backend.parameters()).dtype
