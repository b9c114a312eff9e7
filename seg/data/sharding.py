"""`seg prepare`: pair, validate in worker processes, write WebDataset shards and dataset.json.

Design choices:

- Pairs are sorted by key, then validated in chunks by a process pool; results come back in
  submission order through a bounded window of futures, so shards are written in key order
  (deterministic output) while memory holds only a few chunks of encoded bytes.
- A worker reads each file once and returns the original encoded image bytes (stored unchanged
  as ``KEY.image.<ext>``), the binarised mask as an 8-bit 0/255 PNG, the sample's JSON and its
  statistics (per-channel sum and sum of squares on the [0, 1] scale in float64, so channel
  mean/std are exact over all pixels; a grey image counts in all three channels).
- Bad pairs never stop the run: each is skipped with a reason (grouped in the summary and listed
  in ``dataset.json``). ``strict=True`` turns any bad pair into an error; shards written by that
  run are removed and no ``dataset.json`` is written.
- Crash safety: each shard is written under a ``seg.fileio`` temporary name and renamed only when
  closed and fsynced; ``dataset.json`` is written last, atomically. A killed run leaves complete
  shards and temporaries, never a partial final-named shard; ``--overwrite`` clears both.
- Tar members use a fixed mtime and PAX headers (long keys), so a re-run writes identical shards.
- NIfTI volumes (``.nii``/``.nii.gz`` images with label volumes) are sliced and written by
  ``seg.data.volume_prepare``; a run holds either 2D images or volumes, never both.
- ``group_by`` (a regex on the relative path) makes the split by group (patient, slide), not
  by sample; the group goes into each sample's JSON and the groups of each split into
  ``dataset.json``. Without it nothing changes (the split is by sample key).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import re
import tarfile
from collections import Counter, deque
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import webdataset as wds

from seg.data.io import ImageReadError, check_same_size, decode_image, decode_mask_info, encode_mask_png
from seg.data.io import opencv_threads, read_bytes, to_float01
from seg.data.pairing import DEFAULT_MASK_SUFFIXES, Pair, Problem, find_pairs, read_pairs_csv, split_of
from seg.data.qc_reference import build_reference, mask_stats
from seg.data.volume_prepare import groups_record, input_kind, prepare_volume_dataset, split_groups
from seg.fileio import AtomicFile, atomic_write_json, is_temporary
from seg.progress import progress_bar

FORMAT_VERSION = 1
_OWNED = re.compile(r"^(train|val|data)-\d{6}\.tar$")
_EXT = {".jpeg": "jpg", ".tiff": "tif"}


class PrepareError(ValueError):
    """A `seg prepare` run that cannot proceed; the message says why and what to do."""


# ----------------------------------------------------------------------------- validation (workers)
def _init_worker() -> None:
    import cv2  # one OpenCV thread, inherited: the pool runs inside seg.data.io.opencv_threads(1)

    with contextlib.suppress(Exception):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _validate(pair: Pair, val_split: float, labelled: bool) -> dict | Problem:
    side = "image"
    try:
        image_bytes = read_bytes(pair.image)
        image = decode_image(image_bytes, str(pair.image))
        meta = {"key": pair.key, "image": pair.image_rel, "mask": pair.mask_rel,
                "height": int(image.shape[0]), "width": int(image.shape[1]),
                "channels": 1 if image.ndim == 2 else int(image.shape[2]), "dtype": str(image.dtype),
                "foreground_fraction": None}
        split = (pair.split or split_of(pair.key, val_split)) if labelled else "data"
        out = {"key": pair.key, "split": split,
               "image_ext": _EXT.get(pair.image.suffix.lower(), pair.image.suffix.lower()[1:]),
               "image_bytes": image_bytes, "mask_png": None, "multi_value": False, "meta": meta}
        if labelled:
            side = "mask"
            mask, n_values = decode_mask_info(read_bytes(pair.mask), str(pair.mask))
            check_same_size(image, mask, str(pair.image), str(pair.mask))
            meta["foreground_fraction"] = float(mask.mean())
            out["mask_stats"] = mask_stats(mask)  # for the QC reference (seg.data.qc_reference)
            out["mask_png"] = encode_mask_png(mask)
            out["multi_value"] = n_values > 2
    except ImageReadError as exc:
        reason = exc.kind if exc.kind == "size mismatch" else f"{exc.kind} {side}"
        return Problem(pair.image_rel, pair.mask_rel, reason, str(exc))
    x = to_float01(image).astype(np.float64).reshape(image.shape[0] * image.shape[1], -1)
    s, ss = x.sum(axis=0), np.square(x).sum(axis=0)
    out["sum"] = np.broadcast_to(s, (3,)).copy() if s.size == 1 else s[:3]
    out["sumsq"] = np.broadcast_to(ss, (3,)).copy() if ss.size == 1 else ss[:3]
    out["pixels"] = x.shape[0]
    return out


def _validate_chunk(chunk: list[Pair], val_split: float, labelled: bool) -> list:
    return [_validate(p, val_split, labelled) for p in chunk]


def _results(pairs, val_split, labelled, workers, chunk=16):
    """Yield validation results in the order of ``pairs`` (bounded window of chunks in flight)."""
    chunks = [pairs[i:i + chunk] for i in range(0, len(pairs), chunk)]
    if workers <= 1:  # in this process (OpenCV's global log level and threads left as they are)
        for c in chunks:
            yield from _validate_chunk(c, val_split, labelled)
        return
    with opencv_threads(1), cf.ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        window: deque = deque()
        todo = iter(chunks)
        try:
            for c in todo:
                window.append(pool.submit(_validate_chunk, c, val_split, labelled))
                if len(window) >= 2 * workers:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        finally:
            for f in window:
                f.cancel()


# ----------------------------------------------------------------------------- shard writing
class ShardSeries:
    """``PREFIX-000000.tar, PREFIX-000001.tar, ...`` bounded by sample count and bytes.

    Each shard is written to a temporary name and renamed when closed. ``abort()`` removes the
    open temporary (the caller removes finished shards if it must).
    """

    def __init__(self, out: Path, prefix: str, max_count: int, max_bytes: float):
        self.out, self.prefix, self.max_count, self.max_bytes = out, prefix, max_count, max_bytes
        self.shards: list[dict] = []
        self.count = 0
        self._writer = self._file = None
        self._n = 0

    @staticmethod
    def _tar_bytes(sample: dict) -> int:
        """Bytes a sample adds to a tar: per member a header (+ a PAX header for a long name) and
        the data padded to 512-byte blocks."""
        total = 0
        for k, v in sample.items():
            if not k.startswith("__"):
                name_len = len(sample["__key__"].encode()) + 1 + len(k)
                total += 512 + (1024 if name_len > 99 else 0) + -(-len(v) // 512) * 512
        return total

    def _final_size(self, extra: int) -> int:
        """Size of the open shard if closed after ``extra`` more bytes: end blocks, record padding."""
        used = self._writer.tarstream.offset + extra + 1024  # offset: bytes written so far
        return -(-used // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def write(self, sample: dict) -> None:
        """Append a sample, first closing the open shard if the sample would break a bound.

        A single sample larger than ``max_bytes`` gets a shard of its own.
        """
        size = self._tar_bytes(sample)
        if self._writer is not None and (self._n >= self.max_count or self._final_size(size) > self.max_bytes):
            self._close()
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._n += 1
        self.count += 1

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = AtomicFile(self.out / self._name)
        self._writer = wds.TarWriter(self._file.file, mtime=0.0, format="PAX_FORMAT")
        self._n = 0

    def _close(self) -> None:
        self._writer.close()
        self._file.commit()
        self.shards.append({"name": self._name, "count": self._n, "bytes": (self.out / self._name).stat().st_size})
        self._writer = self._file = None

    def close(self) -> dict:
        if self._writer is not None:
            self._close()
        return {"count": self.count, "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._writer.close()  # the tar's end blocks go into the temporary, about to go
            self._file.abort()
        self._writer = self._file = None


class ShardRun:
    """The shard series of one `seg prepare` run, one per split, written as a unit.

    ``with ShardRun(out, names, ...) as run:`` hands out ``run.series[split]``; a normal exit
    closes every series into ``run.splits`` (``{split: {"count", "shards"}}``) and, with
    ``strict``, raises for any problem; an exception removes the open shards' temporaries and,
    with ``strict``, every shard the run wrote (a strict run leaves nothing).
    """

    def __init__(self, out: Path, names: tuple[str, ...], shard_size: int, shard_bytes: float, strict: bool,
                 problems: list):
        self.out, self.strict, self.problems = Path(out), strict, problems
        self.series = {n: ShardSeries(self.out, n, shard_size, shard_bytes) for n in names}
        self.splits: dict[str, dict] = {}

    def __enter__(self) -> "ShardRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.splits = {n: ser.close() for n, ser in self.series.items()}
                if self.strict and self.problems:
                    raise PrepareError(_strict_message(self.problems))
                return
            except BaseException:
                self._abort()
                raise
        self._abort()

    def _abort(self) -> None:
        for ser in self.series.values():
            ser.abort()
            if self.strict:
                for shard in ser.shards:
                    (self.out / shard["name"]).unlink(missing_ok=True)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out.iterdir()]
    if not entries:
        return
    if not overwrite:
        raise PrepareError(f"{out}: output folder is not empty; pass --overwrite to replace the shards and "
                           "dataset.json there, or pick another --out folder")
    for p in entries:
        if p.is_file() and (_OWNED.match(p.name) or p.name == "dataset.json" or is_temporary(p)):
            p.unlink()


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"min": None, "max": None, "mean": None}
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


def summary_text(info: dict, seconds: float) -> str:
    """The human summary printed at the end of `seg prepare`."""
    written = sum(s["count"] for s in info["splits"].values())
    shards = sum(len(s["shards"]) for s in info["splits"].values())
    parts = ", ".join(f"{k} {v['count']}" for k, v in info["splits"].items())
    lines = [f"wrote {written} pairs ({parts}) in {shards} shards; skipped {len(info['skipped'])}"]
    if "volumes" in info:  # NIfTI volumes: the pairs above are slices
        vol = info["volumes"]
        lines[0] = (f"wrote {written} {vol['slice_axis']} slices ({parts}) of {sum(vol['count'].values())} volumes "
                    f"({', '.join(f'{k} {v}' for k, v in vol['count'].items())}) in {shards} shards; skipped "
                    f"{len(info['skipped'])} volumes; {vol['empty_slices_dropped']} empty training slices left out")
    for reason, n in Counter(s["reason"] for s in info["skipped"]).most_common():
        lines.append(f"  skipped {n}: {reason}")
    if info["mask_multi_value_count"]:
        lines.append(f"  {info['mask_multi_value_count']} masks had more than two values (read as > 0)")
    lines.append(f"{written / max(seconds, 1e-9):.1f} pairs/s ({seconds:.2f} s)")
    return "\n".join(lines)


def prepare_dataset(images=None, masks=None, out="data/shards", pairs_csv=None, val_split: float = 0.2,
                    shard_size: int = 1000, shard_bytes: float = 1e9, suffixes=DEFAULT_MASK_SUFFIXES,
                    workers: int | None = None, strict: bool = False, overwrite: bool = False,
                    progress: bool = True, group_by: str | None = None, slice_axis: str = "axial",
                    modality: str | None = None, empty_slice_fraction: float = 1.0) -> dict:
    """Validate image/mask pairs and write WebDataset shards plus ``dataset.json`` to ``out``.

    Args:
        images: images folder (recursive). With ``masks=None`` and no ``pairs_csv``: unlabelled
            cohort, written as ``data-NNNNNN.tar`` shards without masks.
        masks: masks folder mirroring ``images``.
        out: output folder; must be empty unless ``overwrite``.
        pairs_csv: CSV with columns ``image,mask`` and optionally ``split`` (train/val, imposing
            the row's split), instead of ``images``/``masks``.
        val_split: fraction of keys (by hash) sent to ``val``, for pairs without an imposed split.
        shard_size, shard_bytes: a shard closes before exceeding either bound.
        suffixes: mask stem suffixes for folder pairing.
        workers: validation processes (default ``min(8, cpu count)``; 0 or 1 = in this process).
        strict: any bad pair is an error (``PrepareError`` listing them).
        overwrite: replace shards/dataset.json/temporaries already in ``out``.
        progress: show progress (a bar on a terminal, lines in a log: seg.progress).
        group_by: regex on the relative image path; its first group (else its match) is the
            sample's group, and groups, not samples, are split between train and val.
        slice_axis, modality, empty_slice_fraction: for NIfTI volumes only (see
            ``seg.data.volume_prepare``); ``modality`` defaults to ``mri``.

    Returns:
        the ``dataset.json`` content.
    """
    if not 0.0 <= val_split < 1.0:
        raise PrepareError(f"--val_split={val_split} is not valid; it must be in [0, 1)")
    if shard_size < 1 or shard_bytes < 1:
        raise PrepareError(f"--shard_size={shard_size} and --shard_bytes={shard_bytes} must be at least 1")
    if pairs_csv is not None:
        pairs, problems = read_pairs_csv(pairs_csv, labelled=True)
        labelled = True
    elif images is not None:
        pairs, problems = find_pairs(images, masks, tuple(suffixes), volumes=True)
        labelled = masks is not None
    else:
        raise PrepareError("nothing to prepare: pass --images (and --masks), or --pairs FILE.csv")
    if strict and problems:
        raise PrepareError(_strict_message(problems))
    try:
        volumes = input_kind(pairs, labelled, slice_axis, modality, empty_slice_fraction)
        groups = split_groups(pairs, val_split, labelled, group_by) if group_by or volumes else None
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    out = Path(out)
    _prepare_out(out, overwrite)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if volumes:
        return prepare_volume_dataset(pairs, problems, labelled, out, val_split=val_split, shard_size=shard_size,
                                      shard_bytes=shard_bytes, slice_axis=slice_axis, modality=modality or "mri",
                                      empty_slice_fraction=empty_slice_fraction, group_by=group_by, workers=workers,
                                      strict=strict, progress=progress, source=_source(images, masks, pairs_csv),
                                      groups=groups)
    names = ("train", "val") if labelled else ("data",)
    sizes, fg, multi = ([], []), [], 0
    written_keys: list[str] = []
    qc_stats: dict[str, list] = {n: [] for n in names}
    s, ss, npix = {n: np.zeros(3) for n in names}, {n: np.zeros(3) for n in names}, dict.fromkeys(names, 0)
    with ShardRun(out, names, shard_size, shard_bytes, strict, problems) as run:
        bar = progress_bar(total=len(pairs), unit="pair", desc="prepare", disable=not progress)
        with bar:
            for r in _results(pairs, val_split, labelled, workers):
                bar.update(1)
                if isinstance(r, Problem):
                    problems.append(r)
                    continue
                if groups is not None:  # the group's split, not the sample's
                    r["meta"]["group"], r["split"] = groups[r["key"]]
                    written_keys.append(r["key"])
                sample = {"__key__": r["key"], f"image.{r['image_ext']}": r["image_bytes"],
                          "json": json.dumps(r["meta"]).encode("utf-8")}
                if labelled:
                    sample["mask.png"] = r["mask_png"]
                    fg.append(r["meta"]["foreground_fraction"])
                    multi += r["multi_value"]
                    qc_stats[r["split"]].append(r["mask_stats"])
                run.series[r["split"]].write(sample)
                sizes[0].append(r["meta"]["height"])
                sizes[1].append(r["meta"]["width"])
                s[r["split"]] += r["sum"]
                ss[r["split"]] += r["sumsq"]
                npix[r["split"]] += r["pixels"]
    stat_split = "data" if not labelled else ("train" if npix["train"] else "val")
    n = max(npix[stat_split], 1)
    mean = s[stat_split] / n
    std = np.sqrt(np.maximum(ss[stat_split] / n - mean**2, 0.0))
    info = {"format_version": FORMAT_VERSION, "labelled": labelled,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": _source(images, masks, pairs_csv),
            "splits": run.splits,
            "image_size": {"height": _stats(sizes[0]), "width": _stats(sizes[1])},
            "channels": {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "scale": "dtype max",
                         "computed_on": stat_split},
            "foreground_fraction": {k: v for k, v in _stats(fg).items()} if labelled else None,
            "mask_multi_value_count": int(multi), "val_split": val_split, "shard_size": shard_size,
            "shard_bytes": int(shard_bytes),
            "skipped": [p.as_dict() for p in problems]}
    if groups is not None:
        info["groups"] = groups_record({k: groups[k] for k in written_keys}, group_by, names)
    if labelled:  # the training masks' distribution, for prediction QC (seg.inference.qc)
        info["qc_reference"] = build_reference(qc_stats[stat_split], stat_split)
    atomic_write_json(out / "dataset.json", info)
    return info


def _source(images, masks, pairs_csv) -> dict:
    return {"images": str(Path(images).resolve()) if images is not None and pairs_csv is None else None,
            "masks": str(Path(masks).resolve()) if masks is not None and pairs_csv is None else None,
            "pairs": str(Path(pairs_csv).resolve()) if pairs_csv is not None else None}


def _strict_message(problems: list[Problem]) -> str:
    lines = [f"--strict: {len(problems)} bad pairs (fix them, or run without --strict to skip them):"]
    lines += [f"  [{p.reason}] {p.detail}" for p in problems[:50]]
    if len(problems) > 50:
        lines.append(f"  ... and {len(problems) - 50} more")
    return "\n".join(lines)
