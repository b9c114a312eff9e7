"""Per-volume 3D metrics: overlap (Dice, IoU, precision, recall) and surface distances in mm.

Design choices:

- Overlap metrics come from the volume's voxel counts ``[tp, fp, fn, tn]`` through
  ``seg.metrics.metrics_from_counts``: one implementation of the formulas and of the empty
  policy for 2D images and volumes.
- Surfaces are the voxels of a mask with at least one face neighbour outside it
  (``mask & ~binary_erosion(mask)`` with the 6-connected structure; the volume's border counts
  as outside). The distance of each surface voxel of one mask to the nearest surface voxel of
  the other is read from ``scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)``:
  exact Euclidean distances between voxel centres in millimetres, anisotropic spacing
  included. This is the voxel-based definition of MONAI's ``compute_hausdorff_distance`` and
  ``compute_surface_dice`` and of DeepMind's surface-distance package without sub-voxel
  surface elements.
- HD95 is ``max(P95(d(pred -> truth)), P95(d(truth -> pred)))`` (each direction's 95th
  percentile, numpy's linear interpolation, then the larger: MONAI's ``percentile=95``).
  Surface Dice at tolerance t (Nikolov et al. 2021) is the fraction of both surfaces within t
  mm of the other: ``(#{d(p->t) <= t} + #{d(t->p) <= t}) / (|S_pred| + |S_truth|)``.
- Empty masks: both empty gives HD95 0 and surface Dice 1 (they agree); exactly one empty
  gives surface Dice 0 and HD95 ``None`` (no distance exists; JSON ``null``), which the report
  leaves out of the HD95 mean/std and counts.
- The distance transform runs on the bounding box of both masks grown by one voxel (clipped to
  the volume), which gives the same surfaces and distances as the whole volume: outside the
  box both masks are empty, and the one-voxel margin keeps the box's faces outside both masks.
  A small structure in a large CT costs the structure's size, not the scan's.
"""

from __future__ import annotations

import numpy as np

from seg.metrics import metrics_from_counts

OVERLAP_METRICS = ("dice", "iou", "precision", "recall")
DISTANCE_METRICS = ("hd95", "surface_dice")
DEFAULT_TOLERANCE_MM = 1.0
DISTANCE_POLICY = ("hd95 is 0 and surface_dice 1 when both masks are empty; when exactly one is empty, "
                   "surface_dice is 0 and hd95 is null (left out of its mean/std, counted in hd95_undefined)")


def voxel_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[tp, fp, fn, tn]`` of two boolean volumes of the same shape (int64)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction of shape {pred.shape} and truth of shape {truth.shape} differ")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return np.array([tp, fp, fn, pred.size - tp - fp - fn], np.int64)


def _box(pred: np.ndarray, truth: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``pred | truth`` grown by one voxel, clipped to the volume."""
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: in the mask with a face neighbour outside it (the border is outside)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``pred`` to ``truth``'s surface, and back.

    Args:
        pred, truth: boolean masks of one shape, both non-empty.
        spacing: voxel size in mm along each array axis.

    Shape:
        returns ``(|S_pred|,)`` and ``(|S_truth|,)`` float64 arrays.
    """
    from scipy import ndimage

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    box = _box(pred, truth)
    sp, st = surface(pred[box]), surface(truth[box])
    spacing = tuple(float(s) for s in spacing)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return to_truth, to_pred


def volume_metrics(pred: np.ndarray, truth: np.ndarray, spacing, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict:
    """Every per-volume metric of a predicted against a true mask.

    Args:
        pred, truth: masks of one shape (any dtype; non-zero is foreground).
        spacing: voxel size in mm per array axis (the canonical spacing of the volume).
        tolerance_mm: the surface Dice tolerance.

    Returns:
        ``{"dice", "iou", "precision", "recall", "hd95" (float or None), "surface_dice",
        "tp", "fp", "fn", "tn"}``.
    """
    pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
    if len(tuple(spacing)) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(tuple(spacing))} values for a {pred.ndim}D mask")
    counts = voxel_counts(pred, truth)
    overlap = metrics_from_counts(counts)
    out = {m: float(overlap[m][0]) for m in OVERLAP_METRICS}
    has_pred, has_truth = bool(counts[0] + counts[1]), bool(counts[0] + counts[2])
    if not has_pred and not has_truth:
        out.update(hd95=0.0, surface_dice=1.0)
    elif not has_pred or not has_truth:
        out.update(hd95=None, surface_dice=0.0)
    else:
        to_truth, to_pred = surface_distances(pred, truth, spacing)
        out["hd95"] = float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))
        within = np.count_nonzero(to_truth <= tolerance_mm) + np.count_nonzero(to_pred <= tolerance_mm)
        out["surface_dice"] = float(within / (to_truth.size + to_pred.size))
    out.update({name: int(v) for name, v in zip(("tp", "fp", "fn", "tn"), counts)})
    return out


def summarize_volumes(per_volume: list[dict], tolerance_mm: float) -> dict:
    """The report's volume keys from per-volume results (``volume_metrics`` plus ``id``).

    Returns:
        ``{"n_volumes", "surface_tolerance_mm", "volume_global", "volume_mean", "volume_std",
        "hd95_undefined", "distance_policy", "per_volume"}``: ``volume_global`` pools the voxel
        counts of all volumes (overlap metrics only), mean/std are over volumes (population
        std; HD95 over the volumes where it is defined).
    """
    rows = sorted(per_volume, key=lambda r: r["id"])
    counts = np.array([[r[c] for c in ("tp", "fp", "fn", "tn")] for r in rows], np.int64).reshape(-1, 4)
    pooled = metrics_from_counts(counts.sum(0))
    mean, std = {}, {}
    for m in OVERLAP_METRICS + DISTANCE_METRICS:
        values = np.array([r[m] for r in rows if r[m] is not None], np.float64)
        mean[m] = float(values.mean()) if values.size else None
        std[m] = float(values.std()) if values.size else None
    return {
        "n_volumes": len(rows),
        "surface_tolerance_mm": float(tolerance_mm),
        "volume_global": {**{m: float(pooled[m][0]) for m in OVERLAP_METRICS},
                          **{c: int(v) for c, v in zip(("tp", "fp", "fn", "tn"), counts.sum(0))}},
        "volume_mean": mean,
        "volume_std": std,
        "hd95_undefined": sum(r["hd95"] is None for r in rows),
        "distance_policy": DISTANCE_POLICY,
        "per_volume": rows,
    }
