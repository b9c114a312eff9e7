"""Image panels: ``sample_predictions.png`` and ``worst_cases.png``.

Design choices:

- Panels are drawn from ``scoring.Thumbnail``s (longest side 256 px), never from full images,
  so rank 0 never holds a cohort in memory.
- Errors are coloured the same way in both panels: true positive green, false positive red
  (predicted, not in the truth), false negative blue (missed), on the image dimmed to grey, or
  on black when no image is available (``--pred_dir`` without ``--image_dir``). A legend says
  so on the figure.
- Model mode adds the probability map (colour scale 0..1) between truth and prediction.
- Each tile is titled with the image id (shortened from the left if long), its Dice and its
  FP/FN pixel counts at the original size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from seg.evaluation.plots import save_figure
from seg.evaluation.scoring import Thumbnail

TP_COLOUR = (0, 200, 0)
FP_COLOUR = (230, 30, 30)
FN_COLOUR = (40, 90, 255)
LEGEND = [Patch(color=np.array(TP_COLOUR) / 255, label="true positive"),
          Patch(color=np.array(FP_COLOUR) / 255, label="false positive (predicted, not in truth)"),
          Patch(color=np.array(FN_COLOUR) / 255, label="false negative (missed)")]


def short(key: str, width: int = 34) -> str:
    return key if len(key) <= width else "…" + key[-(width - 1):]


def _rgb(image: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if image is None:
        return np.zeros((*shape, 3), np.uint8)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def error_overlay(thumb: Thumbnail, alpha: float = 0.55) -> np.ndarray:
    """RGB uint8 image: TP green, FP red, FN blue blended over the dimmed grey image.

    Shape:
        ``(h, w, 3)`` of the thumbnail.
    """
    base = _rgb(thumb.image, thumb.truth.shape).astype(np.float32)
    grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.7
    out = grey
    t, p = thumb.truth, thumb.pred
    for region, colour in ((t & p, TP_COLOUR), (p & ~t, FP_COLOUR), (t & ~p, FN_COLOUR)):
        out[region] = (1 - alpha) * out[region] + alpha * np.array(colour, np.float32) if thumb.image is not None \
            else np.array(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _aspect(thumbs: list[Thumbnail]) -> float:
    """Median height/width of the thumbnails (clipped), to size the figure rows to the images."""
    if not thumbs:
        return 1.0
    return float(np.clip(np.median([t.truth.shape[0] / t.truth.shape[1] for t in thumbs]), 0.3, 3.0))


def _counts_note(report: dict) -> dict[str, str]:
    return {p["id"]: f"FP {p['fp']:,} px, FN {p['fn']:,} px" for p in report["per_image"]}


def sample_predictions(samples: list[Thumbnail], report: dict, path: Path) -> Path:
    """One row per sample: image (when known), truth, prediction, errors."""
    with_image = any(s.image is not None for s in samples)
    with_prob = any(s.prob is not None for s in samples)
    columns = ((["image"] if with_image else []) + ["ground truth"] + (["probability"] if with_prob else [])
               + ["prediction", "errors (TP / FP / FN)"])
    rows = max(1, len(samples))
    fig = Figure(figsize=(3.3 * len(columns), (3.0 * _aspect(samples) + 0.7) * rows + 0.9))
    axes = np.array(fig.subplots(rows, len(columns), squeeze=False))
    notes = _counts_note(report)
    for r, s in enumerate(samples):
        tiles = (([_rgb(s.image, s.truth.shape)] if with_image else []) + [s.truth]
                 + ([s.prob if s.prob is not None else np.zeros(s.truth.shape, np.uint8)] if with_prob else [])
                 + [s.pred, error_overlay(s)])
        for c, (tile, name) in enumerate(zip(tiles, columns)):
            ax = axes[r, c]
            cmap = "magma" if name == "probability" else "gray" if tile.ndim == 2 else None
            shown = ax.imshow(tile, cmap=cmap, vmin=0, vmax=1 if tile.dtype == bool else 255, interpolation="nearest")
            if name == "probability":  # a scale on every row keeps the tiles the same size
                bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, ticks=[0, 127.5, 255])
                bar.ax.set_yticklabels(["0", "0.5", "1"])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=11, fontweight="bold", pad=18)
            if c == 0:
                ax.set_ylabel(f"{short(s.key, 26)}\n{s.size[1]}x{s.size[0]} px", fontsize=9)
        axes[r, -1].text(0.5, -0.04, f"Dice {s.dice:.3f}; {notes.get(s.key, '')}", transform=axes[r, -1].transAxes,
                         ha="center", va="top", fontsize=9)
    if not samples:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    thr = report["threshold"]
    which = ("axial slices at the middle, then the quarters, of the first volumes" if "per_volume" in report
             else "the first {} images by id".format(len(samples)))  # volumes: see seg.evaluation.volumes
    fig.suptitle(f"Sample predictions: {which}"
                 + (f" (threshold {thr:g})" if thr is not None else "")
                 + ("" if with_image else " -- no --image_dir given, errors drawn on black"), fontsize=12)
    fig.legend(handles=LEGEND, loc="lower center", ncols=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return save_figure(fig, path)


def worst_cases(worst: list[Thumbnail], report: dict, path: Path, ncols: int = 4) -> Path:
    """The lowest-Dice images, lowest first, each with its error overlay."""
    n = max(1, len(worst))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.6 * ncols, (3.4 * _aspect(worst) + 0.8) * nrows + 0.9))
    axes = np.array(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    notes = _counts_note(report)
    for ax in axes:
        ax.axis("off")
    for i, (ax, t) in enumerate(zip(axes, worst)):
        ax.imshow(error_overlay(t), interpolation="nearest")
        ax.set_title(f"#{i + 1}  {short(t.key)}\nDice {t.dice:.3f}; {notes.get(t.key, '')}", fontsize=9)
    if not worst:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle(f"Worst cases: the {len(worst)} lowest-Dice images of {report['n_images']}, lowest first", fontsize=12)
    fig.legend(handles=LEGEND, loc="lower center", ncols=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    return save_figure(fig, path)
