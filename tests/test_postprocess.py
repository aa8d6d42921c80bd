import math

import pytest
import torch
import torch.nn.functional as F

from textseg.labels.postprocess import NODATA, ClassGrouping, label_image
from textseg.outputs.metadata import class_statistics


def spec_labels(logits: torch.Tensor, size: tuple[int, int], grouping: ClassGrouping) -> torch.Tensor:
    """The mask formula written out literally, pixel by pixel over classes and prompts."""
    resized = [
        F.interpolate(prompt_logits[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        for prompt_logits in logits
    ]
    scores = torch.stack(
        [
            torch.stack(
                [
                    torch.sigmoid(r)
                    for r, c in zip(resized, grouping.prompt_class_index, strict=True)
                    if c == k
                ]
            ).amax(0)
            for k in range(1, grouping.num_classes + 1)
        ]
    )
    best_score, best = scores.max(0)
    labels = torch.zeros(size, dtype=torch.uint8)
    for y in range(size[0]):
        for x in range(size[1]):
            k = int(best[y, x]) + 1
            if best_score[y, x] >= grouping.thresholds[k - 1]:
                labels[y, x] = k
    return labels


def test_sigmoid_labels_follow_the_spec_formula_with_synonyms_and_per_class_thresholds():
    torch.manual_seed(0)
    grouping = ClassGrouping(prompt_class_index=(1, 1, 2, 3), thresholds=(0.5, 0.3, 0.7))
    logits = torch.randn(4, 8, 8) * 2
    result = label_image(logits, (21, 13), grouping, "sigmoid")
    assert result.labels.shape == (21, 13) and result.labels.dtype == torch.uint8
    assert torch.equal(result.labels, spec_labels(logits, (21, 13), grouping))
    assert sum(result.class_pixel_count) == 21 * 13


def test_class_fractions_and_mean_scores_describe_the_labels():
    grouping = ClassGrouping(prompt_class_index=(1, 2), thresholds=(0.5, 0.5))
    logits = torch.full((2, 4, 4), -10.0)
    logits[0, :, :2] = 10.0  # class 1 on the left half, score sigmoid(10)
    result = label_image(logits, (4, 4), grouping, "sigmoid")
    fractions, means = class_statistics(result.class_pixel_count, result.class_score_sum)
    assert fractions == pytest.approx([0.5, 0.5, 0.0])
    assert means[1] == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item())
    assert math.isnan(means[2])


def test_nodata_pixels_are_255_and_count_in_no_class():
    grouping = ClassGrouping(prompt_class_index=(1,), thresholds=(0.5,))
    logits = torch.full((1, 4, 4), 10.0)
    nodata = torch.zeros(4, 4, dtype=torch.bool)
    nodata[0] = True
    result = label_image(logits, (4, 4), grouping, "sigmoid", nodata)
    assert (result.labels[0] == NODATA).all() and (result.labels[1:] == 1).all()
    assert result.class_pixel_count == [0, 12]


def test_softmax_background_channel_wins_where_it_is_largest():
    grouping = ClassGrouping(prompt_class_index=(1, 1, 2), thresholds=(0.0, 0.9))
    logits = torch.zeros(4, 2, 2)  # background, prompt a, prompt a', prompt b
    logits[0, 0, 0] = 5.0  # background
    logits[2, 0, 1] = 5.0  # class 1 through its second synonym
    logits[3, 1, 0] = 5.0  # class 2, confident
    logits[3, 1, 1] = 0.5  # class 2 argmax but below its 0.9 threshold -> background
    labels = label_image(logits, (2, 2), grouping, "softmax").labels
    assert labels.tolist() == [[0, 1], [2, 0]]


def test_wrong_number_of_prompt_maps_is_a_clear_error():
    grouping = ClassGrouping(prompt_class_index=(1, 2), thresholds=(0.5, 0.5))
    with pytest.raises(ValueError, match="3 prompt maps for 2 prompts"):
        label_image(torch.zeros(3, 2, 2), (2, 2), grouping, "sigmoid")


@pytest.mark.parametrize("score_kind", ["sigmoid", "softmax"])
def test_labels_from_logits_equal_labels_from_the_full_score_maps(score_kind):
    """`label_image` skips the (1 + K, H, W) probabilities; it must decide exactly as they would."""
    from textseg.labels.postprocess import class_scores, labels_from_scores

    torch.manual_seed(1)
    grouping = ClassGrouping(prompt_class_index=(1, 2, 2, 3), thresholds=(0.3, 0.5, 0.6))
    logits = torch.randn(4 + (score_kind == "softmax"), 9, 7) * 3
    nodata = torch.rand(40, 30) < 0.1
    fast = label_image(logits, (40, 30), grouping, score_kind, nodata)
    full = labels_from_scores(
        class_scores(logits, (40, 30), grouping, score_kind), grouping, score_kind, nodata
    )
    assert torch.equal(fast.labels, full.labels)
    assert set(fast.labels.unique().tolist()) == {0, 1, 2, 3, NODATA}
    assert fast.class_pixel_count == full.class_pixel_count
    assert fast.class_score_sum == pytest.approx(full.class_score_sum, rel=1e-5)
