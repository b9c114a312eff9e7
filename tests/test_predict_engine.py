"""The in-memory engine (seg.inference.engine.Predictor) and sliding-window tiling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from predict_fixtures import make_checkpoint, random_image
from seg.checkpoint import load_checkpoint
from seg.inference.engine import Predictor, model_channels
from seg.inference.tiling import gaussian_1d, tile_starts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model.pth", image_size=32)


def test_probabilities_have_original_sizes_and_range(ckpt):
    p = Predictor(ckpt, device="cpu", precision="fp32", batch_size=2)
    images = [random_image(40, 50, seed=1), random_image(17, 23, channels=1, seed=2),
              random_image(64, 32, dtype=np.uint16, seed=3)]
    probs = p.predict_probabilities(images)
    assert [q.shape for q in probs] == [(40, 50), (17, 23), (64, 32)]
    for q in probs:
        assert q.dtype == np.float32 and 0 <= q.min() and q.max() <= 1
        assert q.std() > 1e-3  # input-dependent, not a constant map
    assert p.mode == "resize" and p.threshold == 0.5 and len(p.sha256) == 64
    assert p.preprocess["image_size"] == 32


def test_resize_mode_matches_manual_pipeline(ckpt):
    """Resize raw pixels to the training size, normalise, forward, resize probabilities back."""
    p = Predictor(ckpt, device="cpu", precision="fp32")
    image = random_image(45, 70, seed=4)
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    x = torch.from_numpy(((small - 0.5) / 0.25).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        ref = torch.sigmoid(p.model(x))[0, 0].numpy()
    ref = cv2.resize(ref, (70, 45), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(p.predict_probabilities([image])[0], ref, atol=1e-5)


def test_folded_batchnorm_computes_the_checkpoint_model(ckpt):
    from seg.checkpoint import model_from_checkpoint

    p = Predictor(ckpt, device="cpu", precision="fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in p.model.modules())
    x = p.normalise(random_image(32, 32, seed=11)[None])
    with torch.no_grad():
        reference = torch.sigmoid(model_from_checkpoint(load_checkpoint(ckpt))(x))[:, 0].numpy()
    np.testing.assert_allclose(p.forward(x), reference, atol=1e-5)


def test_batching_does_not_change_results(ckpt):
    images = [random_image(30 + i, 40, seed=i) for i in range(5)]
    one = Predictor(ckpt, device="cpu", precision="fp32", batch_size=1).predict_probabilities(images)
    many = Predictor(ckpt, device="cpu", precision="fp32", batch_size=4).predict_probabilities(images)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_checkpoint_dict_and_threshold_override(ckpt):
    p = Predictor(load_checkpoint(ckpt), device="cpu", threshold=0.3)
    assert p.threshold == 0.3 and len(p.sha256) == 64 and p.path is None


def test_tta_is_flip_equivariant(ckpt):
    p = Predictor(ckpt, device="cpu", precision="fp32", tta=True)
    image = random_image(32, 32, seed=5)
    a = p.predict_probabilities([image])[0]
    b = p.predict_probabilities([np.ascontiguousarray(image[:, ::-1])])[0]
    np.testing.assert_allclose(a[:, ::-1], b, atol=1e-5)
    plain = Predictor(ckpt, device="cpu", precision="fp32").predict_probabilities([image])[0]
    assert np.abs(plain - a).max() > 1e-4  # TTA really averages something else


def test_bf16_close_to_fp32(ckpt):
    image = random_image(32, 32, seed=6)
    fp32 = Predictor(ckpt, device="cpu", precision="fp32").predict_probabilities([image])[0]
    bf16 = Predictor(ckpt, device="cpu", precision="bf16")
    assert bf16.autocast_dtype == torch.bfloat16
    assert np.abs(bf16.predict_probabilities([image])[0] - fp32).mean() < 0.05


def test_bad_options_name_the_fix(ckpt):
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA GPU .* use 'auto', 'bf16' or 'fp32'"):
        Predictor(ckpt, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision='fp8' is not valid; allowed values are 'auto', 'bf16'"):
        Predictor(ckpt, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="tile_size=8"):
        Predictor(ckpt, device="cpu", tile_size=8)


def test_model_channels():
    grey, rgb = np.zeros((4, 5), np.uint8), np.zeros((4, 5, 3), np.uint16)
    assert model_channels(grey, 3).shape == (4, 5, 3)
    assert model_channels(rgb, 1).shape == (4, 5) and model_channels(rgb, 1).dtype == np.uint16


def test_tile_starts_cover_any_length():
    for length in (64, 65, 100, 127, 128, 300):
        starts = tile_starts(length, 64, 48)
        assert starts[0] == 0 and starts[-1] == length - 64
        assert all(b - a <= 48 for a, b in zip(starts, starts[1:]))
    g = gaussian_1d(64)
    assert g.max() == pytest.approx(1.0) and g.min() >= 1e-3 and np.argmax(g) in (31, 32)


@pytest.mark.parametrize("size", [(200, 150), (131, 257), (40, 50)])
def test_tiled_equals_whole_image_away_from_borders(tmp_path, size):
    """With a model of small receptive field, blending tiles reproduces the whole-image map;
    sizes not divisible by the tile (and smaller than it) work."""
    ck = make_checkpoint(tmp_path / "local.pth", image_size=64, sampling="patch", local=True)
    p = Predictor(ck, device="cpu", precision="fp32", batch_size=3)
    assert p.mode == "tile" and p.tile_size == 64
    image = random_image(*size, seed=7)
    tiled = p.predict_probabilities([image])[0]
    whole = p.forward(p.normalise(image[None]))[0]
    assert tiled.shape == size
    border = 16
    diff = np.abs(tiled - whole)[border:-border, border:-border]
    assert whole.std() > 0.05 and diff.max() < 1e-2, diff.max()


def test_explicit_tile_size_on_resize_checkpoint(ckpt):
    p = Predictor(ckpt, device="cpu", precision="fp32", tile_size=32, tile_overlap=0.5)
    assert p.mode == "tile"
    prob = p.predict_probabilities([random_image(70, 45, seed=8)])[0]
    assert prob.shape == (70, 45) and 0 <= prob.min() <= prob.max() <= 1


@pytest.mark.parametrize("in_channels, channels, dtype", [(3, 3, np.uint8), (3, 1, np.uint16), (1, 3, np.uint8)])
def test_prediction_preprocessing_equals_training_eval_transform(tmp_path, in_channels, channels, dtype):
    """Train/predict parity: the engine's CPU half gives the numbers seg.data.transforms gives."""
    from seg.data.transforms import build_eval_transform

    ck = make_checkpoint(tmp_path / "m.pth", in_channels=in_channels, image_size=32)
    p = Predictor(ck, device="cpu", precision="fp32")
    pre = p.preprocess
    reference = build_eval_transform(pre["image_size"], pre["mean"], pre["std"], in_channels, "resize")
    image = random_image(45, 61, channels=channels, dtype=dtype, seed=9)
    expected, _ = reference(image)
    prepared = p.prepare(image)
    assert prepared.dtype == dtype
    np.testing.assert_allclose(p.normalise(prepared[None])[0], expected.numpy(), atol=1e-5)
    # normalising on the device gives the same probabilities as normalising in numpy
    np.testing.assert_allclose(p.forward_raw(prepared[None]), p.forward(p.normalise(prepared[None])), atol=1e-5)
