"""What to predict: input listing, units of work, the worker split, safe output names.

Design choices:

- Inputs are listed the same way by every worker and sorted, then cut into *units*: one input
  shard, or a chunk of ``unit_size`` consecutive paths. Unit ``i`` belongs to worker
  ``i mod W`` (``seg.dist.prediction_worker``: torchrun ranks x Slurm array tasks, or
  ``--part/--num_parts``), so workers split a cohort with no overlap and no communication.
  Unit ids are stable for the same input list and unit size (``files-000042``,
  ``shard-train-000003``); the manifest stores each unit's inputs, so a changed list is caught.
- ``--list`` entries that are relative are resolved against the current directory (where the
  list was usually made with ``find``). Output paths mirror each input's path relative to the
  input folder (``--image_dir``), to the common parent of the listed paths (``--list``), or the
  sample key (``--shards``).
- Output names come only from ``safe_relative``: the path is normalised (``a/../b`` is ``b``),
  then the ``..`` left at its start, drive letters and leading ``/`` are dropped, backslashes are separators, so no input name can write outside
  ``--output_dir``. Two inputs that map to the same output name are an error naming both.
- NIfTI volumes (``.nii``, ``.nii.gz``) are inputs like images; the whole ``.nii.gz`` is
  removed from the output stem, and each volume is a unit of its own (its slices are batched
  through the model and its mask volume is one output, one manifest record).
"""

from __future__ import annotations

import glob
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from seg.data.io import IMAGE_EXTENSIONS
from seg.data.volumes import VOLUME_EXTENSIONS, is_volume_name, split_volume_name


@dataclass(frozen=True)
class Unit:
    """One unit of work.

    Attributes:
        index: position in the sorted unit list (decides the worker: ``index mod W``).
        id: stable name, used in the manifest and for ``--format tar`` output names.
        kind: 'files' (``sources`` are image paths) or 'shard' (``sources`` is one tar path).
        sources: input paths.
        rels: for 'files', the sanitised output stem of each source (``a/b/x`` for ``a/b/x.png``).
    """

    index: int
    id: str
    kind: str
    sources: tuple[str, ...]
    rels: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.sources) if self.kind == "files" else 0


def safe_relative(name: str) -> str:
    """A relative POSIX path that stays inside any folder it is joined to.

    Raises:
        ValueError: nothing usable is left (e.g. the name was only ``..``).
    """
    normal = posixpath.normpath(str(name).replace("\\", "/"))  # a/../b -> b; leading .. kept
    parts = [p for p in normal.split("/") if p not in ("", ".", "..")]
    parts = [p for p in parts if not (len(p) == 2 and p[1] == ":")]  # Windows drive letters
    parts = [p.lstrip(".") or "_" if p.startswith(".") else p for p in parts]  # no hidden names
    if not parts:
        raise ValueError(f"input name {name!r} gives no usable output name")
    return "/".join(parts)


def output_stem(rel_path: str) -> str:
    """Sanitised relative path without the extension: ``a/../b/x.png`` -> ``b/x``."""
    safe = safe_relative(rel_path)
    if is_volume_name(safe):
        return split_volume_name(safe)[0]
    head, _, name = safe.rpartition("/")
    dot = name.rfind(".")  # pathlib's suffix rule, without two PurePosixPath objects per input
    if 0 < dot < len(name) - 1:
        name = name[:dot]
    return f"{head}/{name}" if head else name


def is_image_name(name: str) -> bool:
    """An image or a NIfTI volume file name (hidden files excluded)."""
    return (os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS or is_volume_name(name)) and not name.startswith(".")


