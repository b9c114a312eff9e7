"""Synthetic NIfTI volumes for tests: anisotropic spacing, non-identity affines, int16/float32.

``OBLIQUE_AFFINE`` stores the axes permuted and flipped (storage order "PIL"-like, not RAS), so
every test that writes a mask back checks the input's orientation, not the canonical one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# storage axis 0 -> world -z (2.5 mm), axis 1 -> world +x (0.8 mm), axis 2 -> world -y (1.2 mm)
OBLIQUE_AFFINE = np.array([[0.0, 0.8, 0.0, -12.0],
                           [0.0, 0.0, -1.2, 30.0],
                           [-2.5, 0.0, 0.0, 40.0],
                           [0.0, 0.0, 0.0, 1.0]])
RAS_AFFINE = np.diag([0.9, 1.1, 2.0, 1.0])


def save_nifti(path: Path, data: np.ndarray, affine=OBLIQUE_AFFINE, qform_code: int = 1, sform_code: int = 2) -> Path:
    """Write ``data`` as NIfTI-1 (``.nii`` or ``.nii.gz`` by name) with the given affine and codes."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.asarray(affine, np.float64))
    img.header.set_qform(affine, qform_code)
    img.header.set_sform(affine, sform_code)
    nib.save(img, str(path))
    return path


def ball_volume(shape=(12, 40, 36), centre=None, radius=None, dtype=np.int16, seed: int = 0):
    """An image with a bright ellipsoid in noise and its label (uint8 0/1), in storage order.

    Returns:
        (image array of ``dtype``, label uint8 array); the ellipsoid has the given radius in voxels.
    """
    rng = np.random.default_rng(seed)
    centre = np.array(centre if centre is not None else [s / 2 for s in shape], np.float64)
    radius = np.array(radius if radius is not None else [s / 3.5 for s in shape], np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    inside = (((grid - centre) / radius) ** 2).sum(-1) <= 1.0
    image = 300.0 + 40.0 * rng.standard_normal(shape) + 500.0 * inside
    image[:, :2] = 0.0  # a band of background zeros, as MRI volumes have
    return image.astype(dtype), inside.astype(np.uint8)
