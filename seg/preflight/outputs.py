"""Doctor checks of a cohort prediction: inputs, units vs workers, output size and file count.

The unit list is built by ``seg.inference.inputs.build_units``, exactly as ``seg predict``
builds it. Output bytes are estimated from the pixel count of a sample of inputs with rough
per-pixel sizes of the written PNGs (a binary mask compresses to well under a bit per pixel;
the overlay is RGB, the probability map 16-bit): an order of magnitude for planning disk and
file-count quotas, not an exact figure.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from seg.config.inference import PredictConfig
from seg.preflight import Check

BYTES_PER_PIXEL = {"mask": 0.1, "overlay": 1.5, "probability": 1.0}
SAMPLE = 8  # inputs whose size is read for the estimate


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _shard_images(shard: str, sample: bool) -> tuple[int, list[int]]:
    """(images in the shard, pixel counts of up to SAMPLE of them from their KEY.json)."""
    count, pixels = 0, []
    with tarfile.open(shard) as tar:
        for member in tar:
            if ".image." in member.name:
                count += 1
            elif sample and member.name.endswith(".json") and len(pixels) < SAMPLE:
                meta = json.load(tar.extractfile(member))
                if "height" in meta and "width" in meta:
                    pixels.append(int(meta["height"]) * int(meta["width"]))
    return count, pixels


def _sizes(units) -> tuple[int, list[int]]:
    """(number of input images, pixel counts of a sample of them)."""
    from seg.data.io import ImageReadError, image_size_of

    if units[0].kind == "shard":
        total, pixels = 0, []
        for i, unit in enumerate(units):
            n, px = _shard_images(unit.sources[0], sample=i < 2)
            total += n
            pixels += px
        return total, pixels
    paths = [p for u in units for p in u.sources]
    step = max(1, len(paths) // SAMPLE)
    pixels = []
    for path in paths[::step][:SAMPLE]:
        try:
            h, w = image_size_of(path)
            pixels.append(h * w)
        except (ImageReadError, OSError, ValueError):
            pass
    return len(paths), pixels


def check_prediction(args: PredictConfig, workers: int, tar_threshold: int = 1_000_000) -> list[Check]:
    """Inputs, units per worker, expected outputs (files, bytes), free disk, --format tar hint.

    Args:
        args: the planned `seg predict` options.
        workers: array tasks x processes per task.
        tar_threshold: output files above which ``--format tar`` is advised.
    """
    from seg.inference.inputs import build_units

    try:
        units = build_units(args.image_dir, args.list_path, args.shards, args.unit_size, exclude=args.output_dir)
    except (ValueError, OSError) as exc:
        return [Check("fail", "inputs", str(exc), "give an existing --image_dir, --list or --shards")]
    n_images, pixels = _sizes(units)
    out = [Check("ok", "inputs", f"{n_images} image(s) in {len(units)} unit(s)")]
    if len(units) < workers:
        out.append(Check("warn", "units", f"{len(units)} unit(s) for {workers} worker(s): {workers - len(units)} "
                                          "worker(s) get nothing",
                         f"lower --unit_size to {max(1, n_images // workers)} or use fewer array tasks"))
    else:
        out.append(Check("ok", "units", f"{len(units)} unit(s) over {workers} worker(s): "
                                        f"about {len(units) / workers:.1f} each"))
    kinds = ["mask"] + (["overlay"] if args.save_overlay else []) + (["probability"] if args.save_probability else [])
    files = n_images * len(kinds) if args.format == "png" else len(units)
    mean_px = sum(pixels) / len(pixels) if pixels else 0
    nbytes = n_images * mean_px * sum(BYTES_PER_PIXEL[k] for k in kinds)
    what = f"{files} output file(s) ({', '.join(kinds)}{' in tars' if args.format == 'tar' else ''}), " \
           f"about {_human(nbytes)}" + ("" if pixels else " (image sizes unknown)")
    if args.format == "png" and files > tar_threshold:
        out.append(Check("warn", "outputs", what + f": more than {tar_threshold} files strain shared "
                                                   "file systems (inode quotas, slow listings)",
                         f"use --format tar: one tar per unit, {len(units)} file(s)"))
    else:
        out.append(Check("ok", "outputs", what))
    parent = Path(args.output_dir).absolute()
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        out.append(Check("fail", "disk", f"about {_human(nbytes)} to write, {_human(free)} free under {parent}",
                         "free space, choose another --output_dir, or drop --save_overlay/--save_probability"))
    else:
        out.append(Check("ok", "disk", f"{_human(free)} free under {parent}"))
    return out
