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

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): decoding processes and
writer threads share the cores with the model, and spinning OpenMP threads made a small model
5x slower on a 2-core machine, while a large model's long parallel regions lose nothing.

Exit codes: 0 done; 3 some inputs could not be read (listed in failures.jsonl; the others are
done); 2 invalid arguments, or an output folder holding another model's results; 1 summarize
found the cohort incomplete or inconsistent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_FAILED_INPUTS = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--model_path", help="model checkpoint (*_model.pth from a run folder)")
    a("--image_dir", help="predict every image under this folder (recursive, by extension)")
    a("--list", dest="list_path", metavar="FILE", help="text file with one image path per line")
    a("--shards", help="shards from `seg prepare` (glob or braces), labelled or not")
    a("--image_path", help="predict one image (writes next to nothing else: no manifest)")
    a("--mask_path", help="with --image_path: ground truth; writes {stem}_visualization.png and prints metrics")
    a("--output_dir", default="predictions", help="where masks, manifest.jsonl and failures.jsonl go")
    a("--threshold", type=float, default=None, help="probability threshold (default: the checkpoint's)")
    a("--save_overlay", action="store_true", help="also write {stem}_overlay.png")
    a("--save_probability", action="store_true", help="also write {stem}_prob.png (16-bit, p x 65535)")
    a("--show_probability", action="store_true", help="seed flag: same as --save_probability (single image: "
                                                       "also a visualization with the probability map)")
    a("--format", choices=("png", "tar"), default="png", help="png files, or one tar per unit")
    a("--batch_size", type=int, default=8, help="images (or tiles) per forward")
    a("--num_workers", type=int, default=2, help="decoding threads (image files) or processes (shards) per rank "
                                                  "(0: decode in the main thread)")
    a("--writer_threads", type=int, default=4, help="threads encoding and writing outputs")
    a("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="autocast precision")
    a("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda, cuda:N")
    a("--compile", choices=("off", "default", "reduce-overhead", "max-autotune"), default="off",
      help="torch.compile the model for the fixed batch shape (CUDA, resize mode; pays off on long cohorts)")
    a("--tta", action="store_true", help="average predictions of horizontal/vertical flips (4x compute)")
    a("--tile_size", type=int, default=None, help="predict at native resolution with tiles of this side "
                                                  "(default: only for sampling=patch checkpoints, tile = training size)")
    a("--tile_overlap", type=float, default=0.25, help="fraction of a tile shared with its neighbours")
    a("--unit_size", type=int, default=256, help="paths per unit of work (one manifest line each)")
    a("--part", type=int, default=None, help="this worker's part k of --num_parts (instead of a Slurm array)")
    a("--num_parts", type=int, default=None, help="number of parts the cohort is split into")
    a("--overwrite", action="store_true", help="allow a different checkpoint in a used --output_dir: its "
                                               "records are set aside and every unit is redone")
    a("--no_progress", action="store_true", help="no progress bar")
    a("--summarize", metavar="OUT", help="merge and validate OUT/manifest.jsonl, print the cohort summary")
    a("--json", action="store_true", help="print the summary as JSON")
    return p


def _summarize(args) -> int:
    from pathlib import Path

    from seg.inference.manifest import format_summary, summarize

    summary = summarize(Path(args.summarize))
    print(json.dumps(summary) if args.json else format_summary(summary))
    if summary["problems"]:
        return 1
    return EXIT_FAILED_INPUTS if summary["failures"] else 0


def _single(args, predictor, out_dir) -> int:
    from seg.data.io import ImageReadError
    from seg.inference.visualize import predict_one

    try:
        result = predict_one(predictor, args.image_path, out_dir, args.mask_path, args.save_overlay,
                             args.save_probability or args.show_probability)
    except ImageReadError as exc:
        print(f"seg predict: {exc}", file=sys.stderr)
        return EXIT_FAILED_INPUTS
    print(f"foreground fraction {result['foreground']:.4f}; wrote {', '.join(result['outputs'])}")
    if result["metrics"]:
        print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    return 0


def _cohort(args, predictor, out_dir) -> int:
    from seg.dist import prediction_worker, read_dist_env
    from seg.inference.inputs import build_units
    from seg.inference.runner import CohortRun, RunOptions

    try:
        worker, num_workers = prediction_worker(args.part, args.num_parts)
    except RuntimeError as exc:  # a half-set torchrun or Slurm environment
        raise ValueError(str(exc)) from None
    units = build_units(args.image_dir, args.list_path, args.shards, args.unit_size, exclude=str(out_dir))
    opts = RunOptions(out_dir=out_dir, fmt=args.format, overlay=args.save_overlay,
                      probability=args.save_probability or args.show_probability,
                      loader_workers=args.num_workers, writer_threads=args.writer_threads,
                      overwrite=args.overwrite, progress=not args.no_progress, position=read_dist_env().local_rank,
                      compile=args.compile)
    s = CohortRun(predictor, units, worker, num_workers, opts).run()
    first = (f"; first batch in the model {s['first_batch_start_s']:.2f} s after start, done at "
             f"{s['first_batch_s']:.2f} s") if s["first_batch_s"] is not None else ""
    if s["steady_images_per_s"] is not None:
        first += f", then {s['steady_images_per_s']:.2f} images/s"
    print(f"worker {worker + 1}/{num_workers}: {s['images']} images, {s['failures']} failures, {s['seconds']:.1f} s, "
          f"{s['images_per_s']:.2f} images/s ({s['units']} units done, {s['skipped_units']} already finished){first}",
          flush=True)
    if s["failures"]:
        print(f"{s['failures']} inputs could not be read; see {out_dir / 'failures.jsonl'}", file=sys.stderr)
        return EXIT_FAILED_INPUTS
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see the docstring
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarize:
        return _summarize(args)
    if not args.model_path:
        parser.error("--model_path is required (or --summarize OUT)")
    if args.mask_path and not args.image_path:
        parser.error("--mask_path goes with --image_path (one image and its ground truth)")
    from pathlib import Path

    from seg.checkpoint import CheckpointError
    from seg.inference.engine import Predictor
    from seg.inference.manifest import ManifestError

    out_dir = Path(args.output_dir)
    try:
        if not args.image_path and not (args.image_dir or args.list_path or args.shards):
            raise ValueError("give one input: --image_dir, --list, --shards or --image_path")
        predictor = Predictor(args.model_path, device=args.device, precision=args.precision,
                              batch_size=args.batch_size, tta=args.tta, tile_size=args.tile_size,
                              tile_overlap=args.tile_overlap, threshold=args.threshold)
        print(f"seg predict: {predictor.describe()}", flush=True)
        if args.image_path:
            if args.image_dir or args.list_path or args.shards:
                raise ValueError("--image_path predicts one image; do not combine it with --image_dir/--list/--shards")
            out_dir.mkdir(parents=True, exist_ok=True)
            return _single(args, predictor, out_dir)
        return _cohort(args, predictor, out_dir)
    except (ValueError, CheckpointError, ManifestError) as exc:
        print(f"seg predict: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # no module teardown of torch at exit (0.5 s of every run, measured on 1,000 small images);
    # threads are joined and atexit handlers run first (see seg.train.exit_now)
    _code = main()
    from seg.train import exit_now

    exit_now(_code)
