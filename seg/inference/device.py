"""Prediction batches on the device: pinned transfers, one batch in flight, masks made on the GPU.

``BatchForward`` is what the cohort runner calls: ``launch(raw, sizes)`` starts a batch and
returns at once where the device allows it; ``Launched.result()`` waits for it and gives the
writer threads what they need.

Design choices:

- CPU (and any non-CUDA device): ``launch`` runs ``Predictor.forward_raw`` at once and returns
  its probabilities at the network's size; the writer threads resize them back and threshold,
  as ever (the model has the cores; OpenCV in the writers releases the GIL).
- CUDA, where a U-Net forward of a 256 px batch takes milliseconds and the host decides the pace:
  - the batch's raw ``uint8``/``uint16`` pixels (4x fewer bytes than float32) are pinned (a batch
    that is one whole DataLoader chunk comes pinned by the loader's pin thread) and copied on a
    side stream with ``non_blocking=True``: the copy of batch k+1 overlaps the compute of batch k;
  - scaling, mean/std, the model, the sigmoid, the bilinear resize of the probabilities back to
    each image's size and the threshold all run on the device (``postprocess``). Only ``uint8``
    0/255 masks (a quarter of float32 probabilities), their exact foreground pixel counts and,
    with ``--save_probability``, ``uint16`` maps come back, one ``non_blocking`` copy into
    pinned memory per batch, followed by an event;
  - ``launch`` returns before the GPU is done: the runner collects batch k after it has
    launched k+1, so stacking, encoding and writing on the host overlap the device's work.
- The device resize is ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``:
  half-pixel centres, two taps, no antialiasing, the sampling of ``cv2.INTER_LINEAR`` that the
  CPU path uses; the two agree to ~2e-6 (a test compares them), so a mask can differ only where
  a probability lies that close to the threshold. Foreground fractions are counts divided on
  the host in float64, exactly as the CPU path computes them.
- Fixed shapes (resize mode: every batch has the training size): cuDNN autotuning
  (``torch.backends.cudnn.benchmark``) is turned on for CUDA. ``compile`` (off by default)
  wraps the model in ``torch.compile`` with a static shape; the last, smaller batch is padded
  to the batch size so that no second graph is built (``mode='reduce-overhead'`` adds CUDA
  graphs). It is an option because it pays only over long cohorts: compilation takes tens of
  seconds; on CPU it is not applied (prediction there is bound by oneDNN convolutions).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from seg.config.fields import choices, field_types
from seg.config.inference import PredictConfig

COMPILE_MODES = choices(field_types(PredictConfig)["compile"])  # the allowed values, from the config


class BatchOutput(NamedTuple):
    """What a batch gives the writers: probabilities at the network size (CPU path), or masks at
    the original sizes with their foreground counts (and ``uint16`` maps) made on the device."""
    probs: np.ndarray | None = None
    masks: list[np.ndarray] | None = None
    counts: list[int] | None = None
    prob16: list[np.ndarray] | None = None


def postprocess(probs: torch.Tensor, sizes: Sequence[tuple[int, int]], threshold: float, probability: bool = False):
    """Resize probabilities back to each image's size, threshold and count, on ``probs``' device.

    Images of one size are resized together (one ``interpolate`` call per distinct size).

    Args:
        probs: ``(N, h, w)`` float32 probabilities at the network's size.
        sizes: original ``(H, W)`` per image.
        threshold: foreground where ``p > threshold``.
        probability: also return ``round(p * 65535)`` maps as ``uint16``.

    Returns:
        ``(masks, counts, prob16)``: per image a ``uint8 (H, W)`` 0/255 tensor, an ``int64 (N,)``
        tensor of foreground pixel counts, and per image a ``uint16 (H, W)`` tensor or None.
    """
    n = probs.shape[0]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault((int(size[0]), int(size[1])), []).append(i)
    masks: list = [None] * n
    prob16: list | None = [None] * n if probability else None
    counts = torch.empty(n, dtype=torch.int64, device=probs.device)
    for size, index in groups.items():
        p = probs if len(index) == n else probs[torch.as_tensor(index, device=probs.device)]
        if tuple(p.shape[-2:]) != size:
            p = F.interpolate(p[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        above = p > threshold
        counts[torch.as_tensor(index, device=probs.device)] = above.flatten(1).sum(1)
        m = above.to(torch.uint8).mul_(255)
        q = p.clamp(0, 1).mul(65535).round_().to(torch.int32).to(torch.uint16) if probability else None
        for j, i in enumerate(index):
            masks[i] = m[j]
            if q is not None:
                prob16[i] = q[j]
    return masks, counts, prob16


def _to_host(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, tuple]]]:
    """Start one non_blocking copy of several same-dtype device tensors into pinned host memory.
    Returns the host buffer and ``(offset, shape)`` per tensor (valid once the copy is done)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=flat.is_cuda)
    host.copy_(flat, non_blocking=True)
    layout, offset = [], 0
    for t in tensors:
        layout.append((offset, tuple(t.shape)))
        offset += t.numel()
    return host, layout


