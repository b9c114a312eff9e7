"""Crash-safe file writing: every final name only ever holds a complete file.

Files are written under a temporary name in the destination folder
(``.NAME.tmp-PID-RANDOM``, or ``.NAME.tmp-TOKEN`` for callers that name many files) and
renamed into place with ``os.replace`` (atomic on POSIX within one file system) only once
complete, flushed and, unless asked otherwise, fsynced. A crash leaves at most a temporary
file, which ``remove_stale_temporaries`` (or a caller that knows the names) deletes on the next
run. ``AtomicFile`` is the one implementation; the functions below are shorthands for it.

``fsync=False`` is for files that are cheap to redo and numerous (prediction PNGs, demo data):
the rename alone protects them against a killed process, not against a machine crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


def temporary_name(path: str | Path, token: str | None = None) -> Path:
    """The temporary sibling of ``path``: ``.NAME.tmp-TOKEN`` (default token: PID-RANDOM)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{token or f'{os.getpid()}-{secrets.token_hex(4)}'}")


def is_temporary(path: str | Path) -> bool:
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


class AtomicFile:
    """A binary file written under a temporary name and renamed to ``path`` by ``commit()``.

    Args:
        path: the final name.
        fsync: fsync the data before the rename (durable against a machine crash).
        token: unique suffix of the temporary name (default: PID and random hex); a writer of
            many files passes its own counter to save the random draw per file.
        make_dirs: create the folder if needed (a writer of many files in few folders makes
            them itself, once).
        open_file: open ``self.file`` for writing; False hands out only ``self.tmp`` for
            libraries that write to a path themselves (``torch.save``, ``savefig``).

    Use as a context manager (commit on success, abort on an exception) or call ``commit()`` /
    ``abort()``; ``file`` is a buffered binary file (``write``, or give it to ``tarfile``).
    """

    def __init__(self, path: str | Path, fsync: bool = True, token: str | None = None, make_dirs: bool = True,
                 open_file: bool = True):
        self.path, self.fsync = os.fspath(path), fsync
        if make_dirs:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.tmp = os.fspath(temporary_name(self.path, token))
        self.file = open(self.tmp, "wb") if open_file else None

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        """Flush (and fsync) the data, then rename the temporary to the final name."""
        try:
            if self.file is not None:
                self.file.flush()
                if self.fsync:
                    os.fsync(self.file.fileno())
                self.file.close()
            elif self.fsync and os.path.exists(self.tmp):
                fd = os.open(self.tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the temporary; the final name is untouched."""
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write by name; on success it is renamed to ``path``."""
    with AtomicFile(path, fsync=fsync, open_file=False) as f:
        yield Path(f.tmp)


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with AtomicFile(path, fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | Path, obj, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", fsync=fsync)


def remove_stale_temporaries(folder: str | Path, recursive: bool = True) -> int:
    """Delete temporary files left by a crashed writer; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(f".*{TMP_MARK}*") if recursive else folder.glob(f".*{TMP_MARK}*")
    removed = 0
    for p in found:
        if p.is_file() and is_temporary(p):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
    return removed
