"""Flip test-time augmentation with the agreement of the flips as a QC signal.

``flip_average`` runs the model on an input batch and on its horizontal, vertical and double
flips, un-flips the outputs and averages them (what ``Predictor.forward`` does with
``tta=True``) and also returns, per image, the mean Dice over the 6 pairs of the 4 flips'
masks (``prob > threshold``): 1 when all four agree, lower where the model's answer depends
on the orientation, which is a sign it does not recognise the image well.

Design choices: the agreement is computed on the device at the network's size from the four
maps that are computed anyway (one 4x4 Gram matrix of the masks per image: a few tensor ops per
batch against four forwards). Two empty masks agree (Dice 1).
"""

from __future__ import annotations

from typing import Callable

import torch

FLIPS = ((), (-1,), (-2,), (-2, -1))


def pairwise_mask_dice(masks: torch.Tensor) -> torch.Tensor:
    """Mean Dice over the pairs of ``K`` masks of each image.

    Shape:
        masks ``(K, N, H, W)`` bool -> ``(N,)`` float32.
    """
    k = masks.shape[0]
    flat = masks.reshape(k, masks.shape[1], -1).float()
    inter = torch.einsum("anp,bnp->nab", flat, flat)  # (N, K, K) intersections
    area = torch.diagonal(inter, dim1=1, dim2=2)  # (N, K)
    total = area[:, :, None] + area[:, None, :]
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(inter))
    iu = torch.triu_indices(k, k, offset=1)
    return dice[:, iu[0], iu[1]].mean(1)


def flip_average(prob_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip-averaged probabilities and the flips' agreement.

    Args:
        prob_fn: batch ``(N, C, H, W)`` -> probabilities ``(N, H, W)``.
        x: the network input batch.
        threshold: the mask threshold for the agreement.

    Shape:
        returns ``(N, H, W)`` float32 and ``(N,)`` float32.
    """
    total, masks = None, []
    for dims in FLIPS:
        prob = prob_fn(x.flip(dims)).flip(dims) if dims else prob_fn(x)
        masks.append(prob > threshold)
        total = prob if total is None else total.add_(prob)
    return total.div_(len(FLIPS)), pairwise_mask_dice(torch.stack(masks))
