"""Shared helpers for the seg predict tests: a tiny random U-Net checkpoint and small images.

A trained model is not needed to test behaviour: a random tiny U-Net (base width 4) gives
deterministic, input-dependent probabilities.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from seg.checkpoint import model_checkpoint, save_checkpoint
from seg.model.unet import UNet


def make_checkpoint(path: Path, seed: int = 0, in_channels: int = 3, image_size: int = 32,
                    sampling: str = "resize", threshold: float = 0.5, base_channels: int = 4,
                    local: bool = False) -> Path:
    """Save a random tiny U-Net checkpoint (weights from ``seed``) and return its path.

    ``local=True`` cuts the decoder's deep path at the last level, so each output pixel depends
    only on a ~9 px neighbourhood: tiled and whole-image predictions must then agree everywhere
    except near the image border (a test of the tiling arithmetic, not of border effects).
    """
    torch.manual_seed(seed)
    model = UNet(in_channels, base_channels)
    with torch.no_grad():  # non-trivial BatchNorm statistics so that outputs vary across pixels
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        if local:
            first = model.up4.conv.block[0].weight
            first[:, first.shape[1] // 2:] = 0
        # scale the last layer so that logits spread over a few units (a random net's are ~constant)
        model.eval()
        x = torch.randn(2, in_channels, 64, 64)
        logits = model(x)
        spread = float(logits.std()) or 1.0
        model.outc.weight.mul_(2.0 / spread)
        model.outc.bias.sub_(float(model(x).mean()))
    preprocess = {"image_size": image_size, "in_channels": in_channels,
                  "mean": [0.5] * in_channels, "std": [0.25] * in_channels, "sampling": sampling}
    save_checkpoint(model_checkpoint(model, preprocess, threshold=threshold), path)
    return Path(path)


def random_image(h: int, w: int, channels: int = 3, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """A smooth random image (blurred noise), ``HxW`` or ``HxWx3``."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, 3)
    img = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 3)
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-6)
    return (img * np.iinfo(dtype).max).astype(dtype)


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write an RGB/grey array with OpenCV (RGB converted to BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(path), arr):
        raise RuntimeError(f"could not write {path}")
    return path
