"""Losses for binary segmentation on logits: 'bce', 'dice', 'combined' (the original scripts' names).

Soft Dice is computed over the whole batch by default (``reduction="batch"``: sums pooled over
images, as nnU-Net's batch Dice for 2D): a per-image Dice over every image drives the loss of
every image with an empty mask to 1 for any non-zero prediction, which dominates training on
real cohorts where many images (slices, tiles) have no foreground. ``smooth`` keeps 0/0
finite: two empty masks give a loss of 0.

``reduction="image"``: the mean of per-image soft Dice over the images of the batch whose mask
has foreground (images without foreground are left to BCE; a batch without any foreground
gives a Dice term of 0). A batch Dice is dominated by the images with large structures: a
slice with 100 foreground pixels next to one with 10,000 moves it by 1 %, so the network
can miss small structures altogether at little cost, and does (empty predictions on the small
structures at the top of a brain volume). Per image, each structure counts as much as any other.

Shape:
    logits ``(N, 1, H, W)`` (any dtype; computed in fp32), target ``(N, 1, H, W)`` in {0, 1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("bce", "dice", "combined")


DICE_REDUCTIONS = ("batch", "image")


class SoftDiceLoss(nn.Module):
    """1 - soft Dice of sigmoid(logits) against target, pooled over the batch or per image.

    Args:
        smooth: added to numerator and denominator; 1.0 is negligible at real image sizes.
        reduction: 'batch' (sums over the whole batch) or 'image' (mean of the per-image Dice
            losses of the images with foreground; see the module docstring).
    """

    def __init__(self, smooth: float = 1.0, reduction: str = "batch"):
        super().__init__()
        if reduction not in DICE_REDUCTIONS:
            raise ValueError(f"dice reduction={reduction!r} is not valid; valid options are {', '.join(DICE_REDUCTIONS)}")
        self.smooth, self.reduction = smooth, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(logits.float())
        target = target.float()
        if self.reduction == "image":
            dims = tuple(range(1, prob.ndim))
            truth = target.sum(dims)
            loss = 1.0 - (2.0 * (prob * target).sum(dims) + self.smooth) / (prob.sum(dims) + truth + self.smooth)
            has = (truth > 0).float()
            return (loss * has).sum() / has.sum().clamp(min=1.0)
        intersection = (prob * target).sum()
        denominator = prob.sum() + target.sum()
        return 1.0 - (2.0 * intersection + self.smooth) / (denominator + self.smooth)


class CombinedLoss(nn.Module):
    """bce_weight * BCEWithLogits + dice_weight * SoftDice."""

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5, smooth: float = 1.0,
                 reduction: str = "batch"):
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.dice = SoftDiceLoss(smooth, reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return self.bce_weight * bce + self.dice_weight * self.dice(logits, target)


class BCELoss(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def build_loss(name: str, bce_weight: float = 0.5, dice_weight: float = 0.5, dice_reduction: str = "batch") -> nn.Module:
    """The loss ``name`` ('bce', 'dice', 'combined'); ``dice_reduction`` 'batch' or 'image' for the Dice term."""
    if name == "bce":
        return BCELoss()
    if name == "dice":
        return SoftDiceLoss(reduction=dice_reduction)
    if name == "combined":
        return CombinedLoss(bce_weight, dice_weight, reduction=dice_reduction)
    raise ValueError(f"loss={name!r} is not valid; valid options are {', '.join(LOSS_NAMES)}")
