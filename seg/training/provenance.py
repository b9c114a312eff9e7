"""The reproducibility record: written as ``provenance.json`` and stored in every checkpoint.

Design choices:

- Plain JSON types only (strings, numbers, lists, dicts), so that model checkpoints carrying
  it still load with ``torch.load(weights_only=True)``.
- It records what is needed to reproduce or audit a run: the git commit of the code (and
  whether the tree had uncommitted changes), package versions, world size, seeds, the exact
  command line, host, and the SHA-256 of the data set's ``dataset.json`` (which lists every
  shard and count, so it identifies the data).
- Collected once on rank 0 at start; nothing here may fail a run: a missing git or package is
  recorded as ``null``.
"""

from __future__ import annotations

import datetime
import hashlib
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("seg", "torch", "accelerate", "webdataset", "albumentations", "opencv-python-headless", "numpy")
PROVENANCE_FILE = "provenance.json"


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def collect_provenance(data_dir: str | Path, world_size: int, seed: int, mixed_precision: str,
                       argv: list[str] | None = None) -> dict:
    """The run's reproducibility record as a plain dict.

    Args:
        data_dir: the shard folder (its ``dataset.json`` is hashed).
        world_size: number of training processes.
        seed: train.seed (data order is a function of seed, epoch, rank and worker).
        mixed_precision: the resolved precision ('bf16', 'fp16' or 'fp32').
        argv: the command line (default: ``sys.argv``).
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "world_size": int(world_size),
        "seed": int(seed),
        "mixed_precision": mixed_precision,
        "command": list(sys.argv if argv is None else argv),
        "dataset_json_sha256": _sha256(Path(data_dir) / "dataset.json"),
        "data_dir": str(Path(data_dir).resolve()),
    }
