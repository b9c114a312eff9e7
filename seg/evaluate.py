"""`seg evaluate` / `python -m seg.evaluate`: score a model or existing masks; report and plots.

Examples::

    # existing masks (e.g. seg predict output, {stem}_mask.png) against ground truth
    seg evaluate --pred_dir predictions/ --gt_dir data/masks --image_dir data/images
    # a model on the validation split of prepared shards (also sweeps the threshold)
    seg evaluate --model_path runs/x/best_model.pth --data_dir data/shards
    seg evaluate --model_path best_model.pth --data_dir 'shards/val-{000000..000009}.tar'
    # the same on 8 GPUs or CPU processes: each image scored once, same report
    torchrun --nproc_per_node 8 -m seg.evaluate --model_path best_model.pth --data_dir data/shards

Writes to ``--output_dir``: evaluation_report.json (docs/FORMATS.md; model mode adds
``best_threshold``), evaluation_report.txt, confusion_matrix.png, metrics_distribution.png,
metrics_summary.png, sample_predictions.png, worst_cases.png, and in model mode
threshold_sweep.png; where QC exists (model mode, or a ``seg predict`` folder as --pred_dir)
the JSON's ``qc`` key and qc_vs_dice.png; and report.html (``seg.reporting``). ``threshold`` in
the JSON is the probability threshold applied to the model (the checkpoint's, or
``--threshold``); with ``--pred_dir`` predictions are binary masks (any value > 0 is
foreground) and it is ``null``. ``best_threshold`` (model mode only) is the threshold
of 0.05, 0.10, ..., 0.95 with the highest global Dice: ``{"threshold": t, "dice": d}``.
Under torchrun each rank scores images ``i mod world_size`` and rank 0 writes everything.
The work lives in ``seg.evaluation``; this module parses flags (every option is a field of
``seg.config.EvaluateConfig``). Exit codes (``seg.exitcodes``): 0 done; 1 an error while
scoring; 2 invalid arguments or input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from seg import exitcodes
from seg.config.fields import add_flags, from_flags
from seg.config.inference import EvaluateConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p.add_argument_group("existing masks"), EvaluateConfig,
              names=["pred_dir", "gt_dir", "image_dir", "tolerance_mm"])
    add_flags(p.add_argument_group("a model on labelled data"), EvaluateConfig,
              names=["model_path", "data_dir", "split", "threshold", "batch_size", "device", "precision", "tta",
                     "tile_size", "tile_overlap", "postprocess", "tune_postprocessing", "tuned_model_path"])
    add_flags(p, EvaluateConfig, names=["output_dir", "worst_k", "num_samples", "workers", "progress"])
    return p


def summary(evaluation, outputs: dict, seconds: float) -> str:
    r = evaluation.report
    g, m = r["global"], r["mean"]
    lines = [f"evaluated {r['n_images']} images in {seconds:.1f} s: global Dice {g['dice']:.4f}, "
             f"global IoU {g['iou']:.4f}, mean Dice {m['dice']:.4f} ± {r['std']['dice']:.4f}"]
    if "per_volume" in r:  # NIfTI volumes: the images above are their slices
        vm, hd = r["volume_mean"], r["volume_mean"]["hd95"]
        lines.append(f"{r['n_volumes']} volumes: mean 3D Dice {vm['dice']:.4f} ± {r['volume_std']['dice']:.4f}, "
                     f"HD95 {'n/a' if hd is None else f'{hd:.2f} mm'}, surface Dice "
                     f"{vm['surface_dice']:.4f} at {r['surface_tolerance_mm']:g} mm")
    if evaluation.sweep is not None:
        b = evaluation.sweep["best"]
        lines.append(f"best threshold {b['threshold']:g} (global Dice {b['dice']:.4f}); used {r['threshold']:g}")
    if evaluation.postprocessing is not None:
        pp = evaluation.postprocessing
        from seg.postprocess import PostProcess

        lines.append(f"tuned on {pp['n_images']} images: threshold {pp['threshold']:g}, post-processing "
                     f"{PostProcess.from_dict(pp['postprocess']).describe()}: mean Dice {pp['baseline_dice']:.4f} -> "
                     f"{pp['dice']:.4f}; written to {pp['tuned_model_path']} (seg predict applies it)")
    lines.append(f"report: {outputs['report']} and {outputs['text'].name}")
    lines.append(f"plots:  {', '.join(p.name for k, p in outputs.items() if k not in ('report', 'text'))} "
                 f"in {outputs['report'].parent}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = from_flags(EvaluateConfig, args)
        mode = cfg.mode()
    except ValueError as exc:
        print(f"seg evaluate: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    from seg.dist import read_dist_env
    from seg.evaluation.run import EvaluationError, evaluate_masks, evaluate_model, read_report, write_outputs
    from seg.evaluation.scoring import init_process_group

    env = read_dist_env()
    start = time.perf_counter()
    created = init_process_group(env)
    try:
        evaluation, source = (evaluate_masks if mode == "masks" else evaluate_model)(cfg, env)
        if evaluation is not None:
            outputs = write_outputs(evaluation, source, Path(cfg.output_dir))
            from seg.reporting.hooks import evaluation_report  # report.html (seg.reporting)

            outputs["html"] = evaluation_report(read_report(Path(cfg.output_dir)), Path(cfg.output_dir), source,
                                                cfg.pred_dir)
            print(summary(evaluation, outputs, time.perf_counter() - start))
    except (ValueError, FileNotFoundError) as exc:  # bad input: a folder without masks, a bad checkpoint
        print(f"seg evaluate: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except (EvaluationError, OSError) as exc:
        if env.is_main or not isinstance(exc, EvaluationError):  # shared errors are printed once
            print(f"seg evaluate: error: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return exitcodes.OK


if __name__ == "__main__":
    from seg.cli import run_command

    run_command(main)
