"""Training and validation loaders over the shards written by `seg prepare`.

Design choices:

- Training streams through ``seg.data.shards.shard_pipeline``: the shard list is permuted per
  (seed, epoch) identically on every rank, split by rank and by DataLoader worker, each
  reader resamples its own shards forever and shuffles samples in a buffer. Order and
  augmentation are therefore a function of (seed, epoch, rank, worker) only. The loop takes
  exactly ``steps_per_epoch x grad_accum`` batches per rank, so every rank runs the same number
  of steps and no rank waits for another at the end of an epoch.
- ``steps_per_epoch`` (optimizer steps) = ceil(train set size / global batch), global batch =
  batch_size x world size x grad_accum. The epoch's last micro-batch is cut to the remainder
  (``last_batch_size``, shared over the ranks, at least one image each), as a DataLoader with
  ``drop_last=False`` does: an epoch trains the training set size, not up to a batch more.
  With gradient accumulation a remainder that does not fall in the last micro-batch is not cut.
- Too few shards for ranks x workers is an error before the first step, with the fix.
- Workers are not persistent: each epoch starts fresh workers, which pick up the epoch's seed.
  They are forked, so whatever the main process has imported they have for free:
  ``preload_for_workers`` imports albumentations there once (each worker importing it on its
  own cost 0.7 CPU s, 4 workers per epoch with validation, a fifth of a 10 s epoch's CPU).
  Workers ignore SIGTERM/SIGUSR1: Slurm (and ``timeout``) signal the whole process group, and a
  worker killed mid-step would crash the main process instead of letting it save ``last/``.
  A DataLoader with several workers yields batch i from worker i mod W (in order), so skipping
  the first k batches of a regenerated epoch stream (resume mid-epoch) is exact.
- Validation is exact: every sample goes to exactly one (rank, worker) reader. With at least
  as many shards as readers the split is by shard; otherwise every reader walks all val shards
  and keeps samples ``index mod readers == reader``, decoding only its own. Readers may get
  unequal counts; nothing in validation is a collective until the final gather.
- Shards are compared with dataset.json before the first step and while read
  (``seg.data.shards``). A corrupt sample stops training (exit code 1, the message names the
  shard and key) unless ``data.skip_bad_samples``: then it is skipped and counted, per epoch,
  in ``history.csv`` (``skipped_samples``) and the epoch's log line.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from seg.config import Config
from seg.data.shards import (ShardReadError, ShardSampleError, SkipCounter, check_enough_shards,
                             decode_and_transform, load_dataset_info, read_shards, shard_counts, shard_pipeline,
                             shard_urls)
from seg.data.transforms import augmentation_seed, build_eval_transform, build_train_transform, channel_stats
from seg.data.volume_prepare import volume_preprocess
from seg.exitcodes import RunFailed


class DataSpec:
    """What the trainer needs to know about a prepared data set.

    Attributes:
        info: parsed dataset.json; train_urls/val_urls: shard paths (checked against dataset.json:
        ``seg.data.shards.shard_urls``); counts: samples per shard; n_train/n_val: sample counts;
        mean/std: normalisation per input channel; preprocess: the checkpoint's preprocess dict.
    """

    def __init__(self, cfg: Config):
        d = cfg.data
        self.data_dir = Path(d.data_dir)
        self.info = load_dataset_info(self.data_dir)
        if self.info.get("labelled") is False:
            raise ValueError(f"{self.data_dir} holds unlabelled shards (data-*.tar); training needs masks: "
                             "run `seg prepare --images IMAGES --masks MASKS --out DIR`")
        self.train_urls = shard_urls(self.data_dir, "train", self.info)
        splits = self.info["splits"]
        if not splits.get("val", {}).get("shards"):
            raise ValueError(f"{self.data_dir} has no validation shards; training selects the best model and "
                             f"stops early on validation Dice: re-run `seg prepare ... --val_split 0.2`")
        self.val_urls = shard_urls(self.data_dir, "val", self.info)
        self.counts = {**shard_counts(self.data_dir, "train", self.info), **shard_counts(self.data_dir, "val", self.info)}
        self.n_train = int(splits["train"]["count"])
        self.n_val = int(splits["val"]["count"])
        self.mean, self.std = channel_stats(d.normalization, self.info, d.in_channels)
        self.preprocess = {"image_size": d.image_size, "in_channels": d.in_channels,
                           "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                           "sampling": d.sampling}
        self.preprocess.update(volume_preprocess(self.info))  # NIfTI volumes: slice axis, normalisation


@dataclass(frozen=True)
class EpochPlan:
    """The shape of every epoch on every rank (so all ranks run the same number of steps).

    Attributes:
        steps: optimizer steps per epoch; micro: micro-batches per rank (steps x grad_accum);
        last_size: per-rank size of the final micro-batch; images: training images of an
        epoch, all ranks together.
    """

    steps: int
    micro: int
    last_size: int
    images: int

    @classmethod
    def of(cls, n_train: int, batch_size: int, world_size: int, grad_accum: int, cap: int = 0) -> "EpochPlan":
        steps = steps_per_epoch(n_train, batch_size, world_size, grad_accum, cap)
        micro = steps * grad_accum
        last = last_batch_size(n_train, batch_size, world_size, grad_accum, steps)
        return cls(steps, micro, last, ((micro - 1) * batch_size + last) * world_size)


def steps_per_epoch(n_train: int, batch_size: int, world_size: int, grad_accum: int, cap: int = 0) -> int:
    """Optimizer steps per epoch: ceil(n_train / global batch), at least 1, at most ``cap`` if > 0."""
    steps = max(1, math.ceil(n_train / (batch_size * world_size * grad_accum)))
    return min(steps, cap) if cap > 0 else steps


def last_batch_size(n_train: int, batch_size: int, world_size: int, grad_accum: int, steps: int) -> int:
    """Per-rank size of an epoch's final micro-batch: the training images left after the
    other micro-batches, shared over the ranks (ceil, at least 1); ``batch_size`` when they
    fill it, or when ``steps`` was capped (``max_steps_per_epoch``) below the training set.

    Args:
        steps: optimizer steps per epoch (``steps_per_epoch``).
    """
    per_micro = batch_size * world_size
    rest = n_train - (steps * grad_accum - 1) * per_micro
    if rest <= 0 or rest >= per_micro:
        return batch_size
    return -(-rest // world_size)


def check_shards(spec: DataSpec, world_size: int, num_workers: int) -> None:
    """Fail before training when some (rank, worker) reader would get no training shard."""
    try:
        check_enough_shards(len(spec.train_urls), world_size, num_workers, "training")
    except ValueError as exc:
        readers = world_size * max(1, num_workers)
        per_shard = max(1, spec.n_train // readers)
        raise ValueError(f"{exc}, e.g. `seg prepare --images ... --masks ... --out NEW_DIR --shard_size {per_shard}` "
                         f"({spec.n_train} training samples in {len(spec.train_urls)} shard(s) under {spec.data_dir}), "
                         f"or pass --num_workers {max(0, len(spec.train_urls) // world_size)}") from None


def _skipper(cfg: Config) -> SkipCounter | None:
    """The bad-sample handler: None (a bad sample stops the run) unless data.skip_bad_samples."""
    return SkipCounter() if cfg.data.skip_bad_samples else None


def preload_for_workers() -> None:
    """Import the transform library in this process, so that DataLoader workers forked from it
    later inherit it instead of importing it each (see the module docstring)."""
    import albumentations  # noqa: F401


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGUSR1 (Slurm signals every process
    of a job; the main process decides, saves and exits, and its workers stop with it)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _seeded_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The DataLoader's base-seed generator: worker seeds depend on (seed, epoch, rank) only."""
    return torch.Generator().manual_seed(augmentation_seed(seed, epoch, rank, 10_000))


