"""`seg prepare` / `python -m seg.prepare`: images + masks -> WebDataset shards + dataset.json.

Examples::

    seg prepare --images data/images --masks data/masks --out data/shards
    seg prepare --pairs pairs.csv --out data/shards --val_split 0.1 --strict
    seg prepare --pairs pairs_with_split_column.csv --out data/shards   # train/val chosen per row
    seg prepare --images cohort/ --out cohort_shards          # unlabelled, for prediction

The work lives in ``seg.data.prepare``; this module only parses flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="validation processes")
    p.add_argument("--strict", action="store_true", help="any bad pair is an error (nothing is kept)")
    p.add_argument("--overwrite", action="store_true", help="replace shards and dataset.json already in --out")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pairs and (args.images or args.masks):
        print("seg prepare: pass either --pairs or --images/--masks, not both", file=sys.stderr)
        return 2
    if args.masks and not args.images:
        print("seg prepare: --masks needs --images", file=sys.stderr)
        return 2
    from seg.data.prepare import PrepareError, prepare_dataset, summary_text

    suffixes = ("",) + tuple(s.strip() for s in args.mask_suffixes.split(",") if s.strip())
    start = time.perf_counter()
    try:
        info = prepare_dataset(images=args.images, masks=args.masks, out=args.out, pairs_csv=args.pairs,
                               val_split=args.val_split, shard_size=args.shard_size,
                               shard_bytes=args.shard_bytes, suffixes=suffixes, workers=args.workers,
                               strict=args.strict, overwrite=args.overwrite, progress=not args.no_progress)
    except (PrepareError, FileNotFoundError, ValueError) as exc:
        print(f"seg prepare: error: {exc}", file=sys.stderr)
        return 1
    print(summary_text(info, time.perf_counter() - start))
    print(f"dataset description: {os.path.join(args.out, 'dataset.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
