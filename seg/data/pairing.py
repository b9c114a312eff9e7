"""Pairing images with masks, sample keys, and the train/val split.

Design choices:

- An image ``a/b/x.jpg`` (relative to the images folder) pairs with a mask at the same relative
  folder whose stem is ``x`` plus one of the mask suffixes (default ``""``, ``_mask``, ``-mask``,
  ``_seg``) and whose extension is any supported one: ``a/b/x.png``, ``a/b/x_mask.tif``, ...
  Several candidates for one image are ambiguous and reported, never guessed between.
- Images and masks may live in the same folder: a file that is some image's mask candidate
  (``x_mask.png`` next to ``x.jpg``) is then not treated as an image itself.
- Pairing never raises for bad data: it returns ``(pairs, problems)``; ``seg prepare`` decides
  whether a problem skips the pair or (``--strict``) fails the run.
- The sample key is the image's relative path without extension, made safe for tar and
  webdataset: ``/`` kept, ``..``/``.``/empty components and a leading ``/`` dropped, dots
  replaced by ``_`` (webdataset splits a member name at the first dot), any character outside
  ``[A-Za-z0-9_-]`` replaced by ``_``. Keys must be unique: ``x.jpg`` and ``x.png`` in one
  folder collide; every file of a collision is reported naming the others.
- The split is a hash of the key (sha1 mapped to [0, 1)), not of a position in a list: a key
  keeps its split when the data set grows or is re-prepared. With ``--group_by REGEX`` the
  hash is of the sample's group instead (``group_of``: the regex's first capture group, or its
  whole match, searched in the relative path), so every image of one patient or slide lands in
  the same split; a path the regex does not match is an error, never a group of its own. A
  pairs CSV may impose the split per row instead (an optional ``split`` column, ``train`` or
  ``val``; an empty cell falls back to the hash): neighbouring slices of a volume or tiles of
  one image are near copies, and a split by hash would put near copies on both sides.
- NIfTI volumes (``.nii``, ``.nii.gz``; listed only with ``volumes=True``) pair like images,
  the whole double extension removed from the stem (``x.nii.gz`` pairs with ``x_seg.nii.gz``),
  and only with volumes: a volume never pairs with a 2D mask, nor an image with a mask volume.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from seg.data.io import IMAGE_EXTENSIONS
from seg.data.volumes import is_volume_name, split_volume_name

DEFAULT_MASK_SUFFIXES = ("", "_mask", "-mask", "_seg")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True)
class Pair:
    """One sample to prepare. ``mask`` is None in unlabelled mode.

    ``image``/``mask`` are absolute paths; ``image_rel``/``mask_rel`` are the relative paths
    recorded in shards and ``dataset.json``. ``split`` is ``"train"``/``"val"`` when imposed (a
    pairs CSV's ``split`` column), None for the split by key hash.
    """

    key: str
    image: Path
    mask: Path | None
    image_rel: str
    mask_rel: str | None
    split: str | None = None


@dataclass(frozen=True)
class Problem:
    """A pair that cannot be used: ``reason`` is a short category, ``detail`` the full message."""

    image: str | None
    mask: str | None
    reason: str
    detail: str

    def as_dict(self) -> dict:
        return {"image": self.image, "mask": self.mask, "reason": self.reason, "detail": self.detail}


def sample_key(rel_path: str | Path) -> str:
    """The tar-safe sample key of an image's relative path (extension removed).

    Example: ``"a/b.c/x.y.jpg" -> "a/b_c/x_y"``, ``"../x.png" -> "x"``.
    """
    text = str(rel_path).replace("\\", "/")
    stem, ext = os.path.splitext(text)
    if is_volume_name(text):
        stem = split_volume_name(text)[0]
    elif ext.lower() not in IMAGE_EXTENSIONS:
        stem = text
    parts = [p for p in stem.split("/") if p not in ("", ".", "..")]
    safe = [_UNSAFE.sub("_", p.replace(".", "_")) for p in parts]
    return "/".join(safe) or "_"


def split_of(key: str, val_split: float) -> str:
    """``"val"`` if the key's hash in [0, 1) is below ``val_split``, else ``"train"``."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "val" if h < val_split else "train"


def group_of(rel_path: str, pattern: "re.Pattern") -> str | None:
    """The group of a relative path: ``pattern``'s first capture group, else its whole match;
    None when it does not match. Example: ``r"^(patient\\d+)/"`` on ``patient07/a.png`` -> ``patient07``."""
    match = pattern.search(str(rel_path).replace("\\", "/"))
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def _stem(rel: Path) -> str:
    return split_volume_name(rel.name)[0] if is_volume_name(rel.name) else rel.stem


def list_images(folder: str | Path, volumes: bool = False) -> list[Path]:
    """All files with a supported image extension under ``folder`` (recursive, sorted, relative).

    Hidden files and folders (names starting with ``.``, e.g. temporary files) are skipped.
    ``volumes=True`` lists NIfTI volumes (``.nii``, ``.nii.gz``) too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found (check the --images/--masks path)")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and (os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                                              or (volumes and is_volume_name(name))):
                found.append((Path(root) / name).relative_to(folder))
    return sorted(found, key=lambda p: p.as_posix())


def _stem_index(rel_paths: list[Path]) -> dict[tuple[str, str], list[Path]]:
    index: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for rel in rel_paths:
        index[(rel.parent.as_posix(), _stem(rel))].append(rel)
    return index


def _mask_candidates(image_rel: Path, index, suffixes, same_folder: bool) -> list[Path]:
    parent, stem, volume = image_rel.parent.as_posix(), _stem(image_rel), is_volume_name(image_rel.name)
    out = []
    for suffix in suffixes:
        out += [m for m in index.get((parent, stem + suffix), [])
                if not (same_folder and m == image_rel) and is_volume_name(m.name) == volume]
    return sorted(set(out), key=lambda p: p.as_posix())


def _dedupe_keys(pairs: list[Pair], problems: list[Problem]) -> list[Pair]:
    """Drop every pair whose key collides with another's, reporting it with the others' names."""
    by_key: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_key[pair.key].append(pair)
    kept = []
    for key, group in by_key.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        for pair in group:
            others = ", ".join(p.image_rel for p in group if p is not pair)
            problems.append(Problem(pair.image_rel, pair.mask_rel, "duplicate key",
                                    f"{pair.image_rel}: sample key {key!r} is also the key of {others}; "
                                    "rename one of the files"))
    return sorted(kept, key=lambda p: p.key)


def find_pairs(images_dir: str | Path, masks_dir: str | Path | None = None,
               suffixes=DEFAULT_MASK_SUFFIXES, volumes: bool = False) -> tuple[list[Pair], list[Problem]]:
    """Pair every image under ``images_dir`` with its mask under ``masks_dir``.

    Args:
        images_dir: folder of images (searched recursively).
        masks_dir: folder of masks mirroring ``images_dir``'s layout; None for an unlabelled
            cohort (every pair's mask is None).
        suffixes: mask stem suffixes tried in order, e.g. ``("", "_mask")``.
        volumes: also pair NIfTI volumes (with mask volumes).

    Returns:
        ``(pairs sorted by key, problems)``; problems are ``missing mask``, ``ambiguous mask``
        and ``duplicate key``.
    """
    images_dir = Path(images_dir).resolve()
    image_rels = list_images(images_dir, volumes)
    problems: list[Problem] = []
    pairs: list[Pair] = []
    if masks_dir is None:
        for rel in image_rels:
            pairs.append(Pair(sample_key(rel), images_dir / rel, None, rel.as_posix(), None))
        return _dedupe_keys(pairs, problems), problems
    masks_dir = Path(masks_dir).resolve()
    mask_rels = list_images(masks_dir, volumes)
    index = _stem_index(mask_rels)
    same = masks_dir == images_dir
    if same:  # masks next to images: a mask candidate is not an image
        taken = {m for rel in image_rels for m in _mask_candidates(rel, index, [s for s in suffixes if s], True)}
        image_rels = [rel for rel in image_rels if rel not in taken]
    for rel in image_rels:
        candidates = _mask_candidates(rel, index, suffixes, same)
        if not candidates:
            tried = ", ".join(f"{rel.parent.as_posix()}/{_stem(rel)}{s}.*".lstrip("./") for s in suffixes)
            problems.append(Problem(rel.as_posix(), None, "missing mask",
                                    f"{images_dir / rel}: no mask found in {masks_dir} (looked for {tried})"))
        elif len(candidates) > 1:
            names = ", ".join(c.as_posix() for c in candidates)
            problems.append(Problem(rel.as_posix(), names, "ambiguous mask",
                                    f"{images_dir / rel}: several mask candidates ({names}); keep one"))
        else:
            m = candidates[0]
            pairs.append(Pair(sample_key(rel), images_dir / rel, masks_dir / m, rel.as_posix(), m.as_posix()))
    return _dedupe_keys(pairs, problems), problems


SPLITS = ("train", "val")


def read_pairs_csv(path: str | Path, labelled: bool = True) -> tuple[list[Pair], list[Problem]]:
    """Read a CSV with columns ``image,mask`` (``mask`` optional when ``labelled`` is False).

    Relative paths are resolved against the CSV's folder. Keys are made from the image paths
    relative to their common folder. Missing files are reported as problems
    (``missing image``, ``missing mask``), never raised. An optional ``split`` column imposes
    the row's split (``train`` or ``val``; empty: by key hash); any other value is a
    ``ValueError`` naming the row, as it is a mistake in the file rather than bad data.
    """
    path = Path(path)
    base = path.resolve().parent
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        need = ["image", "mask"] if labelled else ["image"]
        if any(f not in fields for f in need):
            raise ValueError(f"{path}: needs a header row with columns {','.join(need)}; found {fields}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    rows = [r for r in rows if r.get("image")]
    if not rows:
        raise ValueError(f"{path}: no rows with an image path")
    for line, row in enumerate(rows, start=2):
        if row.get("split", "") not in ("", *SPLITS):
            raise ValueError(f"{path}: row {line} ({row['image']}) has split={row['split']!r}; the split column takes "
                             f"{' or '.join(SPLITS)} (or an empty cell for the split by key hash)")
    images = [(base / r["image"]).resolve() for r in rows]
    root = Path(os.path.commonpath([p.parent for p in images]))
    problems: list[Problem] = []
    pairs: list[Pair] = []
    for row, image in zip(rows, images):
        mask_text = row.get("mask") or None
        mask = (base / mask_text).resolve() if (labelled and mask_text) else None
        if not image.is_file():
            problems.append(Problem(row["image"], mask_text, "missing image", f"{image}: image file not found (row of {path})"))
        elif labelled and (mask is None or not mask.is_file()):
            problems.append(Problem(row["image"], mask_text, "missing mask",
                                    f"{mask or row['image']}: mask file not found (row of {path})"))
        else:
            pairs.append(Pair(sample_key(image.relative_to(root).as_posix()), image, mask, row["image"],
                              mask_text if labelled else None, row.get("split") or None))
    return _dedupe_keys(pairs, problems), problems
