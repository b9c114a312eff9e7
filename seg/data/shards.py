"""Reading the shards written by `seg prepare` with webdataset: samples -> (image, mask, key).

Design choices:

- The pipeline is written out stage by stage (``shard_pipeline``): shard list -> node split ->
  worker split -> [resample] -> tar reading -> [shuffle buffer] -> decode + transform -> tuple.
  Each stage is a small exported function, so the trainer and predictor can compose their own.
- Shards are checked, not trusted. ``shard_urls`` compares the folder with ``dataset.json``
  before anything is read: a listed shard that is missing, or whose size differs from the one
  recorded (truncated, replaced), and an unlisted ``SPLIT-*.tar`` (a shard of another prepare
  run) are errors naming the shard and the fix. ``shard_samples`` is the one tar reader
  (training, validation, evaluation, prediction): a tar that breaks while read, or ends before
  the sample count of ``dataset.json`` (tarfile's stream mode stops silently at a truncated
  header), raises ``ShardReadError`` naming the shard; never a silently short epoch.
- Node splitting uses the rank/world size passed in (``urls[rank::world_size]``), not
  webdataset's ``split_by_node`` (which reads ``RANK``/``WORLD_SIZE`` or torch.distributed
  itself): ``seg.dist`` is the one reader of the launcher environment, and the split is testable
  without a process group. Worker splitting uses the DataLoader's worker info (or explicit
  ``worker``/``num_workers`` for tests).
- Order and augmentation are functions of (seed, epoch, rank, worker): the shard order is one
  permutation of the list per (seed, epoch), identical on every rank, before the split (so
  ranks x workers still cover every shard exactly once per epoch); the shuffle buffer, the
  resampling and the augmentation state (``SegTransform.reseed``) are seeded with
  ``augmentation_seed(seed, epoch, rank, worker)``, one stream each; a pipeline is built for
  one epoch (the trainer starts fresh, non-persistent workers each epoch).
- ``resampled=True`` draws this worker's shards with replacement forever (the trainer caps the
  steps so every rank runs the same number); without it each shard is read once.
- Bad samples (an image or mask that does not decode, a sample without its mask) raise
  ``ShardSampleError`` naming the shard and key: a corrupt sample stops training by default.
  Skipping is opt-in (``data.skip_bad_samples``: ``handler=SkipCounter()``): every yielded
  tuple carries how many bad samples this reader skipped just before it, so the count reaches
  the training process exactly through the DataLoader (``history.csv`` ``skipped_samples``).
- Slices of NIfTI volumes (``KEY.image.npy``, raw intensities in the volume's dtype) are
  decoded to float32 normalised with the statistics in the sample's JSON
  (``seg.data.volume_prepare.npy_slice``); encoded images decode as before.
"""

from __future__ import annotations

import json
import random
import tarfile
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import webdataset as wds

from seg.data.io import decode_image, decode_mask
from seg.data.transforms import augmentation_seed

DATASET_JSON = "dataset.json"
SHARD_ORDER, RESAMPLE, SHUFFLE = 1, 2, 3  # augmentation_seed streams (augmentation itself is 0)


class ShardSampleError(ValueError):
    """A sample in a shard that cannot be used; the message names the shard and the key."""


class ShardReadError(ValueError):
    """A shard that breaks while read or holds fewer samples than dataset.json lists."""


FIX = "copy the shard folder again, or re-run `seg prepare`"


def load_dataset_info(data_dir: str | Path) -> dict:
    """Parsed ``dataset.json`` of a shard folder; a raw image folder gets the prepare command."""
    data_dir = Path(data_dir)
    path = data_dir / DATASET_JSON
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); re-run `seg prepare` to rewrite it") from None
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist; create shards with "
                                f"`seg prepare --images IMAGES --masks MASKS --out {data_dir}`")
    if (data_dir / "images").is_dir():
        masks = f" --masks {data_dir / 'masks'}" if (data_dir / "masks").is_dir() else ""
        raise ValueError(
            f"{data_dir} holds raw images, not shards (no {DATASET_JSON}). Convert it first:\n"
            f"  seg prepare --images {data_dir / 'images'}{masks} --out {data_dir}_shards\n"
            f"then use --data_dir {data_dir}_shards")
    raise ValueError(f"{data_dir} has no {DATASET_JSON}; it is not a folder written by `seg prepare` "
                     f"(run `seg prepare --images IMAGES --masks MASKS --out {data_dir}`)")


