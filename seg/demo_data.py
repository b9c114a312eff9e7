"""`seg demo-data OUT` / `python -m seg.demo_data OUT`: write the synthetic demo data set.

Example::

    seg demo-data data/demo --n 200 --size 128 --seed 0
    seg prepare --images data/demo/images --masks data/demo/masks --out data/demo_shards

The generator and what makes it a real learning task are described in ``seg.data.synthetic``.
"""

from __future__ import annotations

import argparse
import sys
import time

from seg import exitcodes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg demo-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output folder (gets images/ and masks/)")
    p.add_argument("--n", type=int, default=200, help="number of image/mask pairs")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--size_scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("LO", "HI"),
                   help="object size factor range, drawn per image (a distribution shift; 1 1 = training range)")
    p.add_argument("--contrast", type=float, nargs=2, default=(1.0, 1.0), metavar=("LO", "HI"),
                   help="object contrast factor range, drawn per image (a distribution shift)")
    p.add_argument("--prefix", default="", help="file name prefix, to combine several sets in one folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from seg.data.synthetic import make_demo_dataset

    start = time.perf_counter()
    try:
        if min(args.size_scale + args.contrast) <= 0:
            raise ValueError("--size_scale and --contrast must be positive")
        out = make_demo_dataset(args.out, n=args.n, size=args.size, seed=args.seed, size_scale=tuple(args.size_scale),
                                contrast=tuple(args.contrast), prefix=args.prefix)
    except ValueError as exc:
        print(f"seg demo-data: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    print(f"wrote {args.n} pairs of {args.size}px to {out}/images and {out}/masks "
          f"in {time.perf_counter() - start:.2f} s")
    return exitcodes.OK


if __name__ == "__main__":
    from seg.cli import run_command

    run_command(main)
