"""Pair prediction masks with ground-truth masks by relative path and stem.

Design choices:

- The rule is the one ``seg prepare`` uses for images and masks: the same relative folder and
  the same stem, an optional mask suffix (``_mask``, ``-mask``, ``_seg``) ignored on either
  side, any supported extension. So ``seg predict``'s ``a/b/x_mask.png`` pairs with the truth
  ``a/b/x.png``, ``a/b/x_mask.tif`` or ``a/b/x_seg.png``, and a plain ``a/b/x.png`` prediction
  works too.
- Two files of one folder that reduce to the same name (``x.png`` and ``x_mask.png``) are an
  error naming both: silently picking one would score the wrong mask.
- Every truth needs a prediction: a missing one is an error listing the names (the first 20
  and how many more), never a silently smaller evaluation. Predictions without a truth are
  ignored and counted; ``seg predict``'s by-products (``_overlay``, ``_prob``,
  ``_visualization``) and hidden/temporary files are skipped.
- The pair id (the ``id`` in the report) is the sample key (``seg.data.pairing.sample_key``)
  of the truth's relative path without its mask suffix: the same id ``seg prepare`` gives the
  image, so reports from ``--pred_dir`` and from a model on shards name images alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seg.data.io import IMAGE_EXTENSIONS
from seg.data.pairing import DEFAULT_MASK_SUFFIXES, list_images, sample_key

MASK_SUFFIXES = tuple(s for s in DEFAULT_MASK_SUFFIXES if s)
PREDICTOR_BY_PRODUCTS = ("_overlay", "_prob", "_visualization")
MAX_LISTED = 20
NAMING_RULE = (
    "a prediction pairs with a truth of the same relative path and stem, an optional suffix "
    f"{', '.join(MASK_SUFFIXES)} ignored on either side (a/x_mask.png pairs with a/x.png), "
    f"extensions {', '.join(IMAGE_EXTENSIONS)}"
)


@dataclass(frozen=True)
class MaskPair:
    key: str
    pred: Path
    truth: Path
    image: Path | None = None


def strip_mask_suffix(stem: str) -> str:
    """``x_mask`` -> ``x``; a stem without a known suffix is returned unchanged."""
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def index_masks(folder: Path, role: str, skip_by_products: bool = False) -> dict[str, Path]:
    """Map pair id -> file for every mask under ``folder``.

    Args:
        folder: the folder to scan recursively.
        role: the folder's flag, used in errors (``--pred_dir``).
        skip_by_products: skip ``seg predict``'s ``_overlay``/``_prob``/``_visualization`` files.

    Raises:
        ValueError: the folder does not exist, or two files reduce to the same id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{role} {folder} is not a folder")
    index: dict[str, Path] = {}
    for rel in list_images(folder):
        path = folder / rel
        rel = rel.with_suffix("")
        if skip_by_products and rel.name.endswith(PREDICTOR_BY_PRODUCTS):
            continue
        key = sample_key(rel.with_name(strip_mask_suffix(rel.name)).as_posix())
        if key in index:
            raise ValueError(
                f"{role}: {index[key]} and {path} are both the mask of {key!r}; "
                "keep one of them (or move the other out of the folder)"
            )
        index[key] = path
    return index


def index_images(folder: Path) -> dict[str, Path]:
    """Map sample key -> image file (no suffix stripped: images and masks may share a folder)."""
    if not folder.is_dir():
        raise ValueError(f"--image_dir {folder} is not a folder")
    index: dict[str, Path] = {}
    for rel in list_images(folder):
        key = sample_key(rel.as_posix())
        if key in index:
            raise ValueError(f"--image_dir: {index[key]} and {folder / rel} are both the image of {key!r}; keep one")
        index[key] = folder / rel
    return index


def listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def pair_masks(pred_dir: str | Path, gt_dir: str | Path, image_dir: str | Path | None = None) -> tuple[list[MaskPair], int]:
    """Match every truth in ``gt_dir`` with its prediction in ``pred_dir``.

    Args:
        pred_dir: predicted masks (e.g. ``seg predict`` output, ``{stem}_mask.png``).
        gt_dir: ground-truth masks.
        image_dir: optional images (same relative paths and stems) shown in the sample panels;
            an image that is not found is simply not shown.

    Returns:
        (pairs sorted by id, number of predictions that have no truth and were ignored).

    Raises:
        ValueError: no truths, no pairs, or truths without a prediction (listed by name).
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    truths = index_masks(gt_dir, "--gt_dir")
    preds = index_masks(pred_dir, "--pred_dir", skip_by_products=True)
    if not truths:
        raise ValueError(f"--gt_dir {gt_dir} holds no mask files ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    missing = sorted(set(truths) - set(preds))
    if len(missing) == len(truths):
        tars = "" if preds or not any(pred_dir.glob("*.tar")) else (
            "; --pred_dir holds tar files (seg predict --format tar): extract them (tar -xf) into a folder first")
        raise ValueError(
            f"no prediction in --pred_dir {pred_dir} pairs with a truth in --gt_dir {gt_dir} "
            f"({len(preds)} prediction and {len(truths)} truth files found); {NAMING_RULE}{tars}"
        )
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(truths)} truths in --gt_dir {gt_dir} have no prediction in --pred_dir "
            f"{pred_dir}: {listing(missing)}. Predict them (seg predict), or evaluate a --gt_dir without them"
        )
    images = index_images(Path(image_dir)) if image_dir else {}
    pairs = [MaskPair(key, preds[key], truths[key], images.get(key)) for key in sorted(truths)]
    return pairs, len(set(preds) - set(truths))
