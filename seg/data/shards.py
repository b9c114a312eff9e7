"""Reading the shards written by `seg prepare` with webdataset: samples -> (image, mask, key).

Design choices:

- The pipeline is written out stage by stage (``shard_pipeline``): shard list -> node split ->
  worker split -> [resample] -> tar reading -> [shuffle buffer] -> decode + transform -> tuple.
  Each stage is a small exported function, so the trainer and predictor can compose their own.
- Node splitting uses the rank/world size passed in (``urls[rank::world_size]``), not
  webdataset's ``split_by_node`` (which reads ``RANK``/``WORLD_SIZE`` or torch.distributed
  itself): ``seg.dist`` is the one reader of the launcher environment, and the split is testable
  without a process group. Worker splitting uses the DataLoader's worker info (or explicit
  ``worker``/``num_workers`` for tests).
- Order and augmentation are functions of (seed, epoch, rank, worker): the shard order is one
  permutation of the list per (seed, epoch), identical on every rank, before the split (so
  ranks x workers still cover every shard exactly once per epoch); the shuffle buffer, the
  resampling and the augmentation state (``SegTransform.reseed``) are seeded with
  ``augmentation_seed(seed, epoch, rank, worker)``, one stream each. ``ShardPipeline.set_epoch`` changes the
  epoch; with ``persistent_workers=True`` the workers keep the epoch they started with, so use
  non-persistent workers (the default) or rebuild the pipeline.
- ``resampled=True`` draws this worker's shards with replacement forever (the trainer caps the
  steps so every rank runs the same number); without it each shard is read once.
- Bad samples raise ``ShardSampleError`` naming the shard and key. Skipping is opt-in: pass
  ``handler=SkipCounter()``, which counts (and keeps the first messages of) what it skipped.
- A sample without a mask (unlabelled shards) yields ``NO_MASK`` (an empty tensor, which
  collates) in the mask position; ``has_mask(t)`` tells them apart.
- Slices of NIfTI volumes (``KEY.image.npy``, raw intensities in the volume's dtype) are
  decoded to float32 normalised with the statistics in the sample's JSON
  (``seg.data.volume_prepare.npy_slice``); encoded images decode as before.
"""

from __future__ import annotations

import json
import random
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import webdataset as wds
from webdataset.filters import _shuffle

from seg.data.io import decode_image, decode_mask
from seg.data.transforms import augmentation_seed

DATASET_JSON = "dataset.json"
NO_MASK = torch.zeros(0)
SHARD_ORDER, RESAMPLE, SHUFFLE = 1, 2, 3  # augmentation_seed streams (augmentation itself is 0)


class ShardSampleError(ValueError):
    """A sample in a shard that cannot be used; the message names the shard and the key."""


def has_mask(mask: torch.Tensor) -> bool:
    """False for the ``NO_MASK`` placeholder of unlabelled samples (also after collation)."""
    return mask.numel() > 0


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
    """Sorted paths of a split's shards as listed in dataset.json, each checked to exist.

    Args:
        split: 'train', 'val', or 'data' (unlabelled shards).
        info: dataset.json contents when already loaded.
    """
    data_dir = Path(data_dir)
    info = load_dataset_info(data_dir) if info is None else info
    splits = info.get("splits", {})
    if split not in splits:
        raise ValueError(f"{data_dir / DATASET_JSON} has no split {split!r}; it has {', '.join(splits) or 'none'}")
    names = sorted(s["name"] for s in splits[split].get("shards", []))
    if not names:
        raise ValueError(f"split {split!r} of {data_dir} has no shards (count {splits[split].get('count', 0)})")
    missing = [n for n in names if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in {data_dir / DATASET_JSON} are missing, "
                                f"e.g. {data_dir / missing[0]}; re-run `seg prepare` or copy the whole folder")
    return [str(data_dir / n) for n in names]


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
        return _shuffle(src, bufsize=size, initial=size, seed=augmentation_seed(seed, epoch, rank, w, stream=SHUFFLE))
    return stage


def decode_and_transform(transform, seed: int, epoch: int, rank: int, worker: int | None = None,
                         handler: Callable[[Exception], bool] | None = None) -> Callable:
    """Stage: raw sample -> ``(image tensor, mask tensor | NO_MASK, key)``.

    Reseeds ``transform`` (when it has ``reseed``) for this (seed, epoch, rank, worker).
    """
    def stage(src):
        if hasattr(transform, "reseed"):
            transform.reseed(augmentation_seed(seed, epoch, rank, _worker_info(worker)[0]))
        for raw in src:
            try:
                s = decode_sample(raw)
                try:
                    image, mask = transform(s["image"], s["mask"])
                except Exception as exc:
                    raise ShardSampleError(f"sample {s['key']!r} in shard {raw.get('__url__')}: "
                                           f"transform failed: {exc}") from exc
            except Exception as exc:
                if handler is not None and handler(exc):
                    continue
                raise
            yield image, (mask if mask is not None else NO_MASK), s["key"]
    return stage


class ShardPipeline(wds.DataPipeline):
    """A ``webdataset.DataPipeline`` whose epoch can be changed (``set_epoch``) between passes."""

    def __init__(self, build: Callable[[int], list], epoch: int = 0):
        self._build = build
        self.epoch = epoch
        super().__init__(*build(epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.pipeline = list(self._build(epoch))


def shard_pipeline(urls: list[str], transform, *, split_by_node: bool = True, split_by_worker: bool = True,
                   shuffle_buffer: int = 0, shuffle_shards: bool = False, seed: int = 0,
                   resampled: bool = False, epoch: int = 0, rank: int = 0, world_size: int = 1,
                   handler: Callable[[Exception], bool] | None = None,
                   worker: int | None = None, num_workers: int | None = None) -> ShardPipeline:
    """The streaming reader: an IterableDataset of ``(image, mask | NO_MASK, key)``.

    Args:
        urls: shard paths (``shard_urls``).
        transform: ``(image, mask) -> (tensor, tensor | None)``, e.g. ``build_train_transform``.
        split_by_node: keep this rank's shards ``[rank::world_size]``.
        split_by_worker: keep this DataLoader worker's shards.
        shuffle_buffer: samples in the shuffle buffer; 0 keeps the shard order.
        shuffle_shards: permute the shard list per (seed, epoch) before splitting.
        seed, epoch, rank, world_size: the reader's identity (see the module docstring).
        resampled: draw shards with replacement forever (streaming training).
        handler: None raises on a bad sample; ``SkipCounter()`` skips and counts.
        worker, num_workers: override the DataLoader worker info (tests, custom loops).
    Shape:
        yields ``(float32 (C, S, S), float32 (1, S, S) or NO_MASK, str)``
    """
    if not urls:
        raise ValueError("no shards given to shard_pipeline (see shard_urls)")
    tar_handler = handler if handler is not None else wds.reraise_exception

    def build(ep: int) -> list:
        return [
            partial(iter, epoch_shard_order(urls, seed, ep, shuffle_shards)),  # source stage
            split_by_rank(rank, world_size) if split_by_node else None,
            split_workers(worker, num_workers) if split_by_worker else None,
            resample(seed, ep, rank, worker) if resampled else None,
            wds.tarfile_to_samples(handler=tar_handler),
            shuffle_samples(shuffle_buffer, seed, ep, rank, worker) if shuffle_buffer > 0 else None,
            decode_and_transform(transform, seed, ep, rank, worker, handler),
        ]
    return ShardPipeline(lambda ep: [s for s in build(ep) if s is not None], epoch)
