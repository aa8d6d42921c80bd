"""The model stage (`textseg.pipeline.label.Labeler`) on the CPU: `--compile`'s fixed batch shape pads a
short batch and drops the padding, so every image gets the labels an unpadded call gives it."""

from __future__ import annotations

import pathlib

import numpy as np

from textseg.models import resolve_model
from textseg.ontology import from_prompts
from textseg.pipeline.label import Labeler


def decoded_batch(count: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "relpath": np.array([f"img{i}.png" for i in range(count)], dtype=object),
        "error": np.array([""] * count, dtype=object),
        "pixels": rng.integers(0, 256, size=(count, *size, 3), dtype=np.uint8),
        "height": np.full(count, 45, dtype=np.int32),
        "width": np.full(count, 70, dtype=np.int32),
        "windowed": np.zeros(count, dtype=bool),
        "nodata": np.array([b""] * count, dtype=object),
        "elapsed_ms": np.zeros(count),
    }


def test_a_fixed_batch_shape_pads_short_calls_without_changing_any_label(
    tiny_clipseg_dir: pathlib.Path,
) -> None:
    model = resolve_model(str(tiny_clipseg_dir))
    ontology = from_prompts("building,road,water", 0.5)
    fixed = Labeler(model, ontology, "cpu", batch_size=4, compile=True)  # on CPU: padding, no compiling
    plain = Labeler(model, ontology, "cpu", batch_size=4)
    shapes: list[int] = []
    score = fixed._score

    def recorded(pixel_values, embeddings):  # type: ignore[no-untyped-def]
        shapes.append(pixel_values.shape[0])
        return score(pixel_values, embeddings)

    fixed._score = recorded
    batch = decoded_batch(6, fixed.backend.input_spec.size)  # calls of 4 and 2: the second padded
    padded, unpadded = fixed(batch), plain(batch)
    assert shapes == [4, 4]  # one shape for the compiler, whatever the call
    for i in range(6):
        ours, theirs = (
            np.frombuffer(padded["labels"][i], np.uint8),
            np.frombuffer(unpadded["labels"][i], np.uint8),
        )
        assert ours.size == 45 * 70
        assert (
            ours != theirs
        ).mean() <= 1e-3  # float noise of a different batch size, at most a pixel or two
    assert np.allclose(padded["class_score_sum"], unpadded["class_score_sum"], rtol=1e-4)
    assert padded["class_pixel_count"].sum() == 6 * 45 * 70
