"""Exact distributed validation: every validation sample scored once, metrics reduced once.

Design choices:

- Each rank scores only its share (``seg.training.loaders.val_loader``), with the unwrapped model
  in eval mode (no DDP hooks, so ranks with different sample counts never meet in a collective
  during the pass), under the same autocast as training.
- Per image it keeps the key, the TP/FP/FN/TN counts (``seg.metrics.confusion_counts``) and the
  loss of that image alone. One ``gather_object`` sends every rank's records to every rank;
  they go into a ``MetricAccumulator`` keyed by sample (a duplicate key counts once) and are
  reduced once. ``val_loss`` is the mean of the per-image losses over unique keys. All ranks
  end with the same report, so early stopping and the lr schedule agree without a broadcast.
- Rank 0 also returns a few samples (normalised image, mask, probability) for the plot.
- ``validate_models`` scores several models (the raw weights and their moving average) in one
  pass over the loader: the batches are read and transformed once, and a streaming loader
  cannot be replayed anyway.
"""

from __future__ import annotations

import numpy as np
import torch

from seg.metrics import MetricAccumulator, confusion_counts
from seg.training.accel import to_device


@torch.no_grad()
def score_batches(model, loader, loss_fn, accelerator, threshold: float, channels_last: bool,
                  keep_samples: int = 0) -> tuple[list[tuple[str, list[int], float]], list[dict], int]:
    """This rank's per-image records ``(key, [tp, fp, fn, tn], loss)``, up to ``keep_samples``
    samples, and the number of bad samples skipped (``data.skip_bad_samples``).

    ``model`` may be a list of models: then a list of ``(records, samples, skipped)``, one per
    model, from one pass over the loader.

    Shape:
        the loader yields ``(float32 (B, C, H, W), float32 (B, 1, H, W), keys, skipped (B,))``.
    """
    models = model if isinstance(model, (list, tuple)) else [model]
    out = [([], []) for _ in models]
    skipped_total = 0
    for images, masks, keys, skipped in loader:
        skipped_total += int(skipped.sum())
        images = to_device(images, accelerator.device, channels_last)
        masks = masks.to(accelerator.device, non_blocking=True)
        for m, (records, samples) in zip(models, out):
            with accelerator.autocast():
                logits = m(images)
            logits = logits.float()
            prob = torch.sigmoid(logits)
            counts = confusion_counts(prob, masks, threshold)
            losses = [float(loss_fn(logits[i:i + 1], masks[i:i + 1])) for i in range(len(keys))]
            records.extend((str(k), c.tolist(), l) for k, c, l in zip(keys, counts, losses))
            for i in range(min(len(keys), keep_samples - len(samples))):
                samples.append({"key": str(keys[i]), "image": images[i].float().cpu().numpy(),
                                "mask": masks[i, 0].cpu().numpy(), "prob": prob[i, 0].cpu().numpy()})
    results = [(records, samples, skipped_total) for records, samples in out]
    return results if isinstance(model, (list, tuple)) else results[0]


def merge_records(all_records: list[tuple[str, list[int], float]], threshold: float) -> tuple[dict, float]:
    """(metrics report, mean per-image loss) from the gathered records of every rank."""
    acc = MetricAccumulator(threshold)
    losses: dict[str, float] = {}
    for key, counts, loss in all_records:
        losses[key] = loss
        acc.update([key], np.asarray(counts, dtype=np.int64)[None])
    report = acc.summary()
    val_loss = float(np.mean(list(losses.values()))) if losses else float("nan")
    return report, val_loss


def validate(model, loader, loss_fn, accelerator, threshold: float, channels_last: bool,
             expected: int | None = None, keep_samples: int = 0) -> tuple[dict, float, list[dict]]:
    """Score the validation set once across all ranks (every rank must call it).

    Args:
        model: the (possibly DDP-wrapped) model; it is unwrapped and put in eval mode here.
        loader: this rank's share (``val_loader``).
        expected: the validation set size (dataset.json); scored + skipped images must equal it,
            else a sample was lost or scored twice.
        keep_samples: samples returned for the plot (rank 0's).
    Returns:
        ``(report, val_loss, samples)``: report as ``MetricAccumulator.summary()`` plus
        ``skipped`` (bad validation samples skipped, all ranks).
    """
    return validate_models([model], loader, loss_fn, accelerator, threshold, channels_last, expected,
                           keep_samples)[0]


