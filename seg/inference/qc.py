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
  is read from a 256-level table of the quantised probabilities (``cv2.LUT``, no log per pixel).
- ``flip_dice``: with TTA, the mean Dice over the 6 pairs of the 4 flip predictions'
  masks at the network's size (``seg.inference.tta``); ``None`` without TTA.
- ``foreground``: predicted foreground fraction; ``foreground_quantile``: its position in the
  training masks' distribution (midrank on the 101 stored quantiles; 0 below the training
  minimum, 1 above the maximum). ``None`` without a reference.
- ``components``: connected components of the mask (8-connectivity, any size; counted as
  ``seg.data.qc_reference.count_components`` counts the training masks);
  ``components_quantile`` as for the foreground (``None`` without a reference).
- ``content``: the image's intensity spread (largest per-channel standard deviation on the
  [0, 1] scale), measured only where the mask is empty (the one place it matters; ``None``
  elsewhere); ``empty_on_content``: empty mask on an image with ``content > 0.02``.
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

Design choices: a handful of OpenCV calls per image (threshold, one dilation with a square
kernel, which is separable so its cost does not grow with the band, a table look-up, a masked
mean, one contour trace, ``meanStdDev``) and plain-Python arithmetic on scalars (``bisect`` for
the quantiles): per-call overhead, not pixels, is the cost of small images, and QC must stay
within a few percent of prediction throughput (docs/BENCHMARKS.md). It runs on the writer
threads, where the map already is (OpenCV releases the GIL).
"""

from __future__ import annotations

import bisect
import math

import cv2
import numpy as np

from seg.data.qc_reference import count_components

LEVELS = 256  # quantisation of probabilities for the entropy table (uint8, for cv2.LUT)
_P = np.arange(LEVELS, dtype=np.float64) / (LEVELS - 1)
with np.errstate(divide="ignore", invalid="ignore"):
    ENTROPY_TABLE = np.nan_to_num(-_P * np.log2(_P) - (1 - _P) * np.log2(1 - _P)).astype(np.float32)
_KERNELS: dict[int, np.ndarray] = {}
STACK_PIXELS = 512 * 512  # maps up to this size are measured stacked (ImageQC.many)
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
    seed = np.ascontiguousarray(mask).view(np.uint8)
    if not cv2.countNonZero(seed):
        seed = (prob > threshold / 2).view(np.uint8)
        if not cv2.countNonZero(seed):
            return 0.0
    b = band_width(prob.shape)
    kernel = _KERNELS.get(b)
    if kernel is None:
        kernel = _KERNELS[b] = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * b + 1, 2 * b + 1))
    region = cv2.dilate(seed, kernel)
    levels = cv2.convertScaleAbs(np.ascontiguousarray(prob, dtype=np.float32), alpha=LEVELS - 1)  # round, saturate
    return float(cv2.mean(cv2.LUT(levels, ENTROPY_TABLE), mask=region)[0])


def intensity_spread(image: np.ndarray) -> float:
    """Largest per-channel standard deviation of an image on the [0, 1] scale (dtype maximum)."""
    if image.size == 0:
        return 0.0
    dtype = image.dtype
    scale = 255.0 if dtype == np.uint8 else 65535.0 if dtype == np.uint16 else 1.0
    if dtype not in (np.uint8, np.uint16, np.float32):
        image = image.astype(np.float32)
    _, std = cv2.meanStdDev(np.ascontiguousarray(image))
    return float(std.max()) / scale


def quantile_of(value: float, quantiles) -> float:
    """Position of ``value`` in a distribution given by increasing quantiles at equal levels.

    Linear between quantiles; a value equal to several (a discrete distribution) gets the
    middle of their levels (midrank); 0 below the first, 1 above the last.
    """
    q = quantiles
    n = len(q)
    if n == 0:
        return 0.5
    if n == 1:
        return 0.5 if value == q[0] else float(value > q[0])
    if value < q[0]:
        return 0.0
    if value > q[-1]:
        return 1.0
    lo, hi = bisect.bisect_left(q, value), bisect.bisect_right(q, value)
    if hi > lo:  # ties with stored quantiles
        return (lo + hi - 1) / 2 / (n - 1)
    i = lo - 1
    return (i + (value - q[i]) / (q[lo] - q[i])) / (n - 1)


def quantiles_of(values, quantiles) -> np.ndarray:
    """``quantile_of`` of each value (vectorised). Shape: ``(N,) -> (N,)`` float64."""
    q = np.asarray(quantiles, np.float64)
    v = np.asarray(values, np.float64)
    if len(q) < 2:
        return np.array([quantile_of(float(x), list(q)) for x in v], np.float64)
    last = len(q) - 1
    lo, hi = np.searchsorted(q, v, "left"), np.searchsorted(q, v, "right")
    i = np.clip(lo - 1, 0, last - 1)
    gap = q[i + 1] - q[i]
    linear = (i + np.where(gap > 0, (v - q[i]) / np.where(gap > 0, gap, 1.0), 0.0)) / last
    out = np.where(hi > lo, (lo + hi - 1) / 2 / last, linear)
    return np.where(v < q[0], 0.0, np.where(v > q[-1], 1.0, out))


def tail_risks(q: np.ndarray) -> np.ndarray:
    """``tail_risk`` of each quantile (vectorised)."""
    return 1.0 - np.minimum(1.0, 2.0 * np.minimum(q, 1.0 - q) / TAIL)


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
        if self.reference:  # plain float lists for bisect
            self._fg_q = [float(v) for v in self.reference["foreground_fraction"]]
            self._cc_q = [float(v) for v in self.reference["components"]]

    def many(self, probs: list[np.ndarray], images: list | None = None, flips: list | None = None) -> list[dict]:
        """QC records of several images at once (a writer job), ``{"score", "flags", **signals}``.

        Maps of equal size are stacked and measured together (``stack_measures``: a few array
        operations for the whole stack instead of a dozen calls per image).

        Shape:
            probs: ``(H, W)`` float32 maps at original sizes; images: any ``(h, w[, c])`` view of
            each input (original or prepared pixels) or None; flips: TTA agreement or None.
        """
        n = len(probs)
        images, flips = images or [None] * n, flips or [None] * n
        groups: dict[tuple, list[int]] = {}
        for i, prob in enumerate(probs):  # large maps one at a time: a stack would copy them
            groups.setdefault(prob.shape if prob.size <= STACK_PIXELS else i, []).append(i)
        out: list = [None] * n
        for idx in groups.values():
            stack = np.stack([probs[i] for i in idx]) if len(idx) > 1 else probs[idx[0]][None]
            entropy, area, components, border = stack_measures(stack, self.threshold)
            content = spreads([images[i] if area[k] == 0 else None for k, i in enumerate(idx)])
            records = self._records(entropy, [flips[i] for i in idx], area, stack.shape[1] * stack.shape[2],
                                    components, border, content)
            for i, record in zip(idx, records):
                out[i] = record
        return out

    def _records(self, entropy, flips, area, size, components, border, content) -> list[dict]:
        """Score and flags of a group as arrays (``qc_score``/``qc_flags`` vectorised: per-image
        Python is what a writer thread must avoid), then one dict per image."""
        n = len(area)
        nan = float("nan")
        ent = np.round(entropy, 4)
        fg = np.round(area / size, 6) if size else np.zeros(n)
        flip = np.round(np.array([nan if f is None else float(f) for f in flips], np.float64), 4)
        cont = np.round(np.array([nan if c is None else c for c in content], np.float64), 4)
        empty_on = (area == 0) & (cont > CONTENT_MIN)  # NaN compares False
        score = (1.0 - ent) ** 2 * np.where(np.isnan(flip), 1.0, flip)
        if self.reference:
            fq = np.round(quantiles_of(fg, self._fg_q), 4)
            cq = np.round(quantiles_of(components, self._cc_q), 4)
            score *= (1.0 - WEIGHTS["foreground"] * tail_risks(fq)) * (1.0 - WEIGHTS["components"] * tail_risks(cq))
        else:
            fq = cq = np.full(n, nan)
        score *= (1.0 - WEIGHTS["empty_on_content"] * empty_on)
        score *= (1.0 - WEIGHTS["touches_border"] * (1.0 - self.border_rate) * border)
        score = np.round(np.clip(score, 0.0, 1.0), 4)
        fired = np.stack([ent > FLAG_ENTROPY, flip < FLAG_FLIP_DICE, 2 * np.minimum(fq, 1 - fq) < FLAG_TAIL,
                          2 * np.minimum(cq, 1 - cq) < FLAG_TAIL, empty_on, border], 1)  # FLAGS order
        none = lambda a: [None if v != v else v for v in a.tolist()]  # noqa: E731 - NaN -> None
        return [{"score": sc, "flags": [FLAGS[j] for j in np.flatnonzero(f)] if f.any() else [], "entropy": e,
                 "flip_dice": fl, "foreground": g, "foreground_quantile": q1, "components": c,
                 "components_quantile": q2, "content": ct, "empty_on_content": eo, "touches_border": bo}
                for sc, f, e, fl, g, q1, c, q2, ct, eo, bo in zip(
                    score.tolist(), fired, ent.tolist(), none(flip), fg.tolist(), none(fq), components.tolist(),
                    none(cq), none(cont), empty_on.tolist(), border.tolist())]

    def __call__(self, prob: np.ndarray, image: np.ndarray | None = None, flip_dice: float | None = None) -> dict:
        """The QC record of one image (see ``many`` for shapes)."""
        return self.many([prob], [image], [flip_dice])[0]


def stack_measures(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """Band entropy, mask area, component count and border contact of equal-size maps at once.

    The maps are laid out one below the other with zero rows between them (as many as the
    band, at least one), so one dilation, one table look-up and one contour trace serve the
    whole stack without a map reaching into its neighbour (8-connectivity needs adjacency).

    Shape:
        probs ``(N, H, W)`` float32 -> four ``(N,)`` arrays (float, int, int, bool).
    """
    n, h, w = probs.shape
    masks = probs > threshold
    area = masks.view(np.uint8).reshape(n, -1).sum(1, dtype=np.int64)
    b = band_width((h, w))
    seeds = masks
    if not area.all():  # empty masks: the band around the near misses
        seeds = masks.copy()
        empty = area == 0
        seeds[empty] = probs[empty] > threshold / 2
    slot = h + b
    laid = np.zeros((n, slot, w), np.uint8)
    laid[:, b:] = seeds
    kernel = _KERNELS.get(b)
    if kernel is None:
        kernel = _KERNELS[b] = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * b + 1, 2 * b + 1))
    region = cv2.dilate(laid.reshape(n * slot, w), kernel).reshape(n, slot, w)[:, b:]
    levels = cv2.convertScaleAbs(np.ascontiguousarray(probs, dtype=np.float32).reshape(n * h, w), alpha=LEVELS - 1)
    ent = cv2.LUT(levels, ENTROPY_TABLE).reshape(n, h, w)
    counted = region.reshape(n, -1).sum(1, dtype=np.int64)
    totals = np.einsum("nij,nij->n", ent, region.astype(np.float32))
    entropy = np.where(counted > 0, totals / np.maximum(counted, 1), 0.0)
    laid[:, b:] = masks  # components: the masks themselves, zero rows between them
    contours, hierarchy = cv2.findContours(laid.reshape(n * slot, w), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    components = np.zeros(n, np.int64)
    if hierarchy is not None:  # outer boundaries (see seg.data.qc_reference.count_components), by map
        tops = np.flatnonzero(hierarchy[0, :, 3] == -1)
        rows = np.fromiter((contours[j][0, 0, 1] for j in tops), np.int64, len(tops))
        components = np.bincount(rows // slot, minlength=n)[:n]
    border = masks[:, 0].any(1) | masks[:, -1].any(1) | masks[:, :, 0].any(1) | masks[:, :, -1].any(1)
    return entropy, area, components, border


def spreads(images: list) -> list[float | None]:
    """``intensity_spread`` of each image (None for None; torch tensors are read as numpy)."""
    return [None if im is None else intensity_spread(im.numpy() if hasattr(im, "numpy") else im) for im in images]