def train_loader(cfg: Config, spec: DataSpec, epoch: int, rank: int, world_size: int) -> DataLoader:
    """The endless training stream of one rank for one epoch (take the steps you need).

    Shape:
        yields ``(images float32 (B, C, S, S), masks float32 (B, 1, S, S), keys list[str],
        skipped int64 (B,))``: ``skipped`` counts bad samples skipped (``data.skip_bad_samples``).
    """
    d, t = cfg.data, cfg.train
    transform = build_train_transform(d.image_size, spec.mean, spec.std, d.in_channels, d.sampling,
                                      d.augment, seed=augmentation_seed(t.seed, epoch, rank),
                                      augmentation=d.augmentation, foreground_crop=d.foreground_crop)
    dataset = shard_pipeline(spec.train_urls, transform, split_by_node=True, split_by_worker=True,
                             shuffle_buffer=d.shuffle_buffer, shuffle_shards=True, seed=t.seed,
                             resampled=True, epoch=epoch, rank=rank, world_size=world_size, counts=spec.counts,
                             handler=_skipper(cfg))
    return DataLoader(dataset, batch_size=t.batch_size, num_workers=d.num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      generator=_seeded_generator(t.seed, epoch, rank), worker_init_fn=ignore_preemption_signals,
                      prefetch_factor=4 if d.num_workers > 0 else None)


