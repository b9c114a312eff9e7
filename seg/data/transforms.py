"""Image/mask transforms for training and evaluation (albumentations), and normalisation stats.

Design choices:

- One order for every image: adapt the channel count (``to_model_channels``), resize (resize
  mode), scale to float32 [0, 1] by the dtype maximum (255 or 65535, so 8- and 16-bit images
  meet on one scale), then the albumentations pipeline, ending with ``Normalize(mean, std, max_pixel_value=1.0)``
  with the [0, 1]-scale stats of ``channel_stats``. The same stats go into the checkpoint's
  ``preprocess`` so prediction normalises exactly as training did.
- Masks go through albumentations as ``uint8`` {0, 1}; every geometric step uses nearest
  neighbour for masks (``mask_interpolation=cv2.INTER_NEAREST``) and fills borders with 0
  (``fill_mask=0``), so a mask stays exactly binary and aligned with its image.
- The final normalisation is ``seg.data.standardize.Standardize``: ``A.Normalize``'s
  arithmetic, bit for bit, without the two image-sized temporaries that made it a third of a
  512 px training image's transform time (docs/BENCHMARKS.md).
- ``sampling="resize"`` (the original scripts' way): the whole image is resized to ``image_size`` square,
  image with ``cv2.INTER_LINEAR`` on the raw pixels after the channel conversion (``cv2``
  RGB2GRAY), mask nearest, before scaling: exactly what ``seg.inference``'s ``Preprocessor``
  does at prediction, so validation and prediction see the same numbers (INTER_AREA would
  alias less when shrinking a lot, but train/predict equality matters more). ``sampling="patch"``: images are
  kept at native resolution; training pads to at least ``image_size`` (zeros, mask 0) and takes
  a random ``image_size`` crop; evaluation pads the FULL image to the next multiple of 16
  (centred, zeros / mask 0) so the U-Net can run on it. Padded pixels count as true negatives
  in evaluation metrics; in patch mode, image sizes differ between samples, so evaluation
  batches hold one image unless all images share a size.
- Augmentations are label-preserving for medical images (lesions, organs, cells have no
  canonical orientation in dermoscopy/microscopy; ultrasound users may prefer
  ``augment=False``). ``standard``: flips, 90-degree rotations, a small affine (scale 0.9-1.1,
  shift 6%, rotation 15 degrees), brightness/contrast +-0.2 and faint Gaussian noise.
  ``strong``: the same flips, an affine with scale 0.7-1.4 (shrinking and growing equally
  likely: ``balanced_scale``), shift 10%, rotation 30 degrees, applied to 70% of images, and
  the standard intensity steps. A test set whose structures are smaller or larger than the
  training set's is then inside the training distribution. Stronger intensity steps (gamma
  0.7-1.5, brightness/contrast +-0.3, blur) were measured and dropped: without them the
  stardist nuclei tiles scored 0.9265 instead of 0.9227 per-image Dice (docs/BENCHMARKS.md).
- ``foreground_crop`` (patch sampling only): that fraction of training crops is placed to
  contain mask foreground (albumentations' ``CropNonEmptyMaskIfExists``; a uniform crop for an
  image without any), the rest are uniform random crops.
- Randomness: albumentations 2 ``Compose`` owns its random state (global numpy/random seeds
  have no effect). ``SegTransform.reseed(seed)`` resets it; ``augmentation_seed(seed, epoch,
  rank, worker)`` gives the random seed for one DataLoader worker of one rank in one epoch, so the
  augmentation stream is a function of (seed, epoch, rank, worker) and never repeats across
  workers (forked workers would otherwise share one state). ``seg.data.shards`` calls it at the
  start of every worker iterator.
- albumentations (about a second to import: docs/BENCHMARKS.md) is imported on first use, and a ``SegTransform`` builds its
  pipeline on its first call (or ``compose`` access): arguments are checked at construction, but
  the training process hands the transform to its DataLoader workers unbuilt, so the import and
  the build happen in the workers, in parallel with the model build (`seg train` start-up).

- Slices of NIfTI volumes arrive as ``float32``, already normalised per volume
  (``seg.data.volumes.normalize``: clipped z-scores). They skip the dtype scaling, and
  dataset.json gives them mean 0 / std 1, so ``Normalize`` leaves them as they are. Their
  intensity augmentation cannot be albumentations' brightness/contrast and noise, which clip
  float images to [0, 1]: ``ZScoreIntensity`` does the same on the z-score scale (contrast
  x0.8-1.2, shift +-0.2 SD, p=0.5; Gaussian noise of SD 0.05-0.2, p=0.2, about the 1-4% of the
  clipped range that ``GaussNoise`` adds to 2D images). The geometric steps are the same, and
  padding fills 0 (the volume's mean intensity). 2D images never reach this path.

Shape:
    input image ``HxW`` or ``HxWx3`` ``uint8``/``uint16`` (``float32`` for volume slices), mask
    ``bool HxW`` or ``None``;
    output image ``float32 (C, S, S)``, mask ``float32 (1, S, S)`` in {0, 1} or ``None``
    (``S = image_size``; in patch-mode evaluation the padded native size).
"""

