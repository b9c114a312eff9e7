"""Quality control of one predicted mask: signals, flags and one ``qc_score`` (numpy/OpenCV only).

Nobody reads a million masks; every predicted mask gets a score that ranks which ones to look
at, computed from what prediction already has: the probability map at the original size, the
threshold, the image, the training set's reference distribution (``seg.data.qc_reference``,
carried in the model checkpoint) and, with ``--tta``, the agreement of the flip predictions.

Signals (the keys of the dict ``ImageQC.__call__`` returns):

- ``entropy``: mean binary entropy ``H(p) = -p log2 p - (1-p) log2(1-p)`` (bits, in [0, 1]) over
  the predicted foreground dilated by a band of ``b = max(1, round(min(H, W) / 64))`` px (the
  foreground and its boundary band on both sides). For an empty prediction the band is taken
  around the pixels with ``p > threshold / 2`` (near misses); 0 when there are none. Entropy
  is read from a 1024-level table of the quantised probabilities (one histogram, no log per pixel).
- ``flip_dice``: with TTA, the mean Dice over the 6 pairs of the 4 flip predictions'
  masks at the network's size (``seg.inference.tta``); ``None`` without TTA.
- ``foreground``: predicted foreground fraction; ``foreground_quantile``: its position in the
  training masks' distribution (midrank on the 101 stored quantiles; 0 below the training
  minimum, 1 above the maximum). ``None`` without a reference.
- ``components``: connected components of the mask (8-connectivity, any size; counted as
  ``seg.data.qc_reference.count_components`` counts the training masks);
  ``components_quantile`` as for the foreground (``None`` without a reference).
- ``content``: the image's intensity spread (largest per-channel standard deviation on the
  [0, 1] scale); ``empty_on_content``: empty mask on an image with ``content > 0.02``.
- ``touches_border``: some foreground pixel lies on the image border.

Score (higher = more likely correct), each factor in [0, 1], monotone in its signal::

    qc_score = (1 - entropy) ** 2
             * flip_dice                                 (1 without TTA)
             * (1 - 0.5 * r_fg) * (1 - 0.3 * r_cc)       (1 without a reference)
             * (1 - 0.8 * empty_on_content)
             * (1 - 0.2 * (1 - border_rate) * touches_border)

where ``r = 1 - min(1, t / 0.1)`` for the two-sided tail ``t = 2 min(q, 1 - q)`` of a quantile
``q`` (0 inside the central 90 % of the training distribution, 1 outside its range), and
``border_rate`` is the share of training masks touching the border (0 without a reference).

Flags (``qc_flags``, in this order): ``uncertain`` (entropy > 0.35), ``flip_disagreement``
(flip_dice < 0.9), ``foreground_atypical`` / ``components_atypical`` (tail < 0.02: outside
the central 98 % of training), ``empty_on_content``, ``touches_border``.

Design choices: one pass of thresholding, one dilation with a square kernel (separable, so its
cost does not grow with the band), one 1024-bin histogram and one contour trace per image; everything on the writer threads, where the map already is (OpenCV releases the GIL).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from seg.data.qc_reference import count_components

LEVELS = 1024  # quantisation of probabilities for the entropy table
_P = np.arange(LEVELS, dtype=np.float64) / (LEVELS - 1)
with np.errstate(divide="ignore", invalid="ignore"):
    ENTROPY_TABLE = np.nan_to_num(-_P * np.log2(_P) - (1 - _P) * np.log2(1 - _P))
CONTENT_MIN = 0.02  # intensity std (on [0, 1]) above which an image is not blank
TAIL = 0.1  # plausibility risk is 0 inside the central 1 - TAIL of training
WEIGHTS = {"foreground": 0.5, "components": 0.3, "empty_on_content": 0.8, "touches_border": 0.2}
FLAG_ENTROPY = 0.35
FLAG_FLIP_DICE = 0.9
FLAG_TAIL = 0.02
FLAGS = ("uncertain", "flip_disagreement", "foreground_atypical", "components_atypical",
         "empty_on_content", "touches_border")


def band_width(shape: tuple[int, int]) -> int:
    """The boundary band in pixels for an image of ``shape = (H, W)``."""
    return max(1, round(min(shape[:2]) / 64))


def band_entropy(prob: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    """Mean binary entropy (bits) over the mask dilated by ``band_width`` (see module docstring).

    Shape:
        prob ``(H, W)`` float, mask ``(H, W)`` bool.
    """
    seed = mask if mask.any() else prob > threshold / 2
    if not seed.any():
        return 0.0
    b = band_width(prob.shape)
    region = cv2.dilate(np.ascontiguousarray(seed).view(np.uint8), cv2.getStructuringElement(cv2.MORPH_RECT, (2 * b + 1, 2 * b + 1)))
    q = (np.clip(prob[region.view(bool)], 0, 1) * (LEVELS - 1) + 0.5).astype(np.int32)
    hist = np.bincount(q, minlength=LEVELS)
    return float(hist @ ENTROPY_TABLE / max(hist.sum(), 1))


def intensity_spread(image: np.ndarray) -> float:
    """Largest per-channel standard deviation of an image on the [0, 1] scale (dtype maximum)."""
    image = np.asarray(image)
    if image.size == 0:
        return 0.0
    scale = float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else 1.0
    if image.dtype not in (np.uint8, np.uint16, np.float32):
        image = image.astype(np.float32)
    _, std = cv2.meanStdDev(np.ascontiguousarray(image))
    return float(std.max()) / scale


def quantile_of(value: float, quantiles) -> float:
    """Position of ``value`` in a distribution given by increasing quantiles at equal levels.

    Linear between quantiles; a value equal to several (a discrete distribution) gets the
    middle of their levels (midrank); 0 below the first, 1 above the last.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    n = len(q)
    if n == 0:
        return 0.5
    if n == 1:
        return 0.5 if value == q[0] else float(value > q[0])
    if value < q[0]:
        return 0.0
    if value > q[-1]:
        return 1.0
    lo, hi = int(np.searchsorted(q, value, "left")), int(np.searchsorted(q, value, "right"))
    if hi > lo:  # ties with stored quantiles
        return (lo + hi - 1) / 2 / (n - 1)
    i = lo - 1
    return (i + (value - q[i]) / (q[lo] - q[i])) / (n - 1)