def run_failed(exc: BaseException) -> RunFailed:
    """An error raised once training runs, as the command reports it (exit code 1, not the 2 of a
    usage error). A shard or sample error re-raised from a DataLoader worker ("Caught
    ShardReadError in DataLoader worker process 0. Original Traceback ...") is cut to its own
    message, which names the shard and the fix; any other error keeps the worker's traceback
    (it is a bug to report, not a data problem)."""
    text = str(exc)
    if not isinstance(exc, (ShardReadError, ShardSampleError)) or "\nOriginal Traceback" not in text:
        return RunFailed(text)
    worker = text.split(".", 1)[0].split(" in ", 1)[-1]  # "DataLoader worker process 0"
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    own = text.rsplit(marker, 1)[-1].strip() if marker in text else text
    return RunFailed(f"{own} (read in {worker})")


def _split_samples(reader: int, readers: int):
    return lambda src: islice(src, reader, None, readers)


class _ValReaders:
    """Stage factory giving this (rank, worker) reader its exact share of the val samples."""

    def __init__(self, urls: list[str], rank: int, world_size: int):
        self.urls, self.rank, self.world_size = list(urls), rank, world_size

    def __call__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        if len(self.urls) >= readers:  # by shard: read only our shards
            return iter([{"url": u} for u in self.urls[reader::readers]]), None
        return iter([{"url": u} for u in self.urls]), _split_samples(reader, readers)


class ValDataset(torch.utils.data.IterableDataset):
    """Exactly-once validation samples of one rank (see the module docstring).

    Shape:
        yields ``(float32 (C, S, S), float32 (1, S, S), key)``
    """

    def __init__(self, urls: list[str], transform, rank: int, world_size: int, counts: dict[str, int] | None = None,
                 handler=None):
        super().__init__()
        self.readers = _ValReaders(urls, rank, world_size)
        self.transform, self.rank, self.counts, self.handler = transform, rank, counts, handler

    def __iter__(self):
        source, split = self.readers()
        samples = read_shards(self.counts)(source)
        if split is not None:
            samples = split(samples)
        yield from decode_and_transform(self.transform, 0, 0, self.rank, handler=self.handler)(samples)


def val_loader(cfg: Config, spec: DataSpec, rank: int, world_size: int, batch_size: int | None = None) -> DataLoader:
    """This rank's share of the validation set (``patch`` sampling: one image per batch)."""
    d = cfg.data
    transform = build_eval_transform(d.image_size, spec.mean, spec.std, d.in_channels, d.sampling)
    dataset = ValDataset(spec.val_urls, transform, rank, world_size, spec.counts, _skipper(cfg))
    if batch_size is None:
        batch_size = cfg.train.batch_size if d.sampling == "resize" else 1
    workers = min(d.num_workers, max(1, len(spec.val_urls)))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=ignore_preemption_signals,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
