"""``evaluation_report.json`` and ``evaluation_report.txt``.

Design choices:

- The JSON has exactly the keys of docs/FORMATS.md, in that order: ``n_images``, ``threshold``,
  ``global``, ``mean``, ``std``, ``empty_policy``, ``per_image`` -- built by
  ``seg.metrics.MetricAccumulator.summary`` (the one implementation of the metrics and the
  empty policy). Model mode adds one key, ``best_threshold: {"threshold", "dice"}``: the sweep
  threshold (0.05 ... 0.95) with the highest global (pooled) Dice. Nothing that changes from run
  to run (times, paths, rank counts) goes into the JSON, so one process and N ranks write the
  same file.
- ``threshold`` is the probability threshold applied to the model's output; with
  ``--pred_dir`` the predictions are binary masks (any value > 0 is foreground) and it is
  ``null``.
- The text report is for people: the source, the global/mean/std table with counts, the sweep,
  and the lowest-Dice images.
"""

from __future__ import annotations

from pathlib import Path

from seg.fileio import atomic_write_json, atomic_write_text
from seg.metrics import COUNT_NAMES, METRIC_NAMES

REPORT_KEYS = ("n_images", "threshold", "global", "mean", "std", "empty_policy", "per_image")
# NIfTI volumes add per-volume 3D metrics (seg.evaluation.surface.summarize_volumes)
VOLUME_KEYS = ("n_volumes", "surface_tolerance_mm", "volume_global", "volume_mean", "volume_std", "hd95_undefined",
               "distance_policy", "per_volume")


def build_report(summary: dict, sweep: dict | None) -> dict:
    """The JSON document: the docs/FORMATS.md keys in order, plus ``best_threshold`` when a sweep ran."""
    missing = [k for k in REPORT_KEYS if k not in summary]
    assert not missing, f"summary lacks {missing}"
    report = {k: summary[k] for k in REPORT_KEYS}
    report.update({k: summary[k] for k in VOLUME_KEYS if k in summary})
    if sweep is not None:
        report["best_threshold"] = dict(sweep["best"])
    return report


def write_json(report: dict, output_dir: Path) -> Path:
    path = Path(output_dir) / "evaluation_report.json"
    atomic_write_json(path, report)
    return path


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def format_text(report: dict, sweep: dict | None, source: str, worst: list[tuple[str, float]]) -> str:
    """The human-readable report.

    Args:
        report: the JSON document (``build_report``).
        sweep: ``sweep_table`` output, or None.
        source: one line saying what was evaluated.
        worst: (id, dice) of the lowest-Dice images, lowest first.
    """
    thr = report["threshold"]
    lines = [
        "Segmentation evaluation report",
        "==============================",
        f"evaluated:  {source}",
        f"images:     {report['n_images']}",
        "threshold:  " + (f"{thr:g} (probability > threshold is foreground)" if thr is not None
                          else "none (predictions are binary masks: any value > 0 is foreground)"),
        f"empty rule: {report['empty_policy']}",
        "",
        "global = all pixels pooled (micro); mean/std = over images (population std)",
        "",
        f"{'metric':<16}{'global':>10}{'mean':>10}{'std':>10}",
        "-" * 46,
    ]
    for m in METRIC_NAMES:
        lines.append(f"{m:<16}{_fmt(report['global'][m]):>10}{_fmt(report['mean'][m]):>10}{_fmt(report['std'][m]):>10}")
    g = report["global"]
    total = sum(g[c] for c in COUNT_NAMES) or 1
    lines += ["", "pooled pixel counts:"]
    for c, label in zip(COUNT_NAMES, ("true positive", "false positive", "false negative", "true negative")):
        lines.append(f"  {c.upper()} {label:<15}{g[c]:>16,}  ({100 * g[c] / total:5.2f}% of pixels)")
    if sweep is not None:
        best = sweep["best"]
        lines += ["", f"threshold sweep (best global Dice {best['dice']:.4f} at threshold {best['threshold']:g}):",
                  f"  {'threshold':>9}{'dice':>9}{'iou':>9}{'precision':>11}{'recall':>9}{'mean dice':>11}"]
        for i, t in enumerate(sweep["thresholds"]):
            mark = "  <- best" if t == best["threshold"] else ""
            lines.append(f"  {t:>9.2f}{sweep['dice'][i]:>9.4f}{sweep['iou'][i]:>9.4f}"
                         f"{sweep['precision'][i]:>11.4f}{sweep['recall'][i]:>9.4f}{sweep['mean_dice'][i]:>11.4f}{mark}")
    if "per_volume" in report:
        from seg.evaluation.volumes import format_volume_text

        lines += format_volume_text(report)
    if worst:
        lines += ["", f"lowest-Dice images ({len(worst)}):"]
        lines += [f"  {dice:.4f}  {key}" for key, dice in worst]
    return "\n".join(lines) + "\n"


def write_text(text: str, output_dir: Path) -> Path:
    path = Path(output_dir) / "evaluation_report.txt"
    atomic_write_text(path, text)
    return path