def tail(q: float) -> float:
    """Two-sided tail probability of a quantile: 1 at the median, 0 outside the range."""
    return 2.0 * min(q, 1.0 - q)


def tail_risk(q: float | None) -> float:
    """0 inside the central ``1 - TAIL`` of the distribution, rising linearly to 1 at its ends."""
    return 0.0 if q is None else 1.0 - min(1.0, tail(q) / TAIL)


def qc_score(s: dict, border_rate: float = 0.0) -> float:
    """The combined score of a signal dict (module docstring formula). Always in [0, 1]."""
    score = (1.0 - s["entropy"]) ** 2
    if s.get("flip_dice") is not None:
        score *= s["flip_dice"]
    score *= 1.0 - WEIGHTS["foreground"] * tail_risk(s.get("foreground_quantile"))
    score *= 1.0 - WEIGHTS["components"] * tail_risk(s.get("components_quantile"))
    score *= 1.0 - WEIGHTS["empty_on_content"] * bool(s["empty_on_content"])
    score *= 1.0 - WEIGHTS["touches_border"] * (1.0 - border_rate) * bool(s["touches_border"])
    return min(1.0, max(0.0, score))


def qc_flags(s: dict) -> list[str]:
    """The rules that fired for a signal dict, in ``FLAGS`` order."""
    fired = {
        "uncertain": s["entropy"] > FLAG_ENTROPY,
        "flip_disagreement": s.get("flip_dice") is not None and s["flip_dice"] < FLAG_FLIP_DICE,
        "foreground_atypical": s.get("foreground_quantile") is not None and tail(s["foreground_quantile"]) < FLAG_TAIL,
        "components_atypical": s.get("components_quantile") is not None and tail(s["components_quantile"]) < FLAG_TAIL,
        "empty_on_content": bool(s["empty_on_content"]),
        "touches_border": bool(s["touches_border"]),
    }
    return [name for name in FLAGS if fired[name]]


class ImageQC:
    """Computes the QC record of one image (callable from several threads at once).

    Args:
        threshold: the probability threshold of the masks.
        reference: the training reference (``seg.data.qc_reference``), or None: the
            plausibility signals are then ``None`` and drop out of the score.
    """

    def __init__(self, threshold: float, reference: dict | None = None):
        self.threshold = float(threshold)
        self.reference = reference if reference and reference.get("count") else None
        self.border_rate = float(self.reference.get("border_touch_rate", 0.0)) if self.reference else 0.0

    def signals(self, prob: np.ndarray, image: np.ndarray | None = None, flip_dice: float | None = None,
                mask: np.ndarray | None = None) -> dict:
        """The signal dict (module docstring) without score and flags.

        Shape:
            prob ``(H, W)`` float32 at the original size; image any ``(h, w[, c])`` view of the
            input (original or prepared pixels); mask ``(H, W)`` bool = ``prob > threshold``.
        """
        mask = prob > self.threshold if mask is None else mask
        area = int(np.count_nonzero(mask))
        fg = area / mask.size if mask.size else 0.0
        components = count_components(mask) if area else 0
        border = bool(area) and bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        content = intensity_spread(image) if image is not None else None
        s = {"entropy": round(band_entropy(prob, mask, self.threshold), 4),
             "flip_dice": None if flip_dice is None or math.isnan(flip_dice) else round(float(flip_dice), 4),
             "foreground": round(fg, 6), "foreground_quantile": None, "components": components,
             "components_quantile": None, "content": None if content is None else round(content, 4),
             "empty_on_content": area == 0 and content is not None and content > CONTENT_MIN,
             "touches_border": border}
        if self.reference:
            s["foreground_quantile"] = round(quantile_of(fg, self.reference["foreground_fraction"]), 4)
            s["components_quantile"] = round(quantile_of(components, self.reference["components"]), 4)
        return s

    def __call__(self, prob: np.ndarray, image: np.ndarray | None = None, flip_dice: float | None = None,
                 mask: np.ndarray | None = None) -> dict:
        """``{"score", "flags", **signals}`` for one image (see ``signals`` for shapes)."""
        s = self.signals(prob, image, flip_dice, mask)
        return {"score": round(qc_score(s, self.border_rate), 4), "flags": qc_flags(s), **s}
