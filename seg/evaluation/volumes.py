"""`seg evaluate --pred_dir --gt_dir` on NIfTI mask volumes: per-volume 3D metrics plus the slices.

Design choices:

- Pairing follows ``seg.evaluation.pairing``'s rule for files, with the whole ``.nii.gz``
  removed from the stem: ``seg predict``'s ``sub-01/t1_mask.nii.gz`` pairs with the truth
  ``sub-01/t1.nii.gz`` or ``sub-01/t1_seg.nii.gz``; a truth without a prediction is an error
  listing the names, a prediction without a truth is ignored and counted.
- Both volumes are read in canonical orientation (``seg.data.volumes``) and must lie on the
  same grid (shape and affine, 0.001 mm): a mask written in another orientation is compared
  voxel for voxel correctly, a mask on another grid is an error, never resampled. Any value
  > 0 is foreground, as for 2D masks.
- Each volume is scored whole (``seg.evaluation.surface.volume_metrics``: 3D counts, Dice, IoU,
  precision, recall, HD95 and surface Dice in mm with the volume's voxel spacing) into the
  report's new top-level keys (``surface.summarize_volumes``). Its axial slices also go through
  the 2D scorer as images (id ``<volume id>/axial_<index>``), so the existing report keys,
  plots and panels keep their meaning (pixels pooled over every slice; mean/std over slices);
  the sample panels show the middle slices of the first volumes, then their quarter slices
  (the first and last slices of a volume are often empty).
- Work split as for 2D masks: volume ``i`` of the sorted pairs belongs to rank ``i mod
  world_size``; each rank's per-volume results are gathered to rank 0 after the ranks have
  shared their errors, before the slice counts (every rank makes the same collectives).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from seg.data import volumes as V
from seg.data.pairing import list_images, sample_key
from seg.evaluation.pairing import NAMING_RULE, PREDICTOR_BY_PRODUCTS, MaskPair, listing, strip_mask_suffix
from seg.evaluation.sources import Scorable, prefetch
from seg.evaluation.surface import DEFAULT_TOLERANCE_MM, summarize_volumes, volume_metrics

SLICE_AXIS = "axial"


VolumePair = MaskPair  # a predicted mask volume, its truth and optional image volume


def holds_volumes(folder) -> bool:
    """True when ``folder`` holds NIfTI volumes (recursively) and no 2D masks."""
    files = list_images(folder, volumes=True) if Path(folder).is_dir() else []
    kinds = {V.is_volume_name(f.name) for f in files}
    if kinds == {True, False}:
        raise ValueError(f"{folder} holds both 2D masks and NIfTI volumes; evaluate them from separate folders")
    return kinds == {True}


def index_volumes(folder: Path, role: str, strip_suffix: bool = True) -> dict[str, Path]:
    """``{pair id: file}`` of the NIfTI files under ``folder`` (mask suffixes removed from stems)."""
    index: dict[str, Path] = {}
    for rel in list_images(folder, volumes=True):
        if not V.is_volume_name(rel.name):
            continue
        stem = V.split_volume_name(rel.as_posix())[0]
        head, _, name = stem.rpartition("/")
        if strip_suffix and name.endswith(PREDICTOR_BY_PRODUCTS):
            continue
        name = strip_mask_suffix(name) if strip_suffix else name
        key = sample_key(f"{head}/{name}" if head else name)
        if key in index:
            raise ValueError(f"{role}: {index[key]} and {folder / rel} are both the volume of {key!r}; keep one of them")
        index[key] = folder / rel
    return index


def pair_volume_masks(pred_dir, gt_dir, image_dir=None) -> tuple[list[VolumePair], int]:
    """Every truth volume of ``gt_dir`` with its prediction; (pairs sorted by id, ignored predictions).

    Raises:
        ValueError: no pairs, or truths without a prediction (listed by name).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise ValueError(f"--pred_dir {pred_dir} is not a folder")
    truths, preds = index_volumes(gt_dir, "--gt_dir"), index_volumes(pred_dir, "--pred_dir")
    missing = sorted(set(truths) - set(preds))
    if len(missing) == len(truths):
        raise ValueError(f"no prediction volume in --pred_dir {pred_dir} pairs with a truth volume in --gt_dir "
                         f"{gt_dir} ({len(preds)} prediction and {len(truths)} truth volumes found); "
                         f"{NAMING_RULE}, and .nii/.nii.gz volumes")
    if missing:
        raise ValueError(f"{len(missing)} of {len(truths)} truth volumes in --gt_dir {gt_dir} have no prediction in "
                         f"--pred_dir {pred_dir}: {listing(missing)}. Predict them (seg predict), or evaluate a "
                         "--gt_dir without them")
    images = index_volumes(Path(image_dir), "--image_dir", strip_suffix=False) if image_dir else {}
    pairs = [VolumePair(k, preds[k], truths[k], images.get(k)) for k in sorted(truths)]
    return pairs, len(set(preds) - set(truths))


def _read_mask(path: Path) -> V.Volume:
    vol = V.load_volume(path)
    return V.Volume(vol.geometry, vol.data != 0)


