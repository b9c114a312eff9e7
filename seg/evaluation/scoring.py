"""Per-image scoring, the split of images over ranks, and the gather of counts to rank 0.

Design choices:

- An image is reduced to its confusion counts ``[tp, fp, fn, tn]`` (``seg.metrics``) as soon
  as it is scored; only counts travel between ranks and every metric is derived once, on rank
  0, by ``MetricAccumulator.summary``. Never an average of per-rank averages.
- The threshold sweep keeps, per image, the counts at 0.05, 0.10, ..., 0.95: a ``(19, 4)``
  array computed in one pass with a histogram of the probabilities over the thresholds (no
  19 thresholded copies of the image). Probabilities are compared to the thresholds in their
  own precision (float32), exactly as ``confusion_counts`` compares them, so the sweep at the
  report's threshold equals the report's counts.
- Work split: image ``i`` of the source's sorted order belongs to rank ``i mod world_size``;
  every image is scored once. Counts are keyed by image id, so the merged result does not
  depend on the number of ranks.
- Images are kept only as small thumbnails (longest side ``THUMB_SIDE``) and only for the
  panels: the first ``num_samples`` images, and on each rank its ``worst_k`` lowest-Dice
  images, ties broken by id. The global ``worst_k`` are among the union of the ranks' ones,
  so memory stays bounded by ``worst_k x ranks`` thumbnails whatever the cohort size.
- Collectives are object gathers only, so one process group on gloo serves CPU and GPU jobs
  alike. An error on one rank (an unreadable mask) is shared with ``all_gather_object``
  before the counts are gathered, so every rank stops with the error instead of waiting.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from seg.dist import DistEnv
from seg.metrics import MetricAccumulator, confusion_counts, metrics_from_counts
from seg.postprocess import PostProcess, image_stats, mask_of

SWEEP_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(1, 20) * 0.05, 2))
THUMB_SIDE = 256


def sweep_counts(prob: np.ndarray, truth: np.ndarray, thresholds=SWEEP_THRESHOLDS) -> np.ndarray:
    """Counts ``[tp, fp, fn, tn]`` of ``prob > t`` against ``truth`` for every threshold ``t``.

    Args:
        prob: float probabilities of one image.
        truth: bool mask of the same shape.
        thresholds: increasing thresholds.
    Shape:
        prob, truth ``(H, W)`` -> ``(len(thresholds), 4)`` int64.
    """
    prob = np.asarray(prob)
    t = np.asarray(thresholds, dtype=prob.dtype if prob.dtype.kind == "f" else np.float64)
    # idx = how many thresholds lie strictly below each probability: prob > t[j] iff j < idx
    idx = np.searchsorted(t, prob.ravel(), side="left")
    fg = np.asarray(truth, dtype=bool).ravel()
    n = len(t) + 1
    above_fg = np.cumsum(np.bincount(idx[fg], minlength=n)[::-1])[::-1]  # above[k] = #(idx >= k)
    above_bg = np.cumsum(np.bincount(idx[~fg], minlength=n)[::-1])[::-1]
    tp, fp = above_fg[1:], above_bg[1:]
    return np.stack([tp, fp, above_fg[0] - tp, above_bg[0] - fp], 1).astype(np.int64)


def display_image(image: np.ndarray) -> np.ndarray:
    """A uint8 copy for display: 16-bit images are stretched between their 0.5 and 99.5 percentiles."""
    if image.dtype == np.uint8:
        return image
    lo, hi = np.percentile(image, (0.5, 99.5))
    scaled = (image.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _thumb(arr: np.ndarray, interpolation: int) -> np.ndarray:
    h, w = arr.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    if scale >= 1:
        return arr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(arr, size, interpolation=interpolation)


@dataclass
class Thumbnail:
    """A small copy of one image, its truth and its prediction, for the panels."""

    key: str
    dice: float
    truth: np.ndarray
    pred: np.ndarray
    image: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)  # original (height, width)
    prob: np.ndarray | None = None  # uint8 probability x 255 (model mode)

    @classmethod
    def make(cls, key: str, dice: float, truth: np.ndarray, pred: np.ndarray, image: np.ndarray | None,
             prob: np.ndarray | None = None) -> "Thumbnail":
        small = lambda m: _thumb(m.astype(np.uint8), cv2.INTER_NEAREST).astype(bool)  # noqa: E731
        img = None if image is None else _thumb(display_image(image), cv2.INTER_AREA)
        p = None if prob is None else _thumb((np.clip(prob, 0, 1) * 255).astype(np.uint8), cv2.INTER_AREA)
        return cls(key, float(dice), small(truth), small(pred), img, tuple(truth.shape[:2]), p)


ImageSource = Callable[[], "np.ndarray | None"]


@dataclass
class RankScores:
    """What one rank found: counts per image id, sweep counts, and thumbnails for the panels."""

    threshold: float | None
    sweep: bool = False
    worst_k: int = 8
    num_samples: int = 4
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    sweeps: dict[str, np.ndarray] = field(default_factory=dict)
    samples: dict[str, Thumbnail] = field(default_factory=dict)
    worst: dict[str, Thumbnail] = field(default_factory=dict)
    qc: dict[str, dict] = field(default_factory=dict)  # per-image QC records (seg.inference.qc), model mode
    postprocess: PostProcess | None = None  # applied after the threshold (model mode)
    tune_thresholds: tuple[float, ...] | None = None  # collect seg.postprocess.image_stats at these
    tuning: dict[str, dict] = field(default_factory=dict)  # {id: image_stats}

    def add(self, index: int, key: str, truth: np.ndarray, pred: np.ndarray | None = None,
            prob: np.ndarray | None = None, image: "np.ndarray | ImageSource | None" = None,
            qc: dict | None = None) -> np.ndarray:
        """Score one image; returns its ``[tp, fp, fn, tn]``.

        Args:
            index: the image's position in the source's sorted order (picks the sample panels).
            key: the image id.
            truth: bool ``(H, W)``.
            pred: bool ``(H, W)`` prediction (mask mode), or
            prob: float ``(H, W)`` probabilities, thresholded at ``self.threshold`` then
                post-processed by ``self.postprocess`` (model mode); the sweep and the tuning
                statistics are of the probabilities.
            image: the image, or a function returning it (called only if a panel needs it).
            qc: the image's QC record, kept for the report's ``qc`` key.
        """
        if key in self.counts:
            raise ValueError(f"image id {key!r} occurs twice in the evaluated data (a shard or folder given twice?); "
                             "ids must be unique")
        if prob is not None:
            if self.sweep:
                self.sweeps[key] = sweep_counts(prob, truth)
            if self.tune_thresholds is not None:
                self.tuning[key] = image_stats(prob, truth, self.tune_thresholds)
            pred = mask_of(prob, self.threshold, self.postprocess)
            counts = confusion_counts(pred[None], truth[None], 0.5)[0]
        else:
            counts = confusion_counts(pred[None], truth[None], 0.5)[0]
        self.counts[key] = counts
        if qc is not None:
            self.qc[key] = qc
        dice = float(metrics_from_counts(counts)["dice"][0])
        want_sample = index < self.num_samples
        rank_key = (dice, key)
        worst_cut = max(((t.dice, t.key) for t in self.worst.values()), default=None)
        want_worst = self.worst_k > 0 and (len(self.worst) < self.worst_k or rank_key < worst_cut)
        if want_sample or want_worst:
            img = image() if callable(image) else image
            thumb = Thumbnail.make(key, dice, truth, pred, img, prob)
            if want_sample:
                self.samples[key] = thumb
            if want_worst:
                self.worst[key] = thumb
                if len(self.worst) > self.worst_k:
                    del self.worst[worst_cut[1]]
        return counts

    def payload(self) -> dict:
        return {"counts": self.counts, "sweeps": self.sweeps, "samples": self.samples, "worst": self.worst,
                "qc": self.qc, "tuning": self.tuning}


@dataclass
class Evaluation:
    """Everything rank 0 writes: the report dict, the sweep table and the panels' thumbnails."""

    report: dict
    sweep: dict | None
    samples: list[Thumbnail]
    worst: list[Thumbnail]
    qc: dict = field(default_factory=dict)  # {id: QC record}: model mode, or the --pred_dir manifest
    tuning: dict = field(default_factory=dict)  # {id: seg.postprocess.image_stats}: --tune_postprocessing
    postprocessing: dict | None = None  # the tuned choice, for the report (seg.evaluation.run)


