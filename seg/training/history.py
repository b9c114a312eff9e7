"""``history.csv``: one row per finished epoch, rewritten atomically after each epoch.

Design choices:

- Columns: ``epoch`` (1-based), ``train_loss``, ``val_loss``, every metric of
  ``seg.metrics.METRIC_NAMES`` computed over the pooled validation pixels (``global``;
  ``train.select_on`` says whether ``val_loss`` or ``dice`` picks ``best_model.pth`` and counts
  for early stopping), ``mean_dice`` (per-image average), ``lr``, ``seconds`` (the whole
  epoch, validation and checkpoints included), ``images_per_s`` (training images per second
  of the training steps, all ranks together), ``train_seconds`` (the training steps),
  ``data_seconds`` (rank 0's time waiting for the next batch, the data loader's share of
  ``train_seconds``) and ``skipped_samples`` (bad training and validation samples skipped in
  the epoch, all ranks; only with ``data.skip_bad_samples``, else a bad sample stops the run).
  With a weight average (``train.ema_decay``) the metric columns are the average's (they
  select the model) and ``raw_dice`` / ``raw_mean_dice`` / ``raw_val_loss`` are the raw
  weights'; empty otherwise.
- ``stability_warnings``: at the end of a run, a line for each validation curve that fell more
  than ``DROP_WARNING`` below its running best after the warm-up (the warm-up epochs or the
  first 20 % of the epochs, whichever is longer: the first epochs of any run jump about). A
  best model picked from a curve like that may be luck; the warning says so instead of
  letting ``best_model.pth`` hide it.
- The whole file is rewritten through ``seg.fileio`` after every epoch (a few hundred rows at
  most): a crash never leaves a half-written row, and on resume the rows of epochs that will
  run again are dropped, so every epoch is in the file exactly once.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from seg.fileio import atomic_write_text
from seg.metrics import METRIC_NAMES

HISTORY_FILE = "history.csv"
RAW_COLUMNS = ("raw_dice", "raw_mean_dice", "raw_val_loss")  # filled when a weight average is validated
COLUMNS = ("epoch", "train_loss", "val_loss", *METRIC_NAMES, "mean_dice", "lr", "seconds", "images_per_s",
           "train_seconds", "data_seconds", "skipped_samples", *RAW_COLUMNS)
DROP_WARNING = 0.1  # validation Dice this far below its running best after the warm-up is reported
SETTLING_FRACTION = 0.2  # the first epochs not checked for drops, unless the warm-up is longer


def read_history(run_dir: str | Path, before_epoch: int | None = None) -> list[dict]:
    """Rows of ``history.csv`` as dicts of floats (``epoch`` as int), oldest first.

    Args:
        run_dir: the run folder.
        before_epoch: keep only rows with ``epoch <= before_epoch`` (1-based count of finished epochs).
    """
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {k: (int(v) if k == "epoch" else float(v)) for k, v in raw.items() if k in COLUMNS and v != ""}
            if before_epoch is None or row["epoch"] <= before_epoch:
                rows.append(row)
    return rows


def write_history(run_dir: str | Path, rows: list[dict]) -> None:
    """Write every row (missing columns left empty) to ``history.csv`` atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(Path(run_dir) / HISTORY_FILE, buffer.getvalue())


def epoch_row(epoch: int, train_loss: float, val_loss: float, report: dict, lr: float,
              seconds: float, images: int, train_seconds: float | None = None, data_seconds: float = 0.0,
              skipped: int = 0, raw_report: tuple[dict, float] | None = None) -> dict:
    """One history row from a validation report (``MetricAccumulator.summary()``).

    Args:
        seconds: the whole epoch; train_seconds: its training steps (default: ``seconds``);
        images: training images of the epoch, all ranks; data_seconds: time spent waiting for batches;
        skipped: bad samples skipped in the epoch.
        raw_report: ``(report, val_loss)`` of the raw weights when ``report`` is the weight average's.
    """
    train_seconds = seconds if train_seconds is None else train_seconds
    raw = {} if raw_report is None else {"raw_dice": raw_report[0]["global"]["dice"],
                                         "raw_mean_dice": raw_report[0]["mean"]["dice"], "raw_val_loss": raw_report[1]}
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        **{m: report["global"][m] for m in METRIC_NAMES},
        "mean_dice": report["mean"]["dice"],
        "lr": lr,
        "seconds": seconds,
        "images_per_s": images / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": train_seconds,
        "data_seconds": data_seconds,
        "skipped_samples": skipped,
        **raw,
    }


def largest_drop(values: list[float], start: int) -> tuple[float, int]:
    """(largest running-best-minus-value over the entries from index ``start`` on, its 1-based index).

    Returns ``(0.0, 0)`` when no entry there is below the running best.
    """
    best, drop, where = float("-inf"), 0.0, 0
    for i, v in enumerate(values):
        best = max(best, v)
        if i >= start and best - v > drop:
            drop, where = best - v, i + 1
    return drop, where


def stability_warnings(rows: list[dict], epochs: int, warmup_epochs: float = 0.0,
                       threshold: float = DROP_WARNING) -> list[str]:
    """Lines about validation Dice curves that fell more than ``threshold`` below their best.

    The curve that selects the model (``dice``) gets a ``warning:``. With a weight average the
    raw weights' curve (``raw_dice``) is reported as a ``note:`` when the average stayed steady
    (the average did its job; the raw swings say the learning rate is high), and as a warning
    alongside when both fell.

    Args:
        rows: the run's history rows (epoch order).
        epochs: the planned number of epochs (the settling period is a fraction of it).
        warmup_epochs: epochs of lr warm-up; drops are checked after it and after
            ``SETTLING_FRACTION`` of ``epochs``, whichever is later.
    """
    import math

    start = max(math.ceil(warmup_epochs), math.ceil(SETTLING_FRACTION * epochs))
    out, selected_fell = [], False
    for key, name in (("dice", "validation Dice"), ("raw_dice", "validation Dice of the raw weights")):
        values = [r[key] for r in rows if key in r]
        if len(values) != len(rows) or not values:
            continue
        drop, where = largest_drop(values, start)
        if drop <= threshold:
            continue
        fell = (f"{name} fell to {values[where - 1]:.4f} at epoch {rows[where - 1]['epoch']}, {drop:.3f} below "
                f"its best so far ({max(values[:where]):.4f}), after the first {start} epochs")
        if key == "dice" or selected_fell:
            selected_fell = True
            out.append(f"warning: {fell}: training is unstable and the best epoch may be luck (see history.csv and "
                       "training_history.png; train.ema_decay, train.warmup_epochs, a lower train.lr or "
                       "model.norm=group steady it)")
        else:
            out.append(f"note: {fell}; the weight average, which is validated and saved, stayed within "
                       f"{threshold:g} of its best")
    return out


def summary_line(row: dict, epochs: int, best: bool) -> str:
    """The one log line printed per epoch."""
    skipped = int(row.get("skipped_samples") or 0)
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"dice {row['dice']:.4f}  iou {row['iou']:.4f}  lr {row['lr']:.3g}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:.2f} img/s"
            + (f"  skipped {skipped} bad samples" if skipped else "") + ("  (best)" if best else ""))
