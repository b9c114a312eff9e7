"""The in-memory prediction engine: a model checkpoint in, probability maps out.

``Predictor`` is usable without the CLI (``seg evaluate`` calls it)::

    p = Predictor("runs/x/best_model.pth", device="cpu", batch_size=8)   # InferenceConfig fields
    probs = p.predict_probabilities([image1, image2])   # float32 HxW in [0, 1], original sizes
    masks = [prob > p.threshold for prob in probs]

Design choices:

- Preprocessing comes from the checkpoint (``ckpt["preprocess"]``), never guessed: channel
  conversion (grey repeated to 3 channels, RGB to grey for 1-channel models), the training
  size, and mean/std on images scaled to [0, 1] by their dtype maximum (255 or 65535).
  The arithmetic is that of ``seg.data.transforms.build_eval_transform`` (a test checks they
  agree) without importing albumentations, which would add seconds to every start-up
  (docs/BENCHMARKS.md, "Measurements behind design choices").
- Two modes, chosen by the checkpoint's ``sampling`` and ``tile_size``:
  ``resize`` (the training default): each image is resized to ``image_size`` exactly as
  training did (bilinear, on the raw pixels), predicted, and the *probabilities* resized back
  to the original size bilinearly; thresholding happens after, on the full-size map (thresholding first and resizing the
  mask with nearest neighbour loses boundary accuracy).
  ``tile`` (``sampling='patch'`` or an explicit ``tile_size``): images are predicted at native
  resolution by overlapping Gaussian-weighted tiles (``seg.inference.tiling``); memory is
  bounded by tile x batch, not image size.
- The work is split in three steps so the cohort pipeline can run them in different places:
  ``prepare`` (channels and resize, numpy, in DataLoader worker processes; pixels stay
  uint8/uint16, 4x less to move than float32), ``forward_raw`` (scaling, mean/std and the
  model, on the device, in the main process) and ``restore`` (resize back; in writer threads,
  OpenCV releases the GIL).
- Forward: ``torch.inference_mode``, ``channels_last``, BatchNorm folded into the preceding
  convolutions (``fold_batchnorm``), and autocast, with the convolution weights stored in the
  autocast dtype (``cast_for_autocast``: no per-call weight casts, the same arithmetic). The precision
  comes from ``seg.precision`` (one vocabulary and 'auto' rule with training). Outputs are
  always float32 probabilities.
- ``tta=True`` averages the probabilities of the image and its horizontal, vertical and double
  flips (4 forwards per image), and records the flips' agreement for QC (``seg.inference.tta``;
  read with ``pop_flip_dice``).
- torch is imported here, not by the CLI entry, so ``seg predict --help`` stays fast.
- Checkpoints trained on NIfTI volume slices carry ``preprocess["volume"]`` (slice axis,
  normalisation); the ``Preprocessor`` carries it to the decoding processes
  (``seg.inference.volumes``), whose slices arrive as normalised float32, scale 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from seg.checkpoint import file_sha256, load_checkpoint
from seg.config.inference import InferenceConfig
from seg.model import build_model
from seg.inference.tiling import predict_tiled
from seg.inference.tta import flip_average
from seg.postprocess import PostProcess
from seg.precision import autocast_dtype, resolve_precision


def model_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Convert an image to the model's channel count (grey repeated to RGB, RGB to grey).

    Shape:
        image ``(H, W)`` or ``(H, W, 3)`` -> ``(H, W)`` if ``in_channels == 1`` else ``(H, W, 3)``.
    """
    if in_channels == 1:
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is this rank's CUDA device when CUDA is available (LOCAL_RANK), else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        from seg.dist import read_dist_env

        return torch.device("cuda", read_dist_env().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution.

    conv -> BN becomes one conv with a bias (BN replaced by ``Identity``): the same function in
    eval mode (to ~1e-7), one memory pass less per layer, which is most of a small model's time
    on a CPU. The model is changed in place and returned.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in model.modules():
        if isinstance(module, torch.nn.Sequential):
            layers = list(module)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], torch.nn.Conv2d) and isinstance(layers[i + 1], torch.nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(layers[i], layers[i + 1])
                    module[i + 1] = torch.nn.Identity()
    return model


LOW_PRECISION_LAYERS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)


