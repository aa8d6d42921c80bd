"""The CLIPSeg backend's fast path gives the logits of `CLIPSegForImageSegmentation.forward`, and loads
the way the hub checkpoint does."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer

from tests.tiny_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_IMAGE_SIZE,
    make_tiny_clipseg,
    tiny_clip_tokenizer,
    tiny_clipseg_config,
    tiny_clipseg_model,
    tiny_clipseg_processor,
)
from textseg.models import load_model, read_input_spec, resolve_model
from textseg.models.clipseg import ClipSegBackend, load_clipseg
from textseg.models.input_spec import InputSpec

PROMPTS = ["building", "a road", "water"]
TOLERANCE = 1e-4  # fp32 on CPU; measured gaps are ~1e-7 on logits of order one


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(
    scope="module", params=[True, False], ids=["complex_transposed_conv", "plain_transposed_conv"]
)
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_clipseg(
        tmp_path_factory.mktemp("clipseg"), use_complex_transposed_convolution=request.param
    )


@pytest.fixture(scope="module")
def backend(tiny_dir: pathlib.Path) -> ClipSegBackend:
    return load_clipseg(str(tiny_dir))


def usual_recipe_logits(
    model: CLIPSegForImageSegmentation,
    tokenizer: CLIPTokenizer,
    pixel_values: torch.Tensor,
    prompts: list[str],
) -> torch.Tensor:
    """The documented recipe for one image: K copies of it, one prompt each -> (K, h, w)."""
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixel_values[None].expand(len(prompts), -1, -1, -1),
        ).logits
    return logits.reshape(len(prompts), *logits.shape[-2:])  # forward squeezes K == 1 away


def assert_matches_usual_recipe(
    backend: ClipSegBackend, pixel_values: torch.Tensor, prompts: list[str]
) -> None:
    fast = backend.score(pixel_values, backend.embed_prompts(prompts))
    assert fast.shape[:2] == (pixel_values.shape[0], len(prompts))
    for image, fast_logits in zip(pixel_values, fast, strict=True):
        reference = usual_recipe_logits(backend.model, backend.tokenizer, image, prompts)
        assert fast_logits.shape == reference.shape
        assert (fast_logits - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("prompt_count", [1, 3])
def test_score_equals_forward_for_every_image_and_prompt(backend: ClipSegBackend, prompt_count: int) -> None:
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert_matches_usual_recipe(backend, pixel_values, PROMPTS[:prompt_count])


def test_score_equals_forward_when_position_embeddings_are_interpolated(backend: ClipSegBackend) -> None:
    # rd64-refined reads 352 px images with 224 px position tables; 96 px on a 64 px model does the same.
    torch.manual_seed(2)
    assert_matches_usual_recipe(backend, torch.randn(2, 3, 96, 96), PROMPTS)


def test_score_keeps_batch_and_prompt_axes_for_one_image_and_one_prompt(backend: ClipSegBackend) -> None:
    logits = backend.score(
        torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), backend.embed_prompts(["road"])
    )
    assert logits.shape == (1, 1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_score_equals_forward_when_a_later_decoder_layer_is_conditioned() -> None:
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    model = tiny_clipseg_model(tiny_clipseg_config(tokenizer, conditional_layer=1))
    spec = InputSpec(size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    backend = ClipSegBackend(model, tokenizer, spec, model_id="tiny-conditional-layer-1")
    torch.manual_seed(3)
    assert_matches_usual_recipe(backend, torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), PROMPTS)


def test_vision_encoder_stops_at_the_deepest_layer_the_decoder_reads(backend: ClipSegBackend) -> None:
    layers = backend.model.clip.vision_model.encoder.layers
    deepest = max(backend.model.config.extract_layers)
    assert deepest < len(layers) - 1, "the tiny model must have a layer past the deepest one read"
    calls: list[int] = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        backend.score(torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), backend.embed_prompts(PROMPTS))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == list(range(deepest + 1))  # each layer once per batch, not once per prompt


def test_load_reads_input_spec_model_id_and_fp32_weights_from_the_saved_directory(
    backend: ClipSegBackend, tiny_dir: pathlib.Path
) -> None:
    assert backend.input_spec == InputSpec(
        size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
        resample=2,
        rescale_factor=1 / 255,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    assert backend.model_id == str(tiny_dir)
    assert backend.score_kind == "sigmoid"
    assert backend.model.config._attn_implementation == "sdpa"
    embeddings = backend.embed_prompts(PROMPTS)
    assert embeddings.shape == (len(PROMPTS), backend.model.config.projection_dim)
    assert embeddings.dtype == torch.float32
    torch.manual_seed(0)
    rebuilt = tiny_clipseg_model(backend.model.config)
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(backend.model.state_dict()[name], tensor), name


def test_normalize_reproduces_the_processor_pixels(backend: ClipSegBackend, tiny_dir: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
    processor = CLIPSegProcessor.from_pretrained(tiny_dir)
    expected = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    actual = backend.normalize(torch.from_numpy(pixels)[None])
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5


def test_bf16_weights_score_close_to_fp32(backend: ClipSegBackend, tiny_dir: pathlib.Path) -> None:
    # The CUDA default; checked on CPU here so the dtype plumbing (normalize, embeddings, FiLM) is covered.
    bf16 = load_clipseg(str(tiny_dir), dtype=torch.bfloat16)
    pixels = torch.randint(0, 256, (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=torch.uint8)
    logits = bf16.score(bf16.normalize(pixels), bf16.embed_prompts(PROMPTS))
    reference = backend.score(backend.normalize(pixels), backend.embed_prompts(PROMPTS))
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


def test_score_rejects_embeddings_of_the_wrong_width_saying_what_to_change(backend: ClipSegBackend) -> None:
    width = backend.model.config.projection_dim
    with pytest.raises(ValueError, match=rf"feature dimension \({width + 1}\).*projection_dim \({width}\)"):
        backend.score(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), torch.randn(2, width + 1))


def test_score_rejects_pixels_that_are_not_batched_rgb(backend: ClipSegBackend) -> None:
    with pytest.raises(ValueError, match="backend.normalize"):
        backend.score(torch.randn(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), backend.embed_prompts(["road"]))


def test_backend_refuses_a_config_that_never_conditions_on_the_prompt() -> None:
    tokenizer = tiny_clip_tokenizer()
    model = CLIPSegForImageSegmentation(tiny_clipseg_config(tokenizer, conditional_layer=2))
    with pytest.raises(ValueError, match="conditional_layer"):
        ClipSegBackend(model, tokenizer, InputSpec(size=(64, 64)), model_id="never-conditioned")


def test_a_checkpoint_saved_with_processor_save_pretrained_labels_like_the_hub_layout(
    backend: ClipSegBackend, tmp_path: pathlib.Path
) -> None:
    """transformers 5's `processor.save_pretrained` writes `processor_config.json` only: the registry reads
    the input size from its `image_processor` entry, and the weights score the same."""
    directory = make_tiny_clipseg(
        tmp_path / "whole",
        use_complex_transposed_convolution=backend.model.config.use_complex_transposed_convolution,
        whole_processor=True,
    )
    assert not (directory / "preprocessor_config.json").exists()
    assert (directory / "processor_config.json").is_file()
    ref = resolve_model(str(directory))
    assert read_input_spec(ref) == backend.input_spec
    loaded = load_model(ref)
    pixels = torch.randint(0, 256, (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = backend.score(backend.normalize(pixels), backend.embed_prompts(PROMPTS))
        got = loaded.score(loaded.normalize(pixels), loaded.embed_prompts(PROMPTS))
    assert torch.equal(got, expected)


def test_tiny_processor_loads_back_as_clipseg_processor(tiny_dir: pathlib.Path) -> None:
    processor = CLIPSegProcessor.from_pretrained(tiny_dir)
    saved = tiny_clipseg_processor(tiny_clip_tokenizer())
    assert processor.tokenizer(PROMPTS)["input_ids"] == saved.tokenizer(PROMPTS)["input_ids"]


def test_decoded_jpegs_score_like_the_reference_processor_on_the_full_image(
    backend: ClipSegBackend, tiny_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A photo goes through textseg's decode (a JPEG DCT-reduced to about the model's input, then the
    processor's resize) and the fast path; the reference decodes it in full and runs the processor and
    `forward`. The gap in pixel values is the DCT scaling's (tests/test_decoding.py); in logits, measured
    here on five photo-like JPEGs and both tiny variants: at most 0.037 of the reference logits' range
    (0.005-0.02 typically), and ~1e-7 for the JPEG too small to reduce (the same pixels as the processor)."""
    import fsspec

    from textseg.image.pieces import WindowPlan, open_source, resized

    processor = CLIPSegProcessor.from_pretrained(tiny_dir)
    fs = fsspec.filesystem("file")
    rng = np.random.default_rng(3)
    gaps = []
    for seed, (width, height) in enumerate([(640, 480), (1600, 1200), (333, 517), (1024, 768), (96, 80)]):
        ys, xs = np.mgrid[0:height, 0:width]
        base = np.stack([xs * 255 / width, ys * 255 / height, (xs * ys) % 255], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
        path = tmp_path / f"photo{seed}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        plan = WindowPlan(None, 0, backend.input_spec.size)
        _, pieces = open_source(fs, str(path), path.name, plan, max_pixels=10**9)
        (piece,) = [resized(p, backend.input_spec) for p in pieces]
        ours = backend.score(
            backend.normalize(torch.from_numpy(piece.pixels)[None]), backend.embed_prompts(PROMPTS)
        )[0]
        with Image.open(path) as image:
            reference_pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        reference = usual_recipe_logits(backend.model, backend.tokenizer, reference_pixels[0], PROMPTS)
        spread = (reference.max() - reference.min()).item()
        gap = (ours - reference).abs().max().item()
        gaps.append(gap / spread)
    assert max(gaps) <= 0.05 and gaps[-1] <= TOLERANCE
