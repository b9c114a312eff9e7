"""Segmentation metrics from per-image confusion counts, accumulated by sample key.

Counts (TP, FP, FN, TN) are computed per image at a threshold and stored under the image's
key, so distributed code can gather every rank's counts and drop duplicates (a sample seen
twice has the same key and the same counts) before reducing. Never average per-rank
averages.

Derived metrics: dice, iou, precision, recall, f1, specificity, pixel_accuracy, both pooled
over all pixels (``global``, micro) and per image (``mean``/``std``, population std).

Empty policy (docs/FORMATS.md): a ratio whose denominator is zero (Dice of two empty masks,
precision of an empty prediction, specificity of an all-foreground truth, ...) is 1.0 when
that image's prediction equals its truth (FP = FN = 0), else 0.0; the same rule holds for
``global`` over the pooled counts.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

METRIC_NAMES = ("dice", "iou", "precision", "recall", "f1", "specificity", "pixel_accuracy")
COUNT_NAMES = ("tp", "fp", "fn", "tn")
EMPTY_POLICY = "0/0 is 1.0 where prediction equals truth, else 0.0"


def confusion_counts(prob, target, threshold: float = 0.5) -> np.ndarray:
    """Per-image [tp, fp, fn, tn] as an int64 array of shape (N, 4).

    Args:
        prob: probabilities (not logits), torch tensor or array, shape (N, 1, H, W) or (N, H, W).
        target: binary truth of the same shape (> 0.5 is foreground).
    Shape:
        returns ``(N, 4)``.
    """
    try:
        import torch

        if isinstance(prob, torch.Tensor):
            pred = (prob.detach().float() > threshold).flatten(1)
            truth = (target.detach().float() > 0.5).flatten(1)
            tp = (pred & truth).sum(1)
            fp = (pred & ~truth).sum(1)
            fn = (~pred & truth).sum(1)
            tn = (~pred & ~truth).sum(1)
            return torch.stack([tp, fp, fn, tn], 1).cpu().numpy().astype(np.int64)
    except ImportError:  # numpy-only callers (evaluation of existing masks)
        pass
    p = np.asarray(prob)
    pred = (p > threshold).reshape(p.shape[0], -1)
    truth = (np.asarray(target) > 0.5).reshape(p.shape[0], -1)
    return np.stack([(pred & truth).sum(1), (pred & ~truth).sum(1),
                     (~pred & truth).sum(1), (~pred & ~truth).sum(1)], 1).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, exact: np.ndarray) -> np.ndarray:
    out = np.where(exact, 1.0, 0.0)
    nz = den > 0
    out[nz] = num[nz] / den[nz]
    return out


def metrics_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of an (N, 4) count array, with the empty policy."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 4)
    tp, fp, fn, tn = c.T
    exact = (fp == 0) & (fn == 0)
    dice = _ratio(2 * tp, 2 * tp + fp + fn, exact)
    return {
        "dice": dice,
        "iou": _ratio(tp, tp + fp + fn, exact),
        "precision": _ratio(tp, tp + fp, exact),
        "recall": _ratio(tp, tp + fn, exact),
        "f1": dice.copy(),  # F1 of pixels is Dice; kept under both names as the original scripts report both
        "specificity": _ratio(tn, tn + fp, exact),
        "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn, exact),
    }


class MetricAccumulator:
    """Per-image counts keyed by sample key; ``summary()`` reduces them once.

    ``update`` with a key seen before replaces its counts (the same image scored twice, e.g.
    padding in a distributed sampler, counts once).
    """

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.counts: dict[str, np.ndarray] = {}

    def update(self, keys: Iterable[str], counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.int64).reshape(-1, 4)
        keys = list(keys)
        if len(keys) != len(counts):
            raise ValueError(f"got {len(keys)} keys for {len(counts)} count rows")
        for key, row in zip(keys, counts):
            self.counts[str(key)] = row.copy()

    def state(self) -> tuple[list[str], np.ndarray]:
        """(keys, counts) as plain lists/arrays, for gathering across ranks."""
        keys = sorted(self.counts)
        arr = np.stack([self.counts[k] for k in keys]) if keys else np.zeros((0, 4), np.int64)
        return keys, arr

    def __len__(self) -> int:
        return len(self.counts)

    def summary(self, per_image: bool = False) -> dict:
        """The evaluation_report.json structure (docs/FORMATS.md); per_image adds the per-image list."""
        keys, counts = self.state()
        per = metrics_from_counts(counts)
        pooled = metrics_from_counts(counts.sum(0, keepdims=True)) if len(keys) else metrics_from_counts(np.zeros((1, 4)))
        total = counts.sum(0) if len(keys) else np.zeros(4, np.int64)
        report = {
            "n_images": len(keys),
            "threshold": self.threshold,
            "global": {**{m: float(pooled[m][0]) for m in METRIC_NAMES},
                       **{n: int(v) for n, v in zip(COUNT_NAMES, total)}},
            "mean": {m: float(per[m].mean()) if len(keys) else 0.0 for m in METRIC_NAMES},
            "std": {m: float(per[m].std()) if len(keys) else 0.0 for m in METRIC_NAMES},
            "empty_policy": EMPTY_POLICY,
        }
        if per_image:
            report["per_image"] = [
                {"id": k, **{m: float(per[m][i]) for m in METRIC_NAMES},
                 **{n: int(counts[i, j]) for j, n in enumerate(COUNT_NAMES)}}
                for i, k in enumerate(keys)
            ]
        return report
