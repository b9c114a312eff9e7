"""End of training: the threshold and mask post-processing of ``best_model.pth``, chosen on the
validation set (``train.tune_postprocessing``), so that ``seg predict`` applies them by default.

Why: a model trained with soft Dice and a weight average can be calibrated away from 0.5. On the
MNI152 grey-matter ribbon (``tools/bench/accuracy_bench.py``) the default recipe's probabilities
ran high on the thin structure: per-image test Dice 0.784 at 0.5 and 0.843 at the validation's
choice of 0.7, on three of three runs. nnU-Net chooses its post-processing on validation for the
same reason. A run that already holds its validation set should not need a second command.

Design choices:

- It is ``seg evaluate --model_path best_model.pth --data_dir <shards> --tune_postprocessing``
  done in the training process: the validation images are predicted as ``seg predict`` would
  (``seg.inference.engine.Predictor``, the checkpoint's preprocessing, probabilities at each
  image's own size, default precision on the training device) and scored against their masks
  at full resolution; ``seg.evaluation.tuning.tune_and_save`` chooses over the same candidates
  (thresholds 0.10 ... 0.90 and the configured one, hole filling, minimum component sizes,
  largest-K), with the same objective (per-image mean Dice) and the same rule: candidates
  simplest first (bare masks at each threshold before any component rule), each must beat the
  best so far by 0.001.
- Not the training loop's own validation pass: that scores images resized to
  ``data.image_size``, where a threshold is chosen on blurred edges and a size in pixels means
  something else. Chosen there, white matter's threshold went 0.5 -> 0.45 for +0.002 Dice on
  128 px validation images and lost 0.017 per-image Dice on the test slices; chosen at full
  resolution, 0.5 stays.
- Every rank predicts its share of the images and keeps ``image_stats`` (a few numbers per
  component); rank 0 gathers them, chooses and rewrites ``best_model.pth`` atomically with
  ``threshold``, ``postprocess`` and ``postprocess_tuning`` (with ``chosen_by: seg train``);
  the weights are not touched. ``final_model.pth`` and the periodic checkpoints keep the
  configured threshold: the choice is for the weights it was made on. A hard link that
  ``best_model.pth`` shared with them is replaced by its own file.
- Two candidates (``train.select_on=both``, the default): ``best_model.pth`` (the epoch with
  the highest validation Dice in the training loop) and ``best_loss_model.pth`` (the lowest
  validation loss), when they hold different epochs. Each gets its own choice; the one with the
  higher per-image mean Dice becomes ``best_model.pth`` (a tie keeps the Dice epoch), with a
  ``selection`` entry naming both candidates, their epochs and scores. Nothing is written
  before the end, so a crash while choosing leaves both candidates as they were and the rerun
  chooses again. Why: the training loop's Dice at 0.5 on images resized to ``data.image_size``
  levels off early, and its best epoch is then chosen by noise; the loss keeps falling. Neither
  proxy was right on every kind of image (``seg.training.loop``); the objective this step uses
  anyway is the one that decides.
- An error while choosing (an unreadable validation sample, say) does not fail a run whose
  training is done: every rank reports it, rank 0 logs it with the command that makes the
  choice later, and ``best_model.pth`` keeps the configured threshold.
- Crash safety: the run is marked finished before this step, and a rerun of a finished run
  whose ``best_model.pth`` lacks ``postprocess_tuning`` makes the choice then, so a crash here
  loses only the seconds of one prediction pass over the validation set.
"""

from __future__ import annotations

from pathlib import Path

from seg.checkpoint import load_checkpoint
from seg.postprocess import PostProcess, image_stats
from seg.training.checkpoints import BEST, BEST_LOSS


def needs_tuning(run_dir: Path) -> bool:
    """True when ``best_model.pth`` exists and carries no choice yet."""
    path = Path(run_dir) / BEST
    return path.is_file() and "postprocess_tuning" not in load_checkpoint(path)