from __future__ import annotations

import warnings

import functools

import cv2
import numpy as np
import torch

from seg.data.augment import AUGMENTATIONS, augmentations, volume_augmentations  # noqa: F401 (re-exported)
from seg.data.io import to_float01

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION_MODES = ("dataset", "imagenet", "none")
SAMPLING_MODES = ("resize", "patch")
PAD_MULTIPLE = 16  # the U-Net halves the size 4 times


def _reduce_to_grey(mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """One-channel stats of the pooled channels: mean of means; variance = mean of the channel
    variances + variance of the channel means (law of total variance, equal pixel counts)."""
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    pooled_var = float(np.mean(s ** 2) + np.var(m))
    return [float(m.mean())], [float(np.sqrt(pooled_var))]


def channel_stats(mode: str, dataset_info: dict | None, in_channels: int) -> tuple[list[float], list[float]]:
    """Normalisation mean/std on the [0, 1] scale, one value per model input channel.

    Args:
        mode: 'dataset' (dataset.json ``channels``; ImageNet with a warning when absent),
            'imagenet' or 'none' (mean 0, std 1: scaling to [0, 1] only).
        dataset_info: parsed dataset.json (``{"channels": {"mean": [r, g, b], "std": [...]}}``).
        in_channels: 1 or 3; 3-channel stats are pooled into one for grey models.
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"normalization={mode!r} is not valid; valid options are {', '.join(NORMALIZATION_MODES)}")
    if mode == "imagenet" and (dataset_info or {}).get("kind") == "volumes":
        raise ValueError("data.normalization=imagenet does not apply to NIfTI volume shards: their slices are "
                         "normalised per volume by `seg prepare --modality`; use data.normalization=dataset")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels={in_channels} is not valid; use 1 (grey) or 3 (RGB)")
    if mode == "none":
        return [0.0] * in_channels, [1.0] * in_channels
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if mode == "dataset":
        channels = (dataset_info or {}).get("channels") or {}
        if channels.get("mean") and channels.get("std"):
            mean = [float(v) for v in channels["mean"]]
            std = [float(v) for v in channels["std"]]
            if len(mean) != len(std) or len(mean) not in (1, 3):
                raise ValueError(f"dataset.json channels mean={mean} std={std}: need 1 or 3 values each")
            if min(std) <= 0:
                raise ValueError(f"dataset.json channels std={std} has a value <= 0 (constant images?); "
                                 "use data.normalization=imagenet or none")
        else:
            warnings.warn("dataset.json has no channel mean/std (re-run `seg prepare` to compute them); "
                          "normalising with the ImageNet statistics instead", stacklevel=2)
    if in_channels == 1:
        return _reduce_to_grey(mean, std) if len(mean) == 3 else (mean, std)
    return (mean * 3, std * 3) if len(mean) == 1 else (mean, std)


def to_model_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Adapt an ``HxW``/``HxWx1``/``HxWx3`` image to ``HxWxC`` with C = in_channels.

    Grey is repeated to 3 channels; RGB becomes grey by ``cv2.COLOR_RGB2GRAY`` (BT.601
    luminance 0.299 R + 0.587 G + 0.114 B, rounded for integer images), as prediction does.
    The dtype is kept (uint8, uint16 or float32).
    """
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image of shape {image.shape} is not HxW, HxWx1 or HxWx3")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels={in_channels} is not valid; use 1 (grey) or 3 (RGB)")
    if image.shape[2] == in_channels:
        return image
    if in_channels == 3:
        return np.repeat(image, 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)[..., None]


