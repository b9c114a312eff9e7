"""`seg predict` (= ``python -m seg.predict``): masks for a cohort, or for one image.

One machine, several GPUs/processes, a Slurm array, or both; rerun the same command after a
crash or a preemption and it finishes what is left::

    seg predict --model_path runs/unet/best_model.pth --image_dir cohort/ --output_dir preds/
    seg predict --model_path M.pth --list paths.txt --output_dir preds/ --format tar
    seg predict --model_path M.pth --shards 'shards/val-{000000..000003}.tar' --output_dir preds/
    torchrun --nproc_per_node 8 -m seg.predict --model_path M.pth --image_dir cohort/ --output_dir preds/
    sbatch --array 0-99 slurm/predict.sbatch --model_path M.pth ...  # each task: its part
    seg predict --summarize preds/                        # afterok: merge/validate the manifest
    seg predict --model_path M.pth --image_path x.png --mask_path x_mask.png --output_dir out/

Inputs are cut into units (a shard, or ``--unit_size`` sorted paths); unit i is done by worker
``i mod W`` (W = torchrun ranks x array tasks, or ``--part k --num_parts n``). Each finished
unit is a line of ``OUTPUT/manifest.jsonl``; unreadable images go to ``failures.jsonl``.
Every image also gets a quality-control record (``qc_score``, ``qc_flags`` and the signals behind
them; ``seg.inference.qc``, ``--no_qc`` to skip) in the manifest and in ``OUTPUT/qc/``;
``--summarize`` merges those into ``OUTPUT/qc.csv`` and writes ``OUTPUT/report.html``.

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): decoding processes and
writer threads share the cores with the model, and spinning OpenMP threads made a small model
several times slower on a 2-core machine (docs/BENCHMARKS.md), while a large model's long
parallel regions lose nothing.

Exit codes (``seg.exitcodes``): 0 done; 1 an error while running, or ``--summarize`` found the
cohort incomplete or inconsistent; 2 invalid arguments, or an output folder holding another
model's results; 3 some inputs could not be read (listed in failures.jsonl; the others are done).

Every option is a field of ``seg.config.PredictConfig`` (defaults and help live there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from seg import exitcodes
from seg.config.fields import add_flags, from_flags
from seg.config.inference import PredictConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_flags(p, PredictConfig)
    p.add_argument("--summarize", metavar="OUT", help="merge and validate OUT/manifest.jsonl, print the cohort summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no_report", action="store_true", help="with --summarize: do not write OUT/report.html")
    p.add_argument("--report_worst", type=int, default=100,
                   help="with --summarize: lowest-qc_score images shown in report.html (default: 100)")
    return p


def _summarize(args) -> int:
    from pathlib import Path

    from seg.inference.manifest import format_summary, summarize

    summary = summarize(Path(args.summarize))
    from seg.reporting.hooks import after_summarize  # qc.csv merge and report.html

    summary.update(after_summarize(Path(args.summarize), not args.no_report, args.report_worst))
    print(json.dumps(summary) if args.json else "\n".join([format_summary(summary), *summary["qc_notes"]]))
    if summary["problems"]:
        return exitcodes.FAILED
    return exitcodes.FAILED_INPUTS if summary["failures"] else exitcodes.OK


def _single(cfg: PredictConfig, predictor, out_dir) -> int:
    from seg.data.io import ImageReadError
    from seg.inference.visualize import predict_one

    try:
        result = predict_one(predictor, cfg.image_path, out_dir, cfg.mask_path, cfg.save_overlay, cfg.save_probability)
    except ImageReadError as exc:
        print(f"seg predict: {exc}", file=sys.stderr)
        return exitcodes.FAILED_INPUTS
    print(f"foreground fraction {result['foreground']:.4f}; wrote {', '.join(result['outputs'])}")
    if result["metrics"]:
        print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    return exitcodes.OK


def _cohort(cfg: PredictConfig, predictor, out_dir) -> int:
    from seg.dist import prediction_worker, read_dist_env
    from seg.inference.inputs import build_units
    from seg.inference.runner import CohortRun
    from seg.inference.volumes import check_volume_inputs

    try:
        worker, num_workers = prediction_worker(cfg.part, cfg.num_parts)
    except RuntimeError as exc:  # a half-set torchrun or Slurm environment
        raise ValueError(str(exc)) from None
    units = build_units(cfg.image_dir, cfg.list_path, cfg.shards, cfg.unit_size, exclude=str(out_dir))
    check_volume_inputs(units, predictor.preprocess, cfg.save_overlay, cfg.save_probability)
    s = CohortRun(predictor, units, worker, num_workers, cfg, position=read_dist_env().local_rank).run()
    from seg.reporting.cohort import write_prediction_info  # prediction.json (after run(): its model check)

    write_prediction_info(out_dir, predictor, {"format": cfg.format, "tta": cfg.tta, "qc": cfg.qc,
                                               "unit_size": cfg.unit_size, "batch_size": cfg.batch_size,
                                               "num_workers": num_workers})
    first = (f"; first batch in the model {s['first_batch_start_s']:.2f} s after start, done at "
             f"{s['first_batch_s']:.2f} s") if s["first_batch_s"] is not None else ""
    if s["steady_images_per_s"] is not None:
        first += f", then {s['steady_images_per_s']:.2f} images/s"
    print(f"worker {worker + 1}/{num_workers}: {s['images']} images, {s['failures']} failures, {s['seconds']:.1f} s, "
          f"{s['images_per_s']:.2f} images/s ({s['units']} units done, {s['skipped_units']} already finished){first}",
          flush=True)
    if s["failures"]:
        print(f"{s['failures']} inputs could not be read; see {out_dir / 'failures.jsonl'}", file=sys.stderr)
        return exitcodes.FAILED_INPUTS
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see the docstring
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarize:
        return _summarize(args)
    try:
        cfg = from_flags(PredictConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    if not cfg.model_path:
        parser.error("--model_path is required (or --summarize OUT)")
    if cfg.mask_path and not cfg.image_path:
        parser.error("--mask_path goes with --image_path (one image and its ground truth)")
    from pathlib import Path

    from seg.checkpoint import CheckpointError
    from seg.inference.engine import Predictor
    from seg.inference.manifest import ManifestError

    out_dir = Path(cfg.output_dir)
    try:
        if not cfg.image_path and not cfg.inputs():
            raise ValueError("give one input: --image_dir, --list, --shards or --image_path")
        predictor = Predictor(cfg.model_path, cfg)
        print(f"seg predict: {predictor.describe()}", flush=True)
        if cfg.image_path:
            if cfg.inputs():
                raise ValueError("--image_path predicts one image; do not combine it with --image_dir/--list/--shards")
            out_dir.mkdir(parents=True, exist_ok=True)
            return _single(cfg, predictor, out_dir)
        return _cohort(cfg, predictor, out_dir)
    except (ValueError, CheckpointError, ManifestError) as exc:
        print(f"seg predict: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE


if __name__ == "__main__":
    from seg.cli import run_command

    run_command(main)
