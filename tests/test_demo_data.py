"""seg.data.synthetic: deterministic, non-trivial masks, and a task a global threshold cannot solve."""

import cv2
import numpy as np
import pytest

from seg.data.synthetic import make_demo_dataset
from seg.data.io import read_image, read_mask
from seg.demo_data import main


def _best_threshold_dice(images, masks) -> float:
    """Best pooled Dice of ``grey >= t`` or ``grey < t`` over all 256 levels, one t for all images."""
    fg = np.zeros(256)
    bg = np.zeros(256)
    for img, m in zip(images, masks):
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        fg += np.bincount(grey[m], minlength=256)
        bg += np.bincount(grey[~m], minlength=256)
    fg_at_or_above = np.cumsum(fg[::-1])[::-1]
    bg_at_or_above = np.cumsum(bg[::-1])[::-1]
    n_fg = fg.sum()
    dice_high = 2 * fg_at_or_above / (n_fg + fg_at_or_above + bg_at_or_above)
    tp_low = n_fg - fg_at_or_above
    dice_low = 2 * tp_low / (n_fg + tp_low + bg.sum() - bg_at_or_above)
    return float(max(dice_high.max(), dice_low.max()))


@pytest.mark.slow
def test_demo_is_deterministic_and_a_real_task(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n=100, size=128, seed=0)
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names[:2] == ["0000.png", "0001.png"] and len(names) == 100
    assert (a / "masks" / "0099_mask.png").exists()
    images = [read_image(a / "images" / n) for n in names]
    masks = [read_mask(a / "masks" / n.replace(".png", "_mask.png")) for n in names]
    assert all(img.shape == (128, 128, 3) and img.dtype == np.uint8 for img in images)
    fractions = np.array([m.mean() for m in masks])
    assert fractions.min() >= 0.05 and fractions.max() <= 0.5
    dice = _best_threshold_dice(images, masks)
    assert 0.05 < dice < 0.6, f"best global threshold Dice {dice:.3f} (documented: 0.29 on 200 images)"
    # same seed: byte-identical files; another seed: different data
    b = make_demo_dataset(tmp_path / "b", n=5, size=128, seed=0)
    c = make_demo_dataset(tmp_path / "c", n=5, size=128, seed=1)
    for n in names[:5]:
        assert (a / "images" / n).read_bytes() == (b / "images" / n).read_bytes()
        assert (a / "images" / n).read_bytes() != (c / "images" / n).read_bytes()


def test_demo_data_command(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--n", "3", "--size", "32", "--seed", "2"]) == 0
    assert "wrote 3 pairs" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "masks").glob("*_mask.png"))) == 3
    assert main([str(tmp_path / "e"), "--n", "0"]) == 2
