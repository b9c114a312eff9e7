"""`seg prepare` for NIfTI volumes: volumes -> 2D slices in WebDataset shards + dataset.json.

Design choices:

- A volume is one unit of work: a worker process reads the image volume (and its label
  volume), checks them (``seg.data.volumes``: readable, 3D, same canonical grid, binary and
  non-empty label), cuts the canonical volume into slices along ``slice_axis`` and returns the
  encoded samples. Volumes come back in key order through a window of ``workers`` volumes in
  flight (a volume's slices are held in memory while it waits), so the shards are identical
  whatever the number of workers.
- A sample is one slice: ``KEY.image.npy`` (the slice in the volume's stored dtype, lossless,
  ``numpy.save`` format), ``KEY.mask.png`` (8-bit 0/255) and ``KEY.json`` (volume id, slice
  index, spacing, shapes, affines, the volume's normalisation statistics). ``KEY`` is
  ``<volume key>/<axis>_<index>``, e.g. ``sub-01/t1/axial_0042``. Intensities are stored raw:
  the reader normalises with the statistics in the JSON (``npy_slice``), so a shard holds the
  data exactly as scanned and the normalisation is visible and reproducible.
- Split by subject: every slice of a volume goes to the split of the volume's group (its key,
  or the ``--group_by`` group); neighbouring slices never straddle train and val.
- ``--empty_slice_fraction f`` keeps a fraction f of the training slices without foreground
  (chosen by a hash of the slice key: the same slices on every run); validation keeps every
  slice so validation Dice measures whole volumes.
- ``ct`` normalisation needs the data set's foreground intensities before any slice can be
  described, so it reads the training volumes once more first (pass 1: a sample of each
  volume's foreground voxels, ``seg.data.volumes.ct_foreground_sample``); ``mri`` needs no pass
  1 (per-volume statistics).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from seg.data import volumes as V
from seg.data.io import encode_mask_png, opencv_threads
from seg.data.pairing import Pair, Problem, group_of, split_of
from seg.data.qc_reference import build_reference, mask_stats
from seg.data.volumes import is_volume_name
from seg.fileio import atomic_write_json
from seg.progress import progress_bar

VOLUME_KIND = "volumes"


@dataclass(frozen=True)
class VolumeOptions:
    """What ``seg prepare`` does with each volume (picklable: sent to worker processes)."""

    labelled: bool
    slice_axis: str = "axial"
    empty_slice_fraction: float = 1.0
    normalization: dict | None = None  # {"modality": "mri"} or the ct statistics


# ----------------------------------------------------------------------------- slice encoding
def npy_bytes(array: np.ndarray) -> bytes:
    """``numpy.save`` bytes of an array (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_slice(data: bytes, meta: dict, name: str) -> np.ndarray:
    """A ``.npy`` slice member decoded and normalised with the statistics in its JSON.

    Shape:
        ``(H, W)`` of any stored dtype -> float32 ``(H, W)``.

    Raises:
        ValueError: not a 2D numeric ``.npy``, or no normalisation statistics in ``meta``.
    """
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{name}: not a readable .npy array ({exc})") from None
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a 2D numeric slice, got {array.dtype} {array.shape}")
    stats = meta.get("normalization")
    if not isinstance(stats, dict) or not {"lo", "hi", "mean", "std"} <= set(stats):
        raise ValueError(f"{name}: its JSON has no normalization statistics (lo, hi, mean, std); "
                         "re-run `seg prepare` on the volumes")
    return V.normalize(array, stats)


def _keep_empty(slice_key: str, fraction: float) -> bool:
    if fraction >= 1.0:
        return True
    h = int.from_bytes(hashlib.sha1(slice_key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return h < fraction


def _listed(matrix: np.ndarray) -> list:
    return [[float(v) for v in row] for row in np.asarray(matrix)]


# ----------------------------------------------------------------------------- workers
def _problem(pair: Pair, exc: V.ImageReadError, side: str) -> Problem:
    kind = exc.kind
    reason = kind if kind in ("size mismatch", "geometry mismatch", "non-binary label", "empty label") else f"{kind} {side}"
    return Problem(pair.image_rel, pair.mask_rel, reason, str(exc))


def _read_pair(pair: Pair, labelled: bool) -> tuple | Problem:
    """(canonical image volume, canonical bool label or None), or the pair's problem."""
    try:
        vol = V.load_volume(pair.image)
    except V.ImageReadError as exc:
        return _problem(pair, exc, "image")
    if not labelled:
        return vol, None
    try:
        label = V.load_volume(pair.mask)
        V.check_same_geometry(vol.geometry, label.geometry)
        return vol, V.label_mask(label.data, str(pair.mask))
    except V.ImageReadError as exc:
        return _problem(pair, exc, "mask")


def ct_sample(pair: Pair) -> np.ndarray | Problem:
    """Pass 1 of ``ct``: a sample of the pair's foreground intensities (or its problem)."""
    read = _read_pair(pair, True)
    if isinstance(read, Problem):
        return read
    vol, fg = read
    return V.ct_foreground_sample(vol.data, fg, pair.key)


def volume_samples(pair: Pair, split: str, group: str, opts: VolumeOptions) -> dict | Problem:
    """Pass 2: the encoded slice samples of one volume, or the pair's problem."""
    read = _read_pair(pair, opts.labelled)
    if isinstance(read, Problem):
        return read
    vol, fg = read
    try:
        stats = V.volume_stats(vol.data, opts.normalization, str(pair.image))
    except V.ImageReadError as exc:
        return _problem(pair, exc, "image")
    g, axis = vol.geometry, V.axis_name(opts.slice_axis)
    common = {"image": pair.image_rel, "mask": pair.mask_rel, "volume": pair.key, "group": group,
              "slice_axis": axis, "spacing": g.slice_spacing(axis), "volume_shape": list(g.shape),
              "original_shape": list(g.original_shape), "affine": _listed(g.affine),
              "original_affine": _listed(g.original_affine), "channels": 1, "dtype": str(vol.data.dtype),
              "normalization": stats}
    samples, heights, widths, fractions, qc_stats, dropped = [], [], [], [], [], 0
    n = V.slice_count(g.shape, axis)
    for k in range(n):
        key = f"{pair.key}/{axis}_{k:04d}"
        image = V.get_slice(vol.data, axis, k)
        meta = {"key": key, "slice_index": k, "slices": n, **common,
                "height": int(image.shape[0]), "width": int(image.shape[1]), "foreground_fraction": None}
        sample = {"__key__": key, "image.npy": npy_bytes(image)}
        if fg is not None:
            mask = V.get_slice(fg, axis, k)
            meta["foreground_fraction"] = float(mask.mean())
            if split == "train" and not mask.any() and not _keep_empty(key, opts.empty_slice_fraction):
                dropped += 1
                continue
            sample["mask.png"] = encode_mask_png(mask)
            fractions.append(meta["foreground_fraction"])
            qc_stats.append(mask_stats(mask))  # the slice's share of the QC reference (seg.data.qc_reference)
        sample["json"] = json.dumps(meta).encode("utf-8")
        samples.append(sample)
        heights.append(meta["height"])
        widths.append(meta["width"])
    return {"key": pair.key, "split": split, "group": group, "samples": samples, "dropped": dropped,
            "heights": heights, "widths": widths, "fractions": fractions, "qc_stats": qc_stats,
            "spacing": list(g.spacing),
            "slices": n}


def _ordered(fn, jobs: list[tuple], workers: int):
    """``fn(*job)`` for each job, in order; ``workers`` processes, at most ``workers`` results waiting."""
    if workers <= 1:
        for job in jobs:
            yield fn(*job)
        return
    with opencv_threads(1), cf.ProcessPoolExecutor(max_workers=workers) as pool:
        window: deque = deque()
        try:
            for job in jobs:
                window.append(pool.submit(fn, *job))
                if len(window) >= workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


# ----------------------------------------------------------------------------- the run
def split_groups(pairs: list[Pair], val_split: float, labelled: bool, group_by: str | None) -> dict[str, tuple[str, str]]:
    """``{key: (group, split)}``: the group is the key, or ``group_by``'s match on the relative path.

    Raises:
        ValueError: the pattern is not a valid regex, or does not match some paths (listed).
    """
    pattern = None
    if group_by:
        try:
            pattern = re.compile(group_by)
        except re.error as exc:
            raise ValueError(f"--group_by {group_by!r} is not a valid regular expression ({exc})") from None
    out, unmatched = {}, []
    for pair in pairs:
        group = pair.key if pattern is None else group_of(pair.image_rel, pattern)
        if group is None:
            unmatched.append(pair.image_rel)
            continue
        split = (pair.split or split_of(group, val_split)) if labelled else "data"  # a pairs CSV split wins
        out[pair.key] = (group, split)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" ... and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        raise ValueError(f"--group_by {group_by!r} matches no group in {len(unmatched)} of {len(pairs)} relative "
                         f"paths: {shown}. Fix the pattern (it is searched in the path relative to --images; the "
                         "first capture group, else the whole match, is the group)")
    return out


def groups_record(groups: dict[str, tuple[str, str]], group_by: str | None, names) -> dict:
    """dataset.json ``groups``: the pattern and the sorted groups of each split."""
    return {"group_by": group_by, **{n: sorted({g for g, s in groups.values() if s == n}) for n in names}}


def input_kind(pairs: list[Pair], labelled: bool, slice_axis: str, modality: str | None,
               empty_slice_fraction: float) -> bool:
    """True for NIfTI volumes, False for 2D images.

    Raises:
        ValueError: the inputs mix both kinds, volume options are given for 2D images, or a
            volume option is invalid.
    """
    n = sum(is_volume_name(p.image.name) for p in pairs)
    if 0 < n < len(pairs):
        image = next(p.image_rel for p in pairs if not is_volume_name(p.image.name))
        volume = next(p.image_rel for p in pairs if is_volume_name(p.image.name))
        raise ValueError(f"the inputs mix {len(pairs) - n} 2D images (e.g. {image}) and {n} NIfTI volumes (e.g. "
                         f"{volume}); prepare them into separate --out folders")
    if n == 0 and (modality is not None or empty_slice_fraction != 1.0):
        raise ValueError("--modality and --empty_slice_fraction apply to NIfTI volumes (.nii, .nii.gz); "
                         "the inputs are 2D images")
    if n:
        check_volume_options(labelled, slice_axis, modality or "mri", empty_slice_fraction)
    return n > 0


def check_volume_options(labelled: bool, slice_axis: str, modality: str, empty_slice_fraction: float) -> None:
    """Raise ``ValueError`` naming the flag for an invalid volume option."""
    V.axis_index(slice_axis)
    if modality not in V.MODALITIES:
        raise ValueError(f"--modality {modality!r} is not valid; use one of {', '.join(V.MODALITIES)}")
    if not 0.0 <= empty_slice_fraction <= 1.0:
        raise ValueError(f"--empty_slice_fraction {empty_slice_fraction} is not valid; it must be in [0, 1]")
    if modality == "ct" and not labelled:
        raise ValueError("--modality ct computes the data set's statistics from labelled training volumes; "
                         "unlabelled volumes need no shards: predict them directly (seg predict --image_dir; "
                         "the checkpoint holds the statistics), or prepare them with --modality mri")


def _write_volumes(pairs, problems, groups, opts: VolumeOptions, series: dict, workers: int, strict: bool,
                   progress: bool) -> dict:
    """Pass 2: every volume's slices into ``series``; returns the counts and statistics seen."""
    seen = {"volumes": dict.fromkeys(series, 0), "dropped": 0, "heights": [], "widths": [], "fractions": [],
            "spacing": [], "kept": {}, "qc_stats": {name: [] for name in series}}
    jobs = [(p, groups[p.key][1], groups[p.key][0], opts) for p in pairs]
    with progress_bar(total=len(jobs), unit="volume", desc="prepare", disable=not progress) as bar:
        for r in _ordered(volume_samples, jobs, workers):
            bar.update(1)
            if isinstance(r, Problem):
                problems.append(r)
                continue
            if strict and problems:
                continue  # the run fails at the end: nothing more is written
            for sample in r["samples"]:
                series[r["split"]].write(sample)
            seen["volumes"][r["split"]] += 1
            seen["dropped"] += r["dropped"]
            for name in ("heights", "widths", "fractions"):
                seen[name] += r[name]
            seen["spacing"].append(r["spacing"])
            seen["qc_stats"][r["split"]] += r["qc_stats"]
            seen["kept"][r["key"]] = groups[r["key"]]
    return seen


def _ct_statistics(pairs, problems, groups, workers: int, progress: bool) -> tuple[list[Pair], dict]:
    """Pass 1 of ``ct``: (pairs still usable, the data set's statistics from the training volumes)."""
    train = [p for p in pairs if groups[p.key][1] == "train"]
    samples, bad = [], set()
    with progress_bar(total=len(train), unit="volume", desc="ct statistics", disable=not progress) as bar:
        for pair, r in zip(train, _ordered(ct_sample, [(p,) for p in train], workers)):
            bar.update(1)
            if isinstance(r, Problem):
                problems.append(r)
                bad.add(pair.key)
            else:
                samples.append(r)
    stats = {**V.ct_stats(samples), "percentiles": list(V.CLIP_PERCENTILES), "per_volume": False,
             "computed_on": "train"}
    return [p for p in pairs if p.key not in bad], stats


def prepare_volume_dataset(pairs: list[Pair], problems: list[Problem], labelled: bool, out: Path, *,
                           val_split: float, shard_size: int, shard_bytes: float, slice_axis: str = "axial",
                           modality: str = "mri", empty_slice_fraction: float = 1.0, group_by: str | None = None,
                           workers: int = 1, strict: bool = False, progress: bool = True, source: dict,
                           groups: dict | None = None) -> dict:
    """Write the slices of volume ``pairs`` as shards in ``out`` (already emptied) and dataset.json.

    Called by ``seg.data.sharding.prepare_dataset`` when the inputs are NIfTI volumes; its
    arguments mean the same; ``groups`` is ``split_groups``' result when already computed.
    Returns the ``dataset.json`` content.

    Raises:
        PrepareError: invalid options, ``ct`` without labelled training volumes, or ``strict``
            with bad pairs (the shards written are removed).
    """
    from seg.data.sharding import FORMAT_VERSION, PrepareError, ShardRun, _stats

    try:
        check_volume_options(labelled, slice_axis, modality, empty_slice_fraction)
        groups = split_groups(pairs, val_split, labelled, group_by) if groups is None else groups
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    names = ("train", "val") if labelled else ("data",)
    with ShardRun(out, names, shard_size, shard_bytes, strict, problems) as run:
        normalization = {"modality": "mri", "percentiles": list(V.CLIP_PERCENTILES), "per_volume": True}
        if modality == "ct":
            pairs, normalization = _ct_statistics(pairs, problems, groups, workers, progress)
        opts = VolumeOptions(labelled, V.axis_name(slice_axis), empty_slice_fraction, normalization)
        seen = _write_volumes(pairs, problems, groups, opts, run.series, workers, strict, progress)
    spacing = np.asarray(seen["spacing"], np.float64).reshape(-1, 3)
    info = {"format_version": FORMAT_VERSION, "labelled": labelled, "created": created_now(), "source": source,
            "splits": run.splits,
            "image_size": {"height": _stats(seen["heights"]), "width": _stats(seen["widths"])},
            "channels": {"mean": [0.0], "std": [1.0], "scale": "volume normalization", "computed_on": None},
            "foreground_fraction": _stats(seen["fractions"]) if labelled else None,
            "mask_multi_value_count": 0, "val_split": val_split, "shard_size": shard_size,
            "shard_bytes": int(shard_bytes), "skipped": [p.as_dict() for p in problems],
            "kind": VOLUME_KIND, "normalization": normalization,
            "volumes": {"count": seen["volumes"], "slice_axis": opts.slice_axis,
                        "empty_slice_fraction": empty_slice_fraction, "empty_slices_dropped": seen["dropped"],
                        "spacing_mm": {"min": spacing.min(0).tolist() if len(spacing) else None,
                                       "max": spacing.max(0).tolist() if len(spacing) else None}},
            "groups": groups_record(seen["kept"], group_by, names)}
    if labelled:  # the training slices' masks, for prediction QC (seg.inference.qc), as for 2D data
        split = "train" if seen["qc_stats"].get("train") else "val"
        info["qc_reference"] = build_reference(seen["qc_stats"].get(split, []), split)
    atomic_write_json(out / "dataset.json", info)
    return info


def created_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def volume_preprocess(info: dict) -> dict:
    """The checkpoint ``preprocess`` entries of a volume data set (``{}`` for 2D data).

    ``{"volume": {"slice_axis": "axial", "normalization": {...}}}``: prediction slices volumes
    along the same axis and normalises them with the same rule and (``ct``) the same numbers.
    """
    if info.get("kind") != VOLUME_KIND:
        return {}
    return {"volume": {"slice_axis": info["volumes"]["slice_axis"], "normalization": dict(info["normalization"])}}