def augmentation_seed(seed: int, epoch: int = 0, rank: int = 0, worker: int = 0, stream: int = 0) -> int:
    """A 32-bit seed that is a stable function of (seed, epoch, rank, worker).

    ``stream`` separates independent uses by one reader (0: augmentation; ``seg.data.shards``
    uses 1-3 for shard order, resampling and the shuffle buffer), so they are not correlated.
    """
    parts = [int(seed), int(epoch), int(rank), int(worker)] + ([int(stream)] if stream else [])
    if min(parts) < 0:
        raise ValueError(f"seed, epoch, rank, worker and stream must be >= 0, got {parts}")
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


class SegTransform:
    """Callable ``(image, mask) -> (image tensor, mask tensor | None)``; see the module docstring.

    Attributes:
        compose: the albumentations pipeline (float32 [0, 1] image, uint8 {0, 1} mask).
        in_channels: channels of the output image tensor.
        resize_to: side of the square resize done on the raw pixels first (resize mode), or None.
    """

    def __init__(self, compose, in_channels: int, resize_to: int | None = None, seed: int | None = None):
        # compose: an ``A.Compose``, or ``build(seed) -> A.Compose`` called on first use
        lazy = callable(compose) and not hasattr(compose, "set_random_seed")
        self._build, self._compose = (compose, None) if lazy else (None, compose)
        self._seed = seed
        self._float_compose = None  # volume slices' pipeline, built on the first float32 image
        self.in_channels = in_channels
        self.resize_to = resize_to

    @property
    def compose(self):
        """The albumentations pipeline, built (and albumentations imported) on first access."""
        if self._compose is None:
            self._compose = self._build(self._seed)
        return self._compose

    def reseed(self, seed: int) -> None:
        """Reset the augmentation random state (see ``augmentation_seed``)."""
        self._seed = int(seed)  # a pipeline built later starts in the state set_random_seed gives
        for compose in (self._compose, self._float_compose):
            if compose is not None:
                compose.set_random_seed(int(seed))

    def _pipeline(self, dtype) -> "A.Compose":
        if dtype != np.float32:
            return self.compose
        if self._float_compose is None:
            if self._build is None:
                raise TypeError("float32 (volume slice) images need a transform from build_train_transform or "
                                "build_eval_transform")
            self._float_compose = self._build(self._seed, float_images=True)
        return self._float_compose

    def _resize(self, image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        s = self.resize_to
        if s is None or image.shape[:2] == (s, s):
            return image, mask
        resized = cv2.resize(image, (s, s), interpolation=cv2.INTER_LINEAR)
        if resized.ndim == 2:  # cv2 drops a single channel axis
            resized = resized[..., None]
        return resized, None if mask is None else cv2.resize(mask, (s, s), interpolation=cv2.INTER_NEAREST)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if image.dtype not in (np.uint8, np.uint16, np.float32):
            raise TypeError(f"image dtype {image.dtype} is not supported; expected uint8 or uint16 (or float32 "
                            "normalised volume slices)")
        if mask is not None and mask.shape[:2] != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape[:2]} differs from image shape {image.shape[:2]}")
        mask_u8 = None if mask is None else (np.asarray(mask) > 0).astype(np.uint8)
        raw, mask_u8 = self._resize(to_model_channels(image, self.in_channels), mask_u8)
        data = {"image": raw if raw.dtype == np.float32 else to_float01(raw)}
        if mask_u8 is not None:
            data["mask"] = mask_u8
        out = self._pipeline(raw.dtype)(**data)
        img = out["image"]
        if img.ndim == 2:
            img = img[..., None]
        img_t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        if mask is None:
            return img_t, None
        return img_t, torch.from_numpy(np.ascontiguousarray(out["mask"][None], dtype=np.float32))


def _check(image_size: int, mean, std, in_channels: int, sampling: str) -> None:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling={sampling!r} is not valid; valid options are {', '.join(SAMPLING_MODES)}")
    if image_size <= 0 or image_size % PAD_MULTIPLE:
        raise ValueError(f"image_size={image_size} is not valid; it must be a positive multiple of {PAD_MULTIPLE}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean={list(mean)} / std={list(std)} need {in_channels} values (in_channels={in_channels}); "
                         "get them from channel_stats(mode, dataset_info, in_channels)")


