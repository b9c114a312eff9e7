"""Test data made by the real commands' building blocks (no mocks): demo images -> shards."""

from __future__ import annotations

from pathlib import Path

from seg.data.sharding import prepare_dataset
from seg.data.synthetic import make_demo_dataset


def demo_shards(root: Path, n: int, size: int, shard_size: int, val_split: float = 0.2, seed: int = 0) -> Path:
    """``n`` synthetic pairs of ``size`` px prepared into shards of ``shard_size``: ``root/shards``."""
    raw = make_demo_dataset(root / "raw", n=n, size=size, seed=seed)
    prepare_dataset(raw / "images", raw / "masks", out=root / "shards", val_split=val_split, shard_size=shard_size,
                    workers=0, progress=False)
    return root / "shards"
