"""Losses against hand-computed values, including empty masks and batch pooling."""

import math

import pytest
import torch

from seg.losses import BCELoss, CombinedLoss, SoftDiceLoss, build_loss

BIG = 30.0  # sigmoid(30) = 1 - 1e-13


def test_bce_at_zero_logits_is_log_2():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert BCELoss()(torch.zeros_like(target), target).item() == pytest.approx(math.log(2))


def test_soft_dice_hand_computed():
    # p = 0.5 everywhere, 2 of 4 pixels foreground: I = 1, sum p + sum t = 4, smooth 1 -> 1 - 3/5
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert SoftDiceLoss()(torch.zeros_like(target), target).item() == pytest.approx(0.4)
    assert SoftDiceLoss(smooth=0.0)(torch.zeros_like(target), target).item() == pytest.approx(0.5)


def test_perfect_and_empty_predictions():
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    logits = (target * 2 - 1) * BIG
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(1, 1, 4, 4)
    assert SoftDiceLoss()(torch.full_like(empty, -BIG), empty).item() == pytest.approx(0.0, abs=1e-6)  # both empty
    # empty truth, all-foreground prediction: 1 - 1 / (16 + 1)
    assert SoftDiceLoss()(torch.full_like(empty, BIG), empty).item() == pytest.approx(1 - 1 / 17)


def test_dice_is_pooled_over_the_batch():
    # image 0: perfect 4-pixel foreground; image 1: empty truth, p = 0.5 on 4 pixels
    target = torch.zeros(2, 1, 2, 2)
    target[0] = 1
    logits = torch.zeros(2, 1, 2, 2)
    logits[0] = BIG
    # I = 4, sum p = 4 + 2, sum t = 4 -> 1 - (8 + 1) / (10 + 1)
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(1 - 9 / 11, abs=1e-6)


def test_combined_is_the_weighted_sum():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    bce, dice = BCELoss()(logits, target), SoftDiceLoss()(logits, target)
    assert CombinedLoss(0.3, 0.7)(logits, target).item() == pytest.approx((0.3 * bce + 0.7 * dice).item())
    assert build_loss("combined")(logits, target).item() == pytest.approx((0.5 * bce + 0.5 * dice).item())


@pytest.mark.parametrize("name", ["bce", "dice", "combined"])
def test_low_precision_logits_give_fp32_loss_with_gradients(name):
    logits = torch.randn(1, 1, 8, 8).to(torch.bfloat16).requires_grad_()
    loss = build_loss(name)(logits, torch.ones(1, 1, 8, 8))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_unknown_loss_lists_options():
    with pytest.raises(ValueError, match="loss='focal' is not valid; valid options are bce, dice, combined"):
        build_loss("focal")


def test_per_image_dice_weighs_small_structures_like_large_ones_and_skips_empty_masks():
    big = torch.zeros(1, 1, 32, 32)
    big[..., :16, :] = 1  # 512 foreground pixels
    small = torch.zeros(1, 1, 32, 32)
    small[..., :2, :2] = 1  # 4 pixels
    target = torch.cat([big, small])
    logits = torch.where(torch.cat([big, torch.zeros_like(small)]) > 0, BIG, -BIG)  # the small one is missed
    batch = SoftDiceLoss(reduction="batch")(logits, target).item()
    image = SoftDiceLoss(reduction="image")(logits, target).item()
    assert batch < 0.01 and image == pytest.approx((0 + (1 - 1 / 5)) / 2, abs=1e-4)
    empty = torch.zeros(1, 1, 32, 32)  # an empty mask adds nothing, whatever is predicted
    with_empty = SoftDiceLoss(reduction="image")(torch.cat([logits, torch.full_like(empty, BIG)]),
                                                 torch.cat([target, empty])).item()
    assert with_empty == pytest.approx(image, abs=1e-6)
    assert SoftDiceLoss(reduction="image")(torch.full_like(empty, BIG), empty).item() == 0.0
    combined = build_loss("combined", dice_reduction="image")
    assert combined.dice.reduction == "image"
    with pytest.raises(ValueError, match="dice reduction='pixel' is not valid"):
        SoftDiceLoss(reduction="pixel")