def list_folder(root: str | Path, exclude: str | Path | None = None) -> list[tuple[str, str]]:
    """Images under ``root`` (recursive, by extension), sorted: ``[(path, output_stem)]``.

    Args:
        root: the input folder.
        exclude: a folder to skip (the output folder, when it lies inside the input folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--image_dir {root} is not a folder")
    skip = Path(exclude).resolve() if exclude else None
    found = []
    for folder, dirs, files in os.walk(root):
        if skip is not None and Path(folder).resolve() == skip:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_folder = os.path.relpath(folder, root)  # once per folder, not per file (docs/BENCHMARKS.md)
        prefix = "" if rel_folder == "." else rel_folder + os.sep
        for name in files:
            if is_image_name(name):
                found.append((os.path.join(folder, name), output_stem(prefix + name)))
    found.sort(key=lambda item: item[1])
    return _check_unique(found)


def list_file(list_path: str | Path) -> list[tuple[str, str]]:
    """Paths from a text file (one per line; blank lines and ``#`` comments skipped), sorted.

    Output stems are the entries relative to their common parent folder, sanitised.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise ValueError(f"--list {list_path} does not exist")
    entries = []
    for line in list_path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line)
    if not entries:
        raise ValueError(f"--list {list_path} holds no paths (one image path per line)")
    safe = [safe_relative(e).split("/") for e in entries]
    common = 0
    if len(safe) > 1:
        parents = [p[:-1] for p in safe]
        while all(len(p) > common and p[common] == parents[0][common] for p in parents):
            common += 1
    else:
        common = len(safe[0]) - 1
    found = [(e, output_stem("/".join(s[common:]))) for e, s in zip(entries, safe)]
    found.sort(key=lambda item: (item[1], item[0]))
    return _check_unique(found)


def _check_unique(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for path, stem in found:
        if stem in seen:
            raise ValueError(f"inputs {seen[stem]} and {path} would both write {stem}_mask.png; "
                             "rename one of them or predict them into different --output_dir folders")
        seen[stem] = path
    return found


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from a brace pattern (``shards/val-{000000..000009}.tar``) and/or glob, sorted."""
    from braceexpand import braceexpand

    paths: set[str] = set()
    for part in braceexpand(pattern):
        matches = glob.glob(part) if glob.has_magic(part) else ([part] if os.path.exists(part) else [])
        paths.update(matches)
    if not paths:
        raise ValueError(f"--shards {pattern} matches no file (use a glob like 'shards/*.tar' or braces "
                         "like 'shards/val-{000000..000003}.tar')")
    return sorted(paths)


def file_units(found: list[tuple[str, str]], unit_size: int) -> list[Unit]:
    """Chunks of ``unit_size`` consecutive inputs (sorted by output stem); a volume is a unit alone."""
    if unit_size < 1:
        raise ValueError(f"--unit_size {unit_size} is not valid; it must be >= 1 (e.g. 256)")
    chunks, chunk = [], []
    for item in found:
        if is_volume_name(item[0]):
            chunks += [chunk] if chunk else []
            chunks.append([item])
            chunk = []
            continue
        chunk.append(item)
        if len(chunk) == unit_size:
            chunks.append(chunk)
            chunk = []
    chunks += [chunk] if chunk else []
    return [Unit(i, f"files-{i:06d}", "files", tuple(p for p, _ in c), tuple(s for _, s in c))
            for i, c in enumerate(chunks)]


def shard_units(shards: list[str]) -> list[Unit]:
    """One unit per shard; its id is the shard's sanitised path relative to their common folder."""
    parent = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in shards])
    units = []
    for i, shard in enumerate(shards):
        rel = os.path.relpath(os.path.abspath(shard), parent)
        units.append(Unit(i, "shard-" + output_stem(rel).replace("/", "-"), "shard", (shard,)))
    return units


def build_units(image_dir: str | None = None, list_path: str | None = None, shards: str | None = None,
                unit_size: int = 256, exclude: str | None = None) -> list[Unit]:
    """The full, sorted unit list for exactly one input kind (identical in every worker)."""
    given = [name for name, v in (("--image_dir", image_dir), ("--list", list_path), ("--shards", shards)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --image_dir, --list, --shards, --image_path (got {given or 'none'})")
    if shards:
        return shard_units(expand_shards(shards))
    found = list_folder(image_dir, exclude) if image_dir else list_file(list_path)
    if not found:
        raise ValueError(f"--image_dir {image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS + VOLUME_EXTENSIONS)})")
    return file_units(found, unit_size)


def units_for_worker(units: list[Unit], worker: int, num_workers: int) -> list[Unit]:
    """The units of worker ``worker`` of ``num_workers``: those with ``index mod W == worker``."""
    return [u for u in units if u.index % num_workers == worker]