def cast_for_autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Store the weights of the layers autocast runs in ``dtype`` (convolutions, linear) in that
    dtype, once, instead of autocast casting them at every call (in inference mode it caches
    nothing). The same arithmetic: autocast casts inputs, weights and bias of these layers to
    ``dtype`` anyway; other layers keep float32. The model is changed in place and returned.
    """
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, LOW_PRECISION_LAYERS):
                module.to(dtype)
    return model


def build_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The checkpoint's model in eval mode, built on the meta device and given the checkpoint's
    tensors (``assign=True``): no random initialisation of weights that are overwritten anyway
    (about a second of start-up for the 31M model on a CPU: docs/BENCHMARKS.md)."""
    with torch.device("meta"):
        model = build_model(**ckpt["model"])
    model.load_state_dict(ckpt["state_dict"], assign=True)
    return model.eval()


def weights_sha256(state_dict: dict) -> str:
    """SHA-256 of a state dict's names and tensor bytes (for checkpoints given as dicts)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Preprocessor:
    """The CPU half of prediction, small and picklable so DataLoader workers can run it.

    Args:
        mode: 'resize' or 'tile'.
        image_size: the training size (resize mode).
        in_channels: 1 or 3.
        mean, std: per-channel statistics on the [0, 1] scale.
    """

    def __init__(self, mode: str, image_size: int, in_channels: int, mean, std, volume: dict | None = None):
        self.mode, self.image_size, self.in_channels = mode, int(image_size), int(in_channels)
        self.volume = volume  # checkpoint preprocess["volume"]: slice axis and normalisation, or None
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.asarray(std, np.float32).reshape(-1)
        if self.mean.size != self.in_channels or self.std.size != self.in_channels:
            raise ValueError(f"checkpoint preprocess mean/std have {self.mean.size}/{self.std.size} values "
                             f"for in_channels={self.in_channels}; the checkpoint is inconsistent")

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The CPU part of prediction for one decoded image: channels, and size in resize mode.

        Pixels stay in their raw dtype (4x smaller than float32 to move between processes);
        ``Predictor.normalise`` scales them on the device.

        Shape:
            ``(H, W)`` or ``(H, W, 3)`` -> ``(S, S[, 3])`` in resize mode (S = image_size),
            ``(H, W[, 3])`` in tile mode; ``[, 3]`` when the model has 3 input channels.
        """
        image = model_channels(image, self.in_channels)
        s = self.image_size
        if self.mode == "resize" and image.shape[:2] != (s, s):
            image = cv2.resize(image, (s, s), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(image)


class Predictor:
    """A model ready to predict probabilities, with its checkpoint's preprocessing.

    Args:
        checkpoint: a model checkpoint path (``*_model.pth``) or an already loaded checkpoint dict.
        options: how to run it (``seg.config.InferenceConfig``: device, precision, batch_size,
            tta, tile_size, tile_overlap, threshold; ``model_path`` is ignored here).
        **overrides: fields of ``options`` to replace, e.g. ``Predictor(path, device="cpu")``.

    Attributes:
        options, threshold, postprocess (``seg.postprocess.PostProcess``, applied to masks by the
        callers: writers, evaluation), mask_settings (both, with TTA and tiling), sha256 (of the
        checkpoint file, or of the weights for a dict), preprocess, mode ('resize' | 'tile'),
        tile_size, device, precision ('bf16', 'fp16', 'fp32'), autocast_dtype.
    """

    def __init__(self, checkpoint: str | Path | dict, options: InferenceConfig | None = None, **overrides):
        options = replace(options or InferenceConfig(), **overrides)
        self.options = options
        if isinstance(checkpoint, dict):
            ckpt, self.sha256 = checkpoint, weights_sha256(checkpoint["state_dict"])
            self.path = None
        else:
            ckpt, self.sha256, self.path = load_checkpoint(checkpoint), file_sha256(checkpoint), Path(checkpoint)
        self.checkpoint = ckpt
        self.preprocess = dict(ckpt["preprocess"])
        self.image_size = int(self.preprocess["image_size"])
        self.in_channels = int(self.preprocess.get("in_channels", ckpt["model"]["in_channels"]))
        sampling = self.preprocess.get("sampling", "resize")
        self.mode = "tile" if options.tile_size is not None or sampling == "patch" else "resize"
        self.tile_size = int(options.tile_size or self.image_size)
        self.tile_overlap = float(options.tile_overlap)
        self.threshold = float(ckpt.get("threshold", 0.5) if options.threshold is None else options.threshold)
        # the mask post-processing chosen on validation (seg evaluate --tune_postprocessing)
        self.postprocess = (PostProcess.from_dict(ckpt.get("postprocess")) if options.postprocess == "checkpoint"
                            else PostProcess())
        self.batch_size, self.tta = int(options.batch_size), bool(options.tta)
        self.preprocessor = Preprocessor(self.mode, self.image_size, self.in_channels,
                                         self.preprocess["mean"], self.preprocess["std"], self.preprocess.get("volume"))
        self.device = resolve_device(options.device)
        self.precision = resolve_precision(options.precision, self.device.type)
        self.autocast_dtype = autocast_dtype(self.precision)
        self._mean = torch.as_tensor(self.preprocessor.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.as_tensor(self.preprocessor.std, device=self.device).view(1, -1, 1, 1)
        model = cast_for_autocast(fold_batchnorm(build_from_checkpoint(ckpt)).to(self.device), self.autocast_dtype)
        self.model = model.to(memory_format=torch.channels_last).eval()
        self._flip_dice: list[np.ndarray] = []

    @property
    def mask_settings(self) -> dict:
        """What decides a mask besides the weights: threshold, post-processing, TTA and tiling
        (recorded per unit in the manifest; a folder never mixes two of them)."""
        settings = {"threshold": self.threshold, "postprocess": self.postprocess.to_dict(), "tta": self.tta,
                    "mode": self.mode}
        if self.mode == "tile":
            settings.update(tile_size=self.tile_size, tile_overlap=self.tile_overlap)
        return settings

    def pop_flip_dice(self) -> np.ndarray | None:
        """Flip agreement (``seg.inference.tta``) of every network input forwarded since the last
        call, in order, and forget it; None without TTA. Shape: ``(N,)`` float32."""
        if not self.tta:
            return None
        values, self._flip_dice = self._flip_dice, []
        return np.concatenate(values) if values else np.zeros(0, np.float32)

    # ---- CPU side: delegated to the picklable Preprocessor (DataLoader workers use it) --------
    def prepare(self, image: np.ndarray) -> np.ndarray:
        """See ``Preprocessor.prepare``."""
        return self.preprocessor.prepare(image)

    @staticmethod
    def restore(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Resize a probability map back to ``size = (H, W)`` bilinearly. Shape: ``(h, w) -> (H, W)``."""
        h, w = size
        if prob.shape == (h, w):
            return prob
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)

    # ---- model side -------------------------------------------------------------------------
    def normalise(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Prepared raw pixels -> the network input on the device: scaled to [0, 1] by the dtype
        maximum (255 or 65535; float32 volume slices, already normalised per volume, by 1), then
        the checkpoint's mean/std. The one normalisation of prediction, in place on the one float
        copy (half the memory passes of ``(x / scale - mean) / std``, the same values).

        ``channels_last`` comes free: the NHWC pixels permuted to NCHW are channels-last.

        Shape:
            ``(N, H, W)`` or ``(N, H, W, C)`` uint8/uint16/float32 -> ``(N, C, H, W)`` float32.
        """
        x = torch.as_tensor(raw)
        scale = {torch.uint8: 255.0, torch.uint16: 65535.0, torch.float32: 1.0}.get(x.dtype)
        if scale is None:
            raise TypeError(f"expected uint8 or uint16 pixels (float32 volume slices), got {x.dtype}")
        x = x.to(self.device, non_blocking=True)
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = x.float() if x.dtype != torch.float32 else x.clone()  # never change the caller's tensor
        return x.div_(scale).sub_(self._mean).div_(self._std)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model(x)
        return logits.float().sigmoid()[:, 0]

    def _device_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities of one batch of network inputs, left on the device: ``(n, h, w)``.

        With TTA, the mean of the flips; their agreement is kept for ``pop_flip_dice`` (QC).
        """
        x = x.contiguous(memory_format=torch.channels_last)  # no copy when already so
        if not self.tta:
            return self._probabilities(x)
        prob, agreement = flip_average(self._probabilities, x, self.threshold)
        self._flip_dice.append(agreement.cpu().numpy())
        return prob

    def forward_device(self, raw: torch.Tensor) -> torch.Tensor:
        """Like ``forward_raw`` for pixels already on the device, leaving the probabilities there
        (``seg.inference.device``: resizing and thresholding on the GPU).

        Shape:
            ``(N, H, W)`` or ``(N, H, W, C)`` on ``self.device`` -> ``(N, H, W)`` float32.
        """
        with torch.inference_mode():
            out = [self._device_probabilities(self.normalise(raw[i:i + self.batch_size]))
                   for i in range(0, raw.shape[0], self.batch_size)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def forward_raw(self, raw: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probabilities for a batch of prepared raw images (``normalise``, then the model).

        Shape:
            ``(N, H, W)`` or ``(N, H, W, C)`` uint8/uint16 (float32 volume slices; one dtype)
            -> ``(N, H, W)`` float32.
        """
        x = torch.as_tensor(raw)
        with torch.inference_mode():
            out = [self._device_probabilities(self.normalise(x[i:i + self.batch_size])).cpu().numpy()
                   for i in range(0, x.shape[0], self.batch_size)]
        if len(out) == 1:
            return out[0]
        return np.concatenate(out) if out else np.zeros((0,) + tuple(x.shape[1:3]), np.float32)

    def forward(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probabilities for a batch of network inputs (split into ``batch_size`` chunks).

        Shape:
            ``(N, C, H, W)`` float32 -> ``(N, H, W)`` float32 in [0, 1].
        """
        x_all = torch.as_tensor(batch)
        with torch.inference_mode():
            out = [self._device_probabilities(x_all[i:i + self.batch_size].to(self.device, non_blocking=True))
                   .cpu().numpy() for i in range(0, x_all.shape[0], self.batch_size)]
        if len(out) == 1:
            return out[0]
        return np.concatenate(out) if out else np.zeros((0,) + tuple(x_all.shape[-2:]), np.float32)

    def predict_tiled(self, prepared: np.ndarray) -> np.ndarray:
        """Tile-mode probabilities of one prepared image. Shape: ``(H, W[, C]) -> (H, W)``."""
        return predict_tiled(prepared, self.forward_raw, self.tile_size, self.tile_overlap, self.batch_size)

    def predict_probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Probability maps of decoded images at their original sizes.

        Args:
            images: arrays as ``seg.data.io.read_image`` returns them (``HxW`` or ``HxWx3``,
                uint8 or uint16); sizes may differ.

        Shape:
            returns one ``(H, W)`` float32 array in [0, 1] per image, in order.
        """
        if self.mode == "tile":
            return [self.predict_tiled(self.prepare(image)) for image in images]
        results = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            prepared = [self.prepare(image) for image in chunk]
            if len({p.dtype for p in prepared}) > 1:  # 8- and 16-bit mixed: scale each on its own
                probs = np.concatenate([self.forward_raw(p[None]) for p in prepared])
            else:
                probs = self.forward_raw(np.stack(prepared))
            results += [self.restore(p, image.shape[:2]) for p, image in zip(probs, chunk)]
        return results

    def describe(self) -> str:
        """One line for logs: mode, size, precision, device, checkpoint hash."""
        size = (f"tiles {self.tile_size}px overlap {self.tile_overlap}" if self.mode == "tile"
                else f"resize to {self.image_size}px")
        return (f"{size}, {self.precision} on {self.device}, batch {self.batch_size}, tta={self.tta}, "
                f"threshold {self.threshold}, "
                + ("" if self.postprocess.is_identity else f"post-processing {self.postprocess.describe()}, ")
                + f"model sha256 {self.sha256[:12]}")
