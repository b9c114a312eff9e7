"""Losses for binary segmentation on logits: 'bce', 'dice', 'combined' (the original scripts' names).

Soft Dice is computed over the whole batch (sums pooled over images, as nnU-Net's batch Dice
for 2D): a per-image Dice drives the loss of every image with an empty mask to 1 for any
non-zero prediction, which dominates training on real cohorts where many images (slices,
tiles) have no foreground. ``smooth`` keeps 0/0 finite: two empty masks give a loss of 0.

Shape:
    logits ``(N, 1, H, W)`` (any dtype; computed in fp32), target ``(N, 1, H, W)`` in {0, 1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("bce", "dice", "combined")


class SoftDiceLoss(nn.Module):
    """1 - soft Dice of sigmoid(logits) against target, pooled over the batch.

    Args:
        smooth: added to numerator and denominator; 1.0 is negligible at real image sizes.
    """

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(logits.float())
        target = target.float()
        intersection = (prob * target).sum()
        denominator = prob.sum() + target.sum()
        return 1.0 - (2.0 * intersection + self.smooth) / (denominator + self.smooth)


class CombinedLoss(nn.Module):
    """bce_weight * BCEWithLogits + dice_weight * SoftDice."""

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5, smooth: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.dice = SoftDiceLoss(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return self.bce_weight * bce + self.dice_weight * self.dice(logits, target)


class BCELoss(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def build_loss(name: str, bce_weight: float = 0.5, dice_weight: float = 0.5) -> nn.Module:
    if name == "bce":
        return BCELoss()
    if name == "dice":
        return SoftDiceLoss()
    if name == "combined":
        return CombinedLoss(bce_weight, dice_weight)
    raise ValueError(f"loss={name!r} is not valid; valid options are {', '.join(LOSS_NAMES)}")
