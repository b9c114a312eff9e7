"""`seg evaluate` / `python -m seg.evaluate`: score a model or existing masks; report and plots.

Examples::

    # existing masks (e.g. seg predict output, {stem}_mask.png) against ground truth
    seg evaluate --pred_dir predictions/ --gt_dir data/masks --image_dir data/images
    # a model on the validation split of prepared shards (also sweeps the threshold)
    seg evaluate --model_path runs/x/best_model.pth --data_dir data/shards
    seg evaluate --model_path best_model.pth --data_dir 'shards/val-{000000..000009}.tar'
    # the same on 8 GPUs or CPU processes: each image scored once, same report
    torchrun --nproc_per_node 8 -m seg.evaluate --model_path best_model.pth --data_dir data/shards

Writes to ``--output_dir``: evaluation_report.json (DESIGN.md keys; model mode adds
``best_threshold``), evaluation_report.txt, confusion_matrix.png, metrics_distribution.png,
metrics_summary.png, sample_predictions.png, worst_cases.png, and in model mode
threshold_sweep.png; where QC exists (model mode, or a ``seg predict`` folder as --pred_dir)
the JSON's ``qc`` key and qc_vs_dice.png; and report.html (``seg.reporting``). ``threshold`` in
the JSON is the probability threshold applied to the model (the checkpoint's, or
``--threshold``); with ``--pred_dir`` predictions are binary masks (any value > 0 is
foreground) and it is ``null``. ``best_threshold`` (model mode only) is the threshold
of 0.05, 0.10, ..., 0.95 with the highest global Dice: ``{"threshold": t, "dice": d}``.
Under torchrun each rank scores images ``i mod world_size`` and rank 0 writes everything.
The work lives in ``seg.evaluation``; this module parses flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="seg evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=Formatter)
    masks = p.add_argument_group("existing masks")
    masks.add_argument("--pred_dir", help="predicted masks (recursive; x.png or x_mask.png pairs with truth x.*)")
    masks.add_argument("--gt_dir", help="ground-truth masks (recursive; any value > 0 is foreground)")
    masks.add_argument("--image_dir", help="optional images, shown in sample_predictions.png and worst_cases.png")
    model = p.add_argument_group("a model on labelled data")
    model.add_argument("--model_path", help="model checkpoint (*_model.pth)")
    model.add_argument("--data_dir", help="folder from `seg prepare`, a shard pattern, or a folder with images/ and masks/")
    model.add_argument("--split", default="val", choices=("val", "train", "all"),
                       help="split of a `seg prepare` folder to evaluate")
    model.add_argument("--threshold", type=float, default=None,
                       help="probability threshold; None = the checkpoint's")
    model.add_argument("--batch_size", type=int, default=8, help="images per forward")
    model.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda, cuda:1, ...")
    model.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="autocast precision")
    model.add_argument("--tta", action="store_true", help="average horizontal/vertical flips")
    model.add_argument("--tile_size", type=int, default=None,
                       help="predict at native resolution with tiles of this side (None: as the checkpoint was trained)")
    p.add_argument("--output_dir", default="evaluation", help="folder for the report and plots")
    p.add_argument("--worst_k", type=int, default=8, help="lowest-Dice images shown in worst_cases.png")
    p.add_argument("--num_samples", type=int, default=4, help="images shown in sample_predictions.png")
    p.add_argument("--workers", type=int, default=4, help="threads reading files")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _check_mode(args) -> str | None:
    """'masks' or 'model', or an error message."""
    masks, model = bool(args.pred_dir or args.gt_dir), bool(args.model_path or args.data_dir)
    if masks == model:
        return ("give either --pred_dir and --gt_dir (score existing masks) or --model_path and --data_dir "
                "(predict, then score)" + (", not both" if masks else ""))
    if masks and not (args.pred_dir and args.gt_dir):
        return "--pred_dir and --gt_dir go together"
    if model and not (args.model_path and args.data_dir):
        return "--model_path and --data_dir go together"
    if masks and args.threshold is not None:
        return "--threshold applies to --model_path; masks in --pred_dir are binary (any value > 0 is foreground)"
    if args.threshold is not None and not 0 <= args.threshold < 1:
        return f"--threshold {args.threshold} is not valid; it must be in [0, 1)"
    if args.worst_k < 0 or args.num_samples < 0 or args.batch_size < 1 or args.workers < 1:
        return "--worst_k and --num_samples must be >= 0, --batch_size and --workers >= 1"
    return None


def summary(evaluation, outputs: dict, seconds: float) -> str:
    r = evaluation.report
    g, m = r["global"], r["mean"]
    lines = [f"evaluated {r['n_images']} images in {seconds:.1f} s: global Dice {g['dice']:.4f}, "
             f"global IoU {g['iou']:.4f}, mean Dice {m['dice']:.4f} ± {r['std']['dice']:.4f}"]
    if evaluation.sweep is not None:
        b = evaluation.sweep["best"]
        lines.append(f"best threshold {b['threshold']:g} (global Dice {b['dice']:.4f}); used {r['threshold']:g}")
    lines.append(f"report: {outputs['report']} and {outputs['text'].name}")
    lines.append(f"plots:  {', '.join(p.name for k, p in outputs.items() if k not in ('report', 'text'))} "
                 f"in {outputs['report'].parent}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_mode(args)
    if problem:
        print(f"seg evaluate: error: {problem}", file=sys.stderr)
        return 2
    from seg.dist import read_dist_env
    from seg.evaluation.run import EvaluationError, Options, evaluate_masks, evaluate_model, read_report, write_outputs
    from seg.evaluation.scoring import init_process_group

    env = read_dist_env()
    opts = Options(Path(args.output_dir), args.worst_k, args.num_samples, args.workers, not args.no_progress)
    start = time.perf_counter()
    created = init_process_group(env)
    try:
        if args.pred_dir:
            evaluation, source = evaluate_masks(args.pred_dir, args.gt_dir, env, opts, args.image_dir)
        else:
            evaluation, source = evaluate_model(args.model_path, args.data_dir, env, opts, args.split, args.threshold,
                                                device=args.device, precision=args.precision,
                                                batch_size=args.batch_size, tta=args.tta, tile_size=args.tile_size)
        if evaluation is not None:
            outputs = write_outputs(evaluation, source, opts.output_dir)
            from seg.reporting.hooks import evaluation_report  # report.html (seg.reporting)

            outputs["html"] = evaluation_report(read_report(opts.output_dir), opts.output_dir, source, args.pred_dir)
            print(summary(evaluation, outputs, time.perf_counter() - start))
    except (EvaluationError, ValueError, OSError) as exc:
        if env.is_main or not isinstance(exc, EvaluationError):  # shared errors are printed once
            print(f"seg evaluate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
