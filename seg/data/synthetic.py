"""Synthetic demo data set that a U-Net must actually learn (``seg demo-data``).

Each image holds 1-4 blobs (ellipses with a noise-warped boundary) whose inside carries an
oriented stripe texture (period 4-7 px), on a background of smooth cloudy texture under a strong
illumination gradient, with per-image contrast, brightness and colour tint, and pixel noise.
The foreground is only slightly brighter than the background *locally*; across an image (and
across images) the gradient moves both far more than that, so the intensity distributions of
foreground and background overlap and no single intensity threshold separates them. What
separates them is local structure (the stripes), which a convolutional network learns.

Measured (``tests/test_demo_data.py``, 200 images of 128 px, seed 0): the best single global
threshold on grey intensity, searched over all 256 levels and both polarities, reaches a pooled
Dice of 0.29; even the best threshold chosen per image (an oracle) reaches a mean Dice of only
0.34. Foreground fraction per image is 5-34 %, mean 0.16.

Files: ``OUT/images/NNNN.png`` (RGB, 8 bit) and ``OUT/masks/NNNN_mask.png`` (0/255), deterministic
for a seed (one ``numpy.random.Generator`` per image, seeded from ``(seed, index)``). Writing
200 images of 128 px takes well under a second or two.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from seg.fileio import atomic_write_bytes


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a ``cells x cells`` random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _blob_mask(rng: np.random.Generator, size: int, scale: float = 1.0) -> np.ndarray:
    """Union of 1-4 ellipses with wobbly edges; retried until 5-45 % of the image is covered
    (``scale`` multiplies the ellipse axes, and the coverage bounds by ``scale**2``)."""
    lo, hi = max(0.002, 0.05 * scale**2), min(0.9, 0.45 * scale**2)
    for _ in range(20):
        field = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(1, 5)):
            axes = (max(1, int(size * rng.uniform(0.07, 0.22) * scale)), max(1, int(size * rng.uniform(0.07, 0.22) * scale)))
            centre = (int(rng.uniform(0.15, 0.85) * size), int(rng.uniform(0.15, 0.85) * size))
            cv2.ellipse(field, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        field = cv2.GaussianBlur(field, (0, 0), size / 40) + 0.25 * _smooth_noise(rng, size, 10)
        mask = field > 0.5
        if lo <= mask.mean() <= hi:
            return mask
    return mask


def make_demo_sample(rng: np.random.Generator, size: int = 128, scale: float = 1.0,
                     contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its mask.

    Args:
        scale: object size factor (1 = the training range of the default data set).
        contrast: factor on the foreground's brightness shift and stripe amplitude.

    Shape:
        returns ``image uint8 (size, size, 3)`` RGB and ``mask bool (size, size)``.
    """
    mask = _blob_mask(rng, size, scale)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)  # about [-0.7, 0.7]
    light = 0.5 + rng.uniform(0.35, 0.6) * ramp + 0.12 * _smooth_noise(rng, size, 6)
    clouds = 0.08 * _smooth_noise(rng, size, 24)
    theta, period = rng.uniform(0, np.pi), rng.uniform(4.0, 7.0)
    stripes = np.sin(2 * np.pi * size * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    fg_shift = rng.uniform(0.02, 0.08) * contrast
    grey = light + np.where(mask, fg_shift + 0.12 * contrast * stripes, clouds)
    grey = grey + rng.normal(0.0, 0.035, grey.shape)
    grey = (grey - 0.5) * rng.uniform(0.6, 1.2) + 0.5 + rng.uniform(-0.1, 0.1)
    tint = 1.0 + rng.uniform(-0.12, 0.12, 3)
    rgb = grey[..., None] * tint[None, None, :]
    return (np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), mask


def make_demo_dataset(out: str | Path, n: int = 200, size: int = 128, seed: int = 0,
                      size_scale: tuple[float, float] = (1.0, 1.0), contrast: tuple[float, float] = (1.0, 1.0),
                      prefix: str = "") -> Path:
    """Write ``n`` image/mask pairs to ``out/images`` and ``out/masks``; returns ``out``.

    Args:
        out: output folder (created; existing files of the same names are replaced).
        n: number of pairs.
        size: image side in pixels (square images).
        seed: the same seed writes byte-identical files.
        size_scale, contrast: ranges of the per-image object size and contrast factors, drawn
            log-uniformly (a distribution shift against the default ``(1, 1)``; the factors come
            from their own random stream, so the defaults write the same files as before).
        prefix: file name prefix (``{prefix}NNNN.png``), to combine several sets in one folder.
    """
    if n < 1 or size < 16:
        raise ValueError(f"make_demo_dataset: n={n} must be >= 1 and size={size} >= 16")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shift = np.random.default_rng([seed, i, 1])
        scale = float(np.exp(shift.uniform(*np.log(size_scale)))) if size_scale != (1.0, 1.0) else 1.0
        gain = float(np.exp(shift.uniform(*np.log(contrast)))) if contrast != (1.0, 1.0) else 1.0
        image, mask = make_demo_sample(np.random.default_rng([seed, i]), size, scale, gain)
        ok1, img_png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        ok2, mask_png = cv2.imencode(".png", mask.astype(np.uint8) * 255)
        assert ok1 and ok2
        atomic_write_bytes(out / "images" / f"{prefix}{i:04d}.png", img_png.tobytes(), fsync=False)
        atomic_write_bytes(out / "masks" / f"{prefix}{i:04d}_mask.png", mask_png.tobytes(), fsync=False)
    return out