def shard_urls(data_dir: str | Path, split: str, info: dict | None = None) -> list[str]:
    """Sorted paths of a split's shards as listed in dataset.json, checked against the folder.

    Raises ``FileNotFoundError`` for a missing shard and ``ShardReadError`` for one whose size
    differs from dataset.json or an extra ``SPLIT-*.tar`` that dataset.json does not list.

    Args:
        split: 'train', 'val', or 'data' (unlabelled shards).
        info: dataset.json contents when already loaded.
    """
    data_dir = Path(data_dir)
    info = load_dataset_info(data_dir) if info is None else info
    splits = info.get("splits", {})
    if split not in splits:
        raise ValueError(f"{data_dir / DATASET_JSON} has no split {split!r}; it has {', '.join(splits) or 'none'}")
    listed = {s["name"]: s for s in splits[split].get("shards", [])}
    if not listed:
        raise ValueError(f"split {split!r} of {data_dir} has no shards (count {splits[split].get('count', 0)})")
    missing = [n for n in sorted(listed) if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in {data_dir / DATASET_JSON} are missing, "
                                f"e.g. {data_dir / missing[0]}; {FIX}")
    for name in sorted(listed):
        expected = listed[name].get("bytes")
        size = (data_dir / name).stat().st_size
        if expected is not None and size != int(expected):
            raise ShardReadError(f"shard {data_dir / name} has {size} bytes but {DATASET_JSON} lists {expected}: "
                                 f"it was truncated or replaced after `seg prepare`; {FIX}")
    extra = sorted(p.name for p in data_dir.glob(f"{split}-*.tar") if p.name not in listed)
    if extra:
        raise ShardReadError(f"{data_dir / extra[0]} is not listed in {data_dir / DATASET_JSON} ({len(extra)} such "
                             f"shard(s)): a shard of another `seg prepare` run? Remove it, or {FIX}")
    return [str(data_dir / n) for n in sorted(listed)]


def shard_counts(data_dir: str | Path, split: str, info: dict) -> dict[str, int]:
    """``{shard path: sample count}`` of a split as dataset.json lists it."""
    return {str(Path(data_dir) / s["name"]): int(s["count"]) for s in info["splits"][split].get("shards", [])}


def listed_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts of shards given by path, from the ``dataset.json`` beside them where one
    lists them (shards given as a pattern); shards without one are read unchecked."""
    counts: dict[str, int] = {}
    for folder in sorted({str(Path(u).parent) for u in urls}):
        try:
            info = json.loads((Path(folder) / DATASET_JSON).read_text())
        except (OSError, ValueError):
            continue
        for split in info.get("splits", {}).values():
            for shard in split.get("shards", []):
                counts[str(Path(folder) / shard["name"])] = int(shard["count"])
    return {u: counts[str(Path(u))] for u in urls if str(Path(u)) in counts}


def shard_samples(url: str, expected: int | None = None) -> Iterator[dict]:
    """Raw webdataset samples (``__key__``, ``__url__``, ``image.<ext>``, ...) of one tar file.

    Raises:
        ShardReadError: the tar breaks while read, or holds other than ``expected`` samples.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    n = 0
    try:
        with open(url, "rb") as fh:
            for sample in group_by_keys({**f, "__url__": url} for f in tar_file_iterator(fh)):
                n += 1
                yield sample
    except (tarfile.TarError, OSError, ValueError) as exc:
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        raise ShardReadError(f"shard {url} cannot be read past sample {n} ({reason}): it is truncated or "
                             f"corrupt; {FIX}") from exc
    if expected is not None and n != expected:
        raise ShardReadError(f"shard {url} ended after {n} samples but {DATASET_JSON} lists {expected}: it was "
                             f"truncated after `seg prepare`; {FIX}")


def read_shards(counts: dict[str, int] | None = None) -> Callable[[Iterable], Iterator]:
    """Stage: ``{"url"}`` dicts -> raw samples (``shard_samples``, checked against ``counts``)."""
    def stage(src):
        for item in src:
            yield from shard_samples(item["url"], (counts or {}).get(item["url"]))
    return stage