def sweep_table(sweeps: dict[str, np.ndarray]) -> dict:
    """Pooled (global) dice/iou/precision/recall and mean Dice at each sweep threshold, and the best."""
    keys = sorted(sweeps)
    stacked = np.stack([sweeps[k] for k in keys])  # (N, T, 4)
    pooled = metrics_from_counts(stacked.sum(0))
    per_image_dice = metrics_from_counts(stacked.reshape(-1, 4))["dice"].reshape(len(keys), -1)
    table = {"thresholds": list(SWEEP_THRESHOLDS),
             **{m: [float(v) for v in pooled[m]] for m in ("dice", "iou", "precision", "recall")},
             "mean_dice": [float(v) for v in per_image_dice.mean(0)]}
    best = int(np.argmax(pooled["dice"]))  # the lowest threshold among equal Dice
    table["best"] = {"threshold": SWEEP_THRESHOLDS[best], "dice": float(pooled["dice"][best])}
    return table


def merge(payloads: list[dict], threshold: float | None, worst_k: int, num_samples: int) -> Evaluation:
    """Combine every rank's payload into the evaluation (on rank 0)."""
    acc = MetricAccumulator(threshold=threshold)
    sweeps: dict[str, np.ndarray] = {}
    samples: dict[str, Thumbnail] = {}
    worst: dict[str, Thumbnail] = {}
    qc: dict[str, dict] = {}
    tuning: dict[str, dict] = {}
    for p in payloads:
        duplicated = set(p["counts"]) & set(acc.counts)
        if duplicated:  # each index goes to one rank, so a repeated id is in the data itself
            raise ValueError(f"image ids occur more than once in the evaluated data (a shard or folder given twice?): "
                             f"{', '.join(sorted(duplicated)[:5])}; ids must be unique")
        keys = sorted(p["counts"])
        acc.update(keys, np.array([p["counts"][k] for k in keys], np.int64).reshape(-1, 4))
        sweeps.update(p["sweeps"])
        samples.update(p["samples"])
        worst.update(p["worst"])
        qc.update(p.get("qc", {}))
        tuning.update(p.get("tuning", {}))
    report = acc.summary(per_image=True)
    ordered = sorted(worst.values(), key=lambda t: (t.dice, t.key))[:worst_k]
    return Evaluation(report, sweep_table(sweeps) if sweeps else None,
                      [samples[k] for k in sorted(samples)][:num_samples], ordered, qc, tuning)


def init_process_group(env: DistEnv) -> bool:
    """Join the torchrun job's process group (gloo) when distributed; True if this call created it."""
    if not env.is_distributed:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group(backend="gloo", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(hours=2))
    return True


def shared_errors(error: str | None, env: DistEnv) -> list[str]:
    """Every rank's error message (an empty list when all ranks succeeded)."""
    if not env.is_distributed:
        return [error] if error else []
    import torch.distributed as dist

    errors: list = [None] * env.world_size
    dist.all_gather_object(errors, error)
    return [f"rank {r}: {e}" for r, e in enumerate(errors) if e]


def gather_payloads(payload: dict, env: DistEnv) -> list[dict] | None:
    """All ranks' payloads on rank 0 (``None`` on the other ranks)."""
    if not env.is_distributed:
        return [payload]
    import torch.distributed as dist

    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(payload, out, dst=0)
    return out
