"""Training plots: ``training_history.png`` and ``sample_predictions.png`` (rank 0 only).

Design choices:

- matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas), imported
  inside the functions: no pyplot (no global figure state, no GUI backend, no display needed
  on a cluster node; safe from a worker thread) and a faster start than importing pyplot.
  Fixed margins instead of ``tight_layout`` (which costs a second of text measuring).
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def plot_history(rows: list[dict], path: str | Path) -> None:
    """Loss, Dice, IoU and learning-rate curves per epoch from history rows.

    With a weight average (rows with ``raw_dice``) the Dice panel shows both the average's
    curves (the ones that select the model) and the raw weights' curves.
    """
    epochs = [r["epoch"] for r in rows]
    fig, axes = _figure(2, 2, (10, 7))
    dice = [("dice", "global"), ("mean_dice", "per-image mean")]
    if any("raw_dice" in r for r in rows):
        dice = [("dice", "global, weight average"), ("mean_dice", "per-image mean, weight average"),
                ("raw_dice", "global, raw weights"), ("raw_mean_dice", "per-image mean, raw weights")]
    panels = [
        (axes[0, 0], "loss", [("train_loss", "train"), ("val_loss", "validation")]),
        (axes[0, 1], "Dice (validation)", dice),
        (axes[1, 0], "IoU (validation)", [("iou", "global")]),
        (axes[1, 1], "learning rate", [("lr", "lr")]),
    ]
    from matplotlib.ticker import MaxNLocator

    for ax, title, series in panels:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for key, label in series:
            ax.plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    if rows and any(r.get("lr", 0) > 0 for r in rows):
        axes[1, 1].set_yscale("log")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.95, hspace=0.3, wspace=0.2)
    atomic_write_bytes(path, _figure_bytes(fig))


def plot_all_in_background(rows: list[dict], samples: list[dict], mean, std, threshold: float,
                           run_dir: str | Path):
    """Render both plots in a thread (it overlaps the checkpoint writes); ``.join()`` re-raises errors."""
    import threading

    class PlotThread(threading.Thread):
        error: BaseException | None = None

        def run(self) -> None:
            try:
                plot_history(rows, Path(run_dir) / HISTORY_PLOT)
                plot_samples(samples, mean, std, threshold, Path(run_dir) / SAMPLES_PLOT)
            except BaseException as exc:  # noqa: BLE001 - handed to the joining thread
                self.error = exc

        def join(self, timeout: float | None = None) -> None:
            super().join(timeout)
            if self.error is not None:
                raise self.error

    thread = PlotThread(name="seg-plots", daemon=True)
    thread.start()
    return thread


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
    n = max(1, len(samples))
    fig, axes = _figure(n, 3, (9, 3 * n))
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
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.25 / n, hspace=0.15, wspace=0.05)
    atomic_write_bytes(path, _figure_bytes(fig))
