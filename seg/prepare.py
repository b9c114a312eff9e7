"""`seg prepare` / `python -m seg.prepare`: images + masks -> WebDataset shards + dataset.json.

Examples::

    seg prepare --images data/images --masks data/masks --out data/shards
    seg prepare --pairs pairs.csv --out data/shards --val_split 0.1 --strict
    seg prepare --pairs pairs_with_split_column.csv --out data/shards   # train/val chosen per row
    seg prepare --images cohort/ --out cohort_shards          # unlabelled, for prediction
    seg prepare --images raw/images --masks raw/masks --out shards --group_by '^(patient[0-9]+)/'
    seg prepare --images nifti/images --masks nifti/labels --out vol_shards --modality ct \
        --slice_axis axial --empty_slice_fraction 0.2            # NIfTI volumes, split by volume

The work lives in ``seg.data.sharding``; this module only parses flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from seg import exitcodes
from seg.data.pairing import DEFAULT_MASK_SUFFIXES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", help="images folder (recursive); alone = unlabelled cohort")
    p.add_argument("--masks", help="masks folder mirroring --images (same relative path and stem)")
    p.add_argument("--pairs", help="CSV with columns image,mask (paths relative to the CSV's folder) and optionally "
                                   "split (train or val: imposes the row's split; empty: by key hash)")
    p.add_argument("--out", required=True, help="output folder for shards and dataset.json")
    p.add_argument("--mask_suffixes", default=",".join(s for s in DEFAULT_MASK_SUFFIXES if s),
                   help="comma-separated mask stem suffixes tried after the bare stem, e.g. _mask,-mask,_seg")
    p.add_argument("--val_split", type=float, default=0.2,
                   help="fraction of samples (by key hash) for validation; --pairs rows with a split value keep theirs")
    p.add_argument("--shard_size", type=int, default=1000, help="maximum samples per shard")
    p.add_argument("--shard_bytes", type=float, default=1e9, help="maximum bytes per shard")
    p.add_argument("--group_by", metavar="REGEX",
                   help="split by group, not by sample: the regex's first capture group (else its match) in the "
                        "relative path, e.g. '^([^/]+)/' for one folder per patient")
    v = p.add_argument_group("NIfTI volumes (.nii, .nii.gz)")
    v.add_argument("--slice_axis", default="axial", choices=("axial", "coronal", "sagittal"),
                   help="axis of the canonical (RAS) volume the 2D slices are cut along")
    v.add_argument("--modality", choices=("mri", "ct"), default=None,
                   help="intensity normalisation: mri = per-volume z-score of the non-zero voxels, ct = data-set "
                        "0.5/99.5 percentile clip of foreground voxels then z-score (default for volumes: mri)")
    v.add_argument("--empty_slice_fraction", type=float, default=1.0,
                   help="fraction of training slices without foreground that are kept (validation keeps all)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="validation processes")
    p.add_argument("--strict", action="store_true", help="any bad pair is an error (nothing is kept)")
    p.add_argument("--overwrite", action="store_true", help="replace shards and dataset.json already in --out")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pairs and (args.images or args.masks):
        print("seg prepare: pass either --pairs or --images/--masks, not both", file=sys.stderr)
        return exitcodes.USAGE
    if args.masks and not args.images:
        print("seg prepare: --masks needs --images", file=sys.stderr)
        return exitcodes.USAGE
    from seg.data.sharding import PrepareError, prepare_dataset, summary_text

    suffixes = ("",) + tuple(s.strip() for s in args.mask_suffixes.split(",") if s.strip())
    start = time.perf_counter()
    try:
        info = prepare_dataset(images=args.images, masks=args.masks, out=args.out, pairs_csv=args.pairs,
                               val_split=args.val_split, shard_size=args.shard_size,
                               shard_bytes=args.shard_bytes, suffixes=suffixes, workers=args.workers,
                               strict=args.strict, overwrite=args.overwrite, progress=not args.no_progress,
                               group_by=args.group_by, slice_axis=args.slice_axis, modality=args.modality,
                               empty_slice_fraction=args.empty_slice_fraction)
    except (PrepareError, FileNotFoundError, ValueError) as exc:
        print(f"seg prepare: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    print(summary_text(info, time.perf_counter() - start))
    print(f"dataset description: {os.path.join(args.out, 'dataset.json')}")
    return exitcodes.OK


if __name__ == "__main__":
    from seg.cli import run_command

    run_command(main)
