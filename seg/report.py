"""`seg report` (= ``python -m seg.report``): one HTML page to review a predicted cohort.

Examples::

    seg report predictions/ --out predictions/report.html
    seg report predictions/ --gt_dir data/masks --out review.html     # adds the evaluation
    seg report predictions/ --evaluation evaluation/evaluation_report.json --out review.html

The page (``seg.reporting``) is one static file that works offline: cohort summary, foreground
fraction and ``qc_score`` distributions, the ``--worst`` lowest-``qc_score`` images as overlay
thumbnails with their flags (each linking to a full-size overlay in ``<out stem>_files/``), and
with ground truth the evaluation tables and ``qc_score`` against Dice. It is built from
``manifest.jsonl``; only the shown images are read (``--gt_dir`` scores every mask, as
``seg evaluate --pred_dir`` does). ``seg predict --summarize`` and ``seg evaluate`` write the
same page as ``report.html``.

Exit codes: 0 written; 2 invalid arguments or a folder without predictions; 1 an error while
reading or scoring.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seg.exitcodes import FAILED, OK, USAGE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("pred_dir", help="a seg predict output folder (with manifest.jsonl)")
    p.add_argument("--out", default=None, help="the HTML file to write (default: PRED_DIR/report.html)")
    p.add_argument("--gt_dir", default=None, help="ground-truth masks: score the predictions and add the evaluation")
    p.add_argument("--evaluation", default=None, help="an evaluation_report.json to include instead of --gt_dir")
    p.add_argument("--worst", type=int, default=100, help="lowest-qc_score images shown as thumbnails")
    p.add_argument("--table_rows", type=int, default=500, help="rows of the lowest-qc_score table")
    p.add_argument("--workers", type=int, default=4, help="threads reading masks (with --gt_dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pred_dir = Path(args.pred_dir)
    if not (pred_dir / "manifest.jsonl").is_file():
        print(f"seg report: error: {pred_dir}/manifest.jsonl does not exist; give a seg predict --output_dir",
              file=sys.stderr)
        return USAGE
    if args.gt_dir and args.evaluation:
        print("seg report: error: give --gt_dir or --evaluation, not both", file=sys.stderr)
        return USAGE
    if args.worst < 0 or args.table_rows < 0 or args.workers < 1:
        print("seg report: error: --worst and --table_rows must be >= 0, --workers >= 1", file=sys.stderr)
        return USAGE
    from seg.reporting.hooks import report_command

    out = Path(args.out) if args.out else pred_dir / "report.html"
    try:
        written = report_command(pred_dir, out, Path(args.gt_dir) if args.gt_dir else None,
                                 Path(args.evaluation) if args.evaluation else None, args.worst, args.table_rows,
                                 args.workers)
    except ValueError as exc:
        print(f"seg report: error: {exc}", file=sys.stderr)
        return USAGE
    except OSError as exc:
        print(f"seg report: error: {exc}", file=sys.stderr)
        return FAILED
    print(f"wrote {written['path']} ({written['bytes'] / 1e6:.2f} MB, {written['thumbnails']} thumbnails, "
          f"{written['seconds']:.1f} s)")
    return OK


if __name__ == "__main__":
    from seg.cli import run_command

    run_command(main)
