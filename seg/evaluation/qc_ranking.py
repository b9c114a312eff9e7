"""How well ``qc_score`` ranks real quality, where ground truth exists (``seg evaluate``).

The ``qc`` key of ``evaluation_report.json`` (docs/FORMATS.md)::

    {"n_images": N, "spearman_dice": rho,
     "detection": {"dice_below_0.8": {"failures": k, "auroc": a,
                                      "lowest_5pct": {"images": m, "failures": f, "captured": f/k, "precision": f/m},
                                      "lowest_10pct": {...}},
                   "dice_below_0.5": {...}},
     "flags": {flag: {"images": n, "failures_0.8": k}},
     "per_image": [{"id", "qc_score", "qc_flags"}]}

Design choices:

- A failure is an image with Dice below 0.8 (or 0.5). ``auroc`` is the probability that a
  failure scores lower than a success, ties counting one half (Mann-Whitney U from midranks);
  ``None`` when there are no failures or no successes. ``spearman_dice`` is the Pearson
  correlation of the midranks of ``qc_score`` and Dice (``None`` when either is constant).
- ``lowest_5pct``: the ``ceil(5 % of N)`` lowest-scoring images. Where a group of equal scores
  straddles the cut, it contributes its failure share times the places left (the expected count
  under a random order of the ties), so the figures never depend on how ties are broken.
  ``captured`` = share of all failures found there (recall), ``precision`` = share of the
  images there that are failures.
- Where the QC comes from: model mode computes it from the probability maps as ``seg predict``
  does; ``--pred_dir`` reads it from the folder's ``manifest.jsonl`` (``manifest_qc``), matching
  images by the same id the evaluation gives them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FAILURE_DICE = (0.8, 0.5)
LOWEST = (0.05, 0.10)


def midranks(values) -> np.ndarray:
    """1-based ranks, ties given the mean of their positions. Shape: ``(N,) -> (N,)`` float64."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), np.float64)
    sorted_v = v[order]
    start = 0
    while start < len(v):
        end = start + 1
        while end < len(v) and sorted_v[end] == sorted_v[start]:
            end += 1
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of positions start+1 .. end
        start = end
    return ranks


def auroc(scores, failures) -> float | None:
    """P(score of a failure < score of a success) + P(tie) / 2; None without both classes."""
    s, f = np.asarray(scores, np.float64), np.asarray(failures, bool)
    n_f, n_s = int(f.sum()), int((~f).sum())
    if n_f == 0 or n_s == 0:
        return None
    r = midranks(s)
    u = r[~f].sum() - n_s * (n_s + 1) / 2.0  # successes ranked above failures
    return float(u / (n_f * n_s))


def spearman(x, y) -> float | None:
    """Spearman rank correlation with midranks for ties; None if either input is constant."""
    rx, ry = midranks(x), midranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def lowest_share(scores, failures, fraction: float) -> dict:
    """Failures among the ``ceil(fraction * N)`` lowest scores, ties at the cut shared out."""
    s, f = np.asarray(scores, np.float64), np.asarray(failures, bool)
    n = len(s)
    m = min(n, math.ceil(fraction * n - 1e-9))
    if m == 0:
        return {"images": 0, "failures": 0.0, "captured": None, "precision": None}
    cut = np.sort(s)[m - 1]
    below = s < cut
    tied = s == cut
    left = m - int(below.sum())
    found = float(f[below].sum()) + left * float(f[tied].sum()) / int(tied.sum())
    total = int(f.sum())
    return {"images": m, "failures": round(found, 3), "captured": round(found / total, 4) if total else None,
            "precision": round(found / m, 4)}


def qc_section(dice: dict[str, float], qc: dict[str, dict]) -> dict | None:
    """The report's ``qc`` dict for the images that have both a Dice and a QC record."""
    ids = sorted(set(dice) & set(qc))
    if not ids:
        return None
    d = np.array([dice[i] for i in ids], np.float64)
    s = np.array([qc[i]["score"] for i in ids], np.float64)
    detection = {}
    for limit in FAILURE_DICE:
        failed = d < limit
        detection[f"dice_below_{limit}"] = {
            "failures": int(failed.sum()), "auroc": _round(auroc(s, failed)),
            **{f"lowest_{round(p * 100)}pct": lowest_share(s, failed, p) for p in LOWEST}}
    flags: dict[str, dict] = {}
    for i, limit_fail in zip(ids, d < FAILURE_DICE[0]):
        for name in qc[i].get("flags", ()):
            entry = flags.setdefault(name, {"images": 0, "failures_0.8": 0})
            entry["images"] += 1
            entry["failures_0.8"] += int(limit_fail)
    return {"n_images": len(ids), "spearman_dice": _round(spearman(s, d)), "detection": detection,
            "flags": dict(sorted(flags.items())),
            "per_image": [{"id": i, "qc_score": qc[i]["score"], "qc_flags": list(qc[i].get("flags", ()))}
                          for i in ids]}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def manifest_id(output: str) -> str:
    """The evaluation id of a ``seg predict`` output path (``a/x_mask.png`` -> ``a/x``)."""
    from seg.data.pairing import sample_key
    from seg.evaluation.pairing import strip_mask_suffix

    rel = Path(output).with_suffix("")
    return sample_key(rel.with_name(strip_mask_suffix(rel.name)).as_posix())


def manifest_qc(pred_dir: str | Path) -> dict[str, dict]:
    """``{id: qc record}`` from a ``seg predict`` folder's manifest; empty without one."""
    from seg.inference.manifest import read_manifest

    out: dict[str, dict] = {}
    for record in read_manifest(Path(pred_dir)).values():
        for image in record.get("images", []):
            if image.get("qc"):
                out[manifest_id(image["output"])] = image["qc"]
    return out


def text_lines(section: dict) -> list[str]:
    """Lines for evaluation_report.txt."""
    lines = ["", f"quality control: qc_score against Dice on {section['n_images']} images "
                 f"(Spearman {_fmt(section['spearman_dice'])})"]
    for name, det in section["detection"].items():
        low5, low10 = det["lowest_5pct"], det["lowest_10pct"]
        lines.append(f"  {name.replace('_', ' ')}: {det['failures']} images, AUROC {_fmt(det['auroc'])}, "
                     f"lowest 5 % hold {_fmt(low5['captured'], pct=True)} of them, lowest 10 % "
                     f"{_fmt(low10['captured'], pct=True)}")
    return lines


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.0f} %" if pct else f"{v:.3f}"


def plot_qc_vs_dice(section: dict, dice: dict[str, float], path: Path) -> Path:
    """Scatter of qc_score against Dice (failures below 0.8 in red), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seg.fileio import atomic_path

    ids = [p["id"] for p in section["per_image"]]
    s = np.array([p["qc_score"] for p in section["per_image"]])
    d = np.array([dice[i] for i in ids])
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=100)
    bad = d < FAILURE_DICE[0]
    ax.scatter(s[~bad], d[~bad], s=8, alpha=0.6, color="#3b78b0", label="Dice >= 0.8")
    ax.scatter(s[bad], d[bad], s=10, alpha=0.8, color="#c0392b", label="Dice < 0.8")
    det = section["detection"]["dice_below_0.8"]
    ax.set(xlabel="qc_score", ylabel="Dice", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title=f"qc_score vs Dice (AUROC {_fmt(det['auroc'])}, Spearman {_fmt(section['spearman_dice'])})")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
