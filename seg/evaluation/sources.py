"""What is evaluated, and which rank reads which part of it.

Design choices:

- Two kinds of source. ``MaskPairs`` (``--pred_dir``/``--gt_dir``): a predicted and a true mask
  per image, read as ``bool`` (any value > 0 is foreground). ``LabelledImages``
  (``--model_path --data_dir``): an image and its truth, for the model to predict; ``--data_dir``
  may be
    * a folder written by ``seg prepare`` (``dataset.json``): its ``--split`` (``val`` by
      default, ``train``, or ``all`` = train then val),
    * a shard pattern (``shards/val-{000000..000003}.tar``, ``shards/*.tar``, ``a.tar::b.tar``),
    * a raw folder with ``images/`` and ``masks/``, paired like ``seg prepare`` does.
- Every source has one deterministic order (sorted ids for files, sorted shards then tar order
  for shards); item ``i`` of it belongs to rank ``i mod world_size``. With shards every rank
  walks the tar members but decodes only its own samples.
- Files are read in a small thread pool (OpenCV releases the GIL), a bounded window ahead of
  the scorer, so reading overlaps scoring and memory does not grow with the cohort.
- Nothing is skipped silently: an unreadable file, a mask of the wrong size, an unlabelled
  sample or an image without a mask is an error naming the file.
"""

from __future__ import annotations

import glob
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from seg.data.io import ImageReadError, check_same_size, read_image, read_mask
from seg.evaluation.pairing import MaskPair, listing



