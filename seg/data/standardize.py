"""``Standardize``: albumentations' ``Normalize`` arithmetic without its full-size temporaries.

Design choices:

- ``A.Normalize`` on float32 images builds two image-sized arrays of the mean and of 1/std
  before subtracting and multiplying (albucore's OpenCV path): 7.2 ms per 512x512 RGB image,
  a third of a training worker's transform. ``Standardize`` computes ``(x - mean) * (1 / std)``
  with the same float32 constants and the same two float32 operations, broadcasting the
  per-channel values: bit-identical output (a test compares them) in 2.5 ms (one core).
- A module of its own, imported only where a pipeline is built, because it imports
  albumentations (1-1.5 s) at import time; a module-level class keeps built pipelines picklable.
"""

from __future__ import annotations

import albumentations as A
import numpy as np


class Standardize(A.ImageOnlyTransform):
    """``(image - mean) / std`` per channel on float32 images already scaled to [0, 1].

    Args:
        mean, std: per-channel statistics on the [0, 1] scale (1 or 3 values).
    Shape:
        ``(H, W, C)`` or ``(H, W)`` float32 -> the same shape, float32.
    """

    def __init__(self, mean, std):
        super().__init__(p=1.0)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # the constants of A.Normalize(mean, std, max_pixel_value=1.0), in float32
        self._mean = np.array(self.mean, dtype=np.float32) * 1.0
        self._denominator = np.reciprocal(np.array(self.std, dtype=np.float32) * 1.0)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        mean, denominator = self._mean, self._denominator
        if img.ndim == 2:  # a grey image without its channel axis: one value each
            mean, denominator = mean[0], denominator[0]
        out = np.subtract(img, mean, dtype=np.float32)
        np.multiply(out, denominator, out=out)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mean", "std")