def check_enough_shards(n_shards: int, world_size: int, num_workers: int, what: str = "training") -> None:
    """Every (rank, worker) needs at least one shard, else some read nothing and hang/skew."""
    readers = world_size * max(1, num_workers)
    if n_shards < readers:
        raise ValueError(
            f"{n_shards} {what} shard(s) for {world_size} rank(s) x {max(1, num_workers)} worker(s) = {readers} readers: "
            f"some would read no samples. Lower data.num_workers, or re-run `seg prepare` with a smaller "
            f"--shard_size so there are at least {readers} shards")


def decode_sample(sample: dict) -> dict:
    """A raw webdataset sample -> ``{"key", "image", "mask" (bool HxW | None), "meta"}``.

    ``image`` is uint8/uint16 for encoded images, float32 (normalised) for volume slices.

    Errors are ``ShardSampleError`` naming the shard (``__url__``) and key.
    """
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    where = f"sample {key!r} in shard {url}"
    image_fields = [k for k in sample if k.startswith("image.")]
    if len(image_fields) != 1:
        found = ", ".join(k for k in sample if not k.startswith("__"))
        raise ShardSampleError(f"{where}: expected one image.<ext> member, found {found or 'nothing'}")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if image_fields[0] == "image.npy":  # a volume slice: raw intensities + statistics in the JSON
            from seg.data.volume_prepare import npy_slice

            image = npy_slice(sample["image.npy"], meta, f"{url}:{key}.image.npy")
        else:
            image = decode_image(sample[image_fields[0]], f"{url}:{key}.{image_fields[0]}")
        mask = decode_mask(sample["mask.png"], f"{url}:{key}.mask.png") if "mask.png" in sample else None
    except (ValueError, TypeError) as exc:  # ImageReadError and JSONDecodeError are ValueErrors
        raise ShardSampleError(f"{where}: {exc}") from exc
    if mask is not None and mask.shape != image.shape[:2]:
        raise ShardSampleError(f"{where}: mask {mask.shape} and image {image.shape[:2]} differ in size")
    return {"key": key, "image": image, "mask": mask, "meta": meta}


class SkipCounter:
    """Opt-in webdataset handler that skips bad samples, counting them (webdataset's convention:
    return True to continue). ``messages`` keeps the first ``keep`` errors.

    Each DataLoader worker process counts in its own copy; the warnings it emits are how the
    main process sees them (or count in the main process with ``num_workers=0``)."""

    def __init__(self, keep: int = 20, warn: bool = True):
        self.count, self.keep, self.warn = 0, keep, warn
        self.messages: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if len(self.messages) < self.keep:
            self.messages.append(str(exn))
        if self.warn:
            warnings.warn(f"skipping bad sample ({self.count} so far): {exn}", stacklevel=2)
        return True


def _worker_info(worker: int | None = None, num_workers: int | None = None) -> tuple[int, int]:
    """(worker id, number of workers): the given ones, else the DataLoader's, else (0, 1)."""
    info = torch.utils.data.get_worker_info()
    w, n = (info.id, info.num_workers) if info is not None else (0, 1)
    return (w if worker is None else worker), (n if num_workers is None else num_workers)


# ---- stages: each takes an iterator and returns one (webdataset's "filter" convention) --------

def epoch_shard_order(urls: list[str], seed: int, epoch: int, shuffle: bool) -> list[dict]:
    """The shard list as webdataset url dicts, permuted per (seed, epoch) when ``shuffle``."""
    urls = list(urls)
    if shuffle:
        random.Random(augmentation_seed(seed, epoch, stream=SHARD_ORDER)).shuffle(urls)
    return [{"url": u} for u in urls]


