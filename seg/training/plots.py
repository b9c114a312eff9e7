"""Training plots: ``training_history.png`` and ``sample_predictions.png`` (rank 0 only).

Design choices:

- matplotlib with the non-interactive Agg backend, imported inside the functions (start-up
  of ``seg train --help`` stays fast, and a cluster node needs no display).
- Both files are rendered into memory and written with ``seg.fileio.atomic_write_bytes``: a
  crash never leaves a truncated PNG.
- ``sample_predictions.png`` shows, per validation sample, the image (normalisation undone),
  its ground truth and the thresholded prediction, titled with the sample key and its Dice.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from seg.fileio import atomic_write_bytes

HISTORY_PLOT = "training_history.png"
SAMPLES_PLOT = "sample_predictions.png"


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(rows: list[dict], path: str | Path) -> None:
    """Loss, Dice, IoU and learning-rate curves per epoch from history rows."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (axes[0, 0], "loss", [("train_loss", "train"), ("val_loss", "validation")]),
        (axes[0, 1], "Dice (validation)", [("dice", "global"), ("mean_dice", "per-image mean")]),
        (axes[1, 0], "IoU (validation)", [("iou", "global")]),
        (axes[1, 1], "learning rate", [("lr", "lr")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            ax.plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    if rows and any(r.get("lr", 0) > 0 for r in rows):
        axes[1, 1].set_yscale("log")
    fig.tight_layout()
    atomic_write_bytes(path, _figure_bytes(fig))


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = np.logical_and(pred, truth).sum()
    den = pred.sum() + truth.sum()
    return 1.0 if den == 0 else 2.0 * tp / den


def plot_samples(samples: list[dict], mean, std, threshold: float, path: str | Path) -> None:
    """Image / truth / prediction rows for a few validation samples.

    Args:
        samples: dicts with ``key``, ``image`` (normalised float array ``(C, H, W)``),
            ``mask`` ``(H, W)`` in {0, 1} and ``prob`` ``(H, W)`` probabilities.
        mean, std: the normalisation to undo for display (one value per channel).
    """
    plt = _pyplot()
    n = max(1, len(samples))
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    for row, sample in zip(axes, samples):
        image = np.clip(sample["image"] * std + mean, 0.0, 1.0)
        image = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
        pred = sample["prob"] > threshold
        truth = sample["mask"] > 0.5
        row[0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        row[0].set_title(str(sample["key"])[-40:], fontsize=8)
        row[1].imshow(truth, cmap="gray")
        row[1].set_title("ground truth", fontsize=8)
        row[2].imshow(pred, cmap="gray")
        row[2].set_title(f"prediction (Dice {_dice(pred, truth):.3f})", fontsize=8)
        for ax in row:
            ax.axis("off")
    if not samples:
        axes[0, 0].text(0.5, 0.5, "no validation samples", ha="center")
    fig.tight_layout()
    atomic_write_bytes(path, _figure_bytes(fig))