def _split(host: torch.Tensor, layout) -> list[np.ndarray]:
    flat = host.numpy()  # the arrays keep the pinned tensor alive
    return [flat[o:o + int(np.prod(shape))].reshape(shape) for o, shape in layout]


class Ready:
    """A batch computed synchronously (CPU path)."""

    def __init__(self, output: BatchOutput):
        self.output = output

    def result(self) -> BatchOutput:
        return self.output


class Launched:
    """A batch queued on a CUDA device; ``result()`` waits for its copies back."""

    def __init__(self, event, masks, counts, prob16, n: int):
        self.event, self._masks, self._counts, self._prob16, self.n = event, masks, counts, prob16, n

    def result(self) -> BatchOutput:
        self.event.synchronize()
        masks = _split(*self._masks)
        counts = self._counts.numpy()[: self.n].tolist()
        prob16 = _split(*self._prob16) if self._prob16 is not None else None
        return BatchOutput(masks=masks, counts=counts, prob16=prob16)


class BatchForward:
    """Launches prediction batches of a ``Predictor`` (see the module docstring).

    Args:
        predictor: the engine (its ``model`` is looked up at every launch).
        probability: the writers need ``uint16`` probability maps (``--save_probability``).
        compile: 'off' or a ``torch.compile`` mode (CUDA, resize mode only).
        device_post: resize back and threshold on the device; default: on for CUDA.
    """

    def __init__(self, predictor, probability: bool = False, compile: str = "off", device_post: bool | None = None):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r} is not valid; allowed values are {', '.join(COMPILE_MODES)}")
        self.p, self.probability = predictor, probability
        cuda = predictor.device.type == "cuda"
        self.device_post = cuda if device_post is None else bool(device_post)
        self.pad_to = None
        if cuda and predictor.mode == "resize":
            torch.backends.cudnn.benchmark = True  # one input shape: autotune the convolutions once
        if compile != "off":
            if not cuda or predictor.mode != "resize":
                warnings.warn(f"compile={compile!r} applies to CUDA in resize mode only; running eagerly "
                              f"on {predictor.device} ({predictor.mode} mode)", stacklevel=2)
            else:
                self.compile_model(compile)
        self.copy_stream = torch.cuda.Stream(predictor.device) if cuda else None

    def compile_model(self, mode: str, backend: str = "inductor") -> None:
        """Compile the predictor's model for its fixed batch shape (static: ``dynamic=False``);
        batches are padded to ``batch_size`` from now on. ``backend`` is for tests."""
        options = {"backend": backend, "dynamic": False}
        if backend == "inductor":
            options["mode"] = None if mode == "default" else mode
        self.p.model = torch.compile(self.p.model, **options)
        self.pad_to = self.p.batch_size

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_to is None or x.shape[0] >= self.pad_to:
            return x
        return torch.cat([x, x.new_zeros((self.pad_to - x.shape[0],) + tuple(x.shape[1:]))])

    def launch(self, raw: torch.Tensor, sizes: Sequence[tuple[int, int]]):
        """Start predicting a batch of prepared raw pixels (``(N, S, S[, C])`` uint8/uint16).

        Returns an object whose ``result()`` is the batch's ``BatchOutput`` (first ``N`` images).
        """
        n = raw.shape[0]
        if not self.device_post:
            probs = self.p.forward_raw(self._pad(raw))
            return Ready(BatchOutput(probs=probs[:n] if probs.shape[0] != n else probs))
        p = self.p
        raw = self._pad(raw)
        with torch.inference_mode():
            if p.device.type == "cuda" and raw.is_cuda:  # already on the device (benchmarks)
                x = raw
            elif p.device.type == "cuda":
                if not raw.is_pinned():
                    raw = raw.pin_memory()
                with torch.cuda.stream(self.copy_stream):
                    x = raw.to(p.device, non_blocking=True)
                torch.cuda.current_stream(p.device).wait_stream(self.copy_stream)
                x.record_stream(torch.cuda.current_stream(p.device))
            else:  # device_post on the CPU: only for tests of the device path
                x = raw
            probs = p.forward_device(x)[:n]
            masks, counts, prob16 = postprocess(probs, sizes, p.threshold, self.probability)
            masks_host = _to_host(masks)
            prob_host = _to_host(prob16) if prob16 is not None else None
            counts_host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=counts.is_cuda)
            counts_host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event() if p.device.type == "cuda" else None
            if event is not None:
                event.record()
        if event is None:
            return _CpuLaunched(masks_host, counts_host, prob_host, n)
        return Launched(event, masks_host, counts_host, prob_host, n)


class _CpuLaunched(Launched):
    """The device path run on the CPU (tests): nothing to wait for."""

    def __init__(self, masks, counts, prob16, n: int):
        super().__init__(None, masks, counts, prob16, n)

    def result(self) -> BatchOutput:
        masks = _split(*self._masks)
        prob16 = _split(*self._prob16) if self._prob16 is not None else None
        return BatchOutput(masks=masks, counts=self._counts.numpy()[: self.n].tolist(), prob16=prob16)