def split_by_rank(rank: int, world_size: int) -> Callable[[Iterable], Iterator]:
    """Stage keeping items ``rank::world_size`` (explicit node split)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    return lambda src: islice(src, rank, None, world_size)


def split_workers(worker: int | None = None, num_workers: int | None = None) -> Callable[[Iterable], Iterator]:
    """Stage keeping items ``worker::num_workers`` of this DataLoader worker (or the given one)."""
    def stage(src):
        w, n = _worker_info(worker, num_workers)
        return islice(src, w, None, n)
    return stage


def resample(seed: int, epoch: int, rank: int, worker: int | None = None) -> Callable[[Iterable], Iterator]:
    """Stage drawing from its input shards with replacement, forever (seeded per reader)."""
    def stage(src):
        items = list(src)
        if not items:
            return
        rng = random.Random(augmentation_seed(seed, epoch, rank, _worker_info(worker)[0], stream=RESAMPLE))
        while True:
            yield rng.choice(items)
    return stage


def shuffle_samples(size: int, seed: int, epoch: int, rank: int, worker: int | None = None) -> Callable:
    """Stage shuffling samples in a buffer of ``size`` (seeded per reader)."""
    def stage(src):
        w = _worker_info(worker)[0]
        return wds.shuffle(size, size, seed=augmentation_seed(seed, epoch, rank, w, stream=SHUFFLE))(src)
    return stage


def decode_and_transform(transform, seed: int, epoch: int, rank: int, worker: int | None = None,
                         handler: Callable[[Exception], bool] | None = None) -> Callable:
    """Stage: raw labelled sample -> ``(image tensor, mask tensor, key, skipped)``.

    ``skipped`` is the number of bad samples ``handler`` skipped just before this one (always 0
    without a handler, which raises instead). Reseeds ``transform`` (when it has ``reseed``) for
    this (seed, epoch, rank, worker).
    """
    def stage(src):
        if hasattr(transform, "reseed"):
            transform.reseed(augmentation_seed(seed, epoch, rank, _worker_info(worker)[0]))
        skipped = 0
        for raw in src:
            try:
                s = decode_sample(raw)
                if s["mask"] is None:
                    raise ShardSampleError(f"sample {s['key']!r} in shard {raw.get('__url__')} has no mask.png: "
                                           "unlabelled shards cannot be trained on, or the shard is damaged")
                try:
                    image, mask = transform(s["image"], s["mask"])
                except Exception as exc:
                    raise ShardSampleError(f"sample {s['key']!r} in shard {raw.get('__url__')}: "
                                           f"transform failed: {exc}") from exc
            except ShardSampleError as exc:
                if handler is not None and handler(exc):
                    skipped += 1
                    continue
                raise
            yield image, mask, s["key"], skipped
            skipped = 0
    return stage


def shard_pipeline(urls: list[str], transform, *, split_by_node: bool = True, split_by_worker: bool = True,
                   shuffle_buffer: int = 0, shuffle_shards: bool = False, seed: int = 0,
                   resampled: bool = False, epoch: int = 0, rank: int = 0, world_size: int = 1,
                   counts: dict[str, int] | None = None, handler: Callable[[Exception], bool] | None = None,
                   worker: int | None = None, num_workers: int | None = None) -> wds.DataPipeline:
    """The streaming reader of labelled shards: an IterableDataset of ``(image, mask, key, skipped)``.

    Args:
        urls: shard paths (``shard_urls``).
        transform: ``(image, mask) -> (tensor, tensor)``, e.g. ``build_train_transform``.
        split_by_node: keep this rank's shards ``[rank::world_size]``.
        split_by_worker: keep this DataLoader worker's shards.
        shuffle_buffer: samples in the shuffle buffer; 0 keeps the shard order.
        shuffle_shards: permute the shard list per (seed, epoch) before splitting.
        seed, epoch, rank, world_size: the reader's identity (see the module docstring).
        resampled: draw shards with replacement forever (streaming training).
        counts: ``shard_counts``: a shard ending before its count is a ``ShardReadError``.
        handler: None raises on a bad sample; ``SkipCounter()`` skips and counts.
        worker, num_workers: override the DataLoader worker info (tests, custom loops).
    Shape:
        yields ``(float32 (C, S, S), float32 (1, S, S), str, int)``
    """
    if not urls:
        raise ValueError("no shards given to shard_pipeline (see shard_urls)")
    stages = [
        partial(iter, epoch_shard_order(urls, seed, epoch, shuffle_shards)),  # source stage
        split_by_rank(rank, world_size) if split_by_node else None,
        split_workers(worker, num_workers) if split_by_worker else None,
        resample(seed, epoch, rank, worker) if resampled else None,
        read_shards(counts),
        shuffle_samples(shuffle_buffer, seed, epoch, rank, worker) if shuffle_buffer > 0 else None,
        decode_and_transform(transform, seed, epoch, rank, worker, handler),
    ]
    return wds.DataPipeline(*[s for s in stages if s is not None])
