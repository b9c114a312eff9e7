"""Transforms: masks stay binary and aligned, shapes/dtypes, normalisation, bit depth, channels."""

import albumentations as A
import numpy as np
import pytest
import torch

from seg.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, augmentation_seed, augmentations,
                                 build_eval_transform, build_train_transform, channel_stats,
                                 to_model_channels)


def _asymmetric_mask(h=48, w=80):
    """An L-shaped mask off-centre: any flip/rotation/shift applied to one side only shows."""
    mask = np.zeros((h, w), bool)
    mask[5:30, 8:20] = True
    mask[22:30, 8:60] = True
    return mask


@pytest.mark.parametrize("sampling", ["resize", "patch"])
def test_train_masks_stay_binary_and_aligned_with_image(sampling):
    mask = _asymmetric_mask()
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    tr = build_train_transform(32, [0.0] * 3, [1.0] * 3, sampling=sampling, seed=7)
    outputs = set()
    for _ in range(40):
        img_t, mask_t = tr(image, mask)
        assert img_t.shape == (3, 32, 32) and mask_t.shape == (1, 32, 32)
        assert img_t.dtype == torch.float32 and mask_t.dtype == torch.float32
        assert set(mask_t.unique().tolist()) <= {0.0, 1.0}
        from_image = (img_t.mean(0, keepdim=True) > 0.5).float()
        # bilinear (image) vs nearest (mask) may differ on boundary pixels only
        assert (from_image != mask_t).float().mean() < 0.04
        outputs.add(mask_t.numpy().tobytes())
    assert len(outputs) > 10  # the augmentations do move things


def test_geometric_augmentations_are_exact_on_image_and_mask():
    mask = _asymmetric_mask(32, 32)
    image = (mask * 255).astype(np.uint8)
    geometric = [t for t in augmentations() if isinstance(t, (A.HorizontalFlip, A.VerticalFlip, A.RandomRotate90))]
    assert len(geometric) == 3
    compose = A.Compose(geometric, seed=0)
    for _ in range(20):
        out = compose(image=image, mask=mask.astype(np.uint8))
        assert np.array_equal(out["image"] > 127, out["mask"] > 0)