def prefetch(fn: Callable, items: Iterable, workers: int = 4) -> Iterator:
    """``map(fn, items)`` in a thread pool, in order, at most ``2 * workers`` items ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


@dataclass
class Scorable:
    """One image ready to score: ``pred`` (mask mode) or ``image`` (model mode) is set."""

    index: int
    key: str
    truth: np.ndarray
    pred: np.ndarray | None = None
    image: np.ndarray | None = None
    image_loader: Callable[[], np.ndarray | None] | None = None


class MaskPairs:
    """Prediction/truth mask files (``pairing.pair_masks``)."""

    def __init__(self, pairs: list[MaskPair], gt_dir, pred_dir):
        self.pairs = pairs
        self.description = f"predictions {pred_dir} against ground truth {gt_dir}"

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def _load(item: tuple[int, MaskPair]) -> Scorable:
        index, pair = item
        truth, pred = read_mask(pair.truth), read_mask(pair.pred)
        if truth.shape != pred.shape:
            raise ImageReadError(
                f"prediction {pair.pred} is {pred.shape[1]}x{pred.shape[0]} (WxH) but its truth {pair.truth} is "
                f"{truth.shape[1]}x{truth.shape[0]}; predictions must have the truth's size (never resized here)")

        def image() -> np.ndarray | None:
            if pair.image is None:
                return None
            img = read_image(pair.image)
            check_same_size(img, truth, str(pair.image), str(pair.truth))
            return img
        return Scorable(index, pair.key, truth, pred=pred, image_loader=image)

    def assigned(self, rank: int, world: int, workers: int = 4) -> Iterator[Scorable]:
        mine = [(i, p) for i, p in enumerate(self.pairs) if i % world == rank]
        return prefetch(self._load, mine, workers)

    def count_for(self, rank: int, world: int) -> int:
        return len(range(rank, len(self.pairs), world))


class LabelledImages:
    """(image, truth) samples for model mode, from shards or a raw images/ + masks/ folder."""

    def __init__(self, data_dir: str, split: str = "val"):
        self.data_dir, self.split = data_dir, split
        self.urls: list[str] = []
        self.counts: dict[str, int] = {}
        self.pairs: list = []
        self.total: int | None = None  # number of images, when known before reading
        path = Path(data_dir)
        if path.is_dir() and (path / "images").is_dir() and not (path / "dataset.json").is_file():
            self._raw_folder(path)
        elif path.is_dir():
            self._prepared_folder(path, split)
        else:
            self._shard_pattern(data_dir)

    def _raw_folder(self, path: Path) -> None:
        from seg.data.pairing import find_pairs

        masks = path / "masks"
        if not masks.is_dir():
            raise ValueError(f"--data_dir {path} has images/ but no masks/: evaluation needs the true masks")
        pairs, problems = find_pairs(path / "images", masks)
        if problems:
            raise ValueError(f"{len(problems)} image(s) of {path / 'images'} cannot be evaluated: "
                             + listing([p.detail for p in problems]))
        if not pairs:
            raise ValueError(f"no image/mask pairs in {path}/images and {path}/masks (a mask has the image's relative "
                             "path and stem, optionally with _mask, -mask or _seg, e.g. images/a/x.jpg + masks/a/x.png)")
        self.pairs = pairs
        self.total = len(pairs)
        self.description = f"raw images {path / 'images'} with masks {masks} ({len(pairs)} pairs)"

    def _prepared_folder(self, path: Path, split: str) -> None:
        from seg.data.shards import load_dataset_info, shard_counts, shard_urls

        info = load_dataset_info(path)
        names = ("train", "val") if split == "all" else (split,)
        have = [n for n in names if n in info.get("splits", {}) and info["splits"][n].get("shards")]
        if split != "all" and not have:
            others = [s for s in info.get("splits", {}) if info["splits"][s].get("shards")]
            hint = (" (unlabelled shards cannot be evaluated: they hold no masks)" if others == ["data"]
                    else f"; use --split {' or '.join(others)}" if others else "")
            raise ValueError(f"{path} has no {split!r} shards{hint}")
        if not have:
            raise ValueError(f"{path} has no train or val shards (unlabelled shards hold no masks to evaluate against)")
        self.urls = [u for n in have for u in shard_urls(path, n, info)]
        self.counts = {u: c for n in have for u, c in shard_counts(path, n, info).items()}
        counts = [info["splits"][n].get("count") for n in have]
        self.total = sum(counts) if all(isinstance(c, int) for c in counts) else None
        self.description = f"{', '.join(have)} split of {path} ({len(self.urls)} shards)"

    def _shard_pattern(self, pattern: str) -> None:
        from webdataset.shardlists import expand_urls

        urls = []
        for url in expand_urls(pattern):
            urls += sorted(glob.glob(url)) if glob.has_magic(url) else [url]
        missing = [u for u in urls if not Path(u).is_file()]
        if not urls or missing:
            raise ValueError(f"--data_dir {pattern!r} is not a folder and names no existing shard "
                             f"({'missing: ' + missing[0] if missing else 'no match'}); give a folder written by "
                             "`seg prepare`, a shard pattern such as 'shards/val-{000000..000003}.tar', or a folder "
                             "with images/ and masks/")
        from seg.data.shards import listed_counts

        self.urls = urls
        self.counts = listed_counts(urls)
        self.description = f"shards {pattern} ({len(urls)} files)"

    @staticmethod
    def _load_pair(item) -> Scorable:
        index, pair = item
        image, truth = read_image(pair.image), read_mask(pair.mask)
        check_same_size(image, truth, str(pair.image), str(pair.mask))
        return Scorable(index, pair.key, truth, image=image)

    @staticmethod
    def _decode(item) -> Scorable:
        from seg.data.shards import decode_sample

        index, raw = item
        sample = decode_sample(raw)
        if sample["mask"] is None:
            raise ValueError(f"sample {sample['key']!r} in shard {raw.get('__url__')} has no mask: unlabelled shards "
                             "cannot be evaluated (prepare them with --masks)")
        return Scorable(index, sample["key"], sample["mask"], image=sample["image"])

    def _shard_items(self, rank: int, world: int) -> Iterator:
        from seg.data.shards import read_shards

        samples = read_shards(self.counts)({"url": u} for u in self.urls)
        for i, sample in enumerate(samples):
            if i % world == rank:
                yield i, sample

    def assigned(self, rank: int, world: int, workers: int = 4) -> Iterator[Scorable]:
        if self.pairs:
            mine = [(i, p) for i, p in enumerate(self.pairs) if i % world == rank]
            return prefetch(self._load_pair, mine, workers)
        return prefetch(self._decode, self._shard_items(rank, world), workers)

    def count_for(self, rank: int, world: int) -> int | None:
        """Images this rank scores; None for a shard pattern (known only after reading it)."""
        return None if self.total is None else len(range(rank, self.total, world))