def _normalize(mean, std) -> "A.BasicTransform":
    """The last step of every pipeline: ``Normalize``'s arithmetic, faster (``seg.data.standardize``)."""
    from seg.data.standardize import Standardize

    return Standardize(mean, std)


def build_train_transform(image_size: int, mean, std, in_channels: int = 3, sampling: str = "resize",
                          augment: bool = True, seed: int | None = None, augmentation: str = "standard",
                          foreground_crop: float = 0.0) -> SegTransform:
    """Training transform: sizing (resize, or pad + random crop), augmentations, normalisation.

    Args:
        image_size: output side S (multiple of 16).
        mean, std: per-channel stats on the [0, 1] scale (``channel_stats``), in_channels values.
        in_channels: 1 or 3 output channels.
        sampling: 'resize' or 'patch'.
        augment: apply ``augmentations(augmentation)``; off gives the deterministic sizing + normalisation.
        seed: initial augmentation seed (``reseed`` changes it per epoch/rank/worker).
        augmentation: 'standard' or 'strong' (see the module docstring).
        foreground_crop: patch sampling: fraction of crops placed on mask foreground, in [0, 1].
    Shape:
        ``(image HxW[x3], mask HxW | None) -> (float32 (C, S, S), float32 (1, S, S) | None)``
    """
    _check(image_size, mean, std, in_channels, sampling)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} is not valid; valid options are {', '.join(AUGMENTATIONS)}")
    if not 0.0 <= foreground_crop <= 1.0:
        raise ValueError(f"foreground_crop={foreground_crop!r} is not valid; it must be in [0, 1]")
    build = functools.partial(_train_compose, image_size, tuple(mean), tuple(std), sampling, augment,
                              augmentation=augmentation, foreground_crop=foreground_crop)
    return SegTransform(build, in_channels, resize_to=image_size if sampling == "resize" else None, seed=seed)


def _patch_crop(image_size: int, foreground_crop: float) -> "A.BasicTransform":
    import albumentations as A

    uniform = A.RandomCrop(image_size, image_size)
    if foreground_crop <= 0.0:
        return uniform
    on_foreground = A.CropNonEmptyMaskIfExists(image_size, image_size)
    if foreground_crop >= 1.0:
        return on_foreground
    on_foreground.p, uniform.p = foreground_crop, 1.0 - foreground_crop  # OneOf picks by these weights
    return A.OneOf([on_foreground, uniform], p=1.0)


def _train_compose(image_size: int, mean, std, sampling: str, augment: bool, seed: int | None,
                   float_images: bool = False, augmentation: str = "standard",
                   foreground_crop: float = 0.0) -> "A.Compose":
    import albumentations as A

    sizing = [] if sampling == "resize" else [
        A.PadIfNeeded(min_height=image_size, min_width=image_size, position="center",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        _patch_crop(image_size, foreground_crop)]
    augment_steps = (volume_augmentations(augmentation) if float_images else augmentations(augmentation)) if augment else []
    steps = sizing + augment_steps + [_normalize(mean, std)]
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST, seed=seed)


def build_eval_transform(image_size: int, mean, std, in_channels: int = 3, sampling: str = "resize") -> SegTransform:
    """Evaluation/prediction transform: deterministic sizing and normalisation.

    'resize' resizes to ``image_size`` square exactly as training does; 'patch' keeps the
    native resolution and pads the full image (centred) to a multiple of 16.

    Shape:
        ``(image HxW[x3], mask | None) -> (float32 (C, S, S) or (C, H16, W16), mask alike)``
    """
    _check(image_size, mean, std, in_channels, sampling)
    build = functools.partial(_eval_compose, tuple(mean), tuple(std), sampling)
    return SegTransform(build, in_channels, resize_to=image_size if sampling == "resize" else None, seed=0)


def _eval_compose(mean, std, sampling: str, seed: int | None, float_images: bool = False) -> "A.Compose":
    import albumentations as A

    sizing = [] if sampling == "resize" else [
        A.PadIfNeeded(min_height=None, min_width=None, pad_height_divisor=PAD_MULTIPLE,
                      pad_width_divisor=PAD_MULTIPLE, position="center",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)]
    return A.Compose(sizing + [_normalize(mean, std)], mask_interpolation=cv2.INTER_NEAREST, seed=seed)
