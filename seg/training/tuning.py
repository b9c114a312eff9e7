"""End of training: the threshold and mask post-processing of ``best_model.pth``, chosen on the
validation set (``train.tune_postprocessing``), so that ``seg predict`` applies them by default.

Why: a model trained with soft Dice and a weight average can be calibrated away from 0.5. On the
MNI152 grey-matter ribbon (``tools/bench/accuracy_bench.py``) the default recipe's probabilities
ran high on the thin structure: per-image test Dice 0.784 at 0.5, 0.843 at the validation's
choice of 0.7, on three of three runs. nnU-Net chooses its post-processing on validation for
the same reason. A run that already knows its validation set should not need a second command.

Design choices:

- The choice is ``seg.postprocess.choose_postprocessing`` over the same candidates as
  ``seg evaluate --tune_postprocessing`` (thresholds 0.10 ... 0.90 and the configured one; hole
  filling; largest-K), with the same objective (per-image mean Dice) and the same rule that a
  candidate must beat a simpler one by 0.001, so an easy validation set keeps threshold 0.5
  and no post-processing.
- Minimum component sizes are tried only with ``data.sampling=patch``, where validation images
  are scored at their own resolution. With ``resize`` they are scored at ``data.image_size``
  while prediction writes masks at each image's size, so a size in pixels chosen here would
  mean something else there; ``seg evaluate --tune_postprocessing`` chooses sizes at the
  images' resolution.
- Every rank scores its share of the validation images with the weights of ``best_model.pth``
  (read from the file rank 0 wrote, so every rank holds the very weights the choice is for)
  and keeps ``image_stats`` (a few numbers per component); rank 0 gathers them and chooses.
- ``best_model.pth`` is rewritten atomically with ``threshold``, ``postprocess`` and
  ``postprocess_tuning`` (the choice, its validation Dice and the Dice at the configured
  threshold); the weights are not touched. ``final_model.pth`` and the periodic checkpoints keep
  the configured threshold: the choice is for the weights it was made on. A hard link that
  ``best_model.pth`` shared with them is replaced by its own file.
- Crash safety: the run is marked finished before this step, and a rerun of a finished run
  whose ``best_model.pth`` lacks ``postprocess_tuning`` does the step then, so a crash here
  loses nothing but the seconds of one validation pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seg.checkpoint import load_checkpoint, load_model, save_checkpoint
from seg.postprocess import KEEP_LARGEST, MIN_SIZES, THRESHOLDS, choose_postprocessing, image_stats
from seg.training.accel import to_device

BEST = "best_model.pth"
OBJECTIVE = "mean"


def needs_tuning(run_dir: Path) -> bool:
    """True when ``best_model.pth`` exists and carries no tuning yet."""
    path = Path(run_dir) / BEST
    return path.is_file() and "postprocess_tuning" not in load_checkpoint(path)


@torch.no_grad()
def _stats_of_share(model, loader, accelerator, thresholds) -> tuple[dict[str, dict], int]:
    """``image_stats`` of this rank's validation images, by sample key; and the bad samples skipped."""
    stats, skipped = {}, 0
    for images, masks, keys, bad in loader:
        skipped += int(bad.sum())
        with accelerator.autocast():
            logits = model(to_device(images, accelerator.device, False))
        prob = torch.sigmoid(logits.float()).cpu().numpy()
        truth = masks.numpy() > 0.5
        for i, key in enumerate(keys):
            stats[str(key)] = image_stats(prob[i, 0], truth[i, 0], thresholds)
    return stats, skipped


def tune_best_model(cfg, spec, accelerator, run_dir: Path, log) -> dict | None:
    """Choose and store the post-processing of ``run_dir/best_model.pth`` (every rank must call it).

    Args:
        spec: the run's ``seg.training.loaders.DataSpec`` (shards and normalisation).
        log: ``print``-like, called on rank 0 with the outcome.
    Returns:
        on rank 0 the stored ``postprocess_tuning`` entry, None elsewhere or when there was
        nothing to tune (no validation images).
    """
    from accelerate.utils import gather_object

    from seg.training import loaders

    run_dir = Path(run_dir)
    path = run_dir / BEST
    accelerator.wait_for_everyone()  # rank 0 wrote best_model.pth
    if spec.n_val == 0:
        return None
    model, ckpt = load_model(path)
    model.to(accelerator.device)
    configured = float(ckpt.get("threshold", cfg.train.threshold))
    thresholds = tuple(sorted(set(map(float, THRESHOLDS)) | {configured}))
    loader = loaders.val_loader(cfg, spec, accelerator.process_index, accelerator.num_processes)
    stats, skipped = _stats_of_share(model, loader, accelerator, thresholds)
    shares = gather_object([(stats, skipped)]) if accelerator.num_processes > 1 else [(stats, skipped)]
    entry = None
    if accelerator.is_main_process:
        merged = {k: s for share, _ in shares for k, s in share.items()}
        if merged:
            min_sizes = MIN_SIZES if cfg.data.sampling == "patch" else (0,)
            choice = choose_postprocessing([merged[k] for k in sorted(merged)], thresholds, min_sizes, KEEP_LARGEST,
                                           objective=OBJECTIVE, default_threshold=configured)
            entry = {"threshold": float(choice["threshold"]), "postprocess": choice["postprocess"].to_dict(),
                     "dice": float(choice["dice"]), "baseline_dice": float(choice["baseline_dice"]),
                     "objective": OBJECTIVE, "n_images": int(choice["n_images"]), "chosen_by": "seg train"}
            save_checkpoint({**ckpt, "threshold": entry["threshold"], "postprocess": entry["postprocess"],
                             "postprocess_tuning": dict(entry)}, path)
            log(f"{path.name}: threshold {entry['threshold']:g}, post-processing "
                f"{choice['postprocess'].describe()}, chosen on {entry['n_images']} validation images "
                f"(per-image mean Dice {entry['baseline_dice']:.4f} at {configured:g} -> {entry['dice']:.4f}); "
                f"seg predict applies them unless --threshold or --postprocess none is given")
        skipped_total = sum(n for _, n in shares)
        if skipped_total:
            log(f"post-processing choice: {skipped_total} unreadable validation samples skipped")
    accelerator.wait_for_everyone()  # the tuned file is in place before any rank returns
    return entry
