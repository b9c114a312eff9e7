"""The training augmentation policies (albumentations steps between sizing and normalisation).

Design choices (what each policy holds, and why, is in ``seg.data.transforms``' docstring):

- ``augmentations(policy)``: 'standard' or 'strong', for images scaled to [0, 1]. Every
  geometric step uses nearest neighbour and fill 0 for masks, so masks stay binary and aligned.
- ``volume_augmentations(policy)``: for z-scored volume slices, whose values are not in [0, 1]:
  the policy's geometric steps, then ``ZScoreIntensity`` (contrast, shift and noise
  in z-score units, never clipped) in place of the intensity steps, which assume [0, 1].
- albumentations is imported on first use (DataLoader workers, or the trainer once its model is
  built: ``seg.training.loaders.preload_for_workers``; the CLI does not).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

AUGMENTATIONS = ("standard", "strong")


def augmentations(policy: str = "standard") -> list["A.BasicTransform"]:
    """The training augmentations (after sizing, before normalisation): 'standard' or 'strong'."""
    import albumentations as A

    if policy == "strong":
        return [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(scale=(0.7, 1.4), keep_ratio=True, balanced_scale=True, translate_percent=(-0.1, 0.1),
                     rotate=(-30, 30), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
        ]
    if policy != "standard":
        raise ValueError(f"augmentation={policy!r} is not valid; valid options are {', '.join(AUGMENTATIONS)}")
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-15, 15),
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.2),  # std as a fraction of the max (1.0 here)
    ]


@functools.lru_cache(maxsize=1)
def _zscore_intensity_class() -> type:
    import albumentations as A

    class ZScoreIntensity(A.ImageOnlyTransform):
        """Contrast and shift (probability ``contrast_p``), then Gaussian noise (``noise_p``) on
        z-scored (volume) slices, never clipped."""

        def __init__(self, contrast: float = 0.2, shift: float = 0.2, contrast_p: float = 0.5,
                     noise_std=(0.05, 0.2), noise_p: float = 0.2, p: float = 1.0):
            super().__init__(p=p)
            self.contrast, self.shift, self.contrast_p = contrast, shift, contrast_p
            self.noise_std, self.noise_p = tuple(noise_std), noise_p

        def get_params(self) -> dict:
            r = self.py_random
            alpha, beta = 1.0, 0.0
            if r.random() < self.contrast_p:
                alpha, beta = r.uniform(1 - self.contrast, 1 + self.contrast), r.uniform(-self.shift, self.shift)
            noise = r.uniform(*self.noise_std) if r.random() < self.noise_p else 0.0
            return {"alpha": alpha, "beta": beta, "noise": noise}

        def apply(self, img, alpha: float = 1.0, beta: float = 0.0, noise: float = 0.0, **params):
            out = img * np.float32(alpha) + np.float32(beta)
            if noise:
                out = out + self.random_generator.normal(0.0, noise, img.shape).astype(np.float32)
            return out.astype(np.float32, copy=False)

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ("contrast", "shift", "contrast_p", "noise_std", "noise_p")

    return ZScoreIntensity


_INTENSITY_STEPS = ("RandomBrightnessContrast", "GaussNoise")  # for [0, 1] images only


def volume_augmentations(policy: str = "standard") -> list["A.BasicTransform"]:
    """The training augmentations of volume slices: ``augmentations(policy)``' geometric steps,
    then ``ZScoreIntensity`` in place of the intensity steps, which assume [0, 1] images."""
    geometric = [t for t in augmentations(policy) if type(t).__name__ not in _INTENSITY_STEPS]
    return geometric + [_zscore_intensity_class()()]