class VolumePairs:
    """Prediction/truth volumes as a ``MaskPairs``-like source of slices, plus per-volume results.

    ``results`` collects this rank's per-volume metrics as the slices are handed out.
    """

    def __init__(self, pairs: list[VolumePair], gt_dir, pred_dir, tolerance_mm: float = DEFAULT_TOLERANCE_MM):
        self.pairs, self.tolerance_mm = pairs, float(tolerance_mm)
        self.results: list[dict] = []
        self.description = f"prediction volumes {pred_dir} against ground-truth volumes {gt_dir}"

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, item: tuple[int, VolumePair]) -> tuple[dict, list[Scorable]]:
        index, pair = item
        truth, pred = _read_mask(pair.truth), _read_mask(pair.pred)
        try:
            V.check_same_geometry(truth.geometry, pred.geometry)
        except V.VolumeReadError as exc:
            raise V.VolumeReadError(f"prediction {pair.pred} does not lie on the grid of its truth {pair.truth}: {exc}",
                                    kind=exc.kind) from None
        g = truth.geometry
        result = {"id": pair.key, **volume_metrics(pred.data, truth.data, g.spacing, self.tolerance_mm),
                  "spacing": [float(s) for s in g.spacing], "shape": list(g.shape)}
        image = None
        if pair.image is not None:
            image = V.load_volume(pair.image)
            V.check_same_geometry(truth.geometry, image.geometry)
        count = V.slice_count(g.shape, SLICE_AXIS)
        # panel order (RankScores picks indices < num_samples): every volume's middle slice, then quarters
        priority = {count // 2: 0, count // 4: 1, (3 * count) // 4: 2}
        slices = []
        for k in range(count):
            panel = priority.get(k, 3 + k) * len(self.pairs) + index
            img = None if image is None else V.get_slice(image.data, SLICE_AXIS, k)
            slices.append(Scorable(panel, f"{pair.key}/{SLICE_AXIS}_{k:04d}", V.get_slice(truth.data, SLICE_AXIS, k),
                                   pred=V.get_slice(pred.data, SLICE_AXIS, k), image_loader=lambda img=img: img))
        return result, slices

    def assigned(self, rank: int, world: int, workers: int = 4) -> Iterator[Scorable]:
        mine = [(i, p) for i, p in enumerate(self.pairs) if i % world == rank]
        for result, slices in prefetch(self._load, mine, max(1, min(workers, 2))):  # volumes are large
            self.results.append(result)
            yield from slices

    def count_for(self, rank: int, world: int) -> None:
        return None  # slices are known once the volumes are read


def volume_report_keys(per_rank: list[list[dict]], tolerance_mm: float) -> dict:
    """The report's volume keys from every rank's per-volume results."""
    return summarize_volumes([r for part in per_rank for r in part], tolerance_mm)


def format_volume_text(report: dict) -> list[str]:
    """Lines of the text report for the volume keys (empty when there are none)."""
    if "per_volume" not in report:
        return []
    mean, std, g = report["volume_mean"], report["volume_std"], report["volume_global"]
    fmt = lambda v: "     n/a" if v is None else f"{v:8.4f}"  # noqa: E731
    lines = ["", f"volumes: {report['n_volumes']} (3D metrics per volume; surface tolerance "
                 f"{report['surface_tolerance_mm']:g} mm; HD95 in mm)",
             f"{'metric':<16}{'global':>10}{'mean':>10}{'std':>10}", "-" * 46]
    for m in ("dice", "iou", "precision", "recall", "hd95", "surface_dice"):
        pooled = fmt(g[m]) if m in g else ""  # distances have no pooled value
        lines.append(f"{m:<16}{pooled:>10}{fmt(mean[m]):>10}{fmt(std[m]):>10}")
    if report["hd95_undefined"]:
        lines.append(f"  HD95 undefined for {report['hd95_undefined']} volume(s): {report['distance_policy']}")
    lines += ["", f"  {'dice':>8}{'hd95':>10}{'surf.dice':>11}  volume"]
    for r in sorted(report["per_volume"], key=lambda r: (r["dice"], r["id"])):
        lines.append(f"  {r['dice']:8.4f}{fmt(r['hd95']):>10}{r['surface_dice']:11.4f}  {r['id']}")
    return lines


def volume_metrics_plot(report: dict, path: Path) -> Path:
    """``volume_metrics.png``: per-volume Dice, surface Dice and HD95 (one point per volume)."""
    from matplotlib.figure import Figure

    from seg.evaluation.plots import save_figure

    rows = report["per_volume"]
    fig = Figure(figsize=(11, 3.6))
    panels = (("dice", "Dice (3D)"), ("surface_dice", f"surface Dice @ {report['surface_tolerance_mm']:g} mm"),
              ("hd95", "HD95 (mm)"))
    for ax, (name, label) in zip(fig.subplots(1, 3), panels):
        values = np.array([r[name] for r in rows if r[name] is not None], np.float64)
        if values.size:
            ax.boxplot(values, widths=0.5)
            ax.scatter(1 + np.random.default_rng(0).uniform(-0.08, 0.08, values.size), values, s=14, alpha=0.7,
                       color="tab:red")
        ax.set_title(f"{label}\nmean {values.mean():.3f}" if values.size else f"{label}\nundefined", fontsize=10)
        ax.set_xticks([])
    fig.suptitle(f"{report['n_volumes']} volumes", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
