"""The metric charts: confusion matrix, per-image distributions, summary bars, threshold sweep.

Design choices:

- Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global state, no display
  needed) and saved with ``save_figure``: PNG to a temporary name, then renamed
  (``seg.fileio``), so a crash never leaves a half-written plot.
- Every chart says what it shows in its title (number of images, threshold) and prints its
  numbers on it: a reader should not need the JSON to read a value off a bar.
- F1 of pixels equals Dice; the charts show Dice once and say so, the JSON keeps both keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from seg.fileio import atomic_path

SHOWN_METRICS = ("dice", "iou", "precision", "recall", "specificity", "pixel_accuracy")
LABELS = {"dice": "Dice (= F1)", "iou": "IoU", "precision": "Precision", "recall": "Recall",
          "specificity": "Specificity", "pixel_accuracy": "Pixel accuracy"}


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _subtitle(report: dict) -> str:
    thr = report["threshold"]
    return f"{report['n_images']} images" + (f", threshold {thr:g}" if thr is not None else ", binary predictions")


def confusion_matrix(report: dict, path: Path) -> Path:
    """Pooled pixel confusion matrix; colour = share of the truth row, text = count and shares."""
    g = report["global"]
    counts = np.array([[g["tn"], g["fp"]], [g["fn"], g["tp"]]], dtype=np.float64)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    total = counts.sum() or 1.0
    fig = Figure(figsize=(6.2, 5.2))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = [["TN", "FP"], ["FN", "TP"]]
    for i in range(2):
        for j in range(2):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{names[i][j]}\n{int(counts[i, j]):,} px\n{100 * share[i, j]:.2f}% of row\n"
                          f"{100 * counts[i, j] / total:.2f}% of all", ha="center", va="center", color=colour, fontsize=10)
    ax.set_xticks([0, 1], ["background", "foreground"])
    ax.set_yticks([0, 1], ["background", "foreground"])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Truth")
    ax.set_title(f"Pixel confusion matrix (all pixels pooled)\n{_subtitle(report)}, "
                 f"global Dice {g['dice']:.4f}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the truth row")
    return save_figure(fig, path)


def _zoom(values: np.ndarray) -> tuple[float, float]:
    """An x range around the values inside [0, 1]: good models crowd near 1 (specificity ~0.999),
    where fixed 0..1 bins would put every image in one bar."""
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.05 * (hi - lo), 0.005)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def metrics_distribution(report: dict, path: Path) -> Path:
    """Histogram of each metric over the images, with mean and median marked, and a box plot row."""
    per = report["per_image"]
    fig = Figure(figsize=(15, 7.5))
    axes = fig.subplots(2, 3).ravel()
    for ax, m in zip(axes, SHOWN_METRICS):
        values = np.array([p[m] for p in per], dtype=np.float64)
        lo, hi = _zoom(values)
        ax.hist(values, bins=np.linspace(lo, hi, 31), color="#4C72B0", edgecolor="white")
        mean, median = float(values.mean()), float(np.median(values))
        ax.axvline(mean, color="#C44E52", lw=2, label=f"mean {mean:.3f}")
        ax.axvline(median, color="#55A868", lw=2, ls="--", label=f"median {median:.3f}")
        ax.set_xlim(lo, hi)
        ax.set_title(f"{LABELS[m]}  (min {values.min():.3f}, max {values.max():.3f})")
        ax.set_xlabel(f"per-image {LABELS[m]}")
        ax.set_ylabel("images")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize=9, framealpha=0.9)
        # a box plot of the same values above the histogram, sharing its x axis
        top = ax.inset_axes([0.0, 1.0, 1.0, 0.12], sharex=ax)
        top.boxplot(values, orientation="horizontal", widths=0.6, showfliers=True)
        top.axis("off")
        ax.set_title(ax.get_title(), pad=26)
    fig.suptitle(f"Per-image metric distributions ({_subtitle(report)}); x axes zoomed to the values; "
                 "box: quartiles, whiskers 1.5 IQR", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, path)


def metrics_summary(report: dict, path: Path) -> Path:
    """Bars of the per-image mean (with std error bars) and the pooled global value of each metric."""
    x = np.arange(len(SHOWN_METRICS))
    means = [report["mean"][m] for m in SHOWN_METRICS]
    stds = [report["std"][m] for m in SHOWN_METRICS]
    globs = [report["global"][m] for m in SHOWN_METRICS]
    fig = Figure(figsize=(11, 5.5))
    ax = fig.add_subplot()
    w = 0.38
    b1 = ax.bar(x - w / 2, means, w, yerr=stds, capsize=4, color="#4C72B0", label="mean over images ± std")
    b2 = ax.bar(x + w / 2, globs, w, color="#DD8452", label="global (all pixels pooled)")
    for bar, m, sd in zip(b1, means, stds):  # value and spread above the error bar
        ax.text(bar.get_x() + bar.get_width() / 2, m + sd + 0.015, f"{m:.3f}\n±{sd:.3f}",
                ha="center", va="bottom", fontsize=8.5)
    for bar, g in zip(b2, globs):
        ax.text(bar.get_x() + bar.get_width() / 2, g + 0.015, f"{g:.3f}", ha="center", va="bottom", fontsize=8.5)
    ax.set_xticks(x, [LABELS[m] for m in SHOWN_METRICS])
    ax.set_ylim(0, max(1.15, max(m + sd for m, sd in zip(means, stds)) + 0.12))
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncols=2, frameon=False)
    ax.set_title(f"Metric summary ({_subtitle(report)})")
    return save_figure(fig, path)


def threshold_sweep(sweep: dict, report: dict, path: Path) -> Path:
    """Global Dice, IoU, precision, recall (and mean Dice) against the threshold; best and used marked."""
    t = np.array(sweep["thresholds"])
    fig = Figure(figsize=(11, 5.5))
    ax = fig.add_subplot()
    styles = {"dice": ("Dice (global)", "#C44E52", "-"), "iou": ("IoU (global)", "#4C72B0", "-"),
              "precision": ("Precision (global)", "#55A868", "-"), "recall": ("Recall (global)", "#8172B2", "-"),
              "mean_dice": ("Dice (mean over images)", "#C44E52", ":")}
    for key, (label, colour, ls) in styles.items():
        ax.plot(t, sweep[key], ls, color=colour, marker="o", ms=3, label=label)
    best = sweep["best"]
    ax.axvline(best["threshold"], color="black", lw=1, ls="--")
    ax.plot([best["threshold"]], [best["dice"]], "*", color="black", ms=14, zorder=5)
    ax.annotate(f"best {best['threshold']:.2f}\nDice {best['dice']:.4f}", (best["threshold"], best["dice"]),
                xytext=(10, -30), textcoords="offset points", fontsize=10,
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85})
    used = report["threshold"]
    if used is not None:
        ax.axvline(used, color="grey", lw=1, ls=":", label=f"threshold used in the report ({used:g})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("probability threshold (prob > threshold is foreground)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, borderaxespad=0)
    ax.set_title(f"Threshold sweep ({report['n_images']} images): best global Dice {best['dice']:.4f} "
                 f"at {best['threshold']:.2f}")
    return save_figure(fig, path)