def _stats_of_share(cfg, accelerator, path: Path) -> tuple[dict[str, dict], dict]:
    """``image_stats`` of this rank's validation images (by sample key), and the loaded checkpoint."""
    from seg.config.inference import InferenceConfig
    from seg.evaluation.run import batched
    from seg.evaluation.sources import LabelledImages
    from seg.evaluation.tuning import thresholds_for
    from seg.inference.engine import Predictor
    from seg.progress import progress_bar

    predictor = Predictor(path, InferenceConfig(device=str(accelerator.device)))
    thresholds = thresholds_for(predictor.threshold)
    source = LabelledImages(cfg.data.data_dir, "val")
    rank, world = accelerator.process_index, accelerator.num_processes
    stats = {}
    with progress_bar(total=source.count_for(rank, world), desc="choosing the threshold on validation", unit="img",
                      disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True) as bar:
        for batch in batched(source.assigned(rank, world, max(1, cfg.data.num_workers)), predictor.batch_size):
            for item, prob in zip(batch, predictor.predict_probabilities([item.image for item in batch])):
                stats[item.key] = image_stats(prob, item.truth, thresholds)
            bar.update(len(batch))
    return stats, predictor.checkpoint


def _candidates(run_dir: Path) -> list[Path]:
    """``best_model.pth``, and ``best_loss_model.pth`` when it holds another epoch (``train.select_on=both``)."""
    best, loss = run_dir / BEST, run_dir / BEST_LOSS
    if loss.is_file() and load_checkpoint(loss).get("epoch") != load_checkpoint(best).get("epoch"):
        return [best, loss]
    return [best]


def tune_best_model(cfg, accelerator, run_dir: Path, log) -> dict | None:
    """Choose and store the threshold and post-processing of ``run_dir/best_model.pth``; with a
    lowest-loss candidate (``best_loss_model.pth``, another epoch), choose for both and make the
    one with the higher validation Dice ``best_model.pth``.

    Every rank must call it. ``log`` is ``print``-like and called on rank 0.

    Returns:
        on rank 0 the choice (``seg.evaluation.tuning.choose_entry``'s entry, of the kept
        candidate); None on other ranks and when nothing was chosen (an error, logged).
    """
    from accelerate.utils import gather_object

    from seg.evaluation.tuning import choose_entry, save_tuned

    run_dir = Path(run_dir)
    path = run_dir / BEST
    accelerator.wait_for_everyone()  # rank 0 wrote best_model.pth
    scored, errors = [], []
    for candidate in _candidates(run_dir):
        stats, checkpoint, error = {}, {}, None
        try:
            stats, checkpoint = _stats_of_share(cfg, accelerator, candidate)
        except Exception as exc:  # noqa: BLE001 - raised on one rank, the others would wait in the gather
            error = f"rank {accelerator.process_index}: {type(exc).__name__}: {exc}"
        shares = gather_object([(stats, error)]) if accelerator.num_processes > 1 else [(stats, error)]
        errors += [e for _, e in shares if e]
        scored.append((candidate, checkpoint, {k: s for share, _ in shares for k, s in share.items()}))
    entry = None
    if accelerator.is_main_process:
        threshold = float(scored[0][1].get("threshold", cfg.train.threshold))
        if errors or not scored[0][2]:
            log(f"{path}: threshold and post-processing not chosen ({'; '.join(errors) or 'no validation images'}); "
                f"it keeps threshold {threshold:g}. To choose them later, rerun this seg train command, or: "
                f"seg evaluate --model_path {path} --data_dir {cfg.data.data_dir} --tune_postprocessing")
        else:
            entries = [choose_entry(stats, float(ckpt.get("threshold", threshold))) for _, ckpt, stats in scored]
            kept = max(range(len(entries)), key=lambda i: (entries[i]["dice"], -i))  # a tie keeps best_model.pth
            entry = entries[kept]
            extra = {}
            if len(scored) > 1:
                extra["selection"] = {"select_on": cfg.train.select_on, "kept": scored[kept][0].name, "candidates": [
                    {"file": p.name, "epoch": ckpt.get("epoch"), "dice": e["dice"], "threshold": e["threshold"]}
                    for (p, ckpt, _), e in zip(scored, entries)]}
                log("best_model.pth: " + ", ".join(
                    f"{c['file']} (epoch {c['epoch']}) {c['dice']:.4f}" for c in extra["selection"]["candidates"])
                    + f" per-image mean Dice on the validation images at full size; kept {scored[kept][0].name}")
            save_tuned(scored[kept][1], entry, path, "seg train", **extra)
            steps = PostProcess.from_dict(entry["postprocess"]).describe()
            log(f"{path.name}: threshold {entry['threshold']:g}, post-processing {steps}; "
                f"chosen on {entry['n_images']} validation images at full size (per-image mean Dice "
                f"{entry['baseline_dice']:.4f} at {threshold:g} -> {entry['dice']:.4f}). seg predict applies them "
                "unless given --threshold or --postprocess none")
    accelerator.wait_for_everyone()  # the new file is in place before any rank returns
    return entry