def test_eval_resize_shapes_and_normalisation_numbers():
    image = np.full((40, 60, 3), (51, 102, 204), np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[:, :30] = True
    ev = build_eval_transform(64, IMAGENET_MEAN, IMAGENET_STD)
    img_t, mask_t = ev(image, mask)
    assert img_t.shape == (3, 64, 64) and mask_t.shape == (1, 64, 64)
    expected = (np.array([0.2, 0.4, 0.8]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(img_t.mean((1, 2)).numpy(), expected, atol=1e-5)
    assert mask_t[0, :, :32].min() == 1 and mask_t[0, :, 32:].max() == 0
    img_none, none = ev(image, None)
    assert none is None and torch.equal(img_none, img_t)


def test_eval_patch_pads_full_image_to_multiple_of_16():
    image = np.full((40, 70), 255, np.uint8)
    img_t, mask_t = build_eval_transform(32, [0.0], [1.0], in_channels=1, sampling="patch")(image, np.ones((40, 70), bool))
    assert img_t.shape == (1, 48, 80) and mask_t.shape == (1, 48, 80)
    assert img_t.sum() == 40 * 70 and mask_t.sum() == 40 * 70  # padding is 0 in both


def test_16_bit_input_is_scaled_by_its_maximum():
    image = np.full((32, 32), 65535 // 5, np.uint16)
    img_t, _ = build_eval_transform(32, [0.0], [1.0], in_channels=1)(image, None)
    assert torch.allclose(img_t, torch.full_like(img_t, (65535 // 5) / 65535))
    with pytest.raises(TypeError, match="float64"):
        build_eval_transform(32, [0.0], [1.0], in_channels=1)(image.astype(np.float64), None)


def test_grey_to_three_channels_and_rgb_to_grey():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    three = to_model_channels(grey, 3)
    assert three.shape == (3, 4, 3) and all(np.array_equal(three[..., c], grey) for c in range(3))
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (200, 200, 200)
    one = to_model_channels(rgb, 1)
    assert one.shape == (2, 2, 1) and one.dtype == np.uint8
    assert one[..., 0].tolist() == [[76, 150], [29, 200]]  # 0.299, 0.587, 0.114 of 255
    img_t, _ = build_eval_transform(16, [0.0] * 3, [1.0] * 3)(np.zeros((16, 16), np.uint8), None)
    assert img_t.shape == (3, 16, 16)


def test_channel_stats_modes():
    info = {"channels": {"mean": [0.2, 0.4, 0.6], "std": [0.1, 0.1, 0.1]}}
    assert channel_stats("dataset", info, 3) == ([0.2, 0.4, 0.6], [0.1, 0.1, 0.1])
    assert channel_stats("imagenet", info, 3) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert channel_stats("none", info, 1) == ([0.0], [1.0])
    with pytest.warns(UserWarning, match="ImageNet"):
        assert channel_stats("dataset", {}, 3) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    with pytest.raises(ValueError, match="valid options are 'dataset'|valid options are dataset"):
        channel_stats("minmax", info, 3)


def test_grey_stats_equal_the_pooled_pixel_stats():
    rng = np.random.default_rng(0)
    pixels = np.stack([rng.normal(m, s, 10000) for m, s in [(0.2, 0.05), (0.5, 0.1), (0.7, 0.2)]], 1)
    info = {"channels": {"mean": pixels.mean(0).tolist(), "std": pixels.std(0).tolist()}}
    mean, std = channel_stats("dataset", info, 1)
    assert mean == pytest.approx([pixels.mean()]) and std == pytest.approx([pixels.std()])


def test_augmentation_is_a_function_of_the_seed():
    image = np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    a = build_train_transform(32, [0.0] * 3, [1.0] * 3, seed=5)
    b = build_train_transform(32, [0.0] * 3, [1.0] * 3, seed=5)
    first = [a(image, None)[0] for _ in range(5)]
    assert all(torch.equal(x, b(image, None)[0]) for x in first)
    a.reseed(augmentation_seed(5, epoch=0, rank=0, worker=1))
    assert not all(torch.equal(x, a(image, None)[0]) for x in first)
    seeds = {augmentation_seed(5, e, r, w) for e in range(3) for r in range(2) for w in range(2)}
    assert len(seeds) == 12
    assert len({augmentation_seed(5, 0, 0, 0, stream) for stream in range(4)}) == 4  # uncorrelated uses
    assert augmentation_seed(5, 0, 0, 0, 0) == augmentation_seed(5)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="need 1 values"):
        build_eval_transform(32, [0.1, 0.2, 0.3], [1.0] * 3, in_channels=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_train_transform(30, [0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="sampling='tile'"):
        build_eval_transform(32, [0.0] * 3, [1.0] * 3, sampling="tile")
    with pytest.raises(ValueError, match="differs from image shape"):
        build_eval_transform(32, [0.0] * 3, [1.0] * 3)(np.zeros((32, 32), np.uint8), np.zeros((16, 16), bool))


@pytest.mark.parametrize("in_channels, shape, dtype", [(3, (50, 70, 3), np.uint8), (1, (50, 70, 3), np.uint8),
                                                       (3, (40, 40), np.uint16), (1, (64, 64), np.uint8)])
def test_eval_transform_matches_prediction_preprocessing(in_channels, shape, dtype):
    """Validation during training and `seg predict` must feed the model the same numbers."""
    from seg.checkpoint import model_checkpoint
    from seg.inference.engine import Predictor
    from seg.model import UNet

    image = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    mean, std = channel_stats("imagenet", None, in_channels)
    ours, _ = build_eval_transform(32, mean, std, in_channels)(image, None)
    preprocess = {"image_size": 32, "in_channels": in_channels, "mean": mean, "std": std, "sampling": "resize"}
    predictor = Predictor(model_checkpoint(UNet(in_channels, base_channels=4), preprocess), device="cpu")
    theirs = predictor.normalise(predictor.prepare(image)[None])[0]  # raw pixels move between processes
    assert ours.shape == theirs.shape
    assert np.allclose(ours.numpy(), theirs, atol=1e-5)


def test_transforms_build_lazily_and_reseeding_before_the_build_is_exact():
    """albumentations is imported and the pipeline built on first use (in DataLoader workers);
    a seed given before the build gives the same augmentations as one set after it."""
    import subprocess
    import sys

    code = ("import sys; from seg.data.transforms import build_train_transform as b; "
            "t = b(32, [0.5] * 3, [0.2] * 3); assert 'albumentations' not in sys.modules; "
            "t.reseed(3); assert 'albumentations' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    image = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    mask = _asymmetric_mask(40, 40)
    lazy, eager = build_train_transform(32, [0.5] * 3, [0.2] * 3), build_train_transform(32, [0.5] * 3, [0.2] * 3)
    lazy.reseed(7)
    eager.compose.set_random_seed(7)
    for _ in range(5):
        (a, am), (b, bm) = lazy(image, mask), eager(image, mask)
        assert torch.equal(a, b) and torch.equal(am, bm)


@pytest.mark.parametrize("shape,mean,std", [((40, 56, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                            ((40, 56, 1), (0.3,), (0.2,)), ((40, 56), (0.3,), (0.2,))])
def test_standardize_is_albumentations_normalize_bit_for_bit(shape, mean, std):
    import albumentations as A

    from seg.data.standardize import Standardize

    image = np.random.default_rng(0).random(shape, dtype=np.float32) * 1.2 - 0.1  # out of [0, 1] after augmentation
    expected = A.Normalize(mean=mean, std=std, max_pixel_value=1.0)(image=image)["image"]
    got = A.Compose([Standardize(mean, std)])(image=image)["image"]
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_strong_augmentation_keeps_masks_binary_and_aligned_and_varies_scale():
    mask = _asymmetric_mask(64, 64)
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    tr = build_train_transform(64, [0.0] * 3, [1.0] * 3, seed=3, augmentation="strong")
    areas = []
    for _ in range(60):
        img_t, mask_t = tr(image, mask)
        assert set(mask_t.unique().tolist()) <= {0.0, 1.0}
        areas.append(float(mask_t.sum()))
    assert min(areas) < 0.7 * mask.sum() and max(areas) > 1.3 * mask.sum()  # scale 0.7-1.4 both ways
    strong, standard = augmentations("strong"), augmentations("standard")
    # strong differs in geometry only: the intensity steps are standard's
    assert [type(t).__name__ for t in strong] == [type(t).__name__ for t in standard]
    affine = next(t for t in strong if type(t).__name__ == "Affine")
    assert affine.p == 0.7 and affine.balanced_scale
    with pytest.raises(ValueError, match="augmentation='heavy' is not valid; valid options are standard, strong"):
        build_train_transform(32, [0.0] * 3, [1.0] * 3, augmentation="heavy")


def test_foreground_crops_contain_the_small_structure():
    image = np.zeros((256, 256), np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[200:206, 30:36] = True  # 36 pixels of 65536: a uniform 32 px crop rarely sees them
    image[mask] = 255
    def hits(p):
        tr = build_train_transform(32, [0.0], [1.0], in_channels=1, sampling="patch", augment=False, seed=1,
                                   foreground_crop=p)
        return sum(float(tr(image, mask)[1].sum()) > 0 for _ in range(40))
    assert hits(1.0) == 40
    assert hits(0.0) < 10
    assert 10 < hits(0.5) < 40
    with pytest.raises(ValueError, match=r"foreground_crop=1.5 is not valid; it must be in \[0, 1\]"):
        build_train_transform(32, [0.0], [1.0], in_channels=1, sampling="patch", foreground_crop=1.5)