def validate_models(models: list, loader, loss_fn, accelerator, threshold: float, channels_last: bool,
                    expected: int | None = None, keep_samples: int = 0) -> list[tuple[dict, float, list[dict]]]:
    """``validate`` for several models in one pass over ``loader``: one ``(report, val_loss, samples)`` each."""
    from accelerate.utils import gather_object

    inners = [accelerator.unwrap_model(m) for m in models]
    was_training = [m.training for m in inners]
    for m in inners:
        m.eval()
    try:
        scored = score_batches(inners, loader, loss_fn, accelerator, threshold, channels_last,
                               keep_samples if accelerator.is_main_process else 0)
    finally:
        for m, mode in zip(inners, was_training):
            m.train(mode)
    results = []
    for records, samples, skipped in scored:
        per_rank = gather_object([(records, skipped)]) if accelerator.num_processes > 1 else [(records, skipped)]
        report, val_loss = merge_records([r for recs, _ in per_rank for r in recs], threshold)
        report["skipped"] = sum(n for _, n in per_rank)
        if expected is not None and report["n_images"] + report["skipped"] != expected:
            raise RuntimeError(f"validation scored {report['n_images']} unique images (+{report['skipped']} skipped) "
                               f"but dataset.json lists {expected} (duplicate sample keys in the val shards, or shards "
                               "changed since `seg prepare`)")
        results.append((report, val_loss, samples))
    return results


def run_validation(cfg, model_path: str) -> dict:
    """Validate a model checkpoint on ``cfg.data.data_dir``'s val split with the training code path.

    Every rank must call it (torchrun / accelerate launch work as for training); the checkpoint's
    preprocessing is used. Rank 0 writes ``<checkpoint_dir>/validation.json``.
    Returns the report (with ``val_loss``) on every rank.
    """
    from dataclasses import replace
    from pathlib import Path

    from seg.checkpoint import load_model
    from seg.fileio import atomic_write_json
    from seg.losses import build_loss
    from seg.training import loaders
    from seg.training.accel import build_accelerator, prepare_model

    accelerator = build_accelerator(cfg)
    model, ckpt = load_model(model_path)
    p = ckpt["preprocess"]
    cfg = replace(cfg, data=replace(cfg.data, image_size=p["image_size"], in_channels=p["in_channels"],
                                    sampling=p.get("sampling", "resize")))
    spec = loaders.DataSpec(cfg)
    spec.mean, spec.std = list(p["mean"]), list(p["std"])
    model = prepare_model(accelerator, model, cfg.train.channels_last)
    loader = loaders.val_loader(cfg, spec, accelerator.process_index, accelerator.num_processes)
    loss_fn = build_loss(cfg.train.loss, cfg.train.bce_weight, cfg.train.dice_weight, cfg.train.dice_reduction)
    try:
        report, val_loss, _ = validate(model, loader, loss_fn, accelerator, float(ckpt.get("threshold", 0.5)),
                                       cfg.train.channels_last, expected=spec.n_val)
    except (ValueError, FileNotFoundError) as exc:  # a shard that breaks while read: exit code 1
        raise loaders.run_failed(exc) from exc
    report = {**report, "val_loss": val_loss, "model_path": str(model_path)}
    if accelerator.is_main_process:
        atomic_write_json(Path(cfg.train.checkpoint_dir) / "validation.json", report)
        print(f"validation of {model_path}: {report['n_images']} images, dice {report['global']['dice']:.4f}, "
              f"iou {report['global']['iou']:.4f}, val_loss {val_loss:.4f}")
    return report
