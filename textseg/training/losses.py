"""Losses for the fusion model: cross-entropy + Dice, and an optional adversarial mask critic.

Cross-entropy alone under-weights thin and small things (a 6 px road, a 5 px tree crown) next to large
background areas; the soft Dice term scores each channel by overlap, whatever its area, which is what
the mIoU we report measures. The critic (Luc et al. 2016, "Semantic Segmentation using Adversarial
Networks") is a small conv net that tells predicted probability maps from one-hot ground truth given the
image; the segmenter gets a small term for fooling it, which pushes toward label maps that look like
real ones (closed shapes, clean edges). Whether that helps here is measured, not assumed: see
textseg/demo_model/README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """logits (B, K, H, W), target (B, H, W) int64 in 0..K-1 or `ignore_index` -> scalar 1 - mean soft Dice.

    Sums over the whole batch per channel (a class absent from one image does not give it a zero score),
    averaged over the channels present in the target or the prediction; +1 smoothing keeps empty
    channels at loss 0.
    """
    probs = logits.softmax(dim=1)
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
    one_hot = F.one_hot(target.clamp(max=logits.shape[1] - 1) * (target != ignore_index), logits.shape[1])
    one_hot = one_hot.permute(0, 3, 1, 2).to(probs.dtype) * valid
    probs = probs * valid
    intersection = (probs * one_hot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = (2 * intersection + 1.0) / (total + 1.0)
    return 1.0 - dice.mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """logits (B, K, H, W), target (B, H, W) -> (cross-entropy + dice_weight * Dice, the parts as floats)."""
    cross_entropy = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
    dice = dice_loss(logits.float(), target)
    return cross_entropy + dice_weight * dice, {"ce": cross_entropy.item(), "dice": dice.item()}


def class_maps(channel_maps: torch.Tensor, channel_classes: list[int], num_classes: int) -> torch.Tensor:
    """Per-channel maps (B, 1 + P, H, W) for a batch's prompts -> (B, 1 + C, H, W) in class order.

    `channel_classes[p]` is the dataset class (1..C) of prompt channel 1 + p. A batch may ask for only
    some classes, so the critic always sees the same channel layout: classes not asked for are zero
    maps (their pixels are background in the target, hence in channel 0).
    """
    batch, _, height, width = channel_maps.shape
    out = channel_maps.new_zeros(batch, 1 + num_classes, height, width)
    out[:, 0] = channel_maps[:, 0]
    out[:, channel_classes] = channel_maps[:, 1:]
    return out


def one_hot_target(target: torch.Tensor, channels: int) -> torch.Tensor:
    """target (B, H, W) in 0..channels-1 or 255 -> (B, channels, H, W) float one-hot, zero where ignored."""
    valid = target != IGNORE_INDEX
    one_hot = F.one_hot(target * valid, channels).permute(0, 3, 1, 2).float()
    return one_hot * valid.unsqueeze(1)


class MaskCritic(nn.Module):
    """(image (B, 3, H, W), label maps (B, 1 + C, H, W)) -> real/fake logits (B, 1, H/8, W/8).

    A PatchGAN-style critic: each output judges a ~40 px neighbourhood, which is the scale of the shapes
    (houses, road segments, crowns) whose plausibility we want it to judge. Spectral norm keeps it from
    overpowering the segmenter, whose adversarial term is deliberately small.
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.layers = nn.Sequential(
            sn(nn.Conv2d(3 + 1 + num_classes, width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(2 * width, 1, 3, padding=1)),
        )

    def forward(self, pixel_values: torch.Tensor, label_maps: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([pixel_values, label_maps.to(pixel_values.dtype)], dim=1))


def critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's objective: ground truth -> 1, predictions -> 0 (binary cross-entropy on logits)."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The segmenter's adversarial term: make the critic call its predictions real."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
